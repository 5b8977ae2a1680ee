"""The bridge captioner, its training entry point, CIDEr-D and the pipeline wrapper.

The frozen LM is a tiny random LlamaForCausalLM with a word-level tokenizer, built from
a config; the frozen image encoder is the real EfficientNet-Lite0 (a registry package).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from curate.models.base import LoadOptions
from curate.models.bridge import BridgeCaptionerConfig, BridgeCaptionerModel
from curate.models.bridge.captioner import caption_target
from curate.models.captioner import BridgeCaptioner, GenerationSettings, open_captioner
from tests.helpers import make_shard, noise_image, tiny_llama
from train.lib.cider import cider_d, cider_d_per_image, tokenize

pytest.importorskip("efficientnet_lite_pytorch", reason="frozen image encoder package not installed")

WORDS = "a an the picture of frog cat dog red blue green bird penguin sits on mat tux . ,".split()
CAPTIONS = ["A red frog.", "A blue bird.", "The cat sits on the mat.", "A green penguin.", "Tux.", "A dog."]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny models: intra-op threads only add contention on a busy 2-core box
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build_tiny_lm(path: Path) -> Path:
    """A 2-layer LlamaForCausalLM (hidden 32) with a word-level tokenizer over WORDS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<bos>", "<eos>", "<pad>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )
    lm = tiny_llama(len(vocab), bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=True)
    lm.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    return build_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    """Train and val tars in img2dataset layout: six noise images with captions over WORDS."""
    root = tmp_path_factory.mktemp("tiny_captions")
    samples = [
        {"key": f"{i:09d}", "image": noise_image(40, 32, seed=i), "format": "png", "txt": c, "json": {"i": i}}
        for i, c in enumerate(CAPTIONS)
    ]
    make_shard(root / "train" / "00000.tar", samples)
    make_shard(root / "val" / "00000.tar", samples[:3])
    return {"root": root, "train": root / "train" / "00000.tar", "val": root / "val" / "00000.tar"}


def tiny_config(tiny_lm: Path, **overrides) -> BridgeCaptionerConfig:
    kw = dict(
        language_model=str(tiny_lm),
        lm_hidden_size=32,
        hidden_size=32,
        num_queries=4,
        num_layers=1,
        num_heads=2,
        prompt="a picture of",
        max_caption_tokens=12,
    )
    kw.update(overrides)
    return BridgeCaptionerConfig(**kw)


def tiny_model(tiny_lm: Path, seed: int = 0, **overrides) -> BridgeCaptionerModel:
    torch.manual_seed(seed)
    return BridgeCaptionerModel(tiny_config(tiny_lm, **overrides)).eval()


def features(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 49, 1280, generator=torch.Generator().manual_seed(seed))


# -- model -----------------------------------------------------------------------------------------


def test_caption_target_joins_the_prompt_as_one_sentence():
    assert caption_target("A frog.", "A picture of") == " a frog."
    assert caption_target("The  cat sits.", "A picture of") == " the cat sits."
    assert caption_target("Tux and spider - two friends.", "A picture of") == " Tux and spider - two friends."
    assert caption_target("A frog.", "") == "A frog."


def test_save_load_round_trip_keeps_only_the_bridge_and_equal_outputs(tiny_lm, tmp_path):
    model = tiny_model(tiny_lm)
    feats = features()
    model.save_pretrained(tmp_path / "bridge")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "bridge" / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert keys == set(model.state_dict())
    assert not any(k.startswith(("model.", "lm_head", "embed")) for k in keys)  # no frozen LM inside
    config = json.loads((tmp_path / "bridge" / "config.json").read_text())
    assert config["model_type"] == "curate-bridge-captioner"

    loaded = BridgeCaptionerModel.from_pretrained(str(tmp_path / "bridge"), use_safetensors=True).eval()
    with torch.no_grad():
        assert torch.equal(model.bridge(feats), loaded.bridge(feats))
    kw = dict(num_captions=2, max_new_tokens=5, seed=3)
    assert model.generate_captions(feats, **kw) == loaded.generate_captions(feats, **kw)

    from transformers import AutoModel

    assert isinstance(AutoModel.from_pretrained(str(tmp_path / "bridge")), BridgeCaptionerModel)


def test_one_training_step_changes_the_bridge_not_the_frozen_lm(tiny_lm):
    model = tiny_model(tiny_lm).train()
    lm, _ = model.language_model()
    bridge_before = {k: v.clone() for k, v in model.state_dict().items()}
    lm_before = {k: v.clone() for k, v in lm.state_dict().items()}
    assert not any(p.requires_grad for p in lm.parameters())
    assert all(p.requires_grad for p in model.parameters())

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids, mask = model.tokenize_captions(CAPTIONS[:3])
    loss = model(features(), ids, mask).loss
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()

    for k, v in model.state_dict().items():
        assert not torch.equal(v, bridge_before[k]), f"bridge weight {k} did not move"
    for k, v in lm.state_dict().items():
        assert torch.equal(v, lm_before[k]), f"frozen LM weight {k} changed"
    assert all(p.grad is None for p in lm.parameters())


def test_loss_counts_caption_tokens_only(tiny_lm):
    """Padding never changes a caption's loss: a batch is the token-weighted mean of its rows."""
    model = tiny_model(tiny_lm)
    feats = features(2)
    caps = ["A red frog.", "The cat sits on the mat."]
    ids, mask = model.tokenize_captions(caps)
    assert mask.sum(1).tolist() == [5, 8]  # "a red frog ." / "the cat sits on the mat ." + EOS
    assert ids[0, 4] == 2 and ids[0, 5:].eq(3).all()  # EOS, then right-padded with <pad>
    with torch.no_grad():
        batch = model(feats, ids, mask)
        singles = [model(feats[i : i + 1], *model.tokenize_captions([c])) for i, c in enumerate(caps)]
    weighted = sum(float(s.loss) * int(s.num_tokens) for s in singles) / sum(
        int(s.num_tokens) for s in singles
    )
    assert float(batch.loss) == pytest.approx(weighted, rel=1e-5)


def test_generation_gives_num_captions_and_repeats_with_a_seed(tiny_lm):
    model = tiny_model(tiny_lm)
    feats = features(3)
    out = model.generate_captions(feats, num_captions=4, max_new_tokens=6, seed=0)
    assert len(out) == 3 and all(len(caps) == 4 for caps in out)
    assert all(isinstance(c, str) for caps in out for c in caps)
    assert model.generate_captions(feats, num_captions=4, max_new_tokens=6, seed=0) == out
    beams = model.generate_captions(feats, num_captions=2, do_sample=False, num_beams=3, max_new_tokens=4)
    assert [len(c) for c in beams] == [2, 2, 2]
    # PIL images go through the frozen EfficientNet-Lite0
    images = [noise_image(50, 40, seed=1), noise_image(30, 60, seed=2)]
    assert [len(c) for c in model.generate_captions(images, num_captions=2, max_new_tokens=4, seed=1)] == [
        2,
        2,
    ]
    assert model.generate_captions([], num_captions=2) == []


def test_wrong_language_model_width_fails_loudly(tiny_lm):
    model = tiny_model(tiny_lm, lm_hidden_size=48)
    with pytest.raises(ValueError, match="hidden size 32"):
        model.language_model()


def saved_filter(path: Path, seed: int = 5, **overrides) -> Path:
    """A tiny bridge filter (random weights, hubness banks of 8 rows) saved as train_filter saves one."""
    from curate.models.bridge import BridgeFilterConfig, BridgeFilterModel

    torch.manual_seed(seed)
    config = BridgeFilterConfig(hidden_size=16, num_layers=0, num_heads=2, hub_k=2, hub_bank=8, **overrides)
    model = BridgeFilterModel(config)
    model.set_hub_banks(*torch.nn.functional.normalize(torch.randn(2, 8, config.proj_dim), dim=-1))
    model.save_pretrained(path)
    return path


def itc_model(tiny_lm: Path, filter_dir: Path, tokens: int = 2) -> BridgeCaptionerModel:
    from safetensors.torch import load_file

    config = json.loads((filter_dir / "config.json").read_text())
    model = tiny_model(tiny_lm, image_resize="pad", itc_prefix_tokens=tokens, itc_filter=config)
    model.load_itc_filter(load_file(str(filter_dir / "model.safetensors")))
    return model


def test_itc_prefix_adds_the_held_filters_embedding_as_soft_prompt_tokens(tiny_lm, tmp_path):
    from curate.models.bridge import BridgeFilterModel

    filter_dir = saved_filter(tmp_path / "filter")
    model = itc_model(tiny_lm, filter_dir).train()
    held = BridgeFilterModel.from_pretrained(str(filter_dir), use_safetensors=True).eval()
    assert not model.itc.training  # frozen: no dropout while the bridge trains
    feats = features(3)
    soft = model.eval().bridge(feats)
    assert soft.shape == (3, 4 + 2, 32)  # the queries' tokens, then the ITC prefix's
    with torch.no_grad():
        expected = model.itc_proj(held.image_itc(feats)).view(3, 2, 32)
    torch.testing.assert_close(soft[:, 4:], expected)

    # a training step moves the bridge and the prefix's MLP, never the held filter
    model.train()
    before = {k: v.clone() for k, v in model.itc.state_dict().items()}
    ids, mask = model.tokenize_captions(CAPTIONS[:3])
    model(feats, ids, mask).loss.backward()
    assert all(p.grad is None for p in model.itc.parameters())
    assert all(p.grad is not None for n, p in model.named_parameters() if not n.startswith("itc."))
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    assert all(torch.equal(v, before[k]) for k, v in model.itc.state_dict().items())

    # saved with the filter's weights inside; loads and captions the same
    model.eval().save_pretrained(tmp_path / "cap")
    loaded = BridgeCaptionerModel.from_pretrained(str(tmp_path / "cap"), use_safetensors=True).eval()
    torch.testing.assert_close(loaded.bridge(feats), model.bridge(feats))
    kw = dict(num_captions=2, max_new_tokens=4, seed=1)
    assert loaded.generate_captions(feats, **kw) == model.generate_captions(feats, **kw)
    with pytest.raises(ValueError, match="squares images by 'crop', its ITC filter by 'pad'"):
        tiny_model(tiny_lm, itc_prefix_tokens=2, itc_filter=loaded.config.itc_filter)
    with pytest.raises(ValueError, match="needs itc_filter"):
        tiny_model(tiny_lm, image_resize="pad", itc_prefix_tokens=2)


# -- pipeline wrapper ------------------------------------------------------------------------------


def test_pipeline_captioner_loads_a_saved_bridge(tiny_lm, tmp_path):
    tiny_model(tiny_lm).save_pretrained(tmp_path / "bridge")
    images = [noise_image(50, 40, seed=1), noise_image(30, 60, seed=2)]
    settings = GenerationSettings(num_captions=3, max_new_tokens=5, dedupe=False)
    captioner = open_captioner(LoadOptions(str(tmp_path / "bridge")), settings, device="cpu")
    assert isinstance(captioner, BridgeCaptioner)
    out = captioner(images, seeds=[0, 1])
    assert len(out) == 2 and all(len(caps) <= 3 for caps in out)
    assert captioner(images, seeds=[0, 1]) == out
    assert captioner(images[1:], seeds=[1]) == out[1:]  # an image's captions: its seed's alone
    captioner.settings = GenerationSettings(num_captions=2, decoding="beam", num_beams=2, max_new_tokens=4)
    assert all(len(caps) <= 2 for caps in captioner(images))
    assert captioner([]) == []


# -- CIDEr-D ---------------------------------------------------------------------------------------


def test_cider_tokenizes_like_coco():
    assert tokenize("A Frog, (green)! Don't") == ["a", "frog", "green", "dont"]
    assert tokenize("guinea-fowl") == ["guinea", "fowl"]


def test_cider_identical_caption_scores_ten_and_unrelated_zero():
    refs = [["a b c d e"], ["f g h i j"]]
    assert cider_d_per_image(["a b c d e", "x y z"], refs) == pytest.approx([10.0, 0.0])
    assert cider_d(["a b c d e", "f g h i j"], refs) == pytest.approx(10.0)


def test_cider_known_small_example():
    """By hand: idf(a) = 0 (in both reference sets), idf(cat) = log 2, an unseen n-gram log 2 too.

    "a cat sits" vs "a cat": cosine 1/sqrt(2) for 1- and 2-grams, 0 for 3- and 4-grams;
    bigram counts 2 vs 1 -> penalty exp(-1/72); 10 * (2/sqrt(2)) / 4 * exp(-1/72).
    "a dog" vs "a dog": cosine 1 for 1- and 2-grams, nothing longer -> 10 * 2/4 = 5.
    """
    per_image = cider_d_per_image(["a cat sits", "A dog."], [["a cat"], ["a dog"]])
    first = 10 * (2 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
    assert per_image == pytest.approx([first, 5.0])
    assert first == pytest.approx(3.48677, abs=1e-5)
    # several references: similarities are averaged over them; "a" and "dog" occur in both
    # images' references, so their idf is 0 and "a dog" carries no weight at all
    assert cider_d_per_image(["a cat", "a dog"], [["a cat", "a dog"], ["a dog"]]) == pytest.approx([2.5, 0.0])


def test_cider_single_image_is_degenerate_and_inputs_are_checked():
    assert cider_d(["a cat"], [["a cat"]]) == 0.0  # idf of every n-gram is log(1/1)
    assert cider_d([], []) == 0.0
    with pytest.raises(ValueError):
        cider_d(["a"], [])
    with pytest.raises(ValueError):
        cider_d(["a", "b"], [["a"], []])


# -- training entry point --------------------------------------------------------------------------


def train_args(shards, tiny_lm, tmp_path, name: str, *extra: str) -> list[str]:
    return [
        "--train-shards", str(shards["train"]),
        "--val-shards", str(shards["val"]),
        "--cache-dir", str(tmp_path / "features"),
        "--output", str(tmp_path / name),
        "--run-dir", str(tmp_path / f"{name}.run"),
        "--language-model", str(tiny_lm),
        "--hidden-size", "32", "--num-heads", "2", "--num-layers", "1", "--num-queries", "4",
        "--prompt", "a picture of",
        "--batch-size", "2", "--warmup-steps", "1", "--lr", "1e-2",
        "--val-cider-samples", "3", "--max-new-tokens", "4",
        *extra,
    ]  # fmt: skip


def saved_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_training_is_repeatable_and_resumes_to_the_same_weights(shards, tiny_lm, tmp_path):
    from train.train_captioner import main

    common = ("--workers", "0", "--epochs", "2", "--save-dtype", "fp32")
    main(train_args(shards, tiny_lm, tmp_path, "a", *common))
    main(train_args(shards, tiny_lm, tmp_path, "b", *common))
    a, b = saved_weights(tmp_path / "a"), saved_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)

    lines = [json.loads(x) for x in (tmp_path / "a.run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["split"]) for r in lines] == [(1, "train"), (1, "val"), (2, "train"), (2, "val")]
    assert all(math.isfinite(r["loss"]) for r in lines)
    assert all(r["cider"] >= 0.0 for r in lines if r["split"] == "val")
    checkpoints = tmp_path / "b.run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch-0001.pt", "epoch-0002.pt"]

    # a run that died during epoch 2: --resume replays epoch 2 alone and lands on the same weights
    (checkpoints / "epoch-0002.pt").unlink()
    shutil.rmtree(tmp_path / "b")
    main(train_args(shards, tiny_lm, tmp_path, "b", *common, "--resume"))
    resumed = saved_weights(tmp_path / "b")
    assert all(torch.equal(a[k], resumed[k]) for k in a)
    lines = [json.loads(x) for x in (tmp_path / "b.run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 1, 2, 2, 2, 2]


def test_init_from_starts_at_the_saved_bridge_and_keeps_its_architecture(shards, tiny_lm, tmp_path):
    import json as _json

    from train.train_captioner import main

    common = ("--workers", "0", "--save-dtype", "fp32")
    main(train_args(shards, tiny_lm, tmp_path, "seed", *common, "--epochs", "1"))
    # a different --hidden-size on the command line: the saved bridge's architecture wins
    init = ("--init-from", str(tmp_path / "seed"))
    args = train_args(shards, tiny_lm, tmp_path, "ft", *common, "--epochs", "0", *init)
    args[args.index("--hidden-size") + 1] = "64"
    main(args)
    seed, ft = saved_weights(tmp_path / "seed"), saved_weights(tmp_path / "ft")
    assert seed.keys() == ft.keys() and all(torch.equal(seed[k], ft[k]) for k in seed)
    assert _json.loads((tmp_path / "ft" / "config.json").read_text())["hidden_size"] == 32

    # one epoch of fine-tuning moves the weights away from the start
    main(train_args(shards, tiny_lm, tmp_path, "ft2", *common, "--epochs", "1", *init))
    ft2 = saved_weights(tmp_path / "ft2")
    assert any(not torch.equal(seed[k], ft2[k]) for k in seed)

    with pytest.raises(FileNotFoundError, match=r"--init-from .*nowhere"):
        main(train_args(shards, tiny_lm, tmp_path, "bad", *common, "--init-from", str(tmp_path / "nowhere")))


def test_itc_from_trains_a_captioner_holding_the_filter_on_its_image_features(shards, tiny_lm, tmp_path):
    from safetensors.torch import load_file

    from train.train_captioner import main

    filter_dir = saved_filter(tmp_path / "filter")
    common = ("--workers", "0", "--save-dtype", "fp32", "--epochs", "1")
    main(train_args(shards, tiny_lm, tmp_path, "itc", *common, "--itc-from", str(filter_dir)))
    config = json.loads((tmp_path / "itc" / "config.json").read_text())
    assert config["itc_prefix_tokens"] == 4 and config["image_resize"] == "pad"  # the filter's
    assert config["itc_filter"]["model_type"] == "curate-bridge-filter"
    saved, held = saved_weights(tmp_path / "itc"), load_file(str(filter_dir / "model.safetensors"))
    held = {k: v for k, v in held.items() if not k.startswith("hub_")}  # the banks stay behind
    assert all(torch.equal(saved[f"itc.{k}"], v) for k, v in held.items())  # held, not trained
    assert not any(k.startswith("itc.hub_") for k in saved)
    # the features it trained on were the filter's (padded) ones: the cache holds those alone
    from train.lib.features import cache_key

    padded = {cache_key([str(shards[s])], None, 224, 48, 512, "pad") for s in ("train", "val")}
    assert {p.stem.removeprefix("features-") for p in (tmp_path / "features").glob("*.safetensors")} == padded

    # fine-tuning it keeps the held filter (it comes with the saved captioner)
    main(train_args(shards, tiny_lm, tmp_path, "itc2", *common, "--init-from", str(tmp_path / "itc")))
    again = saved_weights(tmp_path / "itc2")
    assert all(torch.equal(again[f"itc.{k}"], v) for k, v in held.items())
    itc = ("--itc-from", str(filter_dir))
    with pytest.raises(SystemExit):  # a filter squares images by pad: crop contradicts it
        main(train_args(shards, tiny_lm, tmp_path, "x", *common, *itc, "--image-resize", "crop"))
    with pytest.raises(SystemExit):
        main(train_args(shards, tiny_lm, tmp_path, "x", *common, "--itc-prefix-tokens", "2"))
    with pytest.raises(ValueError, match="not a curate-bridge-filter"):
        main(train_args(shards, tiny_lm, tmp_path, "x", *common, "--itc-from", str(tmp_path / "itc")))


def test_caption_source_trains_on_one_kind_of_kept_caption(tmp_path):
    """KALE stage 2 on a stage-1 run's curated shards: the kept KALE rewrite of each sample
    (KEY.json captions, best first), not KEY.txt; samples without one are left out."""
    from train.lib.data import iter_pairs
    from train.lib.features import cached_features

    def kept(*pairs):
        return [{"text": t, "source": s, "itm_score": 0.9, "clip_score": 0.3} for s, t in pairs]

    shard = make_shard(
        tmp_path / "00000.tar",
        [
            {
                "key": "a",
                "image": noise_image(40, 32, seed=1),
                "format": "png",
                "txt": "A frog.",
                "json": {"captions": kept(("alt", "A frog."), ("kale", "A  red frog."))},
            },
            {
                "key": "b",
                "image": noise_image(40, 32, seed=2),
                "format": "png",
                "txt": "a dog.",
                "json": {"captions": kept(("synthetic", "a dog."))},
            },
            {
                "key": "c",
                "image": noise_image(40, 32, seed=3),
                "format": "png",
                "txt": "A cat.",
                "json": {"captions": kept(("kale", "A cat on a mat."), ("kale", "A cat."))},
            },
        ],
    )
    assert [(p.key, p.caption) for p in iter_pairs([str(shard)])] == [
        ("a", "A frog."),
        ("b", "a dog."),
        ("c", "A cat."),
    ]
    assert [(p.key, p.caption) for p in iter_pairs([str(shard)], caption_source="kale")] == [
        ("a", "A red frog."),
        ("c", "A cat on a mat."),
    ]
    txt, txt_path = cached_features([str(shard)], tmp_path / "features")
    kale, kale_path = cached_features([str(shard)], tmp_path / "features", caption_source="kale")
    assert txt_path != kale_path  # the caption source is part of the cache key
    assert kale.captions == ["A red frog.", "A cat on a mat."] and len(txt) == 3


def test_evaluate_captioner_scores_a_saved_bridge(shards, tiny_lm, tmp_path):
    from train.lib.evaluation import evaluate_captioner

    tiny_model(tiny_lm).save_pretrained(tmp_path / "bridge")
    result = evaluate_captioner(
        str(tmp_path / "bridge"),
        [str(shards["train"])],
        4,
        "cpu",
        0,
        max_new_tokens=4,
        cache_dir=str(tmp_path / "features"),
        return_captions=True,
    )
    assert result["n"] == 4 and result["cider"] >= 0.0
    assert [r["reference"] for r in result["captions"]] == CAPTIONS[:4]


@pytest.mark.slow
def test_ray_train_with_two_cpu_workers(shards, tiny_lm, tmp_path):
    import ray

    from train.train_captioner import main

    if ray.is_initialized():
        ray.shutdown()  # launch() starts its own local Ray sized for the workers
    try:
        result = main(
            train_args(
                shards,
                tiny_lm,
                tmp_path,
                "ray",
                "--workers",
                "2",
                "--epochs",
                "1",
                "--max-steps-per-epoch",
                "1",
            )
        )
    finally:
        ray.shutdown()
    assert result["epoch"] == 1 and math.isfinite(result["train_loss"]) and "val_cider" in result
    loaded = BridgeCaptionerModel.from_pretrained(str(tmp_path / "ray"), use_safetensors=True)
    assert loaded.config.num_queries == 4
    lines = (tmp_path / "ray.run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["split"] for x in lines] == ["train", "val"]  # rank 0 alone writes
