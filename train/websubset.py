"""A spread-out, reproducible subset of a web shard set, written as new WebDataset tars.

The openclipart shards are sorted by category, so "the first N samples" would be one
category; ``write_subset`` takes every k-th sample of each shard instead, keeps keys
and members byte for byte, and writes tars with fixed metadata, so the same inputs
always give byte-identical files (curation runs over them resume and compare cleanly).
"""

from __future__ import annotations

import io
import math
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path

import fsspec

from curate.io.reader import expand_inputs, iter_tar_groups

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


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
        buf = io.BytesIO()
        taken = 0
        with (
            fsspec.open(url, "rb") as f,
            tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar,
        ):
            usable = 0
            for key, files, problems in iter_tar_groups(f):
                if problems or not any(e in files for e in IMAGE_EXTS):
                    continue
                usable += 1
                if (usable - 1) % stride or (per_shard > 0 and taken >= per_shard):
                    continue
                taken += 1
                for ext in sorted(files):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(files[ext])
                    info.mode, info.mtime = 0o644, 0
                    tar.addfile(info, io.BytesIO(files[ext]))
        if taken == 0:
            continue
        path = directory / Path(url).name
        data = buf.getvalue()
        if not (path.exists() and path.read_bytes() == data):
            tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        paths.append(path)
    if not paths:
        raise ValueError(f"no usable samples in {list(sources)}")
    return paths
