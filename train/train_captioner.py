"""Train the bridge captioner: frozen EfficientNet-Lite0 -> Q-Former bridge -> frozen SmolLM2.

Only the bridge (a few million parameters) learns, with the language-modelling loss on
the caption tokens; the image tokens of the frozen encoder are computed once per split
and cached (``train.lib.features``), so an epoch costs the LM's forward and backward only.
Default data: the human-captioned tuxpaint stamps (``data/tuxpaint/{train,val}``).
``--train-shards`` trains the same family on any img2dataset-layout tars whose ``.txt``
is the target caption, e.g. a curation run's ``OUT/shards/*.tar`` (KALE stage 2; with
``--caption-source kale``, each sample's kept KALE rewrite instead of its best caption);
``--init-from`` starts from a saved bridge (its architecture and weights) instead of a
fresh one, which is how a few hundred stage-1 captions can teach the seed captioner
without it collapsing to one caption.

CPU, one Ray Train worker (the committed model: 6 epochs in 12.5 min on 2 busy cores,
plus ~4 min to cache the frozen features the first time). One torch thread: on a shared
2-core box two threads were 4x slower. ``--amp bf16`` only where the CPU computes bf16
natively (AVX512-BF16 or AMX: ~2x faster); elsewhere torch emulates it, and an AVX2-only
CPU (AMD Zen 3) ran a step 10x slower than in fp32:

    python -m train.train_captioner --device cpu --workers 1 --threads 1 \
        --output pipelines/models/bridge-captioner

Multi-GPU, one node with 8 GPUs (or a cluster: --ray-address auto):

    python -m train.train_captioner --device cuda --workers 8 --amp bf16 --batch-size 256 --epochs 10 \
        --train-shards 'out/kale/shards/*.tar' --val-shards 'data/tuxpaint/val/*.tar' \
        --output models/bridge-captioner-kale

A re-run with ``--resume`` continues from the newest checkpoint in ``--run-dir``; a
fixed ``--seed`` with the same worker count gives the same weights. Metrics per epoch
(train loss, val loss, val CIDEr-D on a small subset) go to the console and to
``RUN_DIR/metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
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
    worker_info,
)
from train.lib.metrics import MetricsLogger
from train.lib.models import save_pretrained, saved_bridge_config
from train.lib.optim import autocast, warmup_cosine

log = logging.getLogger("train.captioner")


@dataclass
class CaptionerHparams(Hyperparams):
    # bridge architecture (BridgeCaptionerConfig)
    hidden_size: int = 256
    num_queries: int = 8
    num_layers: int = 2
    num_heads: int = 4
    dropout: float = 0.1
    prompt: str = "A picture of"
    max_caption_tokens: int = 24
    language_model: str | None = None  # None: the packaged SmolLM2-135M-Instruct
    image_resize: str = "crop"  # how images are squared (an ITC prefix needs its filter's: see main)
    itc_prefix_tokens: int = 0  # soft-prompt tokens from a held filter's ITC embedding (--itc-from)
    # optimisation
    epochs: int = 6
    batch_size: int = 8  # global: split across workers; small batches, more updates per LM pass
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup_steps: int = 20
    grad_clip: float = 1.0
    seed: int = 0
    amp: str = "none"  # bf16: autocast the frozen LM (about 2x on CPUs with AVX512-BF16, and on GPUs)
    max_steps_per_epoch: int | None = None  # cut epochs short (smoke tests)
    # evaluation
    val_cider_samples: int = 48
    max_new_tokens: int = 20


def build_model(hp: CaptionerHparams, itc_filter: dict | None = None):
    """A fresh bridge captioner (weights from torch's current RNG state); ``itc_filter``: the
    config of the filter an ITC prefix holds (its weights are loaded separately)."""
    from curate.models.bridge import BridgeCaptionerConfig, BridgeCaptionerModel

    config = BridgeCaptionerConfig(
        language_model=hp.language_model,
        hidden_size=hp.hidden_size,
        num_queries=hp.num_queries,
        num_layers=hp.num_layers,
        num_heads=hp.num_heads,
        dropout=hp.dropout,
        prompt=hp.prompt,
        max_caption_tokens=hp.max_caption_tokens,
        image_resize=hp.image_resize,
        itc_prefix_tokens=hp.itc_prefix_tokens,
        itc_filter=itc_filter if hp.itc_prefix_tokens > 0 else None,
    )
    if hp.language_model is not None:  # the projection must land in this LM's embedding space
        config.lm_hidden_size = _lm_hidden_size(hp.language_model)
    return BridgeCaptionerModel(config)


def _lm_hidden_size(path: str) -> int:
    with open(Path(path) / "config.json") as f:
        cfg = json.load(f)
    return int(cfg.get("hidden_size") or cfg["text_config"]["hidden_size"])


ARCHITECTURE_FIELDS = (
    "hidden_size",
    "num_queries",
    "num_layers",
    "num_heads",
    "prompt",
    "max_caption_tokens",
    "language_model",
    "image_resize",
    "itc_prefix_tokens",
)


def init_hparams(hp: CaptionerHparams, init_from: str | Path) -> CaptionerHparams:
    """``hp`` with the architecture of the saved bridge in ``init_from`` (its config.json wins)."""
    saved = saved_bridge_config(init_from, "curate-bridge-captioner", "--init-from")
    values = hp.to_dict()
    values.update({k: saved[k] for k in ARCHITECTURE_FIELDS if k in saved})
    return CaptionerHparams.from_dict(values)


def itc_filter_source(filter_dir: str | Path) -> tuple[dict, str]:
    """(config dict, image_resize) of the saved bridge filter an ITC prefix will hold."""
    saved = saved_bridge_config(filter_dir, "curate-bridge-filter", "--itc-from")
    return saved, saved.get("image_resize", "crop")


def load_bridge_weights(model, init_from: str | Path) -> None:
    """Start from a saved bridge's weights (fine-tuning, e.g. KALE stage 2 from the seed captioner)."""
    from safetensors.torch import load_file

    state = load_file(str(Path(init_from) / "model.safetensors"))
    own = model.state_dict()
    state = {k: v.to(own[k].dtype) if k in own else v for k, v in state.items()}
    model.load_state_dict(state, strict=True)


def _batches(indices: list[int], batch_size: int):
    for start in range(0, len(indices), batch_size):
        yield indices[start : start + batch_size]


def length_batches(indices: list[int], lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """Batches of similar caption length (little padding: the LM's cost is per token), in random order.

    Sorting happens within windows of 8 batches of the already shuffled ``indices``, so
    batches stay varied; the batch order is reshuffled with ``seed`` (same on every worker).
    """
    window = batch_size * 8
    batches: list[list[int]] = []
    for start in range(0, len(indices), window):
        chunk = sorted(indices[start : start + window], key=lambda i: lengths[i])
        batches.extend(_batches(chunk, batch_size))
    order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed)).tolist()
    return [batches[i] for i in order]


@torch.no_grad()
def val_loss(model, feats, batch_size: int, device: torch.device, amp: str = "none") -> float:
    """Token-weighted LM loss over the whole split, dropout off."""
    model.eval()
    total, tokens = 0.0, 0
    for idx in _batches(list(range(len(feats))), batch_size):
        ids, mask = model.tokenize_captions([feats.captions[i] for i in idx], device)
        with autocast(device, amp):
            out = model(feats.image_tokens[idx].float().to(device), ids, mask)
        total += float(out.loss) * int(out.num_tokens)
        tokens += int(out.num_tokens)
    model.train()
    return total / max(tokens, 1)


def train_loop(config: dict) -> dict:
    """One Ray Train worker (or the only process with ``--workers 0``)."""
    from train.lib.evaluation import caption_features, score_captions
    from train.lib.features import load_features

    setup_logging()
    hp = CaptionerHparams.from_dict(config["hparams"])
    info = worker_info(config["device"])
    run_dir = Path(config["run_dir"])
    metrics_log = MetricsLogger(run_dir / "metrics.jsonl", enabled=info.is_main)

    train_feats = load_features(config["train_features"])
    val_feats = load_features(config["val_features"]) if config.get("val_features") else None

    seed_everything(hp.seed)
    model = build_model(hp, config.get("itc_filter"))
    if config.get("init_from"):
        load_bridge_weights(model, config["init_from"])
    elif config.get("itc_from"):
        from safetensors.torch import load_file

        model.load_itc_filter(load_file(str(Path(config["itc_from"]) / "model.safetensors")))
    bare = model
    bare.language_model()  # load the frozen LM before DDP wraps the bridge
    model = prepare_model(model, info)
    bare.language_model()  # follow the bridge to the worker's device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
    per_worker = max(1, hp.batch_size // info.world_size)
    _, tok = bare.language_model()
    lengths = [len(tok(c, add_special_tokens=False).input_ids) for c in train_feats.captions]
    steps_per_epoch = math.ceil(len(shard_indices(len(train_feats), info, hp.seed, 0)) / per_worker)
    if hp.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, hp.max_steps_per_epoch)
    total_steps = max(1, steps_per_epoch * hp.epochs)

    # linear warmup, cosine decay to 10%
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, hp.warmup_steps, total_steps, 0.1)
    )
    start_epoch = 0
    ckpt_dir = run_dir / "checkpoints"
    if config.get("resume") and (ckpt := latest_checkpoint(ckpt_dir)) is not None:
        state = load_checkpoint(ckpt, model, optimizer, scheduler)
        start_epoch = state["epoch"]
        if info.is_main:
            log.info("resumed from %s (epoch %d done)", ckpt, start_epoch)

    last: dict = {}
    metrics_log.progress.total = steps_per_epoch * (hp.epochs - start_epoch)
    for epoch in range(start_epoch, hp.epochs):
        seed_everything(hp.seed + epoch + 10_000 * info.rank)  # dropout differs per rank, replays on resume
        model.train()
        indices = shard_indices(len(train_feats), info, hp.seed, epoch)
        started = time.perf_counter()
        loss_sum, token_sum, steps = 0.0, 0, 0
        for idx in length_batches(indices, lengths, per_worker, hp.seed + epoch):
            if steps >= steps_per_epoch:
                break
            ids, mask = bare.tokenize_captions([train_feats.captions[i] for i in idx], info.device)
            feats = train_feats.image_tokens[idx].float().to(info.device)
            with autocast(info.device, hp.amp):
                out = model(feats, ids, mask)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, hp.grad_clip)
            optimizer.step()
            scheduler.step()
            loss_sum += out.loss.item() * int(out.num_tokens)
            token_sum += int(out.num_tokens)
            steps += 1
            metrics_log.step(loss=loss_sum / max(token_sum, 1))
        seconds = time.perf_counter() - started
        train_metrics = {
            "loss": loss_sum / max(token_sum, 1),
            "steps": steps,
            "seconds": round(seconds, 1),
            "tokens_per_s": round(token_sum * info.world_size / max(seconds, 1e-9), 1),
            "lr": scheduler.get_last_lr()[0],
        }
        metrics_log.log(epoch + 1, "train", train_metrics)
        last = {"epoch": epoch + 1, "train_loss": train_metrics["loss"]}
        if info.is_main and val_feats is not None:  # rank 0 evaluates; the others wait at report()
            val = {"loss": val_loss(bare, val_feats, per_worker * 2, info.device, hp.amp)}
            k = min(hp.val_cider_samples, len(val_feats))
            if k > 0:
                with autocast(info.device, hp.amp):
                    caps = caption_features(
                        bare, val_feats.image_tokens[:k], max_new_tokens=hp.max_new_tokens
                    )
                scored = score_captions(caps, [[c] for c in val_feats.captions[:k]])
                val.update(cider=scored["cider"], cider_n=scored["n"], example=caps[0])
            metrics_log.log(epoch + 1, "val", val)
            last.update(val_loss=val["loss"], val_cider=val.get("cider", float("nan")))
        if info.is_main:
            save_checkpoint(ckpt_dir, epoch + 1, model, optimizer, hp, last, scheduler)
        report(last, info)

    if info.is_main:
        path = save_pretrained(bare, config["output"], dtype=config.get("save_dtype", "fp16"))
        log.info("saved %s (%d trainable parameters)", path, bare.num_trainable_parameters())
    metrics_log.close()
    return last


def main(argv: list[str] | None = None) -> dict:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    add = parser.add_argument
    # data
    add("--data-root", default="data/tuxpaint", help="root with train/ and val/ tars")
    add("--train-shards", nargs="+", default=None, help="tars/globs/dirs (default ROOT/train)")
    add("--val-shards", nargs="+", default=None, help="tars/globs/dirs (default ROOT/val)")
    add("--no-val", action="store_true", help="skip validation (no val split at hand)")
    add(
        "--caption-source",
        choices=["alt", "synthetic", "kale"],
        default=None,
        help="curated shards: train on each sample's kept caption of this source (KALE stage 2: kale), "
        "leaving out samples without one (default: KEY.txt, the best caption)",
    )
    add("--max-train-samples", type=int, default=None, help="first N training samples only")
    add("--max-val-samples", type=int, default=None, help="first N validation samples only")
    add("--cache-dir", default=None, help="frozen-feature cache (default ~/.cache/curate)")
    # output
    add("--output", required=True, help="save_pretrained directory of the trained bridge")
    add("--save-dtype", choices=["fp16", "fp32"], default="fp16", help="dtype of the saved file")
    add(
        "--init-from",
        default=None,
        help="saved bridge to fine-tune from (its architecture is used), e.g. the seed captioner",
    )
    add(
        "--itc-from",
        default=None,
        help="saved bridge filter whose ITC image embedding becomes --itc-prefix-tokens more soft-prompt "
        "tokens (BLIP-2: the bridge learns matching before generation); images are squared as it does",
    )
    # compute, run dir
    add_launch_args(parser, run_dir_help="checkpoints, metrics.jsonl, Ray (default .cache/runs/NAME)")
    # hyperparameters
    defaults = CaptionerHparams()
    add("--hidden-size", type=int, default=defaults.hidden_size, help="bridge width")
    add("--num-queries", type=int, default=defaults.num_queries, help="soft-prompt length")
    add("--num-layers", type=int, default=defaults.num_layers, help="Q-Former layers")
    add("--num-heads", type=int, default=defaults.num_heads, help="attention heads")
    add("--dropout", type=float, default=defaults.dropout, help="bridge dropout")
    add("--prompt", default=defaults.prompt, help="fixed text after the soft prompt")
    add("--max-caption-tokens", type=int, default=defaults.max_caption_tokens, help="caption cut (with EOS)")
    add("--language-model", default=None, help="frozen LM directory (default: SmolLM2)")
    add(
        "--itc-prefix-tokens",
        type=int,
        default=None,
        help="soft-prompt tokens from the --itc-from filter (default 4 with --itc-from, else 0)",
    )
    add(
        "--image-resize",
        choices=["crop", "pad"],
        default=None,
        help="square images by centre crop or white padding (default: the --itc-from filter's, else crop)",
    )
    add("--epochs", type=int, default=defaults.epochs, help="passes over the training set")
    add("--batch-size", type=int, default=defaults.batch_size, help="global batch size")
    add("--lr", type=float, default=defaults.lr, help="peak AdamW learning rate")
    add("--weight-decay", type=float, default=defaults.weight_decay, help="AdamW decay")
    add("--warmup-steps", type=int, default=defaults.warmup_steps, help="linear warmup")
    add("--grad-clip", type=float, default=defaults.grad_clip, help="max gradient norm")
    add("--seed", type=int, default=defaults.seed, help="init, data order and dropout")
    add("--amp", choices=["none", "bf16"], default=defaults.amp, help="autocast of the frozen LM")
    add("--max-steps-per-epoch", type=int, default=None, help="cut epochs short (smoke tests)")
    add(
        "--val-cider-samples",
        type=int,
        default=defaults.val_cider_samples,
        help="val images captioned per epoch",
    )
    add("--max-new-tokens", type=int, default=defaults.max_new_tokens, help="caption length cap")
    args = parser.parse_args(argv)
    setup_logging()

    from train.lib.data import list_shards, split_shards
    from train.lib.features import cached_features

    itc_filter = None
    if args.itc_from:
        if args.init_from:
            parser.error("--itc-from starts a new ITC prefix; --init-from brings its own filter: pass one")
        itc_filter, resize = itc_filter_source(args.itc_from)
        if args.image_resize not in (None, resize):
            parser.error(f"--image-resize {args.image_resize}: the --itc-from filter squares by {resize}")
        args.image_resize = resize
        args.itc_prefix_tokens = 4 if args.itc_prefix_tokens is None else args.itc_prefix_tokens
        if args.itc_prefix_tokens < 1:
            parser.error("--itc-from needs --itc-prefix-tokens of at least 1")
    elif args.itc_prefix_tokens:
        parser.error("--itc-prefix-tokens needs --itc-from (the filter whose embedding it reads)")
    args.image_resize = args.image_resize or "crop"
    args.itc_prefix_tokens = args.itc_prefix_tokens or 0
    hp = CaptionerHparams.from_namespace(args)
    if args.init_from:
        hp = init_hparams(hp, args.init_from)
        itc_filter = json.loads((Path(args.init_from) / "config.json").read_text()).get("itc_filter")
    if args.train_shards:
        train_shards = list_shards(args.train_shards)
    else:
        train_shards = split_shards(args.data_root, "train")
    # the frozen image tokens are computed once here (driver CPU) and read by every worker
    _, train_path = cached_features(
        train_shards,
        cache_dir=args.cache_dir,
        max_samples=args.max_train_samples,
        caption_source=args.caption_source,
        resize=hp.image_resize,
    )
    val_path = None
    if not args.no_val:
        val_shards = list_shards(args.val_shards) if args.val_shards else split_shards(args.data_root, "val")
        _, val_path = cached_features(
            val_shards,
            cache_dir=args.cache_dir,
            max_samples=args.max_val_samples,
            caption_source=args.caption_source,
            resize=hp.image_resize,
        )
    run_dir = prepare_run_dir(args.run_dir or Path(".cache") / "runs" / Path(args.output).name, args.resume)
    config = {
        "hparams": hp.to_dict(),
        "train_features": str(train_path),
        "val_features": str(val_path) if val_path else None,
        "output": str(Path(args.output).resolve()),
        "resume": args.resume,
        "save_dtype": args.save_dtype,
        "init_from": str(Path(args.init_from).resolve()) if args.init_from else None,
        "itc_from": str(Path(args.itc_from).resolve()) if args.itc_from else None,
        "itc_filter": itc_filter,
    }
    started = time.perf_counter()
    launch_from_args(train_loop, config, args, run_dir, "captioner")
    seconds = time.perf_counter() - started
    log.info("training took %.1fs; model in %s", seconds, args.output)
    return {**last_metrics(run_dir / "metrics.jsonl"), "seconds": round(seconds, 1)}


def last_metrics(path: Path) -> dict:
    """The newest epoch's train and val lines of ``metrics.jsonl`` (Ray Train 2 returns metrics
    only with Ray checkpoints, so rank 0's log is the record)."""
    out: dict = {}
    if path.exists():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            out["epoch"] = row["epoch"]
            out.update(
                {f"{row['split']}_{k}": v for k, v in row.items() if k not in ("epoch", "split", "time")}
            )
    return out


if __name__ == "__main__":
    main()
