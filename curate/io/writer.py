"""Write a run's output on the workers, one input shard at a time, atomically.

For each input shard ``NAME``::

    OUT/_parts/NAME/SEQ-TOKEN.parquet   a block's finished rows (and kept images), while the run is on
    OUT/shards/NAME.tar                 curated WebDataset: kept samples (image, .txt, .json)
    OUT/_shards/NAME.json               per-shard counts and the shard's read fault, if any
    OUT/embeddings/NAME.parquet         with ``output.write_embeddings``: the ranker's unit image
                                        embedding and best caption's text embedding per sample
    OUT/samples/NAME.parquet            one row per input sample (written last: the done marker)

Two steps, both on Ray workers, so rows and images never pass through the driver:

1. :func:`write_part` (the last task of every block) writes the block's rows as one part
   file per shard under a temporary name, renamed when complete, and returns a summary
   of a few fields per shard: the part's path, how many sample rows it holds and, from
   the shard's ``shard_end`` row, how many the shard has in all.
2. When the summaries of a shard add up to its total (:class:`ShardTracker`, on the
   driver), :func:`commit_shard` (a task) merges the shard's parts in ``seq`` order into
   the curated tar, the embeddings and the samples Parquet, each under a temporary name
   then renamed, the samples Parquet last, and removes the parts. A part holds the block's
   embeddings too, so they are written, retried and committed with its rows.

A part is named by its first ``seq`` and a random token: a retried block writes a new
part and the summary names the one that counts, so a lost attempt's part is ignored
and removed with the rest. A commit is idempotent: run again after a crash, it redoes
the merge from the parts, or returns the shard's meta when the Parquet is already in
place. A run that dies leaves parts and temporary names only, never a half shard under
a final name; the next run removes them and redoes those shards.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.io.files import AtomicFile, TarWriter, atomic_open, is_temp, output_fs, write_atomic
from curate.io.reader import ShardRef, sanitize_key
from curate.schema import (
    ROW_SHARD_END,
    SAMPLES_SCHEMA,
    STATUS_DROPPED,
    STATUS_ERROR,
    STATUS_KEPT,
    STATUSES,
    embeddings_schema,
)

SAMPLES_DIR = "samples"
SHARDS_DIR = "shards"
SHARD_META_DIR = "_shards"
EMBEDDINGS_DIR = "embeddings"  # what curate.dedup reads for --method semantic
PARTS_DIR = "_parts"
MANIFEST = "manifest.json"
PIPELINE_FILE = "_pipeline.json"
ROW_GROUP_SIZE = 4096

# a part: the output rows, plus what the commit needs to order them and build the tar
PART_SCHEMA = pa.schema([*SAMPLES_SCHEMA, pa.field("seq", pa.int64()), pa.field("image", pa.binary())])
EMBEDDING_COLUMNS = ("image_embedding", "text_embedding")


def part_schema(embeddings: str | None = None) -> pa.Schema:
    """``PART_SCHEMA``, with the embedding columns of dtype ``embeddings`` when the run writes them."""
    if embeddings is None:
        return PART_SCHEMA
    emb = embeddings_schema(embeddings)
    return pa.schema([*PART_SCHEMA, *(emb.field(name) for name in EMBEDDING_COLUMNS)])


# what a block's write tells the driver, per shard in the block: a few scalars
SUMMARY_SCHEMA = pa.schema(
    [
        pa.field("shard", pa.string()),
        pa.field("part", pa.string()),  # null when the block held only the shard_end row
        pa.field("rows", pa.int64()),  # sample rows in the part
        # of which kept / dropped / error: for the progress display
        pa.field("kept", pa.int64()),
        pa.field("dropped", pa.int64()),
        pa.field("error", pa.int64()),
        pa.field("total", pa.int64()),  # the shard's sample count, from its shard_end row; else null
        pa.field("fault", pa.string()),  # the shard's read fault, from its shard_end row
        pa.field("meta", pa.string()),  # JSON: the shard's meta when this block's task committed it
    ]
)


class IncompleteRunError(RuntimeError):
    pass


__all__ = [
    "IncompleteRunError",
    "RunWriter",
    "ShardTracker",
    "commit_shard",
    "done_shards",
    "output_fs",
    "output_row",
    "read_shard_metas",
    "tar_members",
    "write_atomic",
    "write_part",
]


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


def _output_candidates(candidates: list[dict] | None) -> list[dict]:
    """A row's candidates in the output's fields; ``kept`` is false where no policy decided."""
    out = []
    for c in candidates or []:
        out.append(
            {
                "text": c.get("text"),
                "source": c.get("source"),
                "itm_score": c.get("itm_score"),
                "clip_score": c.get("clip_score"),
                "kept": bool(c.get("kept", False)),
                "rule": c.get("rule"),
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
    """Curated WebDataset members for a kept sample, readable by webdataset as is.

    ``row`` is an internal row or a samples row with its ``image`` bytes.
    """
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


def _part_dir(root: str, shard: str) -> str:
    return f"{root}/{PARTS_DIR}/{shard}"


def _split_by_shard(rows: Iterable[dict]) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    """A block's sample rows by shard (sorted by ``seq``), and its ``shard_end`` rows."""
    by_shard: dict[str, list[dict]] = {}
    ends: dict[str, dict] = {}
    for row in rows:
        if row["row_type"] == ROW_SHARD_END:
            ends[row["shard"]] = row
            by_shard.setdefault(row["shard"], [])
        else:
            by_shard.setdefault(row["shard"], []).append(row)
    for shard_rows in by_shard.values():
        shard_rows.sort(key=lambda r: r["seq"])
    return by_shard, ends


def _vector(data: bytes | None) -> list[float] | None:
    """A float32 embedding as the stages leave it (bytes) -> a list for Arrow; None stays None."""
    return np.frombuffer(data, dtype=np.float32).tolist() if data is not None else None


def best_text_embedding(row: dict) -> bytes | None:
    """The text embedding of the row's best kept caption (``caption``); None when nothing was kept."""
    caption = row.get("caption")
    if caption is None:
        return None
    for c in row.get("candidates") or []:
        if c.get("kept") and c.get("text") == caption:
            return c.get("text_embedding")
    return None


def part_table(rows: list[dict], write_tars: bool = True, embeddings: str | None = None) -> pa.Table:
    """Finished internal rows -> a ``part_schema(embeddings)`` table: output columns, ``seq``, the
    image bytes of kept samples (only when the run writes curated tars) and, when ``embeddings``
    names a dtype, the ranker's image embedding and the best caption's text embedding."""
    records = []
    for r in rows:
        record = output_row(r)
        record["seq"] = r["seq"]
        keep_image = write_tars and record["status"] == STATUS_KEPT
        record["image"] = r.get("image") if keep_image else None
        if embeddings is not None:
            record["image_embedding"] = _vector(r.get("image_embedding"))
            record["text_embedding"] = _vector(best_text_embedding(r)) if r.get("image_embedding") else None
        records.append(record)
    return pa.Table.from_pylist(records, schema=part_schema(embeddings))


def _summary(
    shard: str, part: str | None, rows: list[dict], end: dict | None, meta: dict | None = None
) -> dict:
    statuses = Counter(r["status"] for r in rows)
    return {
        "shard": shard,
        "part": part,
        "rows": len(rows),
        **{s: statuses.get(s, 0) for s in STATUSES},
        "total": int(end["shard_total"] or 0) if end is not None else None,
        "fault": end.get("shard_error") if end is not None else None,
        "meta": json.dumps(meta) if meta is not None else None,
    }


def write_part(
    rows: Iterable[dict], output: str, write_tars: bool = True, embeddings: str | None = None
) -> list[dict]:
    """Write one block's finished rows, a part file per shard; return a summary per shard.

    Runs on a worker. ``embeddings`` (a dtype name) carries the rows' embeddings in the part.
    """
    fs, root = output_fs(output)
    by_shard, ends = _split_by_shard(rows)
    summaries = []
    for shard, shard_rows in by_shard.items():
        part = None
        if shard_rows:
            directory = _part_dir(root, shard)
            fs.makedirs(directory, exist_ok=True)
            part = f"{directory}/{shard_rows[0]['seq']:012d}-{uuid.uuid4().hex[:12]}.parquet"
            with atomic_open(part, fs) as f:
                pq.write_table(part_table(shard_rows, write_tars, embeddings), f)
        summaries.append(_summary(shard, part, shard_rows, ends.get(shard)))
    return summaries


def read_shard_meta(output: str, shard: str) -> dict | None:
    fs, root = output_fs(output)
    path = f"{root}/{SHARD_META_DIR}/{shard}.json"
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        return json.loads(f.read())


class ShardSink:
    """One shard's final files, written as its rows arrive in ``seq`` order.

    Kept samples stream into the curated tar under a temporary name; the rows (without
    images) and, with ``embeddings`` (their dtype), the embeddings of the samples the ranker
    saw wait in memory for the embeddings file and the Parquet, written last by
    :meth:`commit`. Fed the parts of a shard by :func:`commit_shard`, or a whole shard's
    blocks by the one task that reads, decodes and writes it (:class:`ShardStreamWriter`).
    """

    def __init__(
        self, output: str, shard: ShardRef, write_tar: bool = True, embeddings: str | None = None
    ) -> None:
        self.fs, self.root = output_fs(output)
        self.shard = shard
        self.embeddings = embeddings
        subs = (SAMPLES_DIR, SHARDS_DIR, SHARD_META_DIR) + ((EMBEDDINGS_DIR,) if embeddings else ())
        for sub in subs:
            self.fs.makedirs(f"{self.root}/{sub}", exist_ok=True)
        self._file = AtomicFile(f"{self.root}/{SHARDS_DIR}/{shard.name}.tar", self.fs) if write_tar else None
        self._tar = TarWriter(self._file.file) if self._file is not None else None
        self._tables: list[pa.Table] = []
        self._vectors: list[pa.Table] = []
        self._names: set[str] = set()

    def add(self, table: pa.Table) -> None:
        """A ``part_schema(embeddings)`` table of this shard's rows, sorted by ``seq``."""
        if self._tar is not None:
            kept = table.filter(
                pc.and_(pc.equal(table.column("status"), STATUS_KEPT), pc.is_valid(table["image"]))
            )
            for row in kept.to_pylist():
                members = tar_members(row)
                if members[0][0] in self._names:  # two keys sanitised to one name
                    stem = members[0][0].rsplit(".", 1)[0]
                    members = [(f"{stem}_{row['seq']}.{n.split('.', 1)[1]}", d) for n, d in members]
                self._names.add(members[0][0])
                self._tar.add_all(members)
        if self.embeddings is not None:
            vectors = table.filter(pc.is_valid(table["image_embedding"]))
            self._vectors.append(vectors.select(["seq", "key", "shard", *EMBEDDING_COLUMNS]))
            table = table.drop_columns(list(EMBEDDING_COLUMNS))
        self._tables.append(table.drop_columns(["image"]))

    def commit(self, total: int, fault: str | None = None, started: float | None = None) -> dict:
        """Check the count, rename the tar, write the meta and the embeddings, then the Parquet
        (the done marker)."""
        if self._tables:
            rows = pa.concat_tables(self._tables).sort_by("seq")
        else:
            rows = PART_SCHEMA.empty_table().drop_columns(["image"])
        if rows.num_rows != total:
            self.abort()
            raise IncompleteRunError(
                f"shard {self.shard.name}: {rows.num_rows} rows for {total} samples read"
            )
        if self._tar is not None:
            self._tar.close()
            self._file.commit()
        statuses = Counter(rows.column("status").to_pylist())
        dropped = pc.equal(rows.column("status"), STATUS_DROPPED)
        reasons = Counter(rows.filter(dropped).column("reason").to_pylist())
        meta = {
            "shard": self.shard.name,
            "url": self.shard.url,
            "samples": rows.num_rows,
            **{s: statuses.get(s, 0) for s in STATUSES},
            "reasons": dict(reasons),
            "fault": fault,
            "wall_s": round(time.time() - started, 3) if started is not None else None,
        }
        name = self.shard.name
        write_atomic(
            f"{self.root}/{SHARD_META_DIR}/{name}.json", json.dumps(meta, indent=1).encode(), self.fs
        )
        if self.embeddings is not None:
            schema = embeddings_schema(self.embeddings)
            vectors = (
                pa.concat_tables(self._vectors).sort_by("seq").drop_columns(["seq"]).cast(schema)
                if self._vectors
                else schema.empty_table()
            )
            with atomic_open(f"{self.root}/{EMBEDDINGS_DIR}/{name}.parquet", self.fs) as f:
                pq.write_table(vectors, f, row_group_size=ROW_GROUP_SIZE)
        with atomic_open(f"{self.root}/{SAMPLES_DIR}/{name}.parquet", self.fs) as f:
            pq.write_table(rows.drop_columns(["seq"]).cast(SAMPLES_SCHEMA), f, row_group_size=ROW_GROUP_SIZE)
        return meta

    def abort(self) -> None:
        if self._file is not None:
            self._file.abort()


def commit_shard(
    output: str,
    shard: ShardRef,
    parts: list[str],
    total: int,
    fault: str | None = None,
    write_tar: bool = True,
    started: float | None = None,
    embeddings: str | None = None,
) -> dict:
    """Merge a complete shard's parts into its final files; return the shard's meta.

    Runs on a worker. The tar streams part by part (one part's images in memory at a
    time), the rows of every part are sorted by ``seq`` into one Parquet, written last.
    """
    fs, root = output_fs(output)
    if fs.exists(
        f"{root}/{SAMPLES_DIR}/{shard.name}.parquet"
    ):  # a retried commit whose first attempt finished
        meta = read_shard_meta(output, shard.name)
        if meta is not None:
            _remove_parts(fs, root, shard.name)
            return meta
    sink = ShardSink(output, shard, write_tar, embeddings)
    schema = part_schema(embeddings)
    try:
        for part in sorted(parts, key=lambda p: p.rsplit("/", 1)[-1]):  # by first seq
            with fs.open(part, "rb") as f:
                sink.add(pq.read_table(f, schema=schema))
    except BaseException:
        sink.abort()
        raise
    meta = sink.commit(total, fault, started)
    _remove_parts(fs, root, shard.name)
    return meta


class ShardStreamWriter:
    """The write step of a task that holds whole shards in order (read, decode and write in
    one task, as a pipeline without models runs): each shard's final files are written
    as its blocks pass, with no part files and no commit task. The summary of a shard's
    last block carries its meta, so the driver only counts it as done."""

    def __init__(self, output: str, write_tars: bool = True) -> None:
        self.output = output
        self.write_tars = write_tars
        self._sinks: dict[str, tuple[ShardSink, float]] = {}

    def __call__(self, rows: Iterable[dict], url: str) -> list[dict]:
        by_shard, ends = _split_by_shard(rows)
        summaries = []
        for shard, shard_rows in by_shard.items():
            if shard not in self._sinks:
                self._sinks[shard] = (
                    ShardSink(self.output, ShardRef(url=url, name=shard), self.write_tars),
                    time.time(),
                )
            sink, started = self._sinks[shard]
            if shard_rows:
                sink.add(part_table(shard_rows, self.write_tars))
            end = ends.get(shard)
            meta = None
            if end is not None:
                del self._sinks[shard]
                meta = sink.commit(int(end["shard_total"] or 0), end.get("shard_error"), started)
            summaries.append(_summary(shard, None, shard_rows, end, meta))
        return summaries

    def abort(self) -> None:
        for sink, _ in self._sinks.values():
            sink.abort()
        self._sinks.clear()


def _remove_parts(fs: fsspec.AbstractFileSystem, root: str, shard: str) -> None:
    directory = _part_dir(root, shard)
    if fs.exists(directory):
        fs.rm(directory, recursive=True)


def clear_leftovers(output: str) -> None:
    """Remove a crashed run's parts and temporary files (before a run starts)."""
    fs, root = output_fs(output)
    if fs.exists(f"{root}/{PARTS_DIR}"):
        fs.rm(f"{root}/{PARTS_DIR}", recursive=True)
    clear_temp_files(output)


def clear_temp_files(output: str) -> None:
    """Remove temporary files under the output's final directories: before a run, a crashed
    run's; after every shard is committed, those of writers on a node that died mid-write
    (their shard was written again elsewhere; nothing can still be writing then)."""
    fs, root = output_fs(output)
    for sub in (SAMPLES_DIR, SHARDS_DIR, SHARD_META_DIR, EMBEDDINGS_DIR):
        path = f"{root}/{sub}"
        if not fs.exists(path):
            continue
        for p in fs.ls(path, detail=False):
            if is_temp(p):
                fs.rm(p)


@dataclass
class CommitJob:
    """A complete shard: :func:`commit_shard`'s keyword arguments in ``kwargs``, or, for a
    shard its task already committed, its ``meta``."""

    name: str
    kwargs: dict
    meta: dict | None = None


@dataclass
class _Pending:
    ref: ShardRef
    started: float = field(default_factory=time.time)
    received: int = 0
    total: int | None = None
    fault: str | None = None
    parts: list[str] = field(default_factory=list)


class ShardTracker:
    """The driver's whole state: per shard in flight, a count and its part paths.

    Fed the write summaries, it says when a shard is complete; a committed shard leaves
    it, so the state is bounded by the shards in flight, never by the input.
    """

    def __init__(
        self, output: str, shards: list[ShardRef], write_tars: bool = True, embeddings: str | None = None
    ) -> None:
        self.output = output
        self.write_tars = write_tars
        self.embeddings = embeddings
        self.refs = {s.name: s for s in shards}
        self.open: dict[str, _Pending] = {}
        self.committed = 0
        self._seen: set[str] = set()

    def add(self, summary: dict) -> CommitJob | None:
        name = summary["shard"]
        if name not in self.refs:
            raise IncompleteRunError(f"rows for unknown shard {name!r}")
        pending = self.open.get(name)
        if pending is None:
            if name in self._seen:
                raise IncompleteRunError(f"rows for shard {name!r} after it was complete")
            pending = self.open[name] = _Pending(self.refs[name])
            self._seen.add(name)
        pending.received += int(summary["rows"])
        meta = json.loads(summary["meta"]) if summary.get("meta") else None
        if summary.get("part"):
            pending.parts.append(summary["part"])
        if summary.get("total") is not None:
            pending.total = int(summary["total"])
            pending.fault = summary.get("fault")
        if pending.total is None or pending.received < pending.total:
            return None
        if pending.received > pending.total:
            raise IncompleteRunError(
                f"shard {name}: {pending.received} rows for {pending.total} samples read"
            )
        del self.open[name]
        self.committed += 1
        if meta is not None:
            return CommitJob(name, {}, meta)
        return CommitJob(
            name,
            {
                "output": self.output,
                "shard": pending.ref,
                "parts": pending.parts,
                "total": pending.total,
                "fault": pending.fault,
                "write_tar": self.write_tars,
                "started": pending.started,
                "embeddings": self.embeddings,
            },
        )

    def close(self) -> None:
        """Every shard must be complete; anything else is a bug worth failing loudly for."""
        pending = {n: (p.received, p.total) for n, p in self.open.items()}
        missing = [n for n in self.refs if n not in self._seen]
        if pending or missing:
            raise IncompleteRunError(f"shards not completed: pending={pending} never_seen={missing}")


class RunWriter:
    """The whole write path in one process (tests, and runs without Ray): rows in, shards out.

    It writes a part per ``add_rows`` call and commits each shard when complete, through
    the same :func:`write_part` and :func:`commit_shard` the workers run.
    """

    def __init__(
        self, output: str, shards: list[ShardRef], write_tars: bool = True, embeddings: str | None = None
    ) -> None:
        fs, root = output_fs(output)
        for sub in (SAMPLES_DIR, SHARDS_DIR, SHARD_META_DIR):
            fs.makedirs(f"{root}/{sub}", exist_ok=True)
        self.output = output
        self.write_tars = write_tars
        self.embeddings = embeddings
        self.tracker = ShardTracker(output, shards, write_tars, embeddings)
        self.finished: dict[str, dict] = {}

    def add_rows(self, rows: list[dict]) -> list[dict]:
        """Add rows; return the meta of every shard this completed."""
        done = []
        for summary in write_part(rows, self.output, self.write_tars, self.embeddings):
            job = self.tracker.add(summary)
            if job is not None:
                meta = job.meta or commit_shard(**job.kwargs)
                self.finished[job.name] = meta
                done.append(meta)
        return done

    def close(self) -> None:
        try:
            self.tracker.close()
        finally:
            fs, root = output_fs(self.output)
            for name in list(self.tracker.open):
                _remove_parts(fs, root, name)


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
