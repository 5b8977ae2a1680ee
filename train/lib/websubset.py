"""A spread-out, reproducible subset of a web shard set, written as new WebDataset tars.

The openclipart shards are sorted by category, so "the first N samples" would be one
category; ``write_subset`` takes every k-th sample of each shard instead, keeps keys
and members byte for byte, and writes tars with fixed metadata, so the same inputs
always give byte-identical files (curation runs over them resume and compare cleanly).
"""

from __future__ import annotations

import math
import tarfile
from collections.abc import Sequence
from pathlib import Path

import fsspec

from curate.io.files import tar_bytes, write_atomic
from curate.io.reader import IMAGE_EXTS, expand_inputs, iter_tar_groups


def _count(url: str) -> int:
    with fsspec.open(url, "rb") as f:
        return sum(1 for _key, files, problems in iter_tar_groups(f) if not problems)


def write_subset(sources: Sequence[str], per_shard: int, directory: str | Path) -> list[Path]:
    """Every k-th usable sample of each source shard, ``per_shard`` at most, one tar per source.

    ``per_shard <= 0`` copies every usable sample. Returns the written tar paths; a tar
    that already exists with the same name is rewritten only when its content changed.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for url in expand_inputs(list(sources)):
        total = _count(url)
        stride = 1 if per_shard <= 0 or total <= per_shard else math.ceil(total / per_shard)
        members: list[tuple[str, bytes]] = []
        taken = 0
        with fsspec.open(url, "rb") as f:
            usable = 0
            for key, files, problems in iter_tar_groups(f):
                if problems or not any(e in files for e in IMAGE_EXTS):
                    continue
                usable += 1
                if (usable - 1) % stride or (per_shard > 0 and taken >= per_shard):
                    continue
                taken += 1
                members.extend((f"{key}.{ext}", files[ext]) for ext in sorted(files))
        if taken == 0:
            continue
        path = directory / Path(url).name
        data = tar_bytes(members, format=tarfile.USTAR_FORMAT)
        if not (path.exists() and path.read_bytes() == data):
            write_atomic(path, data)
        paths.append(path)
    if not paths:
        raise ValueError(f"no usable samples in {list(sources)}")
    return paths
