"""Device, dtype and safe loading shared by the model wrappers."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from curate.config import ModelConfig

log = logging.getLogger("curate.models")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class DeviceError(RuntimeError):
    pass


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when this process sees a GPU and logs the choice; ``cuda`` without one fails."""
    if device == "auto":
        chosen = "cuda" if torch.cuda.is_available() else "cpu"
        log.info("device=auto resolved to %s in this actor", chosen)
        return torch.device(chosen)
    if device == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                "device 'cuda' was requested but this process sees no CUDA device; "
                "declare num_gpus > 0 for the stage so Ray places it on a GPU node, or use device: cpu"
            )
        return torch.device("cuda")
    if device == "cpu":
        return torch.device("cpu")
    raise DeviceError(f"unknown device {device!r} (expected auto, cpu or cuda)")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype not in DTYPES:
        raise DeviceError(f"unknown dtype {dtype!r} (expected one of {sorted(DTYPES)})")
    if dtype == "fp16" and device.type == "cpu":
        log.warning("fp16 on CPU is slow and poorly supported; consider bf16 or fp32")
    return DTYPES[dtype]


@dataclass(frozen=True)
class LoadOptions:
    """How to fetch weights: pinned revision, safetensors only, no remote code by default."""

    model: str
    revision: str | None = None
    trust_remote_code: bool = False
    allow_pickle_weights: bool = False

    @classmethod
    def of(cls, cfg: ModelConfig) -> LoadOptions:
        """What a pipeline's model section says about loading."""
        return cls(
            model=cfg.model,
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
            allow_pickle_weights=cfg.allow_pickle_weights,
        )

    def kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"trust_remote_code": self.trust_remote_code}
        if self.revision:
            kw["revision"] = self.revision
        return kw

    def model_kwargs(self) -> dict[str, Any]:
        kw = self.kwargs()
        if not self.allow_pickle_weights:
            kw["use_safetensors"] = True
        return kw


def load_error(what: str, opts: LoadOptions, exc: Exception) -> RuntimeError:
    hint = ""
    if "safetensors" in str(exc).lower() and not opts.allow_pickle_weights:
        hint = " (only safetensors weights are loaded; set allow_pickle_weights: true to accept .bin files)"
    return RuntimeError(f"cannot load {what} from {opts.model!r}: {type(exc).__name__}: {exc}{hint}")


def model_type(load: LoadOptions, what: str) -> str:
    """The ``model_type`` of ``load.model``'s config: what decides which implementation of a
    role (``what``) loads it. The bridge family's types are registered first."""
    import transformers

    import curate.models.bridge  # noqa: F401  (registers the bridge model types)

    try:
        return transformers.AutoConfig.from_pretrained(load.model, **load.kwargs()).model_type
    except Exception as exc:
        raise load_error(what, load, exc) from exc


def model_revision(model: Any) -> str | None:
    """The commit hash a hub model was loaded at, when known."""
    return getattr(getattr(model, "config", None), "_commit_hash", None)


def move(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    model = model.to(device=device, dtype=dtype)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def set_cpu_threads(num_threads: int | None) -> None:
    """torch's intra-op threads for this process; None keeps what Ray set (OMP_NUM_THREADS)."""
    if num_threads is not None and torch.get_num_threads() != num_threads:
        torch.set_num_threads(num_threads)
        log.info("torch CPU threads set to %d", num_threads)
