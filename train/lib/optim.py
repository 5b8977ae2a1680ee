"""Optimisation pieces every training script shares: decay groups, the warm-up + cosine schedule, bf16."""

from __future__ import annotations

import logging
import math
from contextlib import AbstractContextManager

import torch

log = logging.getLogger("train.optim")

PRECISIONS = ("auto", "fp32", "bf16")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norms, biases, embeddings-like vectors and the temperature (ndim < 2)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and not name.endswith("image_pos") else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(step: int, warmup: int, total: int, floor: float = 0.0) -> float:
    """LR factor: linear warm-up over ``warmup`` steps, then cosine from 1 down to ``floor`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 on a CUDA device that computes it natively, else fp32; logs the choice.

    Not bf16 on a CPU by default: only CPUs with AVX512-BF16 or AMX compute it natively,
    and elsewhere torch emulates it, several times slower than fp32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "auto":
        chosen = "bf16" if cuda_bf16 else "fp32"
        log.info("precision=auto resolved to %s on %s", chosen, device)
        return chosen
    if precision == "bf16" and device.type == "cuda" and not cuda_bf16:
        raise ValueError(f"precision bf16 was requested but {torch.cuda.get_device_name(device)} lacks it")
    return precision


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """bf16 autocast of the forward pass (``bf16``), or a no-op (``fp32`` / ``none``)."""
    if precision not in ("none", "fp32", "bf16"):
        raise ValueError(f"precision must be none, fp32 or bf16, got {precision!r}")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
