from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from curate.models import CLIP_SCORE, ITM_SCORE
from curate.models.base import DeviceError, LoadOptions, resolve_device, resolve_dtype
from curate.models.captioner import Captioner, GenerationSettings, HFCaptioner, open_captioner
from curate.models.clip import ClipRanker
from curate.models.itm import ITMFilter
from curate.models.scorer import BridgeScorer, open_scorer
from tests.helpers import noise_image

REPO = Path(__file__).resolve().parents[2]
BRIDGE_FILTER = REPO / "pipelines" / "models" / "bridge-filter"


def flat(nested: list[list[float]]) -> list[float]:
    return [x for xs in nested for x in xs]


no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny models: intra-op threads only add contention (10x slower on a busy 2-core box)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SEEDS = [11, 12, 13]  # one per image of ``images``


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [noise_image(40, 30, seed=1), noise_image(24, 48, seed=2), noise_image(32, 32, seed=3)]


@pytest.fixture(scope="module")
def loaded_captioner(tiny_models) -> Captioner:
    model = open_captioner(LoadOptions(str(tiny_models["captioner"])), GenerationSettings(), device="cpu")
    assert isinstance(model, HFCaptioner)  # a BLIP directory: the transformers implementation
    return model


@pytest.fixture
def captioner(loaded_captioner):
    """``captioner(**settings)``: the loaded model with other generation settings (no reload)."""

    def make(**settings) -> Captioner:
        settings.setdefault("max_new_tokens", 6)
        model = copy.copy(loaded_captioner)
        model.settings = GenerationSettings(**settings)
        return model

    return make


@pytest.fixture(scope="module")
def itm(tiny_models) -> ITMFilter:
    return ITMFilter(LoadOptions(str(tiny_models["itm"])), device="cpu", batch_size=3)


@pytest.fixture(scope="module")
def clip(tiny_models) -> ClipRanker:
    return ClipRanker(LoadOptions(str(tiny_models["clip"])), device="cpu", batch_size=3)


# -- captioner -----------------------------------------------------------------------------------


def test_nucleus_gives_num_captions_per_image(captioner, images):
    out = captioner(num_captions=4, dedupe=False)(images, seeds=SEEDS)
    assert len(out) == len(images)
    for caps in out:
        assert len(caps) == 4
        assert all(isinstance(c, str) and c and c == " ".join(c.split()) for c in caps)


def test_nucleus_with_dedupe_gives_unique_captions(captioner, images):
    out = captioner(num_captions=6)(images, seeds=SEEDS)
    for caps in out:
        assert 1 <= len(caps) <= 6
        assert len({c.lower() for c in caps}) == len(caps)


def test_dedupe_removes_identical_samples(captioner, images):
    # a vanishing top-p keeps only the most likely token: every sample is the same text
    deduped = captioner(num_captions=5, top_p=1e-6)(images[:1], seeds=[0])
    assert len(deduped[0]) == 1
    kept = captioner(num_captions=5, top_p=1e-6, dedupe=False)(images[:1], seeds=[0])
    assert kept[0] == deduped[0] * 5


def test_same_seed_same_captions_other_seed_other_captions(captioner, images):
    model = captioner(num_captions=3)
    first = model(images, seeds=[123, 124, 125])
    assert model(images, seeds=[123, 124, 125]) == first
    assert any(model(images, seeds=[s, s + 1, s + 2]) != first for s in (1, 2, 3))


def test_an_images_captions_depend_on_its_seed_only(captioner, images):
    """Not on the other images of its batch, nor on how many there are: each caption's draws
    come from its image's own generator (the step a batch-wide generator would be at differs)."""
    model = captioner(num_captions=3, dedupe=False)
    batched = model(images, seeds=[7, 8, 9])
    assert [model([img], seeds=[s])[0] for img, s in zip(images, [7, 8, 9])] == batched
    assert model(images[::-1], seeds=[9, 8, 7]) == batched[::-1]
    with pytest.raises(ValueError, match="2 seeds for 3 images"):
        model(images, seeds=[1, 2])


def test_seeded_sampling_with_a_one_token_nucleus_is_greedy(captioner, images):
    """The seeded sampler sits after transformers' temperature and top-p warpers: with a nucleus
    of one token, whatever the seeds, it writes what greedy generate() writes."""
    model = captioner(num_captions=2, top_p=1e-6, temperature=0.7, dedupe=False)
    greedy = model.tokenizer.batch_decode(
        model.model.generate(**model._inputs(images), max_new_tokens=6, do_sample=False),
        skip_special_tokens=True,
    )
    want = [[" ".join(t.split())] * 2 for t in greedy]
    assert model(images, seeds=[1, 2, 3]) == model(images, seeds=[4, 5, 6]) == want


def test_beam_search(captioner, images):
    model = captioner(decoding="beam", num_beams=3, num_captions=2, dedupe=False)
    out = model(images, seeds=SEEDS)
    assert [len(c) for c in out] == [2, 2, 2]
    assert model(images, seeds=[99, 98, 97]) == out  # deterministic: the seeds do not matter
    for caps in out:
        assert caps[0] != caps[1]  # distinct beams


def test_prompt_is_stripped_from_outputs(captioner, images):
    prompt = "A picture of"
    model = captioner(num_captions=3, prompt=prompt, dedupe=False)
    # BLIP's generate returns the prompt tokens followed by the continuation
    raw = model.tokenizer.batch_decode(
        model.model.generate(**model._inputs(images), **model._generate_kwargs(SEEDS, len(images))),
        skip_special_tokens=True,
    )
    assert all(r.lower().startswith(prompt.lower()) for r in raw)
    out = model(images, seeds=SEEDS)
    flat = [c for caps in out for c in caps]
    assert flat
    assert not any(c.lower().startswith(prompt.lower()) for c in flat)
    assert flat == [" ".join(r.split())[len(prompt) :].strip() for r in raw if r[len(prompt) :].strip()]


def test_bf16_on_cpu(tiny_models, images):
    model = open_captioner(
        LoadOptions(str(tiny_models["captioner"])),
        GenerationSettings(num_captions=2, max_new_tokens=6),
        device="cpu",
        dtype="bf16",
    )
    assert next(model.model.parameters()).dtype == torch.bfloat16
    out = model(images[:2], seeds=SEEDS[:2])
    assert len(out) == 2 and all(out)


def test_empty_batch(captioner):
    assert captioner(num_captions=2)([], seeds=[]) == []


@no_cuda
def test_cuda_without_cuda_is_a_device_error(tiny_models):
    with pytest.raises(DeviceError, match="sees no CUDA device"):
        open_captioner(LoadOptions(str(tiny_models["captioner"])), device="cuda")
    with pytest.raises(DeviceError, match="sees no CUDA device"):
        ITMFilter(LoadOptions(str(tiny_models["itm"])), device="cuda")
    with pytest.raises(DeviceError, match="sees no CUDA device"):
        ClipRanker(LoadOptions(str(tiny_models["clip"])), device="cuda")


def test_device_and_dtype_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device("tpu")
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(DeviceError, match="unknown dtype"):
        resolve_dtype("fp8", torch.device("cpu"))


# -- ITM filter ----------------------------------------------------------------------------------

TOL = 1e-6
TEXTS = [
    ["a red car on the street", "dog"],
    [],
    ["a small bird sitting in a tree near the water with a blue sky", "logo", "two people"],
]


def test_itm_probabilities_and_nesting(itm, images):
    scores = itm(images, TEXTS)[ITM_SCORE]
    assert [len(s) for s in scores] == [2, 0, 3]
    assert all(0.0 <= p <= 1.0 for s in scores for p in s)
    assert itm([], []) == {ITM_SCORE: []}
    assert itm(images[:1], [[]]) == {ITM_SCORE: [[]]}


@pytest.fixture(scope="module")
def sighted_itm_dir(tiny_models, tmp_path_factory):
    """The tiny ITM model with a vision tower that sees the image.

    BlipVisionConfig initialises its weights with std 1e-10, so the tiny BLIP models are
    nearly image-blind (scores differ by ~1e-7 between images): a test of which image
    goes with which text would pass vacuously. Re-initialise the vision embeddings.
    """
    from transformers import BlipForImageTextRetrieval

    src = tiny_models["itm"]
    dst = tmp_path_factory.mktemp("sighted") / "itm"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    model = BlipForImageTextRetrieval.from_pretrained(str(src))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        emb = model.vision_model.embeddings
        for param in (emb.patch_embedding.weight, emb.class_embedding, emb.position_embedding):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    model.save_pretrained(dst)
    return dst


@torch.inference_mode()
def test_itm_equals_blip_forward_with_itm_head(sighted_itm_dir, images):
    from transformers import BlipForImageTextRetrieval, BlipProcessor

    # batch_size 3: pairs of different images share a chunk, with padding
    itm = ITMFilter(LoadOptions(str(sighted_itm_dir)), device="cpu", batch_size=3)
    model = BlipForImageTextRetrieval.from_pretrained(str(sighted_itm_dir)).eval()
    processor = BlipProcessor.from_pretrained(str(sighted_itm_dir))
    texts = [*TEXTS, ["a red car on the street"]]
    imgs = [*images, images[1]]
    scores = itm(imgs, texts)[ITM_SCORE]
    # the check below can tell the images apart: a mix-up of pairs would show
    same_text = [scores[0][0], scores[3][0]]
    assert abs(same_text[0] - same_text[1]) > 20 * TOL
    for image, image_texts, got in zip(imgs, texts, scores):
        for text, p in zip(image_texts, got):
            inputs = processor(images=image, text=text, return_tensors="pt")
            logits = model(**inputs, use_itm_head=True).itm_score
            expected = torch.softmax(logits.float(), dim=-1)[0, 1].item()
            assert p == pytest.approx(expected, abs=TOL), text


def test_itm_scores_do_not_depend_on_batching(tiny_models, itm, images):
    one_by_one = ITMFilter(LoadOptions(str(tiny_models["itm"])), device="cpu", batch_size=1)
    expected = one_by_one(images, TEXTS)[ITM_SCORE]
    got = itm(images, TEXTS)[ITM_SCORE]
    assert [len(s) for s in got] == [len(s) for s in expected]
    assert flat(got) == pytest.approx(flat(expected), abs=1e-5)


# -- CLIP ranker ---------------------------------------------------------------------------------


@torch.inference_mode()
def test_clip_equals_manual_cosine_similarity(tiny_models, clip, images):
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    model = CLIPModel.from_pretrained(str(tiny_models["clip"])).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_models["clip"]))
    image_processor = CLIPImageProcessor.from_pretrained(str(tiny_models["clip"]))
    scores = clip(images, TEXTS)[CLIP_SCORE]
    assert [len(s) for s in scores] == [2, 0, 3]
    for image, texts, got in zip(images, TEXTS, scores):
        if not texts:
            continue
        out = model(
            **tokenizer(texts, padding=True, return_tensors="pt"),
            pixel_values=image_processor(images=image, return_tensors="pt")["pixel_values"],
        )
        image_embed = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
        text_embeds = out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True)
        expected = (text_embeds @ image_embed[0]).tolist()
        assert got == pytest.approx(expected, abs=1e-5)
        assert all(-1.0 <= s <= 1.0 for s in got)


def test_clip_edge_cases(clip, images):
    assert clip([], []) == {CLIP_SCORE: []}
    assert clip(images[:2], [[], []]) == {CLIP_SCORE: [[], []]}


# -- safe loading --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pickled_itm_dir(tiny_models, tmp_path_factory):
    """The tiny ITM model with only pytorch_model.bin (pickled) weights."""
    from transformers import BlipForImageTextRetrieval

    src = tiny_models["itm"]
    dst = tmp_path_factory.mktemp("pickled") / "itm"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    model = BlipForImageTextRetrieval.from_pretrained(str(src))
    torch.save(model.state_dict(), dst / "pytorch_model.bin")
    assert not list(dst.glob("*.safetensors"))
    return dst


def test_pickled_weights_are_refused_by_default(pickled_itm_dir):
    with pytest.raises(RuntimeError, match="safetensors") as info:
        ITMFilter(LoadOptions(str(pickled_itm_dir)), device="cpu")
    assert "allow_pickle_weights" in str(info.value)
    assert str(pickled_itm_dir) in str(info.value)


def test_pickled_weights_load_when_allowed(pickled_itm_dir, itm, images):
    allowed = ITMFilter(LoadOptions(str(pickled_itm_dir), allow_pickle_weights=True), device="cpu")
    assert flat(allowed(images, TEXTS)[ITM_SCORE]) == pytest.approx(
        flat(itm(images, TEXTS)[ITM_SCORE]), abs=1e-6
    )


def test_clip_ranker_falls_back_to_the_pil_image_processor(tiny_models, images, monkeypatch):
    import transformers

    expected = ClipRanker(LoadOptions(str(tiny_models["clip"])), device="cpu")(images[:2], [["a"], ["b c"]])
    expected = expected[CLIP_SCORE]

    def torchvision_only(*args, **kwargs):  # transformers 5.17 without torchvision (not installable here)
        raise ImportError("AutoImageProcessor requires the Torchvision library")

    monkeypatch.setattr(transformers.AutoImageProcessor, "from_pretrained", torchvision_only)
    ranker = ClipRanker(LoadOptions(str(tiny_models["clip"])), device="cpu")
    assert type(ranker.image_processor).__name__ == "CLIPImageProcessorPil"
    assert flat(ranker(images[:2], [["a"], ["b c"]])[CLIP_SCORE]) == pytest.approx(flat(expected))


# -- one loader per role -------------------------------------------------------------------------


def test_open_scorer_picks_the_implementation_by_model_type(tiny_models):
    assert type(open_scorer(LoadOptions(str(tiny_models["itm"])), (ITM_SCORE,), device="cpu")) is ITMFilter
    assert type(open_scorer(LoadOptions(str(tiny_models["clip"])), (CLIP_SCORE,), device="cpu")) is ClipRanker
    bridge = open_scorer(LoadOptions(str(BRIDGE_FILTER)), (ITM_SCORE, CLIP_SCORE), device="cpu")
    assert type(bridge) is BridgeScorer and bridge.fields == (ITM_SCORE, CLIP_SCORE)


def test_a_role_the_model_cannot_fill_is_a_clear_error(tiny_models):
    with pytest.raises(RuntimeError, match="ITM filter needs a BLIP retrieval model or a bridge filter"):
        open_scorer(LoadOptions(str(tiny_models["clip"])), (ITM_SCORE,), device="cpu")
    with pytest.raises(ValueError, match="in one pass needs a bridge filter"):
        open_scorer(LoadOptions(str(tiny_models["itm"])), (ITM_SCORE, CLIP_SCORE), device="cpu")
    with pytest.raises(RuntimeError, match="cannot load scorer from '/no/such/model'"):
        open_scorer(LoadOptions("/no/such/model"), (ITM_SCORE,), device="cpu")


def test_bridge_scorer_fused_scores_are_each_heads_own(images):
    """Asked for both fields, the bridge encodes each image and text once; the scores are
    what a scorer of each field alone gives."""
    texts = [["a red car", "a dog"], [], ["a bird in a tree", "a logo", "two people on a beach"]]
    load = LoadOptions(str(BRIDGE_FILTER))
    both = open_scorer(load, (ITM_SCORE, CLIP_SCORE), device="cpu", batch_size=2)(images, texts)
    for field in (ITM_SCORE, CLIP_SCORE):
        alone = open_scorer(load, (field,), device="cpu", batch_size=2)(images, texts)
        assert list(alone) == [field]
        assert [len(s) for s in both[field]] == [2, 0, 3]
        assert flat(both[field]) == pytest.approx(flat(alone[field]), abs=1e-5)
    assert len(set(flat(both[ITM_SCORE]))) > 1  # real scores, not one constant
