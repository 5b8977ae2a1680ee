"""Pre-train a CLIP (both towers, a Hugging Face CLIPModel) on curated WebDataset shards, streamed as is.

BLIP's loop ends by pre-training a new model on the bootstrapped data; this is that step
for a CLIP dual encoder, at any size ``CLIPConfig`` describes (``--arch vit-b-32``,
``vit-b-16``, ``vit-l-14``, or a config.json), from scratch or from a checkpoint
(``--init-from DIR``).

A step: each Ray Train worker takes ``--batch-size / --workers`` samples from its
DataLoader, whose ``--loader-workers`` processes read the tars, shuffle, decode, crop
(random-resized, scale ``--crop-scale``..1), draw one of each sample's kept captions
(``KEY.json``; ``KEY.txt`` for other shards: BLIP-2's recipe) and tokenise
(``train.lib.stream``; nothing is cached, so data larger than any disk cache trains). It
encodes them under bf16 autocast (``--precision auto``: bf16 on a GPU that computes it,
fp32 on a CPU), gathers every worker's features with gradients and takes InfoNCE of its
rows against the whole global batch (``train.lib.losses.ClipLoss``; rows sharing a
caption are not negatives); DDP averages the gradients. ``--accum-steps K`` splits each
worker's batch into K micro-batches whose features are first computed without gradients
and then recomputed one at a time against the cached rest (open_clip's ``--accum-freq``):
the negatives are still the whole global batch, the memory that of one micro-batch.
AdamW, linear warm-up then cosine decay, the logit scale clamped at 100.

Every ``--checkpoint-every`` steps ``RUN_DIR/checkpoints/step-N.pt`` holds the model,
optimizer, schedule and every worker's data-stream position; ``--resume`` continues from
the newest and ends on the same weights as an uninterrupted run (same ``--workers`` and
``--loader-workers``). ``RUN_DIR/metrics.jsonl`` gets one line per step (loss of the global
batch, lr, logit scale, gradient norm, samples/s, the share of the step spent waiting for
data) and, with ``--eval``, zero-shot retrieval recall@1/5/10 both ways on the held-out
shards every ``--eval-every`` steps and at the end. ``--output`` gets ``save_pretrained``
(safetensors), the tokenizer and the image processor: a pipeline file's ``ranker.model``.

CPU (a small config, here the test suite's tiny CLIP; two Ray Train workers over gloo):

    python -m train.pretrain_clip --init-from tiny/clip --train 'out/demo/shards/*.tar' \\
        --eval data/tuxpaint/test --steps 200 --batch-size 32 --lr 1e-3 --warmup-steps 20 \\
        --workers 2 --loader-workers 1 --output out/clip-tiny --run-dir out/pretrain_clip

Multi-GPU (ViT-B/32 from scratch on 8 GPUs of a Ray cluster, global batch 4096):

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m train.pretrain_clip --arch vit-b-32 --tokenizer /models/clip-tokenizer \\
        --train '/data/curated/shards/{00000..09999}.tar' --eval '/data/heldout/*.tar' \\
        --workers 8 --device cuda --loader-workers 8 --batch-size 4096 --steps 100000 \\
        --lr 5e-4 --warmup-steps 2000 --checkpoint-every 1000 \\
        --output /data/models/clip-vit-b-32 --run-dir /data/runs/pretrain_clip

Throughput (``--bench``): no checkpoints, evaluation or output; it times the data loader
alone (samples/s of one worker's DataLoader), then the training steps after two warm-up
steps (samples/s, per worker too, and ``model_samples_per_s`` without the steps' waits for
data: what the model sustains when the loader keeps up), counts one step's FLOPs with
torch's FlopCounterMode and prints MFU (end to end and the model's) against
``--peak-tflops`` (default: the dense bf16 peak of a known GPU).
A CPU smoke check, and the prepared command for one GPU (``bench/RESULTS.md``):

    python -m train.pretrain_clip --bench --arch vit-b-32 --tokenizer bytes --pad-text \\
        --train data/openclipart/00000.tar --workers 0 --batch-size 8 --steps 4 --loader-workers 1 \\
        --run-dir out/bench-clip
    mkdir -p /tmp/clip-shards   # 28 copies of one shard: every loader process reads whole shards
    for i in $(seq -w 0 27); do cp data/openclipart/00000.tar /tmp/clip-shards/$i.tar; done
    python -m train.pretrain_clip --bench --arch vit-b-32 --tokenizer bytes --pad-text \\
        --train /tmp/clip-shards --workers 0 --device cuda --loader-workers 14 \\
        --batch-size 256 --steps 40 --run-dir out/bench-clip
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from train.lib.checkpoint import Hyperparams
from train.lib.launch import (
    absolute_local,
    absolute_shards,
    add_launch_args,
    launch_from_args,
    mean_over_workers,
    prepare_model,
    prepare_run_dir,
    report,
    seed_everything,
    setup_logging,
    step_worker,
)
from train.lib.metrics import MetricsLogger
from train.lib.optim import autocast, param_groups, warmup_cosine

log = logging.getLogger("train.pretrain_clip")

# dense bf16 tensor-core peaks, TFLOP/s (vendor figures), for MFU when --peak-tflops is not given
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}


@dataclass
class PretrainHparams(Hyperparams):
    """Everything that changes the trained weights (saved in every checkpoint)."""

    init_from: str | None = None
    arch: str | None = None
    tokenizer: str | None = None
    steps: int = 1000
    batch_size: int = 256  # global: split across workers, then into accum_steps micro-batches
    accum_steps: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.2
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0
    beta2: float = 0.98
    eps: float = 1e-6
    grad_clip: float = 1.0
    precision: str = "auto"
    shuffle_buffer: int = 1000
    mix_shards: int = 4
    crop_scale: float = 0.9
    max_text_tokens: int = 77
    pad_text: bool = False
    caption_source: str | None = None
    seed: int = 0


def peak_tflops(device: torch.device, precision: str) -> float | None:
    """The dense bf16 peak of a known GPU, or None (a CPU, fp32, an unknown GPU)."""
    if device.type != "cuda" or precision != "bf16":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def train_loop(config: dict) -> dict:
    """One Ray Train worker (or the only process with ``--workers 0``)."""
    from torch.utils.flop_counter import FlopCounterMode

    from train.lib.evaluation import clip_retrieval
    from train.lib.losses import ClipLoss
    from train.lib.models import build_clip, save_pretrained
    from train.lib.stream import (
        ImageTextStream,
        ImageTransform,
        StreamCursor,
        TextTokenizer,
        eval_batches,
        make_loader,
        resume_step,
        save_step,
        to_device,
    )

    hp = PretrainHparams.from_dict(config["hparams"])
    info, micro, precision = step_worker(config["device"], hp.batch_size, hp.accum_steps, hp.precision)
    bench = bool(config.get("bench"))
    run_dir = Path(config["run_dir"])
    logger = MetricsLogger(
        run_dir / "metrics.jsonl", enabled=info.is_main and not bench, unit="step", steps=hp.steps
    )

    seed_everything(hp.seed)  # the same initial weights on every worker
    model, tokenizer, image_processor = build_clip(hp.init_from, hp.arch, hp.tokenizer)
    max_len = min(hp.max_text_tokens, model.config.text_config.max_position_embeddings)
    transform = ImageTransform.from_processor(image_processor, scale=(hp.crop_scale, 1.0))
    tokenize = TextTokenizer(tokenizer, max_len, pad_to_max=hp.pad_text)
    bare = model
    model = prepare_model(model, info)
    optimizer = torch.optim.AdamW(
        param_groups(bare, hp.weight_decay), lr=hp.lr, betas=(0.9, hp.beta2), eps=hp.eps
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, hp.warmup_steps, hp.steps, hp.min_lr_ratio)
    )
    ckpt_dir = run_dir / "checkpoints"
    resume = bool(config.get("resume"))
    start_step, stream_state = resume_step(ckpt_dir, resume, bare, optimizer, scheduler, info)

    def stream(cursor: dict | None) -> ImageTextStream:
        return ImageTextStream(
            config["train"], transform, tokenize, micro, seed=hp.seed, rank=info.rank,
            world_size=info.world_size, loader_workers=config["loader_workers"],
            shuffle_buffer=hp.shuffle_buffer, mix=hp.mix_shards, caption_source=hp.caption_source,
            cursor=cursor,
        )  # fmt: skip

    pin = info.device.type == "cuda"
    bench_result: dict = {}
    if bench:  # the data loader alone, before the model competes with it for the CPU
        loader = iter(make_loader(stream(None), pin_memory=pin))
        next(loader)  # worker start-up
        t0 = time.perf_counter()
        n = config["bench_loader_batches"]
        for _ in range(n):
            next(loader)
        bench_result["loader_samples_per_s"] = round(n * micro / (time.perf_counter() - t0), 2)
        del loader

    cursor = StreamCursor(stream_state)
    batches = iter(make_loader(stream(stream_state), pin_memory=pin))
    loss_fn = ClipLoss()
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    metrics: dict = {}
    eval_metrics: dict = {}
    timed: list[tuple[float, float]] = []  # (step seconds, data seconds) of the bench's timed steps

    def evaluate() -> dict:
        held_out = eval_batches(
            config["eval"], transform, tokenize, max(micro, 16), config.get("eval_samples")
        )
        return clip_retrieval(bare, held_out, transform, info.device, precision)

    model.train()
    for step in range(start_step, hp.steps):
        seed_everything(hp.seed + 1_000_003 * info.rank + step)  # anything random in a step replays on resume
        t0 = time.perf_counter()
        parts = []
        for _ in range(hp.accum_steps):
            batch = next(batches)
            cursor.advance(batch)
            parts.append(batch)
        t_data = time.perf_counter() - t0
        inputs = [to_device(b, info.device, transform) for b in parts]
        ids = torch.cat([b["caption_ids"] for b in parts]).to(info.device)
        optimizer.zero_grad(set_to_none=True)
        counter = FlopCounterMode(display=False) if bench and step == start_step else contextlib.nullcontext()
        with counter:
            if hp.accum_steps == 1:
                with autocast(info.device, precision):
                    out = model(**inputs[0])
                loss = loss_fn(out.image_embeds, out.text_embeds, bare.logit_scale, ids)
                loss.backward()
            else:
                with torch.no_grad(), autocast(info.device, precision):
                    cached = [bare(**x) for x in inputs]
                for j, x in enumerate(inputs):
                    last = j == len(inputs) - 1
                    with contextlib.nullcontext() if last or not ddp else model.no_sync():
                        with autocast(info.device, precision):
                            out = model(**x)
                        image = [out.image_embeds if i == j else c.image_embeds for i, c in enumerate(cached)]
                        text = [out.text_embeds if i == j else c.text_embeds for i, c in enumerate(cached)]
                        loss = loss_fn(torch.cat(image), torch.cat(text), bare.logit_scale, ids)
                        loss.backward()
        if hp.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(bare.parameters(), hp.grad_clip)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(bare.parameters(), float("inf"))
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            bare.logit_scale.clamp_(0, math.log(100.0))
        if isinstance(counter, FlopCounterMode):
            bench_result["flops_per_step_per_worker"] = counter.get_total_flops()
        reduced = mean_over_workers({"loss": float(loss.detach())}, info.device)  # the global batch's loss
        seconds = time.perf_counter() - t0
        metrics = {
            "loss": reduced["loss"],
            "lr": scheduler.get_last_lr()[0],
            "logit_scale": float(bare.logit_scale.detach().exp()),
            "grad_norm": float(grad_norm),
            "samples_per_s": round(hp.batch_size / seconds, 2),
            "data_wait": round(t_data / seconds, 3),
        }
        last_step = step + 1 == hp.steps
        logger.log(step + 1, "train", metrics, echo=(step + 1) % config["log_every"] == 0 or last_step)
        if bench:
            if step - start_step >= 2:  # past the first two steps: allocator, kernels, loader warm
                timed.append((seconds, t_data))
            continue
        if config.get("eval") and ((step + 1) % config["eval_every"] == 0 or last_step):
            if info.is_main:
                eval_metrics = evaluate()
                logger.log(step + 1, "eval", eval_metrics)
            report({"step": step + 1, **metrics}, info)  # a barrier: the others wait for rank 0
        if (step + 1) % config["checkpoint_every"] == 0 or last_step:
            # every worker's position: all resume together
            save_step(ckpt_dir, step + 1, bare, optimizer, scheduler, hp, metrics, cursor, info,
                      keep=config["keep_checkpoints"])  # fmt: skip
            report({"step": step + 1, **metrics}, info)

    logger.close()
    result: dict = {"step": hp.steps, "train": metrics, "precision": precision}
    if eval_metrics:
        result["eval"] = eval_metrics
    if bench:
        if not timed:
            raise ValueError("--bench needs --steps >= 3: the first two steps are warm-up")
        step_s = sum(t for t, _ in timed) / len(timed)
        # the step without its wait for data: what the model alone sustains if the loader keeps up
        compute_s = step_s - sum(d for _, d in timed) / len(timed)
        flops = bench_result.get("flops_per_step_per_worker", 0) * info.world_size
        peak = config.get("peak_tflops") or peak_tflops(info.device, precision)
        achieved, model_achieved = flops / step_s / 1e12, flops / compute_s / 1e12
        bench_result.update(
            samples_per_s=round(hp.batch_size / step_s, 2),
            samples_per_s_per_worker=round(hp.batch_size / step_s / info.world_size, 2),
            model_samples_per_s=round(hp.batch_size / compute_s, 2),
            step_seconds=round(step_s, 4),
            data_wait=round(1 - compute_s / step_s, 3),
            timed_steps=len(timed),
            flops_per_sample=round(flops / hp.batch_size),
            achieved_tflops=float(f"{achieved:.4g}"),
            peak_tflops=peak,
            mfu=float(f"{achieved / peak:.4g}") if peak else None,
            model_mfu=float(f"{model_achieved / peak:.4g}") if peak else None,
            device=torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else "cpu",
            workers=info.world_size,
            micro_batch=micro,
        )
        result["bench"] = bench_result
    elif info.is_main and config.get("output"):
        save_pretrained(bare, config["output"], tokenizer, image_processor, dtype=config["save_dtype"])
        result["output"] = config["output"]
    return result


def main(argv: list[str] | None = None) -> dict:
    D = PretrainHparams()  # defaults live in the dataclass
    parser = argparse.ArgumentParser(
        prog="python -m train.pretrain_clip",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    # data
    add(
        "--train", action="append", required=True, help="training shards (dir, glob, brace range); repeatable"
    )
    add("--eval", action="append", default=None, help="held-out shards for zero-shot retrieval; repeatable")
    add("--eval-samples", type=int, default=1000, help="held-out samples scored (the first N)")
    add("--eval-every", type=int, default=500, help="steps between evaluations (and at the end)")
    add(
        "--caption-source",
        choices=["alt", "synthetic", "kale"],
        default=None,
        help="curated shards: draw only kept captions of this source (default: any kept caption)",
    )
    add("--loader-workers", type=int, default=2, help="DataLoader processes per Ray Train worker (0: none)")
    add(
        "--shuffle-buffer", type=int, default=D.shuffle_buffer, help="samples in each loader's shuffle buffer"
    )
    add("--mix-shards", type=int, default=D.mix_shards, help="shards a loader interleaves at a time")
    add("--crop-scale", type=float, default=D.crop_scale, help="smallest area share of the random crop")
    add("--max-text-tokens", type=int, default=D.max_text_tokens, help="caption cut (CLIP: 77)")
    add(
        "--pad-text",
        action="store_true",
        help="pad every caption to --max-text-tokens (CLIP's fixed context)",
    )
    # model
    add("--init-from", default=None, help="CLIP checkpoint directory (or hub id) to start from")
    add("--arch", default=None, help="from scratch: vit-b-32, vit-b-16, vit-l-14 or a CLIP config.json")
    add("--tokenizer", default=None, help="tokenizer directory, or 'bytes' (byte-level; needs no vocabulary)")
    # optimisation
    add("--steps", type=int, default=D.steps, help="optimizer steps")
    add("--batch-size", type=int, default=D.batch_size, help="global batch: the contrastive negatives")
    add("--accum-steps", type=int, default=D.accum_steps, help="micro-batches per worker and step")
    add("--lr", type=float, default=D.lr, help="peak AdamW learning rate")
    add("--weight-decay", type=float, default=D.weight_decay, help="AdamW weight decay (matrices only)")
    add("--warmup-steps", type=int, default=D.warmup_steps, help="linear warm-up, then cosine")
    add("--min-lr-ratio", type=float, default=D.min_lr_ratio, help="the cosine's end, as a share of --lr")
    add("--beta2", type=float, default=D.beta2, help="AdamW beta2 (CLIP: 0.98)")
    add("--eps", type=float, default=D.eps, help="AdamW epsilon (CLIP: 1e-6)")
    add("--grad-clip", type=float, default=D.grad_clip, help="max gradient norm (0: off)")
    add(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default=D.precision,
        help="autocast dtype (auto: bf16 on a GPU that has it, else fp32)",
    )
    add("--seed", type=int, default=D.seed, help="init, data order, caption draws and crops")
    # output
    add("--output", default=None, help="save_pretrained directory of the trained CLIP")
    add("--save-dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="dtype of the saved weights")
    add("--checkpoint-every", type=int, default=500, help="steps between checkpoints (and at the end)")
    add("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept")
    add("--log-every", type=int, default=10, help="steps between console lines (metrics.jsonl: every step)")
    add("--bench", action="store_true", help="measure throughput and MFU only (see the docstring)")
    add("--bench-loader-batches", type=int, default=20, help="--bench: batches timed from the loader alone")
    add("--peak-tflops", type=float, default=None, help="--bench: the device's peak for MFU")
    add_launch_args(parser, run_dir="out/pretrain_clip")
    args = parser.parse_args(argv)
    if not args.init_from and not args.arch:
        parser.error("give --init-from (a CLIP checkpoint) or --arch (from scratch)")

    from train.lib.data import list_shards

    setup_logging()
    args.init_from = absolute_local(args.init_from)
    args.arch = absolute_local(args.arch)
    args.tokenizer = absolute_local(args.tokenizer)
    hp = PretrainHparams.from_namespace(args)
    run_dir = prepare_run_dir(args.run_dir, args.resume and not args.bench)
    config = {
        "hparams": hp.to_dict(),
        "train": absolute_shards(list_shards(args.train)),
        "eval": absolute_shards(list_shards(args.eval)) if args.eval else None,
        "eval_samples": args.eval_samples,
        "eval_every": args.eval_every,
        "loader_workers": args.loader_workers,
        "output": str(Path(args.output).resolve()) if args.output else None,
        "save_dtype": args.save_dtype,
        "checkpoint_every": args.checkpoint_every,
        "keep_checkpoints": args.keep_checkpoints,
        "log_every": args.log_every,
        "resume": args.resume,
        "bench": args.bench,
        "bench_loader_batches": args.bench_loader_batches,
        "peak_tflops": args.peak_tflops,
    }
    started = time.perf_counter()
    result = launch_from_args(train_loop, config, args, run_dir, "pretrain_clip")
    result["seconds"] = round(time.perf_counter() - started, 1)
    name = "bench.json" if args.bench else "summary.json"
    (run_dir / name).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result.get("bench", result), indent=1))
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
