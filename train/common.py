"""What every training entry script shares: seeding, hyperparameters, checkpoints, metrics, Ray Train.

Stable API (``train_filter.py`` and ``train_captioner.py`` use it):

- ``seed_everything(seed)``: Python, NumPy and torch RNGs. Scripts reseed with
  ``seed + epoch`` at the start of every epoch, so a resumed run replays the same
  batches and a fixed ``--seed`` gives the same result.
- ``Hyperparams``: base for a script's ``@dataclass`` of hyperparameters:
  ``to_dict()``, ``from_dict(d)`` (unknown keys raise) and ``from_namespace(args)``
  (takes the argparse fields whose names match; the rest is the script's business).
- ``WorkerInfo`` / ``worker_info(device)``: rank, world size, torch device and whether
  this runs inside Ray Train (``in_ray``); outside Ray Train it is rank 0 of 1.
  ``device`` is ``auto|cpu|cuda`` (``curate.models.base.resolve_device``: cuda without one fails).
- ``prepare_model(model, info)``: DDP through ``ray.train.torch.prepare_model`` when
  world size > 1, else ``model.to(info.device)``. ``unwrap(model)`` gives the bare module back.
- ``shard_indices(n, info, seed, epoch, shuffle=True)``: this worker's sample indices of
  the epoch: one permutation seeded by ``seed + epoch``, cut to a multiple of the world
  size and strided by rank, so every worker takes the same number of steps (DDP).
- ``trainable_state_dict(model)``: the state dict without parameters of fully frozen
  submodules (frozen backbones are loaded from their packages, never checkpointed).
- ``save_checkpoint(directory, epoch, model, optimizer, hparams, metrics, scheduler=None)``
  writes ``directory/epoch-NNNN.pt`` (temp name, then rename; keeps the last ``keep``)
  and ``latest_checkpoint(directory)`` finds the newest; ``load_checkpoint(path, model,
  optimizer=None, scheduler=None)`` restores them (``strict=False`` for the frozen keys
  left out) and returns ``{"epoch", "hparams", "metrics"}``. Checkpoints hold tensors and
  plain containers only and are read with ``torch.load(weights_only=True)``.
- ``MetricsLogger(path, enabled)``: ``log(epoch, split, metrics)`` prints one line and
  appends one JSON line (``{"epoch", "split", "time", **metrics}``); pass
  ``enabled=info.is_main`` so only rank 0 writes.
- ``report(metrics, info)``: ``ray.train.report`` inside Ray Train (every worker must call
  it the same number of times: it is a barrier), a no-op outside.
- ``launch(train_fn, config, workers, use_gpu, storage_path, name, ...)``: runs
  ``train_fn(config)`` on ``workers`` Ray Train workers (``TorchTrainer``, gloo on CPU,
  NCCL on GPU) and returns rank 0's return value (a JSON-able dict, passed back through
  ``storage_path/name/result.json``: on a multi-node cluster ``storage_path`` must be
  shared storage); ``workers=0`` runs it in this process without Ray (debugging, tests).
  Without a Ray address it starts a local embedded Ray with at least ``workers + 2``
  logical CPUs (see DESIGN.md: on a 2-core box ``num_cpus=1`` actors starve each other)
  and sets each worker's torch threads to its share of the cores (``config["threads"]``
  when given).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch

from curate.io.files import atomic_path, write_atomic
from curate.models.base import resolve_device

log = logging.getLogger("train")

# environment that Ray workers must see as the driver does (offline models, backbone cache)
PROPAGATED_ENV = (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "TOKENIZERS_PARALLELISM",
    "CURATE_CACHE",
    "HF_HOME",
)


# -- seeding and hyperparameters -------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so a run can be replayed."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


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


# -- workers ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerInfo:
    """Where this training process sits: rank, world size, device, inside Ray Train or not."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    in_ray: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _ray_context():
    try:
        import ray.train

        return ray.train.get_context()
    except (ImportError, RuntimeError):
        return None


def worker_info(device: str = "auto") -> WorkerInfo:
    """This process's rank and device; rank 0 of 1 outside Ray Train."""
    ctx = _ray_context()
    if ctx is None:
        return WorkerInfo(0, 1, 0, resolve_device(device), in_ray=False)
    dev = resolve_device(device)
    if dev.type == "cuda":
        import ray.train.torch

        dev = ray.train.torch.get_device()
    return WorkerInfo(
        rank=ctx.get_world_rank(),
        world_size=ctx.get_world_size(),
        local_rank=ctx.get_local_rank(),
        device=dev,
        in_ray=True,
    )


def prepare_model(model: torch.nn.Module, info: WorkerInfo) -> torch.nn.Module:
    """Move to the worker's device; wrap in DDP (Ray's prepare_model) when there are several workers."""
    if info.in_ray and info.world_size > 1:
        import ray.train.torch

        return ray.train.torch.prepare_model(model, move_to_device=info.device)
    return model.to(info.device)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (or the module itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def shard_indices(n: int, info: WorkerInfo, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """This worker's indices for one epoch: same permutation on every worker, strided by rank."""
    if shuffle:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=gen).tolist()
    else:
        order = list(range(n))
    usable = (n // info.world_size) * info.world_size
    return order[:usable][info.rank :: info.world_size]


# -- checkpoints -----------------------------------------------------------------------------------


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


def _checkpoint_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}.pt"


def save_checkpoint(
    directory: str | Path,
    epoch: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    hparams: Hyperparams | Mapping[str, Any],
    metrics: Mapping[str, Any],
    scheduler: Any = None,
    keep: int = 2,
) -> Path:
    """Write ``epoch-NNNN.pt`` (epoch = epochs completed) atomically; keep the newest ``keep``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "epoch": epoch,
        "model": trainable_state_dict(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "hparams": hparams.to_dict() if isinstance(hparams, Hyperparams) else dict(hparams),
        "metrics": dict(metrics),
    }
    path = directory / _checkpoint_name(epoch)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    for old in sorted(directory.glob("epoch-*.pt"))[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest ``epoch-NNNN.pt`` in ``directory``, or None."""
    found = sorted(Path(directory).glob("epoch-*.pt"))
    return found[-1] if found else None


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
) -> dict[str, Any]:
    """Restore model (and optimizer/scheduler) state; returns ``{"epoch", "hparams", "metrics"}``."""
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
    return {"epoch": state["epoch"], "hparams": state["hparams"], "metrics": state["metrics"]}


# -- metrics ---------------------------------------------------------------------------------------


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class MetricsLogger:
    """One console line and one JSON line per (epoch, split); silent when not enabled (rank > 0)."""

    def __init__(self, path: str | Path | None, enabled: bool = True) -> None:
        self.path = Path(path) if path is not None else None
        self.enabled = enabled
        if self.enabled and self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, epoch: int, split: str, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {
            k: (float(v) if isinstance(v, torch.Tensor | np.floating) else v) for k, v in metrics.items()
        }
        text = " ".join(f"{k} {_format(v)}" for k, v in clean.items())
        print(f"epoch {epoch} {split} | {text}", flush=True)
        if self.path is not None:
            record = {"epoch": epoch, "split": split, "time": round(time.time(), 3), **clean}
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def report(metrics: Mapping[str, Any], info: WorkerInfo) -> None:
    """``ray.train.report`` inside Ray Train (a barrier: every worker calls it), else nothing."""
    if info.in_ray:
        import ray.train

        ray.train.report({k: v for k, v in metrics.items() if isinstance(v, int | float | str)})


# -- Ray Train -------------------------------------------------------------------------------------


def init_local_ray(num_cpus: int, num_gpus: int | None = None) -> None:
    """Start an embedded local Ray unless one is already up in this process."""
    import ray

    if ray.is_initialized():
        return
    ray.init(
        address="local",
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        include_dashboard=False,
        configure_logging=False,
    )


def _worker_entry(train_fn: Callable[[dict], Any]) -> Callable[[dict], Any]:
    """Set the worker's torch threads; rank 0 writes the loop's return value for the driver."""

    def run(config: dict) -> Any:
        threads = config.get("threads")
        if threads:
            torch.set_num_threads(int(threads))
        result = train_fn(config)
        path = config.get("_result_path")
        if path and _ray_context() is not None and _ray_context().get_world_rank() == 0:
            write_atomic(path, json.dumps(result or {}, default=str).encode())
        return result

    return run


def launch(
    train_fn: Callable[[dict], Any],
    config: dict[str, Any],
    workers: int,
    use_gpu: bool,
    storage_path: str | Path,
    name: str,
    cpus_per_worker: float = 1.0,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Run ``train_fn(config)`` on ``workers`` Ray Train workers (0: in this process); rank 0's result."""
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    config = dict(config)
    cores = os.cpu_count() or 1
    if workers == 0:
        if use_gpu and not torch.cuda.is_available():
            raise RuntimeError("use_gpu was requested but this process sees no CUDA device")
        return _worker_entry(train_fn)(config) or {}

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    config.setdefault("threads", max(1, cores // workers))
    if ray_address is None:
        init_local_ray(
            num_cpus=max(cores, math.ceil(workers * cpus_per_worker) + 2),
            num_gpus=torch.cuda.device_count() if use_gpu else None,
        )
    else:
        ray.init(address=ray_address, ignore_reinit_error=True)
    if use_gpu and ray_address is None:
        have = ray.cluster_resources().get("GPU", 0)
        if have < workers:
            raise RuntimeError(f"use_gpu with {workers} workers, but the local Ray has {have:g} GPUs")
    storage = Path(storage_path).resolve()
    result_path = storage / name / "result.json"
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.unlink(missing_ok=True)
    config["_result_path"] = str(result_path)
    env = {k: os.environ[k] for k in PROPAGATED_ENV if k in os.environ}
    # workers import the entry script's module: make the driver's import path visible to them
    env["PYTHONPATH"] = os.pathsep.join(p for p in [os.getcwd(), os.environ.get("PYTHONPATH", "")] if p)
    trainer = TorchTrainer(
        _worker_entry(train_fn),
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus_per_worker}
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage),
            worker_runtime_env={"env_vars": env},
        ),
    )
    result = trainer.fit()
    if result_path.exists():
        return json.loads(result_path.read_text())
    return dict(result.metrics or {})


def setup_logging() -> None:
    """Plain INFO logging to stderr for the entry scripts."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
