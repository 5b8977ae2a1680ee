"""Train the bootstrapped CapFilt filter (ITC + ITM with hard negatives) on human captions.

The frozen backbones' features of the train and val splits are computed once on the
driver and cached (``train.lib.features``); Ray Train workers then train only the small
fusion bridge (``curate.models.bridge.filter``) on the cache.

CPU (this machine: the committed pipelines/models/bridge-filter; one Ray Train worker on
the local embedded Ray using both cores, about 1 minute of training after the frozen
features are cached once; ``--workers 2`` runs DDP over gloo instead):

    python -m train.train_filter --data data/tuxpaint --workers 1 --device cpu --save-dtype fp16 \\
        --output pipelines/models/bridge-filter --run-dir out/train_filter

Multi-GPU (a Ray cluster with 4 GPUs; run from the repo root):

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m train.train_filter --train '/data/curated/shards/*.tar' --val /data/tuxpaint/val \\
        --workers 4 --device cuda --output /data/models/bridge-filter --run-dir /data/runs/train_filter

``--workers 0`` runs the same loop in this process without Ray (debugging). ``--resume``
continues from the newest checkpoint in ``RUN_DIR/checkpoints``; each epoch reseeds with
``seed + epoch``, so a resumed run ends where an uninterrupted one would. Per-epoch
metrics go to the console and ``RUN_DIR/metrics.jsonl``; the final bridge is written with
``save_pretrained`` to ``--output`` (config.json + model.safetensors, trainable parts only).
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

from train.lib.checkpoint import Hyperparams, latest_checkpoint, load_checkpoint, save_checkpoint
from train.lib.launch import (
    add_launch_args,
    launch_from_args,
    prepare_model,
    prepare_run_dir,
    report,
    seed_everything,
    setup_logging,
    shard_indices,
    unwrap,
    worker_info,
)
from train.lib.metrics import MetricsLogger
from train.lib.optim import param_groups, warmup_cosine

log = logging.getLogger("train.filter")


@dataclass
class FilterHparams(Hyperparams):
    """Everything that changes the trained weights (saved in every checkpoint)."""

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    proj_dim: int = 384  # == MiniLM's size: the text adapter starts as the identity
    dropout: float = 0.1
    itc_dropout: float = 0.5
    feature_dropout: float = 0.0
    label_prior: bool = True
    label_temperature: float = 0.5
    image_resize: str = "pad"
    flip_augment: bool = True
    epochs: int = 8
    batch_size: int = 64  # global: split across workers
    lr: float = 1e-3
    weight_decay: float = 0.5  # pulls the zero-initialised ITC corrections back to the prior
    warmup_epochs: float = 1.0
    itm_weight: float = 1.0
    itc_weight: float = 1.0
    grad_clip: float = 1.0
    seed: int = 0
    hub_k: int = 0  # hubness correction: nearest bank rows averaged (0: plain cosine)
    hub_bank: int = 4096  # training rows in each hubness bank (at most the training set)


# what --init-from takes from the saved filter (its weights only fit this shape)
ARCHITECTURE_FIELDS = (
    "hidden_size",
    "num_layers",
    "num_heads",
    "proj_dim",
    "label_prior",
    "label_temperature",
    "image_resize",
)


def build_model(hp: FilterHparams, hub_bank: int = 0, init_from: str | Path | None = None):
    """A bridge filter of ``hp``'s size, freshly initialised (seed first for a fixed init) or with
    the weights of the saved filter ``init_from``; ``hub_bank`` rows per hubness bank when
    ``hp.hub_k`` is set (the banks are filled after training)."""
    from curate.models.bridge import BridgeFilterConfig, BridgeFilterModel

    config = BridgeFilterConfig(
        hidden_size=hp.hidden_size,
        num_layers=hp.num_layers,
        num_heads=hp.num_heads,
        proj_dim=hp.proj_dim,
        dropout=hp.dropout,
        itc_dropout=hp.itc_dropout,
        feature_dropout=hp.feature_dropout,
        label_prior=hp.label_prior,
        label_temperature=hp.label_temperature,
        image_resize=hp.image_resize,
        hub_k=hp.hub_k,
        hub_bank=hub_bank if hp.hub_k > 0 else 0,
    )
    model = BridgeFilterModel(config)
    if init_from is not None:
        from safetensors.torch import load_file

        state = load_file(str(Path(init_from) / "model.safetensors"))
        # the banks belong to the data a filter was trained on: this run fills its own
        state = {k: v.float() for k, v in state.items() if not k.startswith("hub_")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if not k.startswith("hub_")]:
            raise ValueError(f"--init-from {init_from}: weights do not fit ({missing + unexpected})")
    return model


def init_hparams(hp: FilterHparams, init_from: str | Path) -> FilterHparams:
    """``hp`` with the architecture of the saved filter in ``init_from`` (its config.json wins)."""
    from train.lib.models import saved_bridge_config

    saved = saved_bridge_config(init_from, "curate-bridge-filter", "--init-from")
    values = hp.to_dict()
    values.update({k: saved[k] for k in ARCHITECTURE_FIELDS if k in saved})
    return FilterHparams.from_dict(values)


@torch.no_grad()
def fill_hub_banks(model, feats, seed: int, device: torch.device | str = "cpu") -> int:
    """The banks from ``hub_bank`` training rows drawn with ``seed``; returns the rows used."""
    from train.lib.evaluation import itc_embeddings

    rows = torch.randperm(len(feats), generator=torch.Generator().manual_seed(seed))
    rows = sorted(rows[: model.config.hub_bank].tolist())
    was = model.training
    model.eval()
    model.set_hub_banks(*itc_embeddings(model, feats, rows, device))
    model.train(was)
    return len(rows)


def _batches(indices: list[int], batch_size: int) -> list[list[int]]:
    # a last batch of one has no in-batch negative: fold it into the previous one
    out = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    if len(out) > 1 and len(out[-1]) < 2:
        out[-2].extend(out.pop())
    return out


@torch.no_grad()
def val_loss(objective, feats, batch_size: int, seed: int, device: torch.device) -> float:
    """Mean ITC + ITM loss on a split, hard negatives drawn with a fixed generator."""
    was = objective.training
    objective.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    total, count = 0.0, 0
    for idx in _batches(list(range(len(feats))), batch_size):
        out = objective(**feats.batch(idx, device), positive_mask=feats.positive_mask(idx), generator=gen)
        total += float(out["loss"]) * len(idx)
        count += len(idx)
    objective.train(was)
    return total / max(count, 1)


def train_loop(config: dict) -> dict:
    """One worker's training (``config``: hparams, feature files, run_dir, output, resume, device)."""
    from train.lib.evaluation import filter_metrics
    from train.lib.features import load_features
    from train.lib.losses import FilterLoss
    from train.lib.models import save_pretrained

    hp = FilterHparams.from_dict(config["hparams"])
    info = worker_info(config["device"])
    run_dir = Path(config["run_dir"])
    logger = MetricsLogger(run_dir / "metrics.jsonl", enabled=info.is_main)
    train_feats = load_features(config["train_features"])
    # augmented views of the same samples (mirrored images): one is drawn per sample and step
    views = [train_feats] + [load_features(p) for p in config.get("train_view_features", [])]
    val_feats = load_features(config["val_features"]) if config.get("val_features") else None
    # the hubness banks come from the training set, or from --hub-shards (a fine-tuning run's
    # pre-training set: the banks then cover the domains the representation learnt)
    bank_feats = load_features(config["hub_features"]) if config.get("hub_features") else train_feats

    seed_everything(hp.seed)
    model = build_model(hp, min(hp.hub_bank, len(bank_feats)), config.get("init_from"))
    objective = FilterLoss(model, itm_weight=hp.itm_weight, itc_weight=hp.itc_weight)
    wrapped = prepare_model(objective, info)
    optimizer = torch.optim.AdamW(param_groups(objective, hp.weight_decay), lr=hp.lr, betas=(0.9, 0.98))
    per_worker = max(2, hp.batch_size // info.world_size)
    steps_per_epoch = len(_batches(shard_indices(len(train_feats), info, hp.seed, 0), per_worker))
    total = max(1, steps_per_epoch * hp.epochs)
    warmup = max(1, int(steps_per_epoch * hp.warmup_epochs))

    # linear warmup, cosine to 5% of the peak
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, warmup, total, 0.05))
    start_epoch = 0
    ckpt_dir = run_dir / "checkpoints"
    if config.get("resume") and (ckpt := latest_checkpoint(ckpt_dir)) is not None:
        state = load_checkpoint(ckpt, objective, optimizer, scheduler)
        start_epoch = state["epoch"]
        if info.is_main:
            log.info("resumed from %s (epoch %d done)", ckpt, start_epoch)

    metrics: dict = {}
    logger.progress.total = steps_per_epoch * (hp.epochs - start_epoch)
    for epoch in range(start_epoch, hp.epochs):
        t0 = time.perf_counter()
        seed_everything(hp.seed + epoch + 1)  # dropout and negative mining replay on resume
        wrapped.train()
        sums = {"loss": 0.0, "itc": 0.0, "itm": 0.0, "itm_acc": 0.0}
        batches = _batches(shard_indices(len(train_feats), info, hp.seed, epoch), per_worker)
        for idx in batches:
            batch = train_feats.batch(idx, info.device)
            if len(views) > 1:
                pick = torch.randint(len(views), (len(idx),)).tolist()
                batch["image_tokens"] = (
                    torch.stack([views[v].image_tokens[i] for v, i in zip(pick, idx)]).float().to(info.device)
                )
            out = wrapped(**batch, positive_mask=train_feats.positive_mask(idx))
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            if hp.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(objective.parameters(), hp.grad_clip)
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100.0))
            for k in sums:
                sums[k] += float(out[k].detach())
            logger.step(loss=float(out["loss"].detach()))
        metrics = {f"train_{k}": v / max(1, len(batches)) for k, v in sums.items()}
        metrics["lr"] = scheduler.get_last_lr()[0]
        metrics["epoch_seconds"] = round(time.perf_counter() - t0, 2)
        logger.log(epoch + 1, "train", metrics)
        if info.is_main and val_feats is not None:
            bare = unwrap(wrapped)
            val = {"loss": val_loss(bare, val_feats, per_worker, hp.seed, info.device)}
            val.update(filter_metrics(bare.model, val_feats, hp.seed, info.device))
            logger.log(epoch + 1, "val", val)
            metrics.update({f"val_{k}": v for k, v in val.items()})
        if info.is_main:
            save_checkpoint(ckpt_dir, epoch + 1, objective, optimizer, hp, metrics, scheduler)
        report({"epoch": epoch + 1, **metrics}, info)

    if info.is_main:
        if hp.hub_k > 0:  # before the calibration: it fits the corrected evidence
            metrics["hub_bank_rows"] = fill_hub_banks(model, bank_feats, hp.seed, info.device)
            if val_feats is not None:
                hub_val = filter_metrics(model, val_feats, hp.seed, info.device)
                metrics.update({f"val_{k}": v for k, v in hub_val.items()})
                logger.log(hp.epochs, "val_hub", hub_val)
        if val_feats is not None and config.get("calibrate", True):
            metrics.update(calibrate_itm(model, val_feats, hp.seed, info.device))
            logger.log(hp.epochs, "calibration", {k: metrics[k] for k in ("itm_scale", "itm_shift")})
        save_pretrained(model, config["output"], dtype=config.get("save_dtype", "fp32"))
    logger.close()
    return {"epoch": hp.epochs, **metrics}


@torch.no_grad()
def calibrate_itm(model, feats, seed: int, device: torch.device | str = "cpu") -> dict[str, float]:
    """Fit P(match) = sigmoid(a * margin + b) on val true vs mismatched captions; fold a, b into the head.

    Trained against 2 hard negatives per positive, the ITM head is shy of saying "match":
    after this, the pipeline's threshold 0.5 separates a true caption from a caption of
    another image. A monotone map: AUC and rankings do not change.
    """
    from train.lib.evaluation import mismatch_indices

    was = model.training
    model.eval()
    rows = list(range(len(feats)))
    margins = []
    for texts in (rows, mismatch_indices(feats.captions, seed)):
        img, txt = feats.batch(rows, device), feats.batch(texts, device)
        logits = model.itm_logits(img["image_tokens"], txt["text_states"], txt["text_mask"]).float()
        margins.append(logits[:, 1] - logits[:, 0])
    z = torch.cat(margins).cpu()
    y = torch.cat([torch.ones(len(rows)), torch.zeros(len(rows))])
    a = torch.ones((), requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([a, b], lr=0.5, max_iter=200)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(a * z + b, y)
        loss = loss + 1e-4 * (a**2 + b**2)  # finite even when val is perfectly separated
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    scale, shift = float(a.detach()), float(b.detach())
    if not 0 < scale < float("inf"):  # a degenerate fit would flip the score: keep the model as is
        return {"itm_scale": 1.0, "itm_shift": 0.0}
    # the match margin is (w1 - w0) h + (b1 - b0) + gain * cos: scale every term, then shift
    model.itm_head.weight.mul_(scale)
    model.itm_head.bias.mul_(scale)
    if model.itc_gain is not None:
        model.itc_gain.mul_(scale)
    model.itm_head.bias[1] += shift
    model.train(was)
    return {"itm_scale": scale, "itm_shift": shift}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    D = FilterHparams()  # defaults live in the dataclass
    # data
    parser.add_argument("--data", default="data/tuxpaint", help="root with train/ and val/ shard directories")
    parser.add_argument(
        "--train", default=None, help="train shards (dir, glob, brace range); default DATA/train"
    )
    parser.add_argument(
        "--val", default=None, help="val shards; default DATA/val ('none' to skip validation)"
    )
    parser.add_argument("--max-train-samples", type=int, default=None, help="use the first N train samples")
    parser.add_argument("--max-val-samples", type=int, default=None, help="use the first N val samples")
    parser.add_argument("--cache-dir", default=None, help="feature cache (default $CURATE_CACHE/features)")
    # model
    parser.add_argument("--hidden-size", type=int, default=D.hidden_size, help="fusion width")
    parser.add_argument(
        "--num-layers", type=int, default=D.num_layers, help="fusion layers (self + cross attention)"
    )
    parser.add_argument("--num-heads", type=int, default=D.num_heads, help="attention heads")
    parser.add_argument(
        "--proj-dim", type=int, default=D.proj_dim, help="ITC size (384: identity-initialised text side)"
    )
    parser.add_argument(
        "--feature-dropout", type=float, default=D.feature_dropout, help="dropout on the fusion inputs"
    )
    parser.add_argument(
        "--itc-dropout", type=float, default=D.itc_dropout, help="input dropout of the ITC projections"
    )
    parser.add_argument(
        "--no-label-prior", dest="label_prior", action="store_false", help="no ImageNet-label zero-shot prior"
    )
    parser.add_argument(
        "--label-temperature",
        type=float,
        default=D.label_temperature,
        help="softmax temperature of the prior",
    )
    parser.add_argument(
        "--image-resize", default=D.image_resize, choices=["pad", "crop"], help="square the image by"
    )
    parser.add_argument(
        "--no-flip", dest="flip_augment", action="store_false", help="no mirrored-image feature view"
    )
    parser.add_argument("--dropout", type=float, default=D.dropout, help="dropout in the fusion layers")
    # optimisation
    parser.add_argument("--epochs", type=int, default=D.epochs, help="passes over the train split")
    parser.add_argument(
        "--batch-size", type=int, default=D.batch_size, help="global batch (split across workers)"
    )
    parser.add_argument("--lr", type=float, default=D.lr, help="peak AdamW learning rate")
    parser.add_argument(
        "--weight-decay", type=float, default=D.weight_decay, help="AdamW weight decay (matrices only)"
    )
    parser.add_argument(
        "--warmup-epochs", type=float, default=D.warmup_epochs, help="linear warmup, then cosine"
    )
    parser.add_argument("--itm-weight", type=float, default=D.itm_weight, help="weight of the ITM loss")
    parser.add_argument("--itc-weight", type=float, default=D.itc_weight, help="weight of the ITC loss")
    parser.add_argument("--grad-clip", type=float, default=D.grad_clip, help="max grad norm (0: off)")
    parser.add_argument(
        "--seed", type=int, default=D.seed, help="init, data order, dropout and negative mining"
    )
    # run
    add_launch_args(parser, run_dir="out/train_filter")
    parser.add_argument("--output", default="out/train_filter/model", help="save_pretrained directory")
    parser.add_argument(
        "--save-dtype", default="fp32", choices=["fp32", "fp16"], help="dtype of the saved bridge"
    )
    parser.add_argument(
        "--no-calibrate", dest="calibrate", action="store_false", help="skip the ITM calibration on val"
    )
    parser.add_argument(
        "--init-from",
        default=None,
        help="saved bridge filter to fine-tune (its architecture is used): BLIP's fine-tuning on human "
        "pairs after pre-training on the bootstrapped set",
    )
    parser.add_argument(
        "--hub-k", type=int, default=D.hub_k, help="hubness correction's nearest neighbours (0: plain cosine)"
    )
    parser.add_argument("--hub-bank", type=int, default=D.hub_bank, help="training rows in each hubness bank")
    parser.add_argument(
        "--hub-shards", default=None, help="shards whose pairs fill the hubness banks (default: --train's)"
    )
    args = parser.parse_args(argv)

    from train.lib.data import list_shards, split_shards
    from train.lib.features import cached_features

    setup_logging()
    hp = FilterHparams.from_namespace(args)
    if args.init_from:
        hp = init_hparams(hp, args.init_from)
        args.image_resize = hp.image_resize  # the features its weights were trained on
    run_dir = prepare_run_dir(args.run_dir, args.resume)
    start = time.perf_counter()
    train_shards = list_shards(args.train) if args.train else split_shards(args.data, "train")
    encode = {"resize": args.image_resize}
    _, train_path = cached_features(train_shards, args.cache_dir, args.max_train_samples, **encode)
    view_paths = []
    if args.flip_augment:
        _, flip_path = cached_features(
            train_shards, args.cache_dir, args.max_train_samples, flip=True, **encode
        )
        view_paths.append(str(flip_path))
    val_path = None
    if args.val != "none":
        val_shards = list_shards(args.val) if args.val else split_shards(args.data, "val")
        _, val_path = cached_features(val_shards, args.cache_dir, args.max_val_samples, **encode)
    hub_path = None
    if args.hub_shards and hp.hub_k > 0:
        _, hub_path = cached_features(list_shards(args.hub_shards), args.cache_dir, None, **encode)
    features_s = time.perf_counter() - start
    config = {
        "hparams": hp.to_dict(),
        "train_features": str(train_path),
        "train_view_features": view_paths,
        "val_features": str(val_path) if val_path else None,
        "output": str(Path(args.output).resolve()),
        "save_dtype": args.save_dtype,
        "resume": args.resume,
        "calibrate": args.calibrate,
        "init_from": str(Path(args.init_from).resolve()) if args.init_from else None,
        "hub_features": str(hub_path) if hub_path else None,
    }
    t0 = time.perf_counter()
    result = launch_from_args(train_loop, config, args, run_dir, "train_filter")
    summary = {
        **result,
        "features_seconds": round(features_s, 2),
        "train_seconds": round(time.perf_counter() - t0, 2),
        "output": config["output"],
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
    sys.exit(0)
