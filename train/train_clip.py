"""Train the downstream CLIP-style model (frozen towers, trained heads) on curated or raw shards.

The model is ``train.lib.models.ContrastiveHeads``: EfficientNet-Lite0 and MiniLM towers,
frozen, with a trained projection head each and a learnt temperature. Each training tar
is encoded once by the frozen towers into a cached feature shard
(``train.lib.feature_shards``); Ray Train workers then stream those feature shards
through a shuffle buffer, draw one of each sample's kept captions per step (BLIP-2), and
train the two heads and the temperature with InfoNCE (``train.lib.losses.ITCLoss``; rows
sharing a caption are not negatives). The run is a fixed number of steps of a fixed
global batch, so runs on differently sized data sets see the same number of samples.
``train.pretrain_clip`` trains whole CLIP towers instead, for GPU machines.

CPU: curated output (kept captions from ``KEY.json``) vs the raw web shards it came from:

    python -m train.train_clip --train 'out/capfilt/shards/*.tar' --eval data/tuxpaint/test \\
        --steps 400 --output out/clip-capfilt --run-dir out/train_clip_capfilt
    python -m train.train_clip --train 'data/openclipart/*.tar' --eval data/tuxpaint/test \\
        --steps 400 --output out/clip-raw --run-dir out/train_clip_raw

Multi-GPU (4 Ray Train workers, NCCL; on a cluster ``--cache-dir`` and ``--run-dir`` on
shared storage):

    python -m train.train_clip --train '/data/curated/shards/*.tar' --eval /data/tuxpaint/test \\
        --workers 4 --device cuda --batch-size 1024 --steps 2000 --cache-dir /data/clip-features \\
        --output /data/models/clip-heads --run-dir /data/runs/train_clip

``--workers N`` runs N Ray Train workers (DDP over gloo on CPU, NCCL with ``--device
cuda``; each worker streams its share of every feature shard); ``--workers 0`` trains in
this process without Ray. The result (eval metrics) is printed as JSON and written to
``RUN_DIR/result.json``; the heads go to ``--output`` (config.json + model.safetensors).
``train.experiment`` runs the whole curated-vs-raw comparison.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from train.lib.checkpoint import Hyperparams
from train.lib.launch import (
    add_launch_args,
    launch_from_args,
    prepare_model,
    prepare_run_dir,
    report,
    seed_everything,
    setup_logging,
    unwrap,
    worker_info,
)
from train.lib.metrics import MetricsLogger
from train.lib.optim import param_groups, warmup_cosine

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


def train_loop(config: dict) -> dict:
    """One worker's run (``config``: hparams, train/eval feature files, run_dir, output, device)."""
    from train.lib.evaluation import evaluate_contrastive
    from train.lib.feature_shards import iter_batches, load_feature_shard
    from train.lib.losses import ITCLoss, positive_mask
    from train.lib.models import ContrastiveHeads

    hp = ClipHparams.from_dict(config["hparams"])
    info = worker_info(config.get("device", "cpu"))
    if hp.batch_size % info.world_size:
        raise ValueError(f"batch_size {hp.batch_size} is not a multiple of {info.world_size} workers")
    seed_everything(hp.seed)  # the same initial heads on every worker
    model = ContrastiveHeads(hidden=hp.hidden, dim=hp.dim, dropout=hp.dropout, temperature=hp.temperature)
    model = prepare_model(model, info)
    optimizer = torch.optim.AdamW(param_groups(unwrap(model), hp.weight_decay), lr=hp.lr)
    # linear warm-up, then cosine decay to zero at hp.steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, hp.warmup_steps, hp.steps)
    )
    itc = ITCLoss()
    run_dir = Path(config["run_dir"])
    logger = MetricsLogger(run_dir / "metrics.jsonl", enabled=info.is_main, steps=hp.steps)
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
        logger.step(loss=float(loss.detach()))
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
    logger.close()
    result: dict = {"steps": hp.steps, "samples_seen": hp.steps * hp.batch_size, "hparams": hp.to_dict()}
    if info.is_main:
        bare = unwrap(model).cpu()
        if config.get("output"):
            bare.save_pretrained(config["output"])
            result["output"] = str(config["output"])
        if config.get("eval_features"):
            scores = evaluate_contrastive(bare, [load_feature_shard(p) for p in config["eval_features"]])
            logger.log(hp.steps, "eval", scores)
            result["eval"] = scores
        result["train_seconds"] = round(time.perf_counter() - start, 2)
    return result


def main(argv: list[str] | None = None) -> int:
    D = ClipHparams()  # defaults live in the dataclass
    ap = argparse.ArgumentParser(
        prog="python -m train.train_clip",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = ap.add_argument
    # data
    add("--train", action="append", required=True, help="training tars (dir, glob, brace range); repeatable")
    add("--eval", action="append", help="held-out human-captioned tars, e.g. data/tuxpaint/test")
    add("--cache-dir", help="feature cache (default ~/.cache/curate/clip-features)")
    add("--output", help="where to save the trained heads")
    add("--log-every", type=int, default=50, help="steps per metrics line")
    add_launch_args(
        ap,
        run_dir="out/train_clip",
        run_dir_help="metrics.jsonl, result.json, Ray Train's files",
        resume=False,
    )
    # model
    add("--hidden", type=int, default=D.hidden, help="hidden width of each projection head")
    add("--dim", type=int, default=D.dim, help="size of the joint embedding space")
    add("--dropout", type=float, default=D.dropout, help="dropout inside the heads")
    add("--temperature", type=float, default=D.temperature, help="initial softmax temperature (learnt)")
    # optimisation
    add("--steps", type=int, default=D.steps, help="optimizer steps (the same for every data set)")
    add("--batch-size", type=int, default=D.batch_size, help="global batch (split across workers)")
    add("--lr", type=float, default=D.lr, help="peak AdamW learning rate")
    add("--weight-decay", type=float, default=D.weight_decay, help="AdamW weight decay (matrices only)")
    add("--warmup-steps", type=int, default=D.warmup_steps, help="linear warm-up, then cosine to zero")
    add("--grad-clip", type=float, default=D.grad_clip, help="max gradient norm (0: off)")
    add("--shuffle-buffer", type=int, default=D.shuffle_buffer, help="rows in the shuffle buffer per worker")
    add("--seed", type=int, default=D.seed, help="head init, data order and caption draws")
    args = ap.parse_args(argv)

    from train.lib.data import list_shards
    from train.lib.feature_shards import encode_shards

    setup_logging()
    hp = ClipHparams.from_namespace(args)
    # the frozen towers encode each tar once, here on the driver; workers read the cached files
    encode_device = "cuda" if args.device == "cuda" else "cpu"
    train_features = [
        str(p) for p in encode_shards(list_shards(args.train), args.cache_dir, device=encode_device)
    ]
    eval_features = []
    if args.eval:
        eval_features = [
            str(p) for p in encode_shards(list_shards(args.eval), args.cache_dir, device=encode_device)
        ]
    run_dir = prepare_run_dir(args.run_dir, resume=False)
    config = {
        "hparams": hp.to_dict(),
        "train_features": train_features,
        "eval_features": eval_features,
        "output": str(Path(args.output).resolve()) if args.output else None,
        "log_every": args.log_every,
    }
    result = launch_from_args(train_loop, config, args, run_dir, "train_clip")
    (run_dir / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result.get("eval", result), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
