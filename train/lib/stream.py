"""Decoded, augmented, tokenised image-caption batches streamed from WebDataset shards.

For training whole models (``train.pretrain_clip``, ``train.finetune_blip``): the shards
are read as they are, never cached as features, and images are decoded (curate's
decoder, its guards included), augmented and tokenised in DataLoader worker processes,
so the training process only moves finished tensors to its device.

The stream's layout. The shards are split over *slots*, one per (Ray Train worker,
DataLoader worker) pair, S = W x L in all. Pass p (an epoch over the shards) orders
them by a permutation seeded with (seed, p), the same on every worker; slot s takes
shards s, s + S, s + 2S, ... of that order (with fewer shards than slots, every slot
reads every shard and keeps every S-th sample). A slot reads its shards ``mix`` at a
time, interleaved sample by sample, through a shuffle buffer of ``shuffle_buffer``
samples (images still encoded) drained at the end of each group of ``mix`` shards;
only then is a sample decoded, augmented and tokenised. A sample's caption draw (one of
its kept captions, BLIP-2's recipe) and its random crop come from a seed derived from
(seed, pass, shard, key), not from the stream's position, so they do not depend on the
batching or on where a run was resumed. The stream never ends: the loop takes a fixed
number of steps, and every worker takes the same number (DDP needs that).

Resuming. Each batch carries its slot's position after it (pass, group, samples taken
from the group). The loop keeps the position of the last batch it consumed from every
slot (``StreamCursor``) and saves it in each checkpoint; a stream started from a
cursor re-reads only the current group of each slot, skipping the samples already
taken without decoding them, and rotates the DataLoader's round-robin over its workers
so batches arrive in the order of an uninterrupted run. A resume needs the same shards,
the same number of Ray Train workers and the same ``--loader-workers``.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from curate.config import DecodeConfig
from curate.stages.decode import DecodeError, decode_image
from train.lib.data import DEFAULT_MAX_SIDE, Record, caption_id, iter_records

log = logging.getLogger("train.stream")

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def derived_seed(*parts: Any) -> int:
    """A 64-bit seed from the parts' text: the same in every process (unlike ``hash``)."""
    return int.from_bytes(hashlib.sha1(":".join(map(str, parts)).encode()).digest()[:8], "big")


def _size_field(size: Any, key: str) -> int | None:
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value else None


@dataclass(frozen=True)
class ImageTransform:
    """PIL RGB image -> (3, size, size) uint8 tensor in the loader; ``normalize`` on the device.

    Evaluation does what the model's image processor does: the shortest side to
    ``resize`` then a centre crop (CLIP), or, with ``resize=None``, a resize to size x
    size (BLIP). Training takes a random crop of ``scale`` of the area with an aspect
    ratio in ``ratio`` (torchvision's RandomResizedCrop; open_clip trains CLIP with
    scale (0.9, 1.0)) resized to size x size; no flip, since captions say left and right.
    Batches stay uint8 until ``normalize`` (rescale, mean, std) runs where the model does:
    a quarter of the bytes to move, and no float work on the loader's CPU (1.3 of its
    ~4 ms per 224 px sample measured on a CPU core).
    """

    size: int
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    resize: int | None = None
    scale: tuple[float, float] = (0.9, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    @classmethod
    def from_processor(cls, image_processor: Any, scale: tuple[float, float] = (0.9, 1.0)) -> ImageTransform:
        """The transform matching a Hugging Face image processor (size, crop, mean and std)."""
        mean = tuple(float(x) for x in image_processor.image_mean)
        std = tuple(float(x) for x in image_processor.image_std)
        crop = getattr(image_processor, "crop_size", None)
        if getattr(image_processor, "do_center_crop", False) and crop is not None:
            size = _size_field(crop, "height")
            resize = _size_field(image_processor.size, "shortest_edge") or size
        else:
            size, resize = _size_field(image_processor.size, "height"), None
        if not size:
            raise ValueError(f"{type(image_processor).__name__}: no image size to train at")
        return cls(size=size, mean=mean, std=std, resize=resize, scale=scale)  # type: ignore[arg-type]

    def _tensor(self, image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)))

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (b, 3, S, S) on any device -> float32 rescaled to [0, 1] and normalised, there."""
        mean = torch.tensor(self.mean, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=pixels.device).view(1, 3, 1, 1)
        return (pixels.float() / 255.0 - mean) / std

    def train(self, image: Image.Image, rng: random.Random) -> torch.Tensor:
        width, height = image.size
        area = width * height
        box = None
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = np.exp(rng.uniform(np.log(self.ratio[0]), np.log(self.ratio[1])))
            w = round((target * aspect) ** 0.5)
            h = round((target / aspect) ** 0.5)
            if 0 < w <= width and 0 < h <= height:
                x, y = rng.randint(0, width - w), rng.randint(0, height - h)
                box = (x, y, x + w, y + h)
                break
        if box is None:  # the centre crop of the nearest allowed aspect ratio
            aspect = min(max(width / height, self.ratio[0]), self.ratio[1])
            w, h = (
                (width, round(width / aspect))
                if width / height < aspect
                else (round(height * aspect), height)
            )
            w, h = min(w, width), min(h, height)
            x, y = (width - w) // 2, (height - h) // 2
            box = (x, y, x + w, y + h)
        return self._tensor(image.resize((self.size, self.size), Image.Resampling.BICUBIC, box=box))

    def eval(self, image: Image.Image) -> torch.Tensor:
        if self.resize is None:
            return self._tensor(image.resize((self.size, self.size), Image.Resampling.BICUBIC))
        width, height = image.size
        # the shortest side to ``resize``, the other scaled and truncated, as transformers does
        if width <= height:
            w, h = self.resize, int(self.resize * height / width)
        else:
            w, h = int(self.resize * width / height), self.resize
        image = image.resize((w, h), Image.Resampling.BICUBIC)
        x, y = (w - self.size) // 2, (h - self.size) // 2
        return self._tensor(image.crop((x, y, x + self.size, y + self.size)))


@dataclass
class TextTokenizer:
    """Captions -> ``input_ids`` and ``attention_mask``: ``prefix`` (a captioner's prompt) before each,
    cut at ``max_length``, padded to the batch's longest (``pad_to_max``: to ``max_length``,
    as CLIP's fixed 77-token context)."""

    tokenizer: Any
    max_length: int
    prefix: str = ""
    pad_to_max: bool = False

    def __call__(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        tok = self.tokenizer(
            [self.prefix + c for c in captions],
            padding="max_length" if self.pad_to_max else "longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"]}


def collate(examples: Sequence[tuple[torch.Tensor, str, str]], tokenize: TextTokenizer) -> dict[str, Any]:
    """(pixels, caption, key) examples -> one batch of tensors, plus ``captions`` and ``keys``."""
    captions = [c for _, c, _ in examples]
    return {
        "pixel_values": torch.stack([p for p, _, _ in examples]),
        **tokenize(captions),
        "caption_ids": torch.tensor([caption_id(c) for c in captions], dtype=torch.long),
        "captions": captions,
        "keys": [k for _, _, k in examples],
    }


class StreamCursor:
    """Where one Ray Train worker's stream stands after the batches its loop consumed.

    ``advance(batch)`` after each batch taken from the DataLoader; ``state()`` (plain
    JSON) goes into the checkpoint and back into ``ImageTextStream(cursor=...)``.
    """

    def __init__(self, state: dict | None = None) -> None:
        self.batches = int(state["batches"]) if state else 0
        self.slots: dict[str, list[int]] = {k: list(v) for k, v in (state or {}).get("slots", {}).items()}
        self.layout = dict(state["layout"]) if state else None

    def advance(self, batch: dict) -> None:
        self.batches += 1
        self.slots[str(batch["slot"])] = list(batch["position"])
        self.layout = batch["layout"]

    def state(self) -> dict:
        return {"batches": self.batches, "slots": self.slots, "layout": self.layout}

    @staticmethod
    def of_worker(states: Sequence[dict], rank: int, world_size: int) -> dict:
        """Worker ``rank``'s state among a checkpoint's (one per worker, in rank order)."""
        if len(states) != world_size:
            raise ValueError(
                f"the checkpoint was written by {len(states)} Ray Train workers, this run has {world_size}: "
                f"resume with --workers {len(states)}"
            )
        return states[rank]


def resume_step(
    ckpt_dir: Path, resume: bool, model: torch.nn.Module, optimizer: Any, scheduler: Any, info: Any
) -> tuple[int, dict | None]:
    """A step-based loop's start: with ``resume`` and a checkpoint in ``ckpt_dir``, restore the
    model, optimizer and schedule and return (steps done, this worker's stream state); else (0, None)."""
    from train.lib.checkpoint import latest_checkpoint, load_checkpoint

    if not resume or (ckpt := latest_checkpoint(ckpt_dir, "step")) is None:
        return 0, None
    state = load_checkpoint(ckpt, model, optimizer, scheduler)
    if info.is_main:
        log.info("resumed from %s (step %d done)", ckpt, state["step"])
    return state["step"], StreamCursor.of_worker(state["extra"]["streams"], info.rank, info.world_size)


def save_step(
    ckpt_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    hparams: Any,
    metrics: dict,
    cursor: StreamCursor,
    info: Any,
    keep: int,
) -> None:
    """Checkpoint after ``step`` steps with every worker's stream position (a collective: every
    worker calls it; rank 0 writes), so a resume continues all streams where they stood."""
    from train.lib.checkpoint import save_checkpoint
    from train.lib.launch import gather_objects

    streams = gather_objects(cursor.state())
    if info.is_main:
        save_checkpoint(
            ckpt_dir, step, model, optimizer, hparams, metrics, scheduler,
            keep=keep, unit="step", extra={"streams": streams},
        )  # fmt: skip


def _interleave(iterators: list[Iterator[Record]]) -> Iterator[Record]:
    end = object()
    active = list(iterators)
    while active:
        still = []
        for it in active:
            item = next(it, end)
            if item is not end:
                yield item  # type: ignore[misc]
                still.append(it)
        active = still


def _shuffled(items: Iterator[Record], rng: random.Random, size: int) -> Iterator[Record]:
    if size <= 1:
        yield from items
        return
    buffer: list[Record] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        k = rng.randrange(size)
        item, buffer[k] = buffer[k], item
        yield item
    rng.shuffle(buffer)
    yield from buffer


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decode and resize are PIL's; torch threads would only contend


class ImageTextStream(torch.utils.data.IterableDataset):
    """Endless batches of one Ray Train worker (``rank`` of ``world_size``) for a DataLoader with
    ``loader_workers`` processes (0: in the training process) and ``batch_size=None``.

    A batch: ``pixel_values`` (b, 3, S, S) uint8 (``to_device`` normalises them),
    ``input_ids`` / ``attention_mask``, ``caption_ids`` (duplicate captions share one),
    ``captions``, ``keys``, and ``slot`` / ``position`` / ``layout`` for ``StreamCursor``.
    ``train=False`` takes each sample's first caption and the evaluation transform (still
    shuffled and endless: for held-out data in order, use ``eval_batches``).
    """

    def __init__(
        self,
        shards: Sequence[str],
        transform: ImageTransform,
        tokenize: TextTokenizer,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        loader_workers: int = 0,
        shuffle_buffer: int = 1000,
        mix: int = 4,
        caption_source: str | None = None,
        max_side: int = DEFAULT_MAX_SIDE,
        train: bool = True,
        cursor: dict | None = None,
    ) -> None:
        if not shards:
            raise ValueError("no shards to stream")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if mix < 1:
            raise ValueError(f"mix must be >= 1, got {mix}")
        self.shards = list(shards)
        self.transform = transform
        self.tokenize = tokenize
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.loader_workers = loader_workers
        self.shuffle_buffer = shuffle_buffer
        self.mix = mix
        self.caption_source = caption_source
        self.decode = DecodeConfig(max_side=max_side)
        self.is_train = train
        self.layout = {"world_size": world_size, "loader_workers": loader_workers, "shards": len(self.shards)}
        self.cursor = StreamCursor(cursor)
        if cursor and self.cursor.layout not in (None, self.layout):
            raise ValueError(
                f"cannot resume this data stream: the checkpoint's was {self.cursor.layout}, this run's is "
                f"{self.layout}; resume with the same shards, --workers and --loader-workers"
            )

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        workers = max(1, self.loader_workers)
        got = info.num_workers if info is not None else 1
        if got != workers:
            raise ValueError(
                f"the stream was built for {workers} DataLoader workers, the DataLoader has {got}"
            )
        wid = info.id if info is not None else 0
        # after k consumed batches the DataLoader's next one is the k-th worker's in round-robin order
        local = (wid + self.cursor.batches) % workers
        slot = self.rank * workers + local
        start = self.cursor.slots.get(str(slot))
        yield from self._batches(slot, self.world_size * workers, start)

    def _records(
        self, slot: int, slots: int, start: Sequence[int] | None
    ) -> Iterator[tuple[Record, int, list]]:
        """(record, pass, position after it) of one slot, forever, from ``start``."""
        pass_, first_group, skip = start if start else (0, 0, 0)
        while True:
            order = list(self.shards)
            random.Random(derived_seed(self.seed, "order", pass_)).shuffle(order)
            if len(order) >= slots:
                mine, keep = order[slot::slots], None
            else:
                mine, keep = order, (slot, slots)
            groups = [mine[i : i + self.mix] for i in range(0, len(mine), self.mix)]
            found = False
            for g in range(first_group, len(groups)):
                rng = random.Random(derived_seed(self.seed, "buffer", pass_, slot, g))
                its = [self._shard_records(s, keep) for s in groups[g]]
                for taken, record in enumerate(_shuffled(_interleave(its), rng, self.shuffle_buffer), 1):
                    found = True
                    if taken > skip:
                        yield record, pass_, [pass_, g, taken]
                skip = 0
            if not found and first_group == 0:
                raise ValueError(
                    f"data stream slot {slot} of {slots} found no usable sample in {len(mine)} shards "
                    f"({mine[:3]}...)"
                )
            pass_, first_group = pass_ + 1, 0

    def _shard_records(self, shard: str, keep: tuple[int, int] | None) -> Iterator[Record]:
        try:
            for j, record in enumerate(iter_records(shard, self.caption_source)):
                if keep is None or j % keep[1] == keep[0]:
                    yield record
        except Exception as exc:  # a tar cut short or unreadable: the samples before the fault stand
            log.warning("%s: stopped reading the shard: %s: %s", shard, type(exc).__name__, exc)

    def _example(self, record: Record, pass_: int) -> tuple[torch.Tensor, str, str] | None:
        rng = random.Random(derived_seed(self.seed, "sample", pass_, record.shard, record.key))
        caption = (
            record.captions[rng.randrange(len(record.captions))] if self.is_train else record.captions[0]
        )
        try:
            pixels, _, _ = decode_image(record.image, self.decode)
        except DecodeError as exc:
            log.warning("%s: %s: skipping sample: %s", record.shard, record.key, exc)
            return None
        image = Image.fromarray(pixels, "RGB")
        pixels_t = self.transform.train(image, rng) if self.is_train else self.transform.eval(image)
        return pixels_t, caption, record.key

    def _batches(self, slot: int, slots: int, start: Sequence[int] | None) -> Iterator[dict]:
        examples: list[tuple[torch.Tensor, str, str]] = []
        for record, pass_, position in self._records(slot, slots, start):
            example = self._example(record, pass_)
            if example is None:
                continue
            examples.append(example)
            if len(examples) == self.batch_size:
                batch = collate(examples, self.tokenize)
                batch.update(slot=slot, position=position, layout=self.layout)
                yield batch
                examples = []


def to_device(batch: dict, device: torch.device, transform: ImageTransform) -> dict[str, torch.Tensor]:
    """A batch's model inputs on ``device``: ``pixel_values`` normalised there, the text as it is."""
    return {
        "pixel_values": transform.normalize(batch["pixel_values"].to(device, non_blocking=True)),
        "input_ids": batch["input_ids"].to(device, non_blocking=True),
        "attention_mask": batch["attention_mask"].to(device, non_blocking=True),
    }


def make_loader(stream: ImageTextStream, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """The DataLoader running ``stream`` in its ``loader_workers`` processes, one batch at a time."""
    workers = stream.loader_workers
    return torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        worker_init_fn=_worker_init if workers else None,
        prefetch_factor=4 if workers else None,
    )


def eval_batches(
    shards: Sequence[str],
    transform: ImageTransform,
    tokenize: TextTokenizer,
    batch_size: int,
    max_samples: int | None = None,
    caption_source: str | None = None,
    max_side: int = DEFAULT_MAX_SIDE,
) -> Iterator[dict]:
    """Held-out batches in shard and tar order, each sample once with its first caption (its best
    kept caption, or ``KEY.txt``) and the evaluation transform; at most ``max_samples``."""
    cfg = DecodeConfig(max_side=max_side)
    examples: list[tuple[torch.Tensor, str, str]] = []
    seen = 0
    for shard in shards:
        if max_samples is not None and seen >= max_samples:
            break
        for record in iter_records(shard, caption_source):
            if max_samples is not None and seen >= max_samples:
                break
            try:
                pixels, _, _ = decode_image(record.image, cfg)
            except DecodeError as exc:
                log.warning("%s: %s: skipping sample: %s", shard, record.key, exc)
                continue
            examples.append((transform.eval(Image.fromarray(pixels, "RGB")), record.captions[0], record.key))
            seen += 1
            if len(examples) == batch_size:
                yield collate(examples, tokenize)
                examples = []
    if examples:
        yield collate(examples, tokenize)
