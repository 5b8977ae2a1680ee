"""One vLLM engine per actor, shared by the vLLM captioner and the vLLM rewriter.

vLLM on PyPI is CUDA-only and pins its own torch and transformers, so it is an optional
extra (``pip install 'curate[vllm]'``): :func:`import_vllm` imports it only when a pipeline
chooses ``backend: vllm``, and a missing install names the extra and the section that
asked for it. :func:`open_llm` builds the engine from a section's load options and its
resources' engine sizing (``tensor_parallel_size``, ``gpu_memory_utilization``,
``max_num_seqs``, ``enforce_eager``), safetensors only unless pickled weights are allowed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from curate.models.base import LoadOptions, load_error

VLLM_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class MissingExtraError(ImportError):
    """An optional dependency chosen in the pipeline file is not installed."""


@dataclass(frozen=True)
class VLLMEngineSettings:
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_model_len: int | None = None
    enforce_eager: bool = False

    @classmethod
    def of(cls, resources: Any, max_model_len: int | None = None) -> VLLMEngineSettings:
        """The sizing a section's ``resources`` (an ``EngineResources``) give."""
        return cls(
            tensor_parallel_size=resources.tensor_parallel_size,
            gpu_memory_utilization=resources.gpu_memory_utilization,
            max_num_seqs=resources.max_num_seqs,
            max_model_len=max_model_len,
            enforce_eager=resources.enforce_eager,
        )


def import_vllm(section: str) -> Any:
    """``import vllm`` on demand; a missing install names the extra and ``section``."""
    try:
        import vllm
    except ImportError as exc:
        raise MissingExtraError(
            f"{section}.backend 'vllm' needs vLLM, which is not installed here: "
            "pip install 'curate[vllm]' on GPU machines (vLLM on PyPI is CUDA-only), "
            f"or use {section}.backend: transformers"
        ) from exc
    return vllm


def open_llm(
    vllm: Any,
    model: str,
    load: LoadOptions,
    engine: VLLMEngineSettings,
    dtype: str,
    seed: int,
    role: str,
    **extra: Any,
) -> Any:
    """``vllm.LLM`` for ``model`` (a resolved path or hub id); a failure names ``role`` and the model."""
    if dtype not in VLLM_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (expected one of {sorted(VLLM_DTYPES)})")
    kw = {
        "model": model,
        "revision": load.revision,
        "trust_remote_code": load.trust_remote_code,
        "tensor_parallel_size": engine.tensor_parallel_size,
        "gpu_memory_utilization": engine.gpu_memory_utilization,
        "max_num_seqs": engine.max_num_seqs,
        "dtype": VLLM_DTYPES[dtype],
        "seed": seed,
        "enforce_eager": engine.enforce_eager,
        **extra,
    }
    if engine.max_model_len is not None:
        kw["max_model_len"] = engine.max_model_len
    if not load.allow_pickle_weights:
        kw["load_format"] = "safetensors"
    try:
        return vllm.LLM(**kw)
    except Exception as exc:
        raise load_error(f"{role} (vllm)", load, exc) from exc
