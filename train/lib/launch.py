"""Where a training process runs: seeding, rank and device, DDP, the Ray Train launcher, shared options.

- ``seed_everything(seed)``: Python, NumPy and torch RNGs. The epoch-based scripts
  reseed with ``seed + epoch`` at the start of every epoch and the step-based ones with
  ``seed + step``, so a resumed run replays the same batches and dropout.
- ``WorkerInfo`` / ``worker_info(device)``: rank, world size, torch device and whether
  this runs inside Ray Train (``in_ray``); outside Ray Train it is rank 0 of 1.
  ``device`` is ``auto|cpu|cuda`` (``curate.models.base.resolve_device``: cuda without one fails).
- ``step_worker(device, batch_size, accum_steps, precision)``: the step-based loops' start:
  this worker's ``WorkerInfo``, its micro-batch (the global batch split across workers, then
  into ``accum_steps``; it must divide evenly) and the resolved autocast dtype.
- ``prepare_model(model, info)``: DDP through ``ray.train.torch.prepare_model`` when
  world size > 1, else ``model.to(info.device)``. ``unwrap(model)`` gives the bare module back.
- ``shard_indices(n, info, seed, epoch, shuffle=True)``: this worker's sample indices of
  the epoch: one permutation seeded by ``seed + epoch``, cut to a multiple of the world
  size and strided by rank, so every worker takes the same number of steps (DDP).
- ``report(metrics, info)``: ``ray.train.report`` inside Ray Train (every worker must call
  it the same number of times: it is a barrier), a no-op outside. ``mean_over_workers``
  and ``gather_objects`` are the two collectives the loops need besides DDP's own.
- ``launch(train_fn, config, workers, use_gpu, storage_path, name, ...)``: runs
  ``train_fn(config)`` on ``workers`` Ray Train workers (``TorchTrainer``, gloo on CPU,
  NCCL on GPU) and returns rank 0's return value (a JSON-able dict, passed back through
  ``storage_path/name/result.json``: on a multi-node cluster ``storage_path`` must be
  shared storage); ``workers=0`` runs it in this process without Ray (debugging, tests).
  Without a Ray address it starts a local embedded Ray with at least ``workers + 2``
  logical CPUs (on a 2-core machine, Ray Train workers holding ``num_cpus=1`` each
  would otherwise leave no CPU for Ray's own tasks and stall) and sets each worker's
  torch threads to its share of the cores (``config["threads"]`` when given).
- ``add_launch_args(parser, ...)``, ``prepare_run_dir(run_dir, resume)`` and
  ``launch_from_args(train_fn, config, args, name)``: the options and the run directory
  every training script shares (``--workers``, ``--device``, ``--cpus-per-worker``,
  ``--threads``, ``--ray-address``, ``--run-dir``, ``--resume``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from curate.io.files import write_atomic
from curate.models.base import resolve_device
from train.lib.optim import resolve_precision

log = logging.getLogger("train")

# environment that Ray workers must see as the driver does (offline models, backbone cache)
PROPAGATED_ENV = (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "TOKENIZERS_PARALLELISM",
    "CURATE_CACHE",
    "HF_HOME",
)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so a run can be replayed."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def setup_logging() -> None:
    """Plain INFO logging to stderr for the entry scripts."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)


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


def step_worker(
    device: str, batch_size: int, accum_steps: int, precision: str
) -> tuple[WorkerInfo, int, str]:
    """This worker, its micro-batch of a global ``batch_size`` and the autocast dtype it resolves to.

    The global batch is split across the workers, then into ``accum_steps`` micro-batches:
    a batch size that does not divide evenly is an error naming both.
    """
    info = worker_info(device)
    if batch_size % (info.world_size * accum_steps):
        raise ValueError(
            f"--batch-size {batch_size} is not a multiple of {info.world_size} workers x "
            f"{accum_steps} accumulation steps"
        )
    micro = batch_size // (info.world_size * accum_steps)
    return info, micro, resolve_precision(precision, info.device)


def prepare_model(
    model: torch.nn.Module, info: WorkerInfo, find_unused_parameters: bool = False
) -> torch.nn.Module:
    """Move to the worker's device; wrap in DDP (Ray's prepare_model) when there are several workers.

    ``find_unused_parameters``: for models whose forward leaves some parameters out of a
    step's graph (DDP otherwise waits for their gradients forever).
    """
    if info.in_ray and info.world_size > 1:
        import ray.train.torch

        kwargs = {"find_unused_parameters": True} if find_unused_parameters else {}
        return ray.train.torch.prepare_model(
            model, move_to_device=info.device, parallel_strategy_kwargs=kwargs or None
        )
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


def distributed() -> bool:
    """True inside a torch.distributed process group of more than one process."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def mean_over_workers(values: Mapping[str, float], device: torch.device) -> dict[str, float]:
    """The mean of each value over all workers (itself with one worker): a collective."""
    if not values or not distributed():
        return {k: float(v) for k, v in values.items()}
    import torch.distributed as dist

    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def gather_objects(obj: Any) -> list[Any]:
    """Every worker's ``obj`` in rank order (``[obj]`` with one worker): a collective."""
    if not distributed():
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


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


# -- the options and run directory every training script shares ------------------------------------


def add_launch_args(
    parser: argparse.ArgumentParser,
    run_dir: str | None = None,
    run_dir_help: str = "checkpoints, metrics.jsonl and Ray Train's files",
    resume: bool = True,
) -> None:
    """Where and on what a script trains: ``--workers``, ``--device``, ``--run-dir``, ``--resume``, ..."""
    add = parser.add_argument
    add("--workers", type=int, default=1, help="Ray Train workers (0: in this process, without Ray)")
    add(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="cpu",
        help="cuda: one GPU per Ray Train worker; auto: each worker's own choice",
    )
    add("--cpus-per-worker", type=float, default=1.0, help="Ray CPUs reserved per worker")
    add("--threads", type=int, default=None, help="torch threads per worker (default: cores / workers)")
    add("--ray-address", default=None, help="join this Ray cluster (default: an embedded local Ray)")
    add("--run-dir", default=run_dir, help=run_dir_help)
    if resume:
        add("--resume", action="store_true", help="continue from the newest checkpoint in the run dir")


def absolute_local(value: str | None) -> str | None:
    """A path that exists here, made absolute; anything else (a hub id, a URL, a keyword such
    as ``vit-b-32``) as it is. Ray Train workers run in their own working directory, where a
    relative path would be taken for a hub id."""
    if value and "://" not in value and Path(value).exists():
        return str(Path(value).resolve())
    return value


def absolute_shards(paths: list[str]) -> list[str]:
    """Shard paths as the workers must see them (local ones absolute, URLs as they are)."""
    return [absolute_local(p) or p for p in paths]


def prepare_run_dir(run_dir: str | Path, resume: bool) -> Path:
    """The absolute run directory; a fresh run (not ``resume``) drops old checkpoints and metrics."""
    path = Path(run_dir).resolve()
    if not resume:
        shutil.rmtree(path / "checkpoints", ignore_errors=True)
        (path / "metrics.jsonl").unlink(missing_ok=True)
    path.mkdir(parents=True, exist_ok=True)
    return path


def launch_from_args(
    train_fn: Callable[[dict], Any],
    config: dict[str, Any],
    args: argparse.Namespace,
    run_dir: Path,
    name: str,
) -> dict[str, Any]:
    """``launch`` with the shared options of ``add_launch_args``; Ray's files go to ``RUN_DIR/ray``."""
    config = {**config, "device": args.device, "run_dir": str(run_dir)}
    if getattr(args, "threads", None):
        config["threads"] = args.threads
    return launch(
        train_fn,
        config,
        workers=args.workers,
        use_gpu=args.device == "cuda",
        storage_path=run_dir / "ray",
        name=name,
        cpus_per_worker=args.cpus_per_worker,
        ray_address=args.ray_address,
    )
