"""Image-caption samples from img2dataset-layout WebDataset tars, for training and evaluation.

Reads what ``curate run`` writes to ``OUT/shards`` and what ``curate data fetch`` writes
(``KEY.png|jpg|webp|...``, ``KEY.txt`` caption, ``KEY.json`` metadata) through curate's
own reader (``curate.io.reader.iter_samples``: same key rule, image extensions and
per-sample checks, cut tars detected) and image decoder (bomb guard, alpha composited
on white, EXIF rotation), so training sees samples and images the way curation did.

- ``Pair(key, image, caption, shard, meta)``: one decoded sample; ``image`` is an RGB PIL
  image downscaled to ``max_side``, ``caption`` the stripped ``KEY.txt``, ``meta`` the
  parsed ``KEY.json`` (``{}`` when absent).
- ``list_shards(spec) -> list[str]``: a directory (its shards), a glob, a brace range
  or a list of those -> sorted absolute shard paths (fsspec URLs pass through).
- ``split_shards(root, split) -> list[str]``: ``root/split/*.tar`` (tuxpaint's layout).
- ``iter_pairs(shards, on_error=..., max_side=..., caption_source=None) -> Iterator[Pair]``:
  streaming, in shard order then tar order; deterministic. ``caption_source`` picks a
  curated sample's kept caption of one source (``kale``) instead of ``KEY.txt``.
- ``kept_captions(meta, source=None)``: a curated sample's kept captions;
  ``sample_captions(meta, alt_text, source=None)``: the captions a sample trains on
  (its kept captions, else its ``KEY.txt``), one of which is drawn per step.
- ``iter_records(shard, caption_source=None) -> Iterator[Record]``: the usable samples of
  a shard with their image still encoded (the streaming loader decodes after shuffling).
- ``caption_id(text)``: a stable integer per caption (case and spacing ignored), so
  workers can tell duplicate captions apart from negatives without sending strings.
- ``load_pairs(shards, max_samples=None, ...) -> list[Pair]``: a small split fully in memory.
- ``DataError``: raised for a bad sample when ``on_error="raise"``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from curate.config import DecodeConfig
from curate.io.reader import expand_inputs, iter_samples
from curate.schema import STATUS_ERROR
from curate.stages.decode import DecodeError, decode_image

log = logging.getLogger("train.data")

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


@dataclass(slots=True)
class Record:
    """One usable sample of a shard, image still encoded: what a shuffle buffer holds."""

    shard: str
    key: str
    image: bytes
    captions: list[str]
    meta: dict[str, Any]


def list_shards(spec: str | Path | Sequence[str | Path]) -> list[str]:
    """Directory, glob, brace range or list of them -> sorted shard paths; nothing found raises."""
    specs = [str(spec)] if isinstance(spec, str | Path) else [str(s) for s in spec]
    return expand_inputs(specs)


def split_shards(root: str | Path, split: str) -> list[str]:
    """``root/split/*.tar``: the layout of ``curate data fetch tuxpaint`` (train, val, test)."""
    return list_shards(Path(root) / split)


def kept_captions(
    meta: dict[str, Any], source: str | None = None, min_score: float | None = None
) -> list[str]:
    """A curated sample's kept captions (``KEY.json`` ``captions``, best first), whitespace
    collapsed and without repeats; only those of ``source`` (``alt``, ``synthetic``,
    ``kale``) when given, and only those whose ``itm_score`` reaches ``min_score`` when
    given. Empty for a sample with none (a raw shard's ``KEY.json``)."""
    listed = meta.get("captions") if isinstance(meta, dict) else None
    texts: list[str] = []
    for c in listed if isinstance(listed, list) else []:
        if not isinstance(c, dict) or (source is not None and c.get("source") != source):
            continue
        score = c.get("itm_score")
        if min_score is not None and not (isinstance(score, int | float) and score >= min_score):
            continue
        text = c.get("text")
        if isinstance(text, str) and (text := " ".join(text.split())) and text not in texts:
            texts.append(text)
    return texts


def sample_captions(meta: dict[str, Any], alt_text: str | None, source: str | None = None) -> list[str]:
    """The captions a sample trains on: a curated sample's kept ones (of ``source`` only, when
    given), else its ``KEY.txt`` (whitespace collapsed); empty when it has none."""
    if source is not None:
        return kept_captions(meta, source)
    text = " ".join(alt_text.split()) if alt_text else ""
    return kept_captions(meta) or ([text] if text else [])


def caption_id(text: str) -> int:
    """A stable signed 63-bit id of a caption, case and spacing ignored (same on every worker)."""
    norm = " ".join(text.lower().split())
    return int.from_bytes(hashlib.sha1(norm.encode()).digest()[:8], "big") >> 1


def _handle(policy: OnError, message: str) -> None:
    if policy == "raise":
        raise DataError(message)
    if policy == "warn":
        log.warning("skipping sample: %s", message)


def _meta(row: dict) -> dict[str, Any]:
    return json.loads(row["meta"]) if row["meta"] else {}  # the reader checked it is JSON


def _pair(row: dict, shard: str, cfg: DecodeConfig) -> Pair | str:
    """A Pair, or the reason this reader row is not one."""
    if row["status"] == STATUS_ERROR:
        return row["error"]
    if row["alt_text"] is None:
        return "no .txt caption"
    caption = " ".join(row["alt_text"].split())
    if not caption:
        return "empty caption"
    try:
        pixels, _, _ = decode_image(row["image"], cfg)
    except DecodeError as exc:
        return str(exc)
    return Pair(
        key=row["key"], image=Image.fromarray(pixels, "RGB"), caption=caption, shard=shard, meta=_meta(row)
    )


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
        for row in iter_samples(shard):
            got = _pair(row, shard, cfg)
            if isinstance(got, str):
                _handle(on_error, f"{shard}: {row['key']}: {got}")
                continue
            if caption_source is not None:
                texts = kept_captions(got.meta, caption_source)
                if not texts:
                    continue  # not a sample of this training set, not an error
                got.caption = texts[0]
            yield got


def iter_records(shard: str, caption_source: str | None = None) -> Iterator[Record]:
    """The samples of one shard that have an image and a caption to train on, image undecoded.

    Samples the curation run already recorded as errors, or without a caption, are
    skipped and counted in one log line per shard; a broken tar raises after the samples
    before the break.
    """
    skipped: Counter[str] = Counter()
    try:
        for row in iter_samples(shard):
            if row["status"] == STATUS_ERROR:
                skipped["error"] += 1
                continue
            meta = _meta(row)
            captions = sample_captions(meta, row["alt_text"], caption_source)
            if not captions:
                skipped["no caption" if caption_source is None else f"no {caption_source} caption"] += 1
                continue
            yield Record(shard=shard, key=row["key"], image=row["image"], captions=captions, meta=meta)
    finally:
        if skipped:
            log.info("%s: skipped %s", shard, ", ".join(f"{n} ({why})" for why, n in sorted(skipped.items())))


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
