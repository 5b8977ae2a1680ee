"""Write a run's output, one input shard at a time, atomically.

For each input shard ``NAME``::

    OUT/shards/NAME.tar          curated WebDataset: kept samples (image, .txt, .json)
    OUT/_shards/NAME.json        per-shard counts and the shard's read fault, if any
    OUT/samples/NAME.parquet     one row per input sample (written last: the done marker)

Each file is written under a temporary name and renamed when complete, so a crash
never leaves a half shard under a final name, and a shard whose Parquet exists is done.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from curate.io.reader import ShardRef, sanitize_key
from curate.schema import (
    ROW_SHARD_END,
    SAMPLES_SCHEMA,
    STATUS_DROPPED,
    STATUS_ERROR,
    STATUS_KEPT,
    STATUSES,
)

SAMPLES_DIR = "samples"
SHARDS_DIR = "shards"
SHARD_META_DIR = "_shards"
MANIFEST = "manifest.json"
PIPELINE_FILE = "_pipeline.json"


class IncompleteRunError(RuntimeError):
    pass


def output_fs(output: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, root = fsspec.core.url_to_fs(output)
    return fs, root.rstrip("/")


def done_shards(output: str) -> set[str]:
    """Names of shards whose samples Parquet is in place (the completion marker)."""
    fs, root = output_fs(output)
    path = f"{root}/{SAMPLES_DIR}"
    if not fs.exists(path):
        return set()
    names = set()
    for p in fs.ls(path, detail=False):
        base = p.rstrip("/").rsplit("/", 1)[-1]
        if base.endswith(".parquet") and not base.startswith("."):
            names.add(base[: -len(".parquet")])
    return names


def _output_candidates(raw: str | None) -> list[dict]:
    if not raw:
        return []
    out = []
    for c in json.loads(raw):
        out.append(
            {
                "text": c.get("text"),
                "source": c.get("source"),
                "itm_score": c.get("itm_score"),
                "clip_score": c.get("clip_score"),
                "kept": bool(c.get("kept", False)),
            }
        )
    return out


def output_row(row: dict) -> dict:
    """Internal pipeline row -> a ``SAMPLES_SCHEMA`` row."""
    out = {name: row.get(name) for name in SAMPLES_SCHEMA.names}
    out["candidates"] = _output_candidates(row.get("candidates"))
    out["captions"] = row.get("captions") or []
    if out["status"] not in STATUSES:
        # a row that never reached the policy (cannot happen in a complete pipeline)
        out["status"] = STATUS_ERROR
        out["error"] = f"sample left the pipeline unfinished (status {row.get('status')!r})"
    return out


def tar_members(row: dict) -> list[tuple[str, bytes]]:
    """Curated WebDataset members for a kept sample, readable by webdataset as is."""
    key = sanitize_key(row["key"])
    candidates = [c for c in _output_candidates(row.get("candidates")) if c["kept"]]
    order = {text: i for i, text in enumerate(row.get("captions") or [])}
    candidates.sort(key=lambda c: order.get(c["text"], len(order)))
    meta = {
        "key": row["key"],
        "shard": row["shard"],
        "caption": row["caption"],
        "captions": [{k: c[k] for k in ("text", "source", "itm_score", "clip_score")} for c in candidates],
        "alt_text": row.get("alt_text"),
        "url": row.get("url"),
        "width": row.get("width"),
        "height": row.get("height"),
        "image_sha256": row.get("image_sha256"),
    }
    return [
        (f"{key}.{row['image_ext']}", row["image"]),
        (f"{key}.txt", (row["caption"] or "").encode("utf-8")),
        (f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8")),
    ]


@dataclass
class ShardWriter:
    """Collects one shard's rows; the curated tar streams to disk, rows are sorted at the end."""

    fs: fsspec.AbstractFileSystem
    root: str
    shard: ShardRef
    write_tar: bool = True
    rows: list[dict] = field(default_factory=list)
    received: int = 0
    total: int | None = None
    fault: str | None = None
    started: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._tar_tmp = f"{self.root}/{SHARDS_DIR}/.{self.shard.name}.tar.tmp-{token}"
        self._tar_file = None
        self._tar = None
        if self.write_tar:
            # both stay open across add() calls; closed in finish() or abort()
            self._tar_file = self.fs.open(self._tar_tmp, "wb")
            self._tar = tarfile.open(fileobj=self._tar_file, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115
        self._names: set[str] = set()

    def add(self, row: dict) -> None:
        if row["row_type"] == ROW_SHARD_END:
            self.total = int(row["shard_total"] or 0)
            self.fault = row.get("shard_error")
            return
        self.received += 1
        if self._tar is not None and row["status"] == STATUS_KEPT and row.get("image"):
            members = tar_members(row)
            if members[0][0] in self._names:  # two keys sanitised to one name
                stem = members[0][0].rsplit(".", 1)[0]
                members = [(f"{stem}_{row['seq']}.{n.split('.', 1)[1]}", d) for n, d in members]
            for name, data in members:
                self._names.add(name)
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o644
                self._tar.addfile(info, io.BytesIO(data))
        row = dict(row)
        row["image"] = None
        row["pixels"] = None
        self.rows.append(row)

    @property
    def complete(self) -> bool:
        return self.total is not None and self.received >= self.total

    def counts(self) -> dict[str, int]:
        c = Counter(r["status"] for r in self.rows)
        return {s: c.get(s, 0) for s in STATUSES}

    def finish(self) -> dict:
        """Rename the tar, write the shard's meta, then its Parquet (the done marker)."""
        if self.received != self.total:
            raise IncompleteRunError(
                f"shard {self.shard.name}: {self.received} rows for {self.total} samples read"
            )
        base = self.root
        if self._tar is not None:
            self._tar.close()
            self._tar_file.close()
            self.fs.mv(self._tar_tmp, f"{base}/{SHARDS_DIR}/{self.shard.name}.tar")
        self.rows.sort(key=lambda r: r["seq"])
        table = pa.Table.from_pylist([output_row(r) for r in self.rows], schema=SAMPLES_SCHEMA)
        counts = self.counts()
        meta = {
            "shard": self.shard.name,
            "url": self.shard.url,
            "samples": self.received,
            **counts,
            "reasons": dict(Counter(r["reason"] for r in self.rows if r["status"] == STATUS_DROPPED)),
            "fault": self.fault,
            "wall_s": round(time.time() - self.started, 3),
        }
        write_atomic(
            self.fs, f"{base}/{SHARD_META_DIR}/{self.shard.name}.json", json.dumps(meta, indent=1).encode()
        )
        token = uuid.uuid4().hex[:8]
        tmp = f"{base}/{SAMPLES_DIR}/.{self.shard.name}.parquet.tmp-{token}"
        with self.fs.open(tmp, "wb") as f:
            pq.write_table(table, f, row_group_size=4096)
        self.fs.mv(tmp, f"{base}/{SAMPLES_DIR}/{self.shard.name}.parquet")
        return meta

    def abort(self) -> None:
        if self._tar is not None:
            try:
                self._tar.close()
                self._tar_file.close()
            finally:
                if self.fs.exists(self._tar_tmp):
                    self.fs.rm(self._tar_tmp)


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


class RunWriter:
    """Routes rows to their shard writers and finishes each shard when all its rows arrived."""

    def __init__(self, output: str, shards: list[ShardRef], write_tars: bool = True) -> None:
        self.fs, self.root = output_fs(output)
        for sub in (SAMPLES_DIR, SHARDS_DIR, SHARD_META_DIR):
            self.fs.makedirs(f"{self.root}/{sub}", exist_ok=True)
        self.refs = {s.name: s for s in shards}
        self.write_tars = write_tars
        self.open: dict[str, ShardWriter] = {}
        self.finished: dict[str, dict] = {}

    def _writer(self, name: str) -> ShardWriter:
        w = self.open.get(name)
        if w is None:
            if name not in self.refs:
                raise IncompleteRunError(f"row for unknown shard {name!r}")
            w = self.open[name] = ShardWriter(self.fs, self.root, self.refs[name], self.write_tars)
        return w

    def add_rows(self, rows: list[dict]) -> list[dict]:
        """Add rows; return the meta of every shard this completed."""
        done = []
        touched = set()
        for row in rows:
            self._writer(row["shard"]).add(row)
            touched.add(row["shard"])
        for name in touched:
            w = self.open[name]
            if w.complete:
                meta = w.finish()
                del self.open[name]
                self.finished[name] = meta
                done.append(meta)
        return done

    def close(self) -> None:
        """Every shard must be finished; anything else is a bug worth failing loudly for."""
        pending = {n: (w.received, w.total) for n, w in self.open.items()}
        for w in self.open.values():
            w.abort()
        missing = [n for n in self.refs if n not in self.finished and n not in self.open]
        if pending or missing:
            raise IncompleteRunError(f"shards not completed: pending={pending} never_seen={missing}")


def read_shard_metas(output: str) -> dict[str, dict]:
    fs, root = output_fs(output)
    path = f"{root}/{SHARD_META_DIR}"
    metas = {}
    if fs.exists(path):
        for p in sorted(fs.ls(path, detail=False)):
            base = p.rsplit("/", 1)[-1]
            if base.endswith(".json") and not base.startswith("."):
                with fs.open(p, "rb") as f:
                    metas[base[: -len(".json")]] = json.loads(f.read())
    return metas
