"""Train the downstream CLIP-style model (``train.contrastive``) on curated or raw shards.

Each training tar is encoded once by the frozen towers into a cached feature shard
(``train.feature_shards``); Ray Train workers then stream those feature shards through a
shuffle buffer, draw one of each sample's kept captions per step (BLIP-2), and train the
two projection heads and the temperature with InfoNCE (``train.losses.ITCLoss``; rows
sharing a caption are not negatives). The run is a fixed number of steps of a fixed
global batch, so runs on differently sized data sets see the same number of samples.

Curated output (kept captions from ``KEY.json``) vs the raw web shards it came from:

    python -m train.train_clip --train 'out/capfilt/shards/*.tar' --eval data/tuxpaint/test \\
        --steps 400 --output out/clip-capfilt --run-dir out/train_clip_capfilt
    python -m train.train_clip --train 'data/openclipart/*.tar' --eval data/tuxpaint/test \\
        --steps 400 --output out/clip-raw --run-dir out/train_clip_raw

``--workers N`` runs N Ray Train workers (DDP over gloo on CPU, NCCL with ``--device
cuda``; each worker streams its share of every feature shard); ``--workers 0`` trains in
this process without Ray. On a multi-node cluster the feature cache (``--cache-dir``) and
``--run-dir`` must be shared storage. The result (eval metrics) is printed as JSON and
written to ``RUN_DIR/result.json``; the heads go to ``--output`` (config.json +
model.safetensors). ``train.experiment`` runs the whole curated-vs-raw comparison.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from train.common import (
    Hyperparams,
    MetricsLogger,
    launch,
    prepare_model,
    report,
    seed_everything,
    setup_logging,
    unwrap,
    worker_info,
)

log = logging.getLogger("train.clip")


@dataclass
class ClipHparams(Hyperparams):
    """Everything that changes the trained heads."""

    hidden: int = 512
    dim: int = 256
    dropout: float = 0.1
    temperature: float = 0.07
    steps: int = 400
    batch_size: int = 128  # global: split across workers
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 40
    grad_clip: float = 1.0
    shuffle_buffer: int = 2048
    seed: int = 0


def lr_factor(step: int, hp: ClipHparams) -> float:
    """Linear warm-up, then cosine decay to zero at ``hp.steps``."""
    if step < hp.warmup_steps:
        return (step + 1) / hp.warmup_steps
    progress = (step - hp.warmup_steps) / max(1, hp.steps - hp.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_loop(config: dict) -> dict:
    """One worker's run (``config``: hparams, train/eval feature files, run_dir, output, device)."""
    from train.contrastive import ContrastiveHeads, evaluate, positive_mask
    from train.feature_shards import iter_batches, load_feature_shard
    from train.losses import ITCLoss
    from train.train_filter import param_groups

    hp = ClipHparams.from_dict(config["hparams"])
    info = worker_info(config.get("device", "cpu"))
    if hp.batch_size % info.world_size:
        raise ValueError(f"batch_size {hp.batch_size} is not a multiple of {info.world_size} workers")
    seed_everything(hp.seed)  # the same initial heads on every worker
    model = ContrastiveHeads(hidden=hp.hidden, dim=hp.dim, dropout=hp.dropout, temperature=hp.temperature)
    model = prepare_model(model, info)
    optimizer = torch.optim.AdamW(param_groups(unwrap(model), hp.weight_decay), lr=hp.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, hp))
    itc = ITCLoss()
    run_dir = Path(config["run_dir"])
    logger = MetricsLogger(run_dir / "metrics.jsonl", enabled=info.is_main)
    batches = iter_batches(
        config["train_features"],
        hp.batch_size // info.world_size,
        seed=hp.seed,
        rank=info.rank,
        world_size=info.world_size,
        shuffle_buffer=hp.shuffle_buffer,
    )
    log_every = max(1, int(config.get("log_every", 50)))
    start = time.perf_counter()
    running = {"loss": 0.0, "acc": 0.0}
    model.train()
    for step in range(hp.steps):
        batch = next(batches)
        image = batch["image"].to(info.device)
        text = batch["text"].to(info.device)
        img, txt = model(image, text)
        pos = positive_mask(batch["captions"]).to(info.device)
        loss = itc(img, txt, unwrap(model).scale(), pos)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if hp.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), hp.grad_clip)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            hits = pos[torch.arange(len(pos)), (img @ txt.t()).argmax(1)]
        running["loss"] += float(loss.detach())
        running["acc"] += float(hits.float().mean())
        if (step + 1) % log_every == 0 or step + 1 == hp.steps:
            n = (step % log_every) + 1
            metrics = {
                "step": step + 1,
                "loss": running["loss"] / n,
                "batch_i2t_acc": running["acc"] / n,
                "temperature": float(1 / unwrap(model).scale().detach().exp()),
                "lr": scheduler.get_last_lr()[0],
                "samples_per_s": (step + 1) * hp.batch_size / (time.perf_counter() - start),
            }
            logger.log(step + 1, "train", metrics)
            report(metrics, info)
            running = {"loss": 0.0, "acc": 0.0}
    result: dict = {"steps": hp.steps, "samples_seen": hp.steps * hp.batch_size, "hparams": hp.to_dict()}
    if info.is_main:
        bare = unwrap(model).cpu()
        if config.get("output"):
            bare.save_pretrained(config["output"])
            result["output"] = str(config["output"])
        if config.get("eval_features"):
            scores = evaluate(bare, [load_feature_shard(p) for p in config["eval_features"]])
            logger.log(hp.steps, "eval", scores)
            result["eval"] = scores
        result["train_seconds"] = round(time.perf_counter() - start, 2)
    return result


def train(
    train_shards: list[str],
    eval_shards: list[str] | None,
    hp: ClipHparams,
    run_dir: str | Path,
    output: str | Path | None = None,
    workers: int = 1,
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    ray_address: str | None = None,
    name: str = "train_clip",
    log_every: int = 50,
) -> dict:
    """Encode the shards (cached), then train on ``workers`` Ray Train workers; rank 0's result."""
    from train.feature_shards import encode_shards

    encode_device = "cuda" if device == "cuda" else "cpu"
    train_features = [str(p) for p in encode_shards(train_shards, cache_dir, device=encode_device)]
    eval_features = (
        [str(p) for p in encode_shards(eval_shards, cache_dir, device=encode_device)] if eval_shards else []
    )
    run_dir = Path(run_dir).resolve()
    config = {
        "hparams": hp.to_dict(),
        "train_features": train_features,
        "eval_features": eval_features,
        "run_dir": str(run_dir),
        "output": str(Path(output).resolve()) if output else None,
        "device": device,
        "log_every": log_every,
    }
    result = launch(
        train_loop,
        config,
        workers=workers,
        use_gpu=device == "cuda",
        storage_path=run_dir.parent,
        name=run_dir.name,
        ray_address=ray_address,
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m train.train_clip", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--train", action="append", required=True, help="training tars (dir, glob, brace range); repeatable"
    )
    ap.add_argument("--eval", action="append", help="held-out human-captioned tars, e.g. data/tuxpaint/test")
    ap.add_argument("--output", help="where to save the trained heads")
    ap.add_argument("--run-dir", required=True, help="metrics.jsonl, result.json and Ray Train's files")
    ap.add_argument("--workers", type=int, default=1, help="Ray Train workers (0: in this process)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--cache-dir", help="feature cache (default ~/.cache/curate/clip-features)")
    ap.add_argument("--ray-address", help="join this Ray cluster instead of an embedded one")
    ap.add_argument("--log-every", type=int, default=50)
    for field, default in ClipHparams().to_dict().items():
        ap.add_argument(f"--{field.replace('_', '-')}", type=type(default), default=default)
    return ap


def main(argv: list[str] | None = None) -> int:
    from train.data import list_shards

    setup_logging()
    args = build_parser().parse_args(argv)
    hp = ClipHparams.from_namespace(args)
    result = train(
        list_shards(args.train),
        list_shards(args.eval) if args.eval else None,
        hp,
        run_dir=args.run_dir,
        output=args.output,
        workers=args.workers,
        device=args.device,
        cache_dir=args.cache_dir,
        ray_address=args.ray_address,
        log_every=args.log_every,
    )
    print(json.dumps(result.get("eval", result), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
