"""Where dedup results live in a run, what they hold, and how to read them back.

::

    OUT/dedup/METHOD/NAME.parquet   one row per sample of input shard NAME that is in a group
    OUT/dedup/METHOD/_dedup.json    the method, its parameters, counts and the inputs covered:
                                    the done marker, written last
    OUT/_dedup/METHOD/...           a dedup in progress (its steps' files); removed when it ends

A result directory appears whole: it is written under a temporary name and renamed into
place. No Ray and no DuckDB here: ``curate query``, ``curate export`` and the dedup run all
read results through these functions.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curate.io.files import is_temp, output_fs

METHODS = ("exact", "phash", "semantic")  # also the precedence when several grouped a sample
DEDUP_DIR = "dedup"
WORK_DIR = "_dedup"
MARKER = "_dedup.json"
EMBEDDINGS_DIR = "embeddings"

# the result rows; ``group`` and ``duplicate_of`` are ``shard/key`` of the group's representative
DEDUP_SCHEMA = pa.schema(
    [
        pa.field("shard", pa.string(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("method", pa.string(), nullable=False),
        pa.field("group", pa.string(), nullable=False),
        pa.field("duplicate_of", pa.string()),  # null for the representative
        pa.field("group_size", pa.int64()),
    ]
)


class DedupError(ValueError):
    """A dedup (or an export that needs one) cannot run on this output; the message says why."""


@dataclass(frozen=True)
class DedupResult:
    """A finished dedup of one method: its directory, result files and marker."""

    method: str
    directory: str
    files: tuple[str, ...]
    meta: dict[str, Any]

    def shard_file(self, shard: str) -> str | None:
        path = f"{self.directory}/{shard}.parquet"
        return path if path in self.files else None


def result_dir(output: str, method: str) -> str:
    _, root = output_fs(output)
    return f"{root}/{DEDUP_DIR}/{method}"


def parquet_files(fs, directory: str) -> list[str]:
    if not fs.exists(directory):
        return []
    return sorted(
        p
        for p in fs.ls(directory, detail=False)
        if p.endswith(".parquet") and not is_temp(p) and p.rsplit("/", 1)[-1][0] not in "._"
    )


def read_results(output: str) -> dict[str, DedupResult]:
    """Every finished dedup of the run, by method (in :data:`METHODS` order)."""
    fs, root = output_fs(output)
    found = {}
    for method in METHODS:
        directory = f"{root}/{DEDUP_DIR}/{method}"
        marker = f"{directory}/{MARKER}"
        if not fs.exists(marker):
            continue
        with fs.open(marker, "rb") as f:
            meta = json.loads(f.read())
        found[method] = DedupResult(method, directory, tuple(parquet_files(fs, directory)), meta)
    return found


def samples_files(output: str) -> list[str]:
    """The run's finished samples Parquet, sorted (temporary names and ``_``/``.`` files skipped)."""
    fs, root = output_fs(output)
    return parquet_files(fs, f"{root}/samples")


def embedding_files(output: str) -> list[str]:
    """``OUT/embeddings/NAME.parquet`` (written with ``output.write_embeddings: true``)."""
    fs, root = output_fs(output)
    return parquet_files(fs, f"{root}/{EMBEDDINGS_DIR}")


def shard_name(path: str) -> str:
    """``.../NAME.parquet`` -> ``NAME``."""
    return path.rsplit("/", 1)[-1][: -len(".parquet")]


def files_fingerprint(output: str, files: list[str]) -> str:
    """Names, sizes and modification times of ``files``: what a result was computed from, so
    a rerun over the same inputs has nothing to do and a changed run is noticed."""
    fs, _ = output_fs(output)
    digest = hashlib.sha256()
    for path in files:
        info = fs.info(path)
        mtime = info.get("mtime") or info.get("LastModified") or info.get("updated") or info.get("created")
        digest.update(f"{shard_name(path)}\0{info.get('size')}\0{mtime}\n".encode())
    return digest.hexdigest()[:16]


def duplicate_keys(output: str, shard: str, results: dict[str, DedupResult] | None = None) -> set[str]:
    """Keys of shard ``shard`` that a finished dedup of any method names a duplicate of another
    sample (its ``duplicate_of`` is set): what ``curate export --no-duplicates`` leaves out.

    Every group keeps its representative, and representatives are chosen by one order for all
    methods, so the smallest sample of overlapping groups is never left out."""
    fs, _ = output_fs(output)
    results = read_results(output) if results is None else results
    keys: set[str] = set()
    for result in results.values():
        path = result.shard_file(shard)
        if path is None:
            continue
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=["key", "duplicate_of"])
        dup = table.filter(table["duplicate_of"].is_valid())
        keys.update(dup["key"].to_pylist())
    return keys
