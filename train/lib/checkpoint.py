"""Checkpoints and the hyperparameter dataclasses they record.

- ``Hyperparams``: base for a script's ``@dataclass`` of hyperparameters: ``to_dict()``,
  ``from_dict(d)`` (unknown keys raise) and ``from_namespace(args)`` (takes the
  argparse fields whose names match; the rest is the script's business).
- ``trainable_state_dict(model)``: the state dict without parameters of fully frozen
  submodules (frozen backbones are loaded from their packages, never checkpointed).
- ``save_checkpoint(directory, index, model, optimizer, hparams, metrics, scheduler=None,
  unit="epoch", extra=None)`` writes ``directory/epoch-NNNN.pt`` (``unit="step"``:
  ``step-NNNNNNNN.pt``; temp name, then rename; keeps the newest ``keep``) and
  ``latest_checkpoint(directory, unit)`` finds the newest; ``load_checkpoint(path,
  model, optimizer=None, scheduler=None)`` restores them (``strict=False`` for the
  frozen keys left out) and returns ``{unit: index, "hparams", "metrics", "extra"}``.
  ``extra`` carries what else a resume needs (a data stream's position). Checkpoints
  hold tensors and plain containers only and are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import torch

from curate.io.files import atomic_path
from train.lib.launch import unwrap

UNITS = {"epoch": 4, "step": 8}  # file name prefix -> digits, so names sort in order


@dataclass
class Hyperparams:
    """Base for a script's hyperparameter dataclass: plain JSON in, plain JSON out."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Self:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {unknown}")
        return cls(**dict(values))

    @classmethod
    def from_namespace(cls, args: Any) -> Self:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})


def _frozen_prefixes(model: torch.nn.Module) -> list[str]:
    """Names of the outermost submodules whose parameters are all frozen."""
    prefixes: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in prefixes):
            continue
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            prefixes.append(name)
    return prefixes


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict minus fully frozen submodules (their weights come from the backbone packages)."""
    model = unwrap(model)
    prefixes = _frozen_prefixes(model)
    return {
        k: v.detach().cpu()
        for k, v in model.state_dict().items()
        if not any(k == p or k.startswith(p + ".") for p in prefixes)
    }


def _checkpoint_name(index: int, unit: str) -> str:
    if unit not in UNITS:
        raise ValueError(f"checkpoint unit must be one of {sorted(UNITS)}, got {unit!r}")
    return f"{unit}-{index:0{UNITS[unit]}d}.pt"


def save_checkpoint(
    directory: str | Path,
    index: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    hparams: Hyperparams | Mapping[str, Any],
    metrics: Mapping[str, Any],
    scheduler: Any = None,
    keep: int = 2,
    unit: str = "epoch",
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``UNIT-NNNN.pt`` (index = epochs or steps completed) atomically; keep the newest ``keep``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        unit: index,
        "model": trainable_state_dict(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "hparams": hparams.to_dict() if isinstance(hparams, Hyperparams) else dict(hparams),
        "metrics": dict(metrics),
        "extra": dict(extra or {}),
    }
    path = directory / _checkpoint_name(index, unit)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    for old in sorted(directory.glob(f"{unit}-*.pt"))[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def latest_checkpoint(directory: str | Path, unit: str = "epoch") -> Path | None:
    """The newest ``UNIT-NNNN.pt`` in ``directory``, or None."""
    found = sorted(Path(directory).glob(f"{unit}-*.pt"))
    return found[-1] if found else None


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
) -> dict[str, Any]:
    """Restore model (and optimizer/scheduler) state; ``{unit: index, "hparams", "metrics", "extra"}``."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    target = unwrap(model)
    result = target.load_state_dict(state["model"], strict=False)
    expected = set(trainable_state_dict(target))
    missing = sorted(set(result.missing_keys) & expected)
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"checkpoint {path} does not fit the model: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    out = {unit: state[unit] for unit in UNITS if unit in state}
    out.update(hparams=state["hparams"], metrics=state["metrics"], extra=state.get("extra", {}))
    return out
