"""Fine-tune a Hugging Face BLIP captioner (LM loss) or ITM filter (ITC + ITM) on human and curated pairs.

BLIP's CapFilt starts both from a pre-trained BLIP and fine-tunes them on human-annotated
pairs: the captioner (``BlipForConditionalGeneration``) with the language-modelling loss
on each caption, the filter (``BlipForImageTextRetrieval``) with ITC (InfoNCE; negatives
from the global batch of every worker, gathered with gradients) plus ITM on the positive
pairs and one hard negative text and image per sample, mined from the ITC similarities
(``train.lib.losses.BlipFilterLoss``). ``--train`` takes any mix of shards: human pairs
(``KEY.txt``, e.g. ``data/tuxpaint/train``) and a curation run's ``OUT/shards`` (one of a
sample's kept captions drawn per step). The data layer, schedule, checkpoints and Ray
Train launch are ``train.pretrain_clip``'s: shards streamed and decoded in
``--loader-workers`` DataLoader processes (``train.lib.stream``), random-resized crops
(scale ``--crop-scale``..1, BLIP's 0.5), bf16 autocast where the GPU has it, AdamW with a
linear warm-up and cosine decay, ``--accum-steps`` micro-batches per step (each its own
ITC negatives here), ``RUN_DIR/metrics.jsonl`` per step, checkpoints with every worker's
stream position, ``--resume`` to the same weights as an uninterrupted run.

``--val`` shards are scored every ``--eval-every`` steps and at the end: the captioner's LM
loss per token and CIDEr-D of greedy captions; the filter's ITM ROC-AUC (own caption vs
another caption of the batch), accuracy at 0.5 and ITC recall@K. ``--output`` gets
``save_pretrained`` (safetensors) with the processor, so a pipeline file takes it as it is:
``curate run pipelines/capfilt.yaml --set captioner.model=OUT_CAP --set filter.model=OUT_ITM``.

CPU (the test suite's tiny BLIPs, one Ray Train worker per task):

    python -m train.finetune_blip --task captioner --init-from tiny/captioner \\
        --train data/tuxpaint/train --train 'out/demo/shards/*.tar' --val data/tuxpaint/val \\
        --steps 200 --batch-size 16 --lr 1e-3 --workers 1 --output out/blip-captioner-ft
    python -m train.finetune_blip --task filter --init-from tiny/itm \\
        --train data/tuxpaint/train --train 'out/demo/shards/*.tar' --val data/tuxpaint/val \\
        --steps 200 --batch-size 16 --lr 1e-3 --workers 1 --output out/blip-itm-ft

Multi-GPU (BLIP-large from its checkpoints, 8 GPUs of a Ray cluster):

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m train.finetune_blip --task captioner --init-from Salesforce/blip-image-captioning-large \\
        --train /data/coco/train --train '/data/curated/shards/*.tar' --val /data/coco/val \\
        --workers 8 --device cuda --loader-workers 8 --batch-size 256 --steps 20000 --lr 1e-5 \\
        --output /data/models/blip-captioner-ft --run-dir /data/runs/finetune_blip_captioner
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m train.finetune_blip --task filter --init-from Salesforce/blip-itm-large-coco \\
        --train /data/coco/train --train '/data/curated/shards/*.tar' --val /data/coco/val \\
        --workers 8 --device cuda --loader-workers 8 --batch-size 256 --steps 20000 --lr 1e-5 \\
        --output /data/models/blip-itm-ft --run-dir /data/runs/finetune_blip_filter
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
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

log = logging.getLogger("train.finetune_blip")

TASKS = ("captioner", "filter")


@dataclass
class FinetuneHparams(Hyperparams):
    """Everything that changes the fine-tuned weights (saved in every checkpoint)."""

    task: str = "captioner"
    init_from: str = ""
    steps: int = 1000
    batch_size: int = 64  # global: split across workers, then into accum_steps micro-batches
    accum_steps: int = 1
    lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    precision: str = "auto"
    shuffle_buffer: int = 1000
    mix_shards: int = 4
    crop_scale: float = 0.5
    max_text_tokens: int = 40
    prompt: str = ""  # captioner: text before every caption, not predicted (BLIP: "a picture of ")
    itm_weight: float = 1.0  # filter
    itc_weight: float = 1.0  # filter
    temperature: float = 0.07  # filter: ITC's initial temperature (learnt)
    caption_source: str | None = None
    seed: int = 0


def train_loop(config: dict) -> dict:
    """One Ray Train worker (or the only process with ``--workers 0``)."""
    from train.lib.evaluation import blip_captioner_metrics, blip_filter_metrics
    from train.lib.losses import BlipFilterLoss, lm_targets
    from train.lib.models import load_blip, save_pretrained
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

    hp = FinetuneHparams.from_dict(config["hparams"])
    info, micro, precision = step_worker(config["device"], hp.batch_size, hp.accum_steps, hp.precision)
    run_dir = Path(config["run_dir"])
    logger = MetricsLogger(run_dir / "metrics.jsonl", enabled=info.is_main, unit="step", steps=hp.steps)

    seed_everything(hp.seed)
    model, processor = load_blip(hp.task, hp.init_from)
    tokenizer, image_processor = processor.tokenizer, processor.image_processor
    max_len = min(hp.max_text_tokens, model.config.text_config.max_position_embeddings)
    transform = ImageTransform.from_processor(image_processor, scale=(hp.crop_scale, 1.0))
    captioner = hp.task == "captioner"
    tokenize = TextTokenizer(tokenizer, max_len, prefix=hp.prompt if captioner else "")
    # [CLS] + the prompt's tokens: the part of each text the captioner is not trained to predict
    prompt_length = len(tokenizer(hp.prompt).input_ids) - 1 if captioner and hp.prompt else 0
    bos = model.config.text_config.bos_token_id
    trained = model if captioner else BlipFilterLoss(model, hp.itm_weight, hp.itc_weight, hp.temperature)
    wrapped = prepare_model(trained, info)
    optimizer = torch.optim.AdamW(param_groups(trained, hp.weight_decay), lr=hp.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, hp.warmup_steps, hp.steps, hp.min_lr_ratio)
    )
    ckpt_dir = run_dir / "checkpoints"
    resume = bool(config.get("resume"))
    start_step, stream_state = resume_step(ckpt_dir, resume, trained, optimizer, scheduler, info)

    stream = ImageTextStream(
        config["train"], transform, tokenize, micro, seed=hp.seed, rank=info.rank, world_size=info.world_size,
        loader_workers=config["loader_workers"], shuffle_buffer=hp.shuffle_buffer, mix=hp.mix_shards,
        caption_source=hp.caption_source, cursor=stream_state,
    )  # fmt: skip
    cursor = StreamCursor(stream_state)
    batches = iter(make_loader(stream, pin_memory=info.device.type == "cuda"))
    ddp = isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)

    def step_loss(batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        x = to_device(batch, info.device, transform)
        with autocast(info.device, precision):
            if captioner:
                ids, labels = lm_targets(x["input_ids"], x["attention_mask"], bos, prompt_length)
                out = wrapped(
                    pixel_values=x["pixel_values"],
                    input_ids=ids,
                    attention_mask=x["attention_mask"],
                    labels=labels,
                )
                return out.loss, {}
            out = wrapped(**x, caption_ids=batch["caption_ids"].to(info.device))
        return out["loss"], {k: float(out[k]) for k in ("itc", "itm", "itm_acc")}

    def evaluate() -> dict:
        held_out = eval_batches(config["val"], transform, tokenize, max(micro, 16), config.get("val_samples"))
        if captioner:
            return blip_captioner_metrics(
                model, tokenizer, held_out, transform, info.device, precision, hp.prompt, prompt_length,
                cider_samples=config["cider_samples"],
            )  # fmt: skip
        return blip_filter_metrics(model, held_out, transform, info.device, precision)

    metrics: dict = {}
    val: dict = {}
    wrapped.train()
    for step in range(start_step, hp.steps):
        seed_everything(hp.seed + 1_000_003 * info.rank + step)  # dropout and hard negatives replay on resume
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        t_data = 0.0
        for j in range(hp.accum_steps):
            t1 = time.perf_counter()
            batch = next(batches)
            cursor.advance(batch)
            t_data += time.perf_counter() - t1
            last = j == hp.accum_steps - 1
            with contextlib.nullcontext() if last or not ddp else wrapped.no_sync():
                loss, parts = step_loss(batch)
                (loss / hp.accum_steps).backward()
            for k, v in {"loss": float(loss.detach()), **parts}.items():
                sums[k] = sums.get(k, 0.0) + v / hp.accum_steps
        grad_norm = torch.nn.utils.clip_grad_norm_(
            trained.parameters(), hp.grad_clip if hp.grad_clip > 0 else float("inf")
        )
        optimizer.step()
        scheduler.step()
        seconds = time.perf_counter() - t0
        metrics = {
            **mean_over_workers(sums, info.device),
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm),
            "samples_per_s": round(hp.batch_size / seconds, 2),
            "data_wait": round(t_data / seconds, 3),
        }
        last_step = step + 1 == hp.steps
        logger.log(step + 1, "train", metrics, echo=(step + 1) % config["log_every"] == 0 or last_step)
        if config.get("val") and ((step + 1) % config["eval_every"] == 0 or last_step):
            if info.is_main:
                val = evaluate()
                logger.log(step + 1, "val", val)
            report({"step": step + 1, **metrics}, info)  # a barrier: the others wait for rank 0
        if (step + 1) % config["checkpoint_every"] == 0 or last_step:
            # every worker's position: all resume together
            save_step(ckpt_dir, step + 1, trained, optimizer, scheduler, hp, metrics, cursor, info,
                      keep=config["keep_checkpoints"])  # fmt: skip
            report({"step": step + 1, **metrics}, info)

    logger.close()
    result: dict = {"task": hp.task, "step": hp.steps, "train": metrics, "precision": precision}
    if val:
        result["val"] = val
    if info.is_main and config.get("output"):
        save_pretrained(model, config["output"], processor, dtype=config["save_dtype"])
        result["output"] = config["output"]
    return result


def main(argv: list[str] | None = None) -> dict:
    D = FinetuneHparams()  # defaults live in the dataclass
    parser = argparse.ArgumentParser(
        prog="python -m train.finetune_blip",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--task", choices=TASKS, required=True, help="captioner (LM loss) or filter (ITC + ITM)")
    add("--init-from", required=True, help="BLIP checkpoint directory or hub id of the task's model class")
    # data
    add(
        "--train", action="append", required=True, help="training shards (dir, glob, brace range); repeatable"
    )
    add("--val", action="append", default=None, help="held-out human-captioned shards; repeatable")
    add("--val-samples", type=int, default=512, help="held-out samples scored (the first N)")
    add("--eval-every", type=int, default=500, help="steps between evaluations (and at the end)")
    add("--cider-samples", type=int, default=64, help="captioner: held-out images captioned for CIDEr-D")
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
    add("--max-text-tokens", type=int, default=D.max_text_tokens, help="caption cut, in tokens")
    add("--prompt", default=D.prompt, help="captioner: text before each caption (use the pipeline's prompt)")
    # optimisation
    add("--steps", type=int, default=D.steps, help="optimizer steps")
    add("--batch-size", type=int, default=D.batch_size, help="global batch")
    add("--accum-steps", type=int, default=D.accum_steps, help="micro-batches per worker and step")
    add("--lr", type=float, default=D.lr, help="peak AdamW learning rate (BLIP fine-tunes at 1e-5)")
    add("--weight-decay", type=float, default=D.weight_decay, help="AdamW weight decay (matrices only)")
    add("--warmup-steps", type=int, default=D.warmup_steps, help="linear warm-up, then cosine")
    add("--min-lr-ratio", type=float, default=D.min_lr_ratio, help="the cosine's end, as a share of --lr")
    add("--grad-clip", type=float, default=D.grad_clip, help="max gradient norm (0: off)")
    add(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default=D.precision,
        help="autocast dtype (auto: bf16 on a GPU that has it, else fp32)",
    )
    add("--itm-weight", type=float, default=D.itm_weight, help="filter: weight of the ITM loss")
    add("--itc-weight", type=float, default=D.itc_weight, help="filter: weight of the ITC loss")
    add("--temperature", type=float, default=D.temperature, help="filter: initial ITC temperature (learnt)")
    add("--seed", type=int, default=D.seed, help="data order, caption draws, crops, dropout, negatives")
    # output
    add("--output", default=None, help="save_pretrained directory (with the processor)")
    add("--save-dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="dtype of the saved weights")
    add("--checkpoint-every", type=int, default=500, help="steps between checkpoints (and at the end)")
    add("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept")
    add("--log-every", type=int, default=10, help="steps between console lines (metrics.jsonl: every step)")
    add_launch_args(parser, run_dir="out/finetune_blip")
    args = parser.parse_args(argv)

    from train.lib.data import list_shards

    setup_logging()
    args.init_from = absolute_local(args.init_from)
    hp = FinetuneHparams.from_namespace(args)
    run_dir = prepare_run_dir(args.run_dir, args.resume)
    config = {
        "hparams": hp.to_dict(),
        "train": absolute_shards(list_shards(args.train)),
        "val": absolute_shards(list_shards(args.val)) if args.val else None,
        "val_samples": args.val_samples,
        "eval_every": args.eval_every,
        "cider_samples": args.cider_samples,
        "loader_workers": args.loader_workers,
        "output": str(Path(args.output).resolve()) if args.output else None,
        "save_dtype": args.save_dtype,
        "checkpoint_every": args.checkpoint_every,
        "keep_checkpoints": args.keep_checkpoints,
        "log_every": args.log_every,
        "resume": args.resume,
    }
    started = time.perf_counter()
    result = launch_from_args(train_loop, config, args, run_dir, f"finetune_blip_{hp.task}")
    result["seconds"] = round(time.perf_counter() - started, 1)
    (run_dir / "summary.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
