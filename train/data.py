"""Image-caption pairs from img2dataset-layout WebDataset tars, for training and evaluation.

Reads what ``curate run`` writes to ``OUT/shards`` and what ``curate data fetch`` writes
(``KEY.png|jpg|webp``, ``KEY.txt`` caption, ``KEY.json`` metadata), reusing the pipeline's
tar reader (same key rule, cut tars detected) and image decoder (bomb guard, alpha
composited on white, EXIF rotation), so training sees images the way curation did.

Stable API (the captioner and filter scripts import it):

- ``Pair(key, image, caption, shard, meta)``: one sample; ``image`` is an RGB PIL image
  downscaled to ``max_side``, ``caption`` the stripped ``KEY.txt``, ``meta`` the parsed
  ``KEY.json`` (``{}`` when absent).
- ``list_shards(spec) -> list[str]``: a directory (its ``*.tar``), a glob, a brace range
  or a list of those -> sorted absolute tar paths (fsspec URLs pass through).
- ``split_shards(root, split) -> list[str]``: ``root/split/*.tar`` (tuxpaint's layout).
- ``iter_pairs(shards, on_error=..., max_side=..., caption_source=None) -> Iterator[Pair]``:
  streaming, in shard order then tar order; deterministic. ``caption_source`` picks a
  curated sample's kept caption of one source (``kale``) instead of ``KEY.txt``.
- ``kept_captions(meta, source=None) -> list[str]``: a curated sample's kept captions.
- ``load_pairs(shards, max_samples=None, ...) -> list[Pair]``: a small split fully in memory.
- ``DataError``: raised for a bad sample when ``on_error="raise"``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import fsspec
from PIL import Image

from curate.config import DecodeConfig
from curate.io.reader import expand_inputs, iter_tar_groups
from curate.stages.decode import DecodeError, decode_image

log = logging.getLogger("train.data")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp")
DEFAULT_MAX_SIDE = 512  # the bridges see 224 px; keep whole splits small in memory

OnError = Literal["raise", "warn", "ignore"]


class DataError(ValueError):
    """A sample without a usable image or caption (``on_error="raise"``)."""


@dataclass(slots=True)
class Pair:
    """One image-caption sample of a shard."""

    key: str
    image: Image.Image
    caption: str
    shard: str
    meta: dict[str, Any] = field(default_factory=dict)


def list_shards(spec: str | Path | Sequence[str | Path]) -> list[str]:
    """Directory, glob, brace range or list of them -> sorted tar paths; nothing found raises."""
    specs = [str(spec)] if isinstance(spec, str | Path) else [str(s) for s in spec]
    return expand_inputs(specs)


def split_shards(root: str | Path, split: str) -> list[str]:
    """``root/split/*.tar``: the layout of ``curate data fetch tuxpaint`` (train, val, test)."""
    return list_shards(Path(root) / split)


def _handle(policy: OnError, message: str) -> None:
    if policy == "raise":
        raise DataError(message)
    if policy == "warn":
        log.warning("skipping sample: %s", message)


def _pair(
    key: str, files: dict[str, bytes], problems: list[str], shard: str, cfg: DecodeConfig
) -> Pair | str:
    """A Pair, or the reason this group is not one."""
    if problems:
        return "; ".join(problems)
    ext = next((e for e in IMAGE_EXTS if e in files), None)
    if ext is None:
        return "no image member"
    if "txt" not in files:
        return "no .txt caption"
    try:
        caption = " ".join(files["txt"].decode("utf-8").split())
    except UnicodeDecodeError as exc:
        return f"caption is not UTF-8: {exc}"
    if not caption:
        return "empty caption"
    try:
        pixels, _, _ = decode_image(files[ext], cfg)
    except DecodeError as exc:
        return str(exc)
    meta: dict[str, Any] = {}
    if "json" in files:
        try:
            meta = json.loads(files["json"])
        except (ValueError, UnicodeDecodeError) as exc:
            return f"bad .json: {exc}"
    return Pair(key=key, image=Image.fromarray(pixels, "RGB"), caption=caption, shard=shard, meta=meta)


def kept_captions(meta: dict[str, Any], source: str | None = None) -> list[str]:
    """A curated sample's kept captions (``KEY.json`` ``captions``, best first), whitespace
    collapsed and without repeats; only those of ``source`` (``alt``, ``synthetic``,
    ``kale``) when given. Empty for a sample with none (a raw shard's ``KEY.json``)."""
    listed = meta.get("captions") if isinstance(meta, dict) else None
    texts: list[str] = []
    for c in listed if isinstance(listed, list) else []:
        if not isinstance(c, dict) or (source is not None and c.get("source") != source):
            continue
        text = c.get("text")
        if isinstance(text, str) and (text := " ".join(text.split())) and text not in texts:
            texts.append(text)
    return texts


def iter_pairs(
    shards: Sequence[str],
    on_error: OnError = "warn",
    max_side: int = DEFAULT_MAX_SIDE,
    caption_source: str | None = None,
) -> Iterator[Pair]:
    """Stream Pairs from each tar in order; bad samples follow ``on_error``, a broken tar raises.

    ``caption_source`` (curated shards): the caption is the sample's best kept caption of
    that source instead of ``KEY.txt``, and samples without one are left out, e.g.
    ``kale`` trains on the KALE rewrites of a stage-1 run only.
    """
    cfg = DecodeConfig(max_side=max_side)
    for shard in shards:
        with fsspec.open(shard, "rb") as f:
            for key, files, problems in iter_tar_groups(f):
                got = _pair(key, files, problems, shard, cfg)
                if isinstance(got, str):
                    _handle(on_error, f"{shard}: {key}: {got}")
                    continue
                if caption_source is not None:
                    texts = kept_captions(got.meta, caption_source)
                    if not texts:
                        continue  # not a sample of this training set, not an error
                    got.caption = texts[0]
                yield got


def load_pairs(
    shards: Sequence[str],
    max_samples: int | None = None,
    on_error: OnError = "warn",
    max_side: int = DEFAULT_MAX_SIDE,
) -> list[Pair]:
    """The first ``max_samples`` Pairs (all when None), in memory: for splits of a few thousand."""
    out: list[Pair] = []
    if max_samples is not None and max_samples <= 0:
        return out
    for pair in iter_pairs(shards, on_error=on_error, max_side=max_side):
        out.append(pair)
        if max_samples is not None and len(out) >= max_samples:
            break
    return out
