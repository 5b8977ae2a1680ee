"""BLIP's bootstrapped set and the round table: the library side of ``python -m train.bootstrap``.

After CapFilt, a curated sample keeps each of its texts that the filter accepted: the
web alt-text (``source = alt``), the captioner's synthetic caption (``synthetic``), or
both. BLIP's bootstrapped set is human pairs + filtered web pairs + filtered synthetic
pairs, each (image, text) pair one training sample. ``write_pairs`` writes the curated
shards' kept texts of one source as WebDataset tars in the layout every training script
reads (``KEY.<ext>`` image bytes as curated, ``KEY.txt`` the text, ``KEY.json``), so the
filter and captioner scripts train on them as on any other shards, next to the human
tuxpaint train split. The same input always writes byte-identical tars.

``score_threshold`` turns a kept fraction into a P(match) threshold over every web text the
filter scored (the run's ``samples`` Parquet lists them all, dropped ones too), so a round
whose filter accepts nearly everything can still keep the best part.

``paired_bootstrap`` gives the test-set noise of a difference of per-image scores
(CIDEr-D of two captioners on the same images); ``markdown_table`` is the round table.
"""

from __future__ import annotations

import json
import math
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from curate.io.files import tar_bytes, write_atomic
from curate.io.reader import IMAGE_EXTS, iter_tar_groups
from train.lib.data import kept_captions, list_shards

SOURCES = ("alt", "synthetic")


def write_pairs(
    curated: Sequence[str], source: str, directory: str | Path, prefix: str, min_score: float | None = None
) -> dict:
    """The kept texts of ``source`` in the ``curated`` shards -> ``directory/PREFIX-NAME.tar``, one
    sample per (image, text) pair; returns ``{"samples", "shards", "images"}``. With
    ``min_score``, only kept texts whose ``itm_score`` reaches it.

    A sample's key is ``KEY_<source>[_N]`` (the Nth kept text of that source, N > 0), so
    pairs of one image stay recognisable and no key collides with another source's.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    samples = images = shards = 0
    for url in list_shards(list(curated)):
        members: list[tuple[str, bytes]] = []
        with open(url, "rb") as f:
            for key, files, problems in iter_tar_groups(f):
                ext = next((e for e in IMAGE_EXTS if e in files), None)
                if problems or ext is None or "json" not in files:
                    continue
                meta = json.loads(files["json"])
                texts = kept_captions(meta, source, min_score)
                images += bool(texts)
                for n, text in enumerate(texts):
                    pair_key = f"{key}_{source}" + (f"_{n}" if n else "")
                    pair_meta = {"key": pair_key, "image_key": key, "source": source, "caption": text}
                    pair_meta["shard"] = meta.get("shard")
                    members += [
                        (f"{pair_key}.{ext}", files[ext]),
                        (f"{pair_key}.txt", text.encode("utf-8")),
                        (f"{pair_key}.json", json.dumps(pair_meta, ensure_ascii=False).encode("utf-8")),
                    ]
                    samples += 1
        if not members:
            continue
        path = directory / f"{prefix}-{Path(url).name}"
        data = tar_bytes(members, format=tarfile.USTAR_FORMAT)
        if not (path.exists() and path.read_bytes() == data):
            write_atomic(path, data)
        shards += 1
    return {"samples": samples, "shards": shards, "images": images}


def score_threshold(samples: str | Path, fraction: float, sources: Sequence[str] = SOURCES) -> float:
    """The ``itm_score`` that the best ``fraction`` of the scored texts of ``sources`` reach, over
    every candidate in a run's ``samples/*.parquet`` (kept or dropped)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if not 0 < fraction <= 1:
        raise ValueError(f"a kept fraction is in (0, 1], got {fraction}")
    files = sorted(Path(samples).glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no samples/*.parquet under {samples}: was the CapFilt run finished?")
    cands = pc.list_flatten(pq.read_table(files, columns=["candidates"]).column("candidates"))
    keep = pc.and_(pc.is_in(pc.struct_field(cands, "source"), value_set=pa.array(list(sources), pa.string())),
                   pc.is_valid(pc.struct_field(cands, "itm_score")))  # fmt: skip
    scores = pc.filter(pc.struct_field(cands, "itm_score"), keep).to_numpy(zero_copy_only=False)
    if scores.size == 0:
        raise ValueError(f"no {'/'.join(sources)} text has an itm_score in {samples}")
    return float(np.quantile(scores, 1.0 - fraction, method="higher"))


def paired_bootstrap(a: Sequence[float], b: Sequence[float], draws: int = 2000, seed: int = 0) -> dict:
    """Mean of ``b - a`` over paired per-image scores and its standard error by resampling images."""
    x = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    if len(x) == 0:
        raise ValueError("no paired scores")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(draws, len(x)))].mean(1)
    return {"diff": float(x.mean()), "std": float(means.std(ddof=1)), "p_le_0": float((means <= 0).mean())}


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


COLUMNS = (
    ("round", "round"),
    ("filter", "filter"),
    ("captioner", "captioner"),
    ("train_human", "human pairs"),
    ("train_alt", "web pairs kept"),
    ("train_synthetic", "synthetic pairs kept"),
    ("web_images", "web images curated"),
    ("tux_itm_auc", "ITM AUC tuxpaint test"),
    ("tux_itc_auc", "ITC AUC tuxpaint test"),
    ("tux_i2t_r1", "I→T R@1 tuxpaint"),
    ("heldout_itm_auc", "ITM AUC held-out"),
    ("heldout_itc_auc", "ITC AUC held-out"),
    ("cider", "CIDEr-D tuxpaint test"),
    ("cider_diff", "CIDEr-D vs round 0 (± s.e.)"),
)


def markdown_table(rows: Sequence[Mapping]) -> str:
    """One line per round (the keys of ``COLUMNS``; a missing figure is '-')."""
    lines = ["| " + " | ".join(name for _, name in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = []
        for key, _ in COLUMNS:
            if key == "cider_diff" and isinstance(row.get(key), Mapping):
                d = row[key]
                cells.append(f"{d['diff']:+.3f} ± {d['std']:.3f}")
            else:
                cells.append(_cell(row.get(key)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
