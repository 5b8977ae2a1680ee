"""Batches travel as Arrow tables of ``INTERNAL_SCHEMA``; stages work on row dicts."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from curate.schema import INTERNAL_SCHEMA, ROW_SAMPLE, STATUS_PENDING


def to_rows(batch: pa.Table | dict[str, Any]) -> list[dict]:
    if isinstance(batch, pa.Table):
        return batch.to_pylist()
    # numpy/pandas-like dict of columns
    names = list(batch)
    n = len(batch[names[0]]) if names else 0
    return [{name: _py(batch[name][i]) for name in names} for i in range(n)]


def _py(value: Any) -> Any:
    return value.item() if hasattr(value, "item") and getattr(value, "ndim", 1) == 0 else value


def to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=INTERNAL_SCHEMA)


def is_pending(row: dict) -> bool:
    return row["row_type"] == ROW_SAMPLE and row["status"] == STATUS_PENDING


def get_candidates(row: dict) -> list[dict]:
    """The row's candidates (``INTERNAL_CANDIDATE_TYPE`` dicts) to read or edit in place."""
    return row.get("candidates") or []


def set_candidates(row: dict, candidates: list[dict]) -> None:
    row["candidates"] = candidates


def fail(row: dict, message: str) -> None:
    from curate.schema import STATUS_ERROR

    row["status"] = STATUS_ERROR
    row["error"] = message
    row["pixels"] = None
    row["image"] = None


def shard_refs_of(batch: pa.Table) -> Iterator[Any]:
    """The ``ShardRef`` of each row of a Ray Data batch of shards (columns url, name)."""
    from curate.io.reader import ShardRef

    for url, name in zip(batch.column("url").to_pylist(), batch.column("name").to_pylist()):
        yield ShardRef(url=url, name=name)


def read_shards_batch(batch: pa.Table, batch_size: int) -> Iterator[pa.Table]:
    """Ray Data entry point: one row per shard in, a stream of row batches out.

    It lives in a module without torch, as do decode and policy: a CPU task worker
    then holds pyarrow and Pillow only, not a model library's few hundred MB.
    """
    from curate.io.reader import read_shard

    for shard in shard_refs_of(batch):
        for rows in read_shard(shard, batch_size=batch_size):
            yield to_table(rows)
