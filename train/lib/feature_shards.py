"""Frozen-tower embeddings of WebDataset shards, one feature file per tar, streamed into batches.

The downstream contrastive model (``train.lib.models.ContrastiveHeads``) trains heads on top of frozen
towers, so a sample's tower outputs never change: each tar is encoded once (EfficientNet-
Lite0 mean-pooled image embedding, MiniLM mean-pooled embedding of every caption) into a
safetensors file named by a hash of the tar's bytes, the backbones' versions and the
encoding settings. Training then streams those files one at a time through a shuffle
buffer (``iter_batches``), so memory holds one feature shard and the buffer, never the
data set, and a second arm, seed or run reuses the encoded files.

Captions of a sample (``train.lib.data.sample_captions``): a curated shard (``curate run``'s
``OUT/shards``) lists every kept caption in ``KEY.json``'s ``captions``; any other tar
(raw web data, human-captioned sets) has its one ``KEY.txt``. Training samples one of a
sample's captions each time it is drawn, as BLIP-2 did with its top-two captions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from curate.models.bridge import backbones
from train.lib.data import DEFAULT_MAX_SIDE, Pair, iter_pairs, sample_captions
from train.lib.features import (
    backbone_versions,
    default_cache_dir,
    file_digest,
    read_safetensors,
    write_safetensors,
)

log = logging.getLogger("train.feature_shards")

FORMAT_VERSION = 2  # 2: samples are read by curate's reader (.tif/.tiff images too)


class EmptyShardError(ValueError):
    """A tar without one usable image-caption sample (e.g. a curated shard that kept nothing)."""


@dataclass
class FeatureShard:
    """One tar's embeddings: image row i has captions ``text[offsets[i]:offsets[i+1]]``."""

    keys: list[str]
    captions: list[list[str]]
    categories: list[str | None]  # KEY.json "category" when present (tuxpaint): zero-shot labels
    image: torch.Tensor  # (n, 1280) fp16
    text: torch.Tensor  # (m, 384) fp16, m = total captions
    offsets: torch.Tensor  # (n + 1,) int64

    def __len__(self) -> int:
        return len(self.keys)

    def first_captions(self) -> torch.Tensor:
        """(n, 384): each sample's first (for curated shards: best) caption embedding."""
        return self.text[self.offsets[:-1]]


def shard_cache_path(shard: str, cache_dir: str | Path | None, resize: str, max_side: int) -> Path:
    """Where ``encode_shard`` keeps this tar's features: named by content and settings."""
    content = file_digest(shard) if os.path.isfile(shard) else shard
    blob = json.dumps(
        {
            "format": FORMAT_VERSION,
            "content": content,
            "backbones": backbone_versions(),
            "resize": resize,
            "max_side": max_side,
            "image_size": backbones.IMAGE_SIZE,
        },
        sort_keys=True,
    )
    key = hashlib.sha256(blob.encode()).hexdigest()[:24]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir().parent / "clip-features"
    return root / f"{Path(shard).stem}-{key}.safetensors"


def _encode(pairs: list[Pair], resize: str, device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    pixels = backbones.preprocess_images([p.image for p in pairs], resize=resize).to(device)
    image = backbones.encode_images(pixels).mean(1).half().cpu()
    texts = [t for p in pairs for t in sample_captions(p.meta, p.caption)]
    text = backbones.encode_texts(texts, device=device)[2].half().cpu()
    return image, text


def save_feature_shard(shard: FeatureShard, path: str | Path) -> Path:
    """Write safetensors atomically; keys, captions and categories travel in its metadata."""
    return write_safetensors(
        {"image": shard.image, "text": shard.text, "offsets": shard.offsets},
        path,
        {
            "keys": json.dumps(shard.keys),
            "captions": json.dumps(shard.captions, ensure_ascii=False),
            "categories": json.dumps(shard.categories),
        },
    )


def load_feature_shard(path: str | Path) -> FeatureShard:
    """Read a file written by ``save_feature_shard``."""
    meta, tensors = read_safetensors(path)
    return FeatureShard(
        keys=json.loads(meta["keys"]),
        captions=json.loads(meta["captions"]),
        categories=json.loads(meta["categories"]),
        image=tensors["image"],
        text=tensors["text"],
        offsets=tensors["offsets"],
    )


def encode_shard(
    shard: str,
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
    resize: str = "pad",
    max_side: int = DEFAULT_MAX_SIDE,
    device: str | torch.device = "cpu",
) -> Path:
    """Encode one tar with the frozen towers (streaming, ``batch_size`` images at a time); cached.

    Samples without a usable image or caption are skipped with a warning naming them (the
    curation run already recorded them); a tar with no usable sample raises.
    """
    path = shard_cache_path(shard, cache_dir, resize, max_side)
    if path.exists():
        return path
    start = time.perf_counter()
    keys: list[str] = []
    captions: list[list[str]] = []
    categories: list[str | None] = []
    images, texts = [], []
    batch: list[Pair] = []

    def flush() -> None:
        image, text = _encode(batch, resize, device)
        images.append(image)
        texts.append(text)
        batch.clear()

    for pair in iter_pairs([shard], on_error="warn", max_side=max_side):
        keys.append(pair.key)
        captions.append(sample_captions(pair.meta, pair.caption))
        category = pair.meta.get("category") if isinstance(pair.meta, dict) else None
        categories.append(category if isinstance(category, str) else None)
        batch.append(pair)
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    if not keys:
        raise EmptyShardError(f"{shard}: no usable image-caption sample to encode")
    counts = torch.tensor([0] + [len(c) for c in captions], dtype=torch.long)
    feature_shard = FeatureShard(
        keys=keys,
        captions=captions,
        categories=categories,
        image=torch.cat(images),
        text=torch.cat(texts),
        offsets=counts.cumsum(0),
    )
    save_feature_shard(feature_shard, path)
    log.info("encoded %s: %d samples in %.1fs -> %s", shard, len(keys), time.perf_counter() - start, path)
    return path


def encode_shards(shards: Sequence[str], cache_dir: str | Path | None = None, **kwargs) -> list[Path]:
    """``encode_shard`` for each tar, in order; tars with no usable sample are skipped with a warning.

    A curation run writes a curated tar for every input shard, and one whose samples were
    all dropped is empty; only when every tar is empty is there nothing to train on.
    """
    if not shards:
        raise ValueError("no shards to encode")
    paths = []
    for s in shards:
        try:
            paths.append(encode_shard(s, cache_dir, **kwargs))
        except EmptyShardError as exc:
            log.warning("skipping %s", exc)
    if not paths:
        raise EmptyShardError(f"none of the {len(shards)} shards has a usable sample: {list(shards)[:3]}")
    return paths


def iter_batches(
    paths: Sequence[str | Path],
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    shuffle_buffer: int = 2048,
) -> Iterator[dict]:
    """Endless shuffled batches of (image embedding, one sampled caption's embedding).

    Every epoch visits the feature shards in an order drawn from ``seed + epoch`` (the same
    on every rank) and gives rank r the rows r, r + world_size, ... of each shard, through a
    shuffle buffer of ``shuffle_buffer`` rows; each row draws one of its captions. Yields
    ``{"image": (b, 1280) fp32, "text": (b, 384) fp32, "captions": [str] * b}``; the caller
    stops after its step budget, so every arm of an experiment sees the same samples count.
    """
    if not paths:
        raise ValueError("no feature shards to train on")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = random.Random(seed * 1_000_003 + rank)
    buffer: list[tuple[torch.Tensor, torch.Tensor, str]] = []
    out: list[tuple[torch.Tensor, torch.Tensor, str]] = []

    def emit(item: tuple[torch.Tensor, torch.Tensor, str]) -> dict | None:
        out.append(item)
        if len(out) < batch_size:
            return None
        batch = {
            "image": torch.stack([o[0] for o in out]).float(),
            "text": torch.stack([o[1] for o in out]).float(),
            "captions": [o[2] for o in out],
        }
        out.clear()
        return batch

    epoch = 0
    while True:
        order = list(paths)
        random.Random(seed * 7919 + epoch).shuffle(order)
        seen = 0
        for path in order:
            shard = load_feature_shard(path)
            offsets = shard.offsets.tolist()
            for i in range(rank, len(shard), world_size):
                j = rng.randrange(offsets[i], offsets[i + 1])
                item = (shard.image[i], shard.text[j], shard.captions[i][j - offsets[i]])
                seen += 1
                if len(buffer) < shuffle_buffer:
                    buffer.append(item)
                    continue
                k = rng.randrange(len(buffer))
                item, buffer[k] = buffer[k], item
                if (batch := emit(item)) is not None:
                    yield batch
        if seen == 0:
            raise ValueError(f"rank {rank} of {world_size} got no rows from {len(paths)} feature shards")
        # drain the buffer at the end of each epoch, so small data sets still cycle
        rng.shuffle(buffer)
        while buffer:
            if (batch := emit(buffer.pop())) is not None:
                yield batch
        epoch += 1
