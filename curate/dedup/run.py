"""``curate dedup``: duplicate groups over every sample of a finished run, on Ray Data.

The driver plans and waits; the cluster reads, groups, compares and writes. Each step is one
Ray Data job whose last tasks write their own files under ``OUT/_dedup/METHOD/STEP/`` and
return a one-row summary, so the driver only ever holds a few numbers per partition::

    exact     samples (sha256) --shuffle by hash--> groups of equal bytes ------------------+
    phash     samples (pHash)  --one row per band, shuffle by band value--> pairs within the |
              threshold --> local components --> edges --> connected components (rounds) ---+
    semantic  per shard: samples + embeddings --> k-means (partial sums per block, added  |
              up by a tree of tasks, one update task per iteration) --> shuffle by        |
              cluster --> pairs above the cosine threshold --> components in the cluster --+
                                                                                           v
              members --shuffle by shard--> OUT/dedup/METHOD/NAME.parquet, then _dedup.json

What one worker holds at a time, and why it is bounded: a partition of a shuffle (about
``rows_per_partition`` rows: the partitions are as many as the rows need), within it the
members of one band value, one sha256 or one k-means cluster, compared a block of 1,024 rows
at a time; in the connected-components rounds, one node's set, which is at most its
component; in k-means, the k centroids and at most 8 blocks' partial sums (k x dim numbers
each); in the last step, one shard's group members. None of these grows with the run but the
k-means ones, which grow with k (the square root of the samples by default).

A step is done when its ``_done.json`` marker exists: a dedup that stops (a crash, Ctrl-C)
resumes from its last finished step when run again with the same parameters over the same
samples; anything else starts afresh. The result directory is written under a temporary name
and renamed into place, marker last, so a reader sees the old result or the new one.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate import __version__
from curate.dedup import groups as G
from curate.dedup import kmeans as K
from curate.dedup.results import (
    DEDUP_SCHEMA,
    MARKER,
    METHODS,
    WORK_DIR,
    DedupError,
    embedding_files,
    files_fingerprint,
    parquet_files,
    result_dir,
    samples_files,
    shard_name,
)
from curate.io.files import atomic_open, atomic_path, output_fs, temp_name, write_atomic
from curate.progress import Progress

ROWS_PER_PARTITION = 200_000
EMBEDDING_BYTES_PER_PARTITION = 256 * 2**20
DEFAULT_THRESHOLDS: dict[str, float | None] = {"exact": None, "phash": 4, "semantic": 0.95}
MAX_PHASH_THRESHOLD = 16
MAX_ROUNDS = 64
KMEANS_ITERATIONS = 20
KMEANS_TOLERANCE = 1e-4
FAN_IN = 8  # partial sums added per task: a task holds at most FAN_IN x k x dim numbers
SEED = 0
FORMAT = 1  # bump when a step's files change meaning, so no old work is resumed

SAMPLE_COLUMNS = ["shard", "key", "status", "caption", "candidates"]
STEP_MARKER = "_done.json"
PLAN = "plan.json"


@dataclass
class DedupSummary:
    """What a dedup found (or found already done)."""

    method: str
    threshold: float | None
    directory: str
    samples: int = 0  # samples compared (those with an image hash or an embedding)
    groups: int = 0
    in_groups: int = 0
    up_to_date: bool = False
    wall_s: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def duplicates(self) -> int:
        return self.in_groups - self.groups


# ------------------------------------------------------------------ checks before any work


def check_threshold(method: str, threshold: float | None) -> float | int | None:
    """The threshold to use (the method's default when None), or DedupError naming the problem."""
    if method not in METHODS:
        raise DedupError(f"unknown dedup method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "exact":
        if threshold is not None:
            raise DedupError("--threshold does not apply to --method exact (equal sha256 of the image bytes)")
        return None
    if threshold is None:
        threshold = DEFAULT_THRESHOLDS[method]
    if method == "phash":
        if float(threshold) != int(threshold) or not 0 <= int(threshold) <= MAX_PHASH_THRESHOLD:
            raise DedupError(
                f"--threshold for phash is a number of differing bits, 0 to {MAX_PHASH_THRESHOLD} "
                f"(default {DEFAULT_THRESHOLDS['phash']}), got {threshold}"
            )
        return int(threshold)
    if not 0 < float(threshold) <= 1:
        raise DedupError(
            f"--threshold for semantic is a cosine similarity in (0, 1] "
            f"(default {DEFAULT_THRESHOLDS['semantic']}), got {threshold}"
        )
    return float(threshold)


def check_run(output: str) -> list[str]:
    """The samples Parquet of a finished run, or DedupError saying what is missing."""
    from curate.io.reader import shard_refs
    from curate.io.writer import MANIFEST

    fs, root = output_fs(output)
    files = samples_files(output)
    if not files:
        raise DedupError(f"no samples Parquet in {root}/samples: is {root} the output of curate run?")
    if not fs.exists(f"{root}/{MANIFEST}"):
        raise DedupError(f"{root} has no {MANIFEST}: the run has not finished (curate run resumes it)")
    with fs.open(f"{root}/{MANIFEST}", "rb") as f:
        manifest = json.loads(f.read())
    done = {shard_name(p) for p in files}
    missing = [ref.name for ref in shard_refs(list(manifest.get("input") or [])) if ref.name not in done]
    if missing:
        raise DedupError(
            f"the run in {root} is unfinished: {len(missing)} input shard(s) have no samples Parquet "
            f"(first: {', '.join(missing[:3])}); finish it with curate run, which resumes it"
        )
    return files


def check_embeddings(output: str, samples: list[str]) -> list[str]:
    """The run's embedding files, one per samples file, or DedupError."""
    _, root = output_fs(output)
    files = embedding_files(output)
    if not files:
        raise DedupError(
            f"{root} has no image embeddings ({root}/embeddings/*.parquet) for --method semantic: "
            "run with --set output.write_embeddings=true"
        )
    have = {shard_name(p) for p in files}
    missing = [shard_name(p) for p in samples if shard_name(p) not in have]
    if missing:
        raise DedupError(
            f"{len(missing)} shard(s) of {root} have samples but no embeddings (first: "
            f"{', '.join(missing[:3])}): rerun them with --set output.write_embeddings=true"
        )
    return files


def partitions(rows: int, per_partition: int) -> int:
    return max(1, math.ceil(rows / max(1, per_partition)))


# ------------------------------------------------------------------ task functions (run on workers)


def _write_parquet(path: str, table: pa.Table) -> None:
    with atomic_open(path) as f:
        pq.write_table(table, f)


def _exact_keys(batch: pa.Table, parts: int) -> pa.Table:
    batch = batch.filter(pc.is_valid(batch["image_sha256"]))
    return pa.table(
        {
            "part": G.string_partition(batch["image_sha256"], parts),
            "k": batch["image_sha256"],
            "label": G.labels_of(batch),
        }
    )


def _count_roots(components: pa.Table) -> int:
    return int(pc.sum(pc.equal(components["root"], components["member"])).as_py() or 0)


def _exact_group(group: pa.Table, directory: str) -> pa.Table:
    components = G.exact_components(group["k"], group["label"])
    if components.num_rows:
        _write_parquet(f"{directory}/{group['part'][0].as_py():05d}.parquet", components)
    return pa.table(
        {
            "samples": [group.num_rows],
            "groups": [_count_roots(components)],
            "in_groups": [components.num_rows],
        }
    )


def _phash_bands(batch: pa.Table, threshold: int, parts: int) -> pa.Table:
    batch = batch.filter(pc.is_valid(_column(batch, "image_phash")))
    labels = G.labels_of(batch)
    hashes = G.parse_hex_hashes(_column(batch, "image_phash").to_pylist())
    tables = []
    for band, values in enumerate(G.band_values(hashes, threshold)):
        tagged = values ^ (np.uint64(band) << np.uint64(59))  # band values are <= 32 bits when bands > 1
        tables.append(
            pa.table(
                {
                    "part": G.int_partition(tagged, parts),
                    "band": pa.array(np.full(len(values), band, dtype=np.int16)),
                    "value": pa.array(values),
                    "label": labels,
                    "hash": pa.array(hashes),
                }
            )
        )
    return pa.concat_tables(tables)


def _phash_group(group: pa.Table, threshold: int, directory: str) -> pa.Table:
    band = group["band"].to_numpy()
    value = group["value"].to_numpy()
    hashes = group["hash"].to_numpy()
    unique_labels, node = np.unique(np.asarray(group["label"].to_pylist(), dtype=object), return_inverse=True)
    order = np.lexsort((value, band))
    b, v = band[order], value[order]
    breaks = np.flatnonzero((np.diff(b) != 0) | (np.diff(v) != 0)) + 1
    starts, ends = np.r_[0, breaks], np.r_[breaks, len(order)]
    left, right = [], []
    for start, end in zip(starts.tolist(), ends.tolist()):
        if end - start < 2:
            continue
        rows = order[start:end]
        i, j = G.hamming_pairs(hashes[rows], threshold)
        left.append(node[rows[i]])
        right.append(node[rows[j]])
    pairs = int(sum(len(x) for x in left))
    edges = 0
    if pairs:
        components = G.components_table(unique_labels.tolist(), np.concatenate(left), np.concatenate(right))
        star = G.star_edges(components)
        edges = star.num_rows
        if edges:
            _write_parquet(f"{directory}/{group['part'][0].as_py():05d}.parquet", star)
    return pa.table({"rows": [group.num_rows], "pairs": [pairs], "edges": [edges]})


def _messages(batch: pa.Table, parts: int, first: bool) -> pa.Table:
    messages = G.edge_messages(batch) if first else G.state_messages(batch)
    return messages.append_column("part", pa.array(G.string_partition(messages["node"], parts)))


def _reduce_group(group: pa.Table, directory: str) -> pa.Table:
    state, changed = G.reduce_messages(group.drop_columns(["part"]))
    if state.num_rows:
        _write_parquet(f"{directory}/{group['part'][0].as_py():05d}.parquet", state)
    return pa.table({"rows": [state.num_rows], "changed": [changed]})


def _result_rows(batch: pa.Table, method: str, from_state: bool) -> pa.Table:
    components = G.state_components(batch) if from_state else batch
    members = [G.label_id(x) for x in components["member"].to_pylist()]
    roots = [G.label_id(x) for x in components["root"].to_pylist()]
    shards, keys = zip(*(G.split_id(m) for m in members)) if members else ((), ())
    return pa.table(
        {
            "shard": pa.array(shards, pa.string()),
            "key": pa.array(keys, pa.string()),
            "method": pa.array([method] * len(members), pa.string()),
            "group": pa.array(roots, pa.string()),
            "duplicate_of": pa.array([r if r != m else None for r, m in zip(roots, members)], pa.string()),
            "group_size": components["size"],
        }
    )


def _result_group(group: pa.Table, directory: str) -> pa.Table:
    shard = group["shard"][0].as_py()
    table = group.sort_by([("key", "ascending")]).cast(DEDUP_SCHEMA)
    _write_parquet(f"{directory}/{shard}.parquet", table)
    duplicates = int(pc.sum(pc.is_valid(table["duplicate_of"])).as_py() or 0)
    return pa.table({"shards": [1], "in_groups": [table.num_rows], "groups": [table.num_rows - duplicates]})


def _semantic_nodes(batch: pa.Table, directory: str) -> pa.Table:
    """One shard's samples joined with its embeddings: (label, unit embedding)."""
    out = []
    for shard, samples_path, embeddings_path in zip(
        batch["shard"].to_pylist(), batch["samples"].to_pylist(), batch["embeddings"].to_pylist()
    ):
        with _open_read(samples_path) as f:
            samples = pq.read_table(f, columns=SAMPLE_COLUMNS)
        with _open_read(embeddings_path) as f:
            emb = pq.read_table(f)
        if not {"key", "image_embedding"} <= set(emb.column_names):
            out.append(
                {"problem": f"{embeddings_path}: no key and image_embedding columns ({emb.column_names})"}
            )
            continue
        emb = emb.filter(pc.is_valid(emb["image_embedding"]))
        label_of = dict(zip(samples["key"].to_pylist(), G.labels_of(samples).to_pylist()))
        keys = emb["key"].to_pylist()
        known = np.array([k in label_of for k in keys], dtype=bool)
        try:
            vectors = K.embedding_matrix(emb["image_embedding"])
        except ValueError as exc:
            out.append({"problem": f"{embeddings_path}: {exc}"})
            continue
        vectors = K.normalize(vectors[known]) if len(keys) else vectors
        labels = [label_of[k] for k, ok in zip(keys, known) if ok]
        dim = vectors.shape[1] if len(labels) else 0
        if labels:
            table = pa.table(
                {
                    "label": pa.array(labels, pa.string()),
                    "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim),
                }
            )
            _write_parquet(f"{directory}/{shard}.parquet", table)
        out.append({"samples": len(labels), "unmatched": int((~known).sum()), "dim": dim, "problem": None})
    return pa.Table.from_pylist(out, schema=_NODES_SUMMARY)


_NODES_SUMMARY = pa.schema(
    [("samples", pa.int64()), ("unmatched", pa.int64()), ("dim", pa.int64()), ("problem", pa.string())]
)


@contextlib.contextmanager
def _open_read(path: str) -> Iterator[Any]:
    import fsspec

    with fsspec.open(path, "rb") as f:
        yield f


def _vectors(batch: pa.Table) -> np.ndarray:
    return K.embedding_matrix(batch["embedding"])


def _smallest_ranks(batch: pa.Table, k: int, seed: int) -> pa.Table:
    rank = K.init_rank(batch["label"].to_pylist(), seed)
    return pa.table({"rank": pa.array(np.sort(rank)[:k])})


def _rank_at_most(batch: pa.Table, limit: int, seed: int) -> pa.Table:
    rank = K.init_rank(batch["label"].to_pylist(), seed)
    keep = np.flatnonzero(rank <= np.uint64(limit))
    return pa.table(
        {
            "rank": pa.array(rank[keep]),
            "label": batch["label"].take(keep),
            "embedding": batch["embedding"].take(keep),
        }
    )


def _partials(batch: pa.Table, centroids: list) -> pa.Table:
    import ray

    c = ray.get(centroids[0])
    counts, sums = K.partial_sums(_vectors(batch), c)
    filled = np.flatnonzero(counts)
    return pa.table(
        {
            "cluster": pa.array(filled, pa.int64()),
            "count": pa.array(counts[filled]),
            "sum": pa.FixedSizeListArray.from_arrays(pa.array(sums[filled].ravel()), c.shape[1]),
        }
    )


def _assign(batch: pa.Table, centroids: list) -> pa.Table:
    import ray

    clusters = K.assign(_vectors(batch), ray.get(centroids[0]))
    return pa.table({"part": pa.array(clusters), "label": batch["label"], "embedding": batch["embedding"]})


def _cluster_group(group: pa.Table, threshold: float, directory: str) -> pa.Table:
    vectors = _vectors(group)
    i, j = G.cosine_pairs(vectors, threshold)
    components = G.components_table(group["label"].to_pylist(), i, j)
    if components.num_rows:
        _write_parquet(f"{directory}/{group['part'][0].as_py():06d}.parquet", components)
    return pa.table(
        {
            "clusters": [1],
            "samples": [group.num_rows],
            "largest_cluster": [group.num_rows],
            "pairs": [len(i)],
            "groups": [_count_roots(components)],
            "in_groups": [components.num_rows],
        }
    )


def _kth_rank(k: int, *blocks: pa.Table) -> int:
    ranks = np.concatenate([b["rank"].to_numpy() for b in blocks if b.num_rows])
    return int(np.sort(ranks)[min(k, len(ranks)) - 1])


def _init_centroids(k: int, *blocks: pa.Table) -> np.ndarray:
    table = pa.concat_tables([b for b in blocks if b.num_rows])
    order = np.lexsort((np.asarray(table["label"].to_pylist(), dtype=object), table["rank"].to_numpy()))
    return K.embedding_matrix(table["embedding"].take(order[:k]))


def _add_partials(*blocks: pa.Table) -> pa.Table:
    """Partial sums of a few blocks added up: one row per cluster that has points."""
    blocks = tuple(b for b in blocks if b.num_rows)
    if not blocks:
        return pa.table({"cluster": pa.array([], pa.int64()), "count": pa.array([], pa.int64())})
    dim = blocks[0]["sum"].type.list_size
    clusters = np.concatenate([b["cluster"].to_numpy() for b in blocks])
    ids, slot = np.unique(clusters, return_inverse=True)
    counts = np.zeros(len(ids), np.int64)
    sums = np.zeros((len(ids), dim), np.float64)
    np.add.at(counts, slot, np.concatenate([b["count"].to_numpy() for b in blocks]))
    np.add.at(sums, slot, np.concatenate([K.embedding_matrix(b["sum"]) for b in blocks]).astype(np.float64))
    return pa.table(
        {
            "cluster": pa.array(ids, pa.int64()),
            "count": pa.array(counts),
            "sum": pa.FixedSizeListArray.from_arrays(pa.array(sums.ravel()), dim),
        }
    )


def _update_centroids(centroids: np.ndarray, *blocks: pa.Table) -> tuple[np.ndarray, float]:
    """Held here: the k centroids and one summed row per cluster, never the embeddings."""
    counts = np.zeros(len(centroids), np.int64)
    sums = np.zeros(centroids.shape, np.float64)
    for block in blocks:
        if block.num_rows:
            clusters = block["cluster"].to_numpy()
            counts[clusters] = block["count"].to_numpy()
            sums[clusters] = K.embedding_matrix(block["sum"])
    return K.update(centroids, counts, sums)


def _save_array(array: np.ndarray, path: str) -> int:
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    write_atomic(path, buf.getvalue())
    return len(array)


def _load_array(path: str) -> np.ndarray:
    import io

    with _open_read(path) as f:
        return np.load(io.BytesIO(f.read()))


# ------------------------------------------------------------------ the driver


@contextlib.contextmanager
def _quiet_data() -> Iterator[None]:
    """No Ray Data progress bars or stats dumps for these jobs: the command has its own display."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = ctx.enable_progress_bars, ctx.enable_auto_log_stats
    ctx.enable_progress_bars = False
    ctx.enable_auto_log_stats = False
    try:
        yield
    finally:
        ctx.enable_progress_bars, ctx.enable_auto_log_stats = saved


def _sum_rows(rows: Iterable[dict[str, Any]], on_row: Callable[[dict], None] | None = None) -> dict[str, Any]:
    totals: dict[str, Any] = {}
    for row in rows:
        if on_row is not None:
            on_row(row)
        for k, v in row.items():
            if v is None:
                continue
            if k.startswith("largest") or k == "dim":
                totals[k] = max(totals.get(k, 0), v)
            else:
                totals[k] = totals.get(k, 0) + v
    return totals


class _Dedup:
    """One dedup's state on the driver: paths, the plan, and the steps done so far."""

    def __init__(self, output: str, method: str, threshold: float | None, progress: Progress) -> None:
        self.output = output
        self.method = method
        self.threshold = threshold
        self.progress = progress
        self.fs, self.root = output_fs(output)
        self.work = f"{self.root}/{WORK_DIR}/{method}"

    def prepare(self, plan: dict[str, Any]) -> None:
        """Keep the steps of an interrupted dedup with this plan; clear anything else."""
        path = f"{self.work}/{PLAN}"
        if self.fs.exists(path):
            with self.fs.open(path, "rb") as f:
                if json.loads(f.read()) == plan:
                    return
            self.fs.rm(self.work, recursive=True)
        elif self.fs.exists(self.work):
            self.fs.rm(self.work, recursive=True)
        self.fs.makedirs(self.work, exist_ok=True)
        write_atomic(path, json.dumps(plan, sort_keys=True).encode(), self.fs)

    def files(self, step: str) -> list[str]:
        return parquet_files(self.fs, f"{self.work}/{step}")

    def step(self, name: str, run: Callable[[str], dict[str, Any]], describe: Callable[[dict], str]) -> dict:
        """Run a step unless an earlier attempt finished it; its totals either way."""
        directory = f"{self.work}/{name}"
        marker = f"{directory}/{STEP_MARKER}"
        if self.fs.exists(marker):
            with self.fs.open(marker, "rb") as f:
                totals = json.loads(f.read())
            self.progress.note(f"  {name}: {describe(totals)} (finished before; reused)")
        else:
            if self.fs.exists(directory):
                self.fs.rm(directory, recursive=True)
            self.fs.makedirs(directory, exist_ok=True)
            totals = run(directory)
            write_atomic(marker, json.dumps(totals).encode(), self.fs)
            self.progress.note(f"  {name}: {describe(totals)}")
        self.progress.update(1)
        return totals


def _read(files: list[str], columns: list[str] | None = None):
    import ray.data

    ds = ray.data.read_parquet(files)
    return ds.select_columns(columns) if columns else ds


def _collect(ds) -> dict[str, Any]:
    """Run a job whose rows are the summaries its writing tasks return; their totals."""
    return _sum_rows(ds.iter_rows())


def prepare(
    output: str, method: str, threshold: float | None, clusters: int | None
) -> tuple[float | int | None, list[str], list[str], dict[str, Any]]:
    """Every check that needs no Ray, and the plan that names this dedup: (threshold, samples
    files, embedding files, plan). Raises DedupError."""
    threshold = check_threshold(method, threshold)
    if clusters is not None and (method != "semantic" or clusters < 1):
        raise DedupError("--clusters is a positive number of k-means clusters, for --method semantic only")
    files = check_run(output)
    embeddings = check_embeddings(output, files) if method == "semantic" else []
    plan = {
        "format": FORMAT,
        "method": method,
        "threshold": threshold,
        "clusters": clusters,
        "seed": SEED,
        "samples": files_fingerprint(output, files),
        "embeddings": files_fingerprint(output, embeddings) if embeddings else None,
    }
    return threshold, files, embeddings, plan


def finished_result(output: str, method: str, plan: dict[str, Any]) -> DedupSummary | None:
    """The summary of a finished dedup with this very plan (nothing to redo), else None."""
    fs, _ = output_fs(output)
    final = result_dir(output, method)
    marker = f"{final}/{MARKER}"
    if not fs.exists(marker):
        return None
    with fs.open(marker, "rb") as f:
        previous = json.loads(f.read())
    if previous.get("plan") != plan:
        return None
    summary = DedupSummary(method=method, threshold=plan["threshold"], directory=final, up_to_date=True)
    for name in ("samples", "groups", "in_groups"):
        setattr(summary, name, previous.get(name, 0))
    summary.details = previous.get("details", {})
    return summary


def run_dedup(
    output: str,
    method: str = "exact",
    threshold: float | None = None,
    *,
    clusters: int | None = None,
    rows_per_partition: int = ROWS_PER_PARTITION,
    progress: Progress | None = None,
) -> DedupSummary:
    """Group the duplicates of a finished run's samples and write ``OUT/dedup/METHOD``.

    Ray must be initialised. Raises DedupError, before any work, for a bad method or
    threshold, an unfinished run, or (semantic) a run without embeddings.
    """
    started = time.time()
    threshold, files, embeddings, plan = prepare(output, method, threshold, clusters)
    done = finished_result(output, method, plan)
    if done is not None:
        return done
    final = result_dir(output, method)
    fs, _ = output_fs(output)
    summary = DedupSummary(method=method, threshold=threshold, directory=final)
    progress = progress or Progress(f"curate dedup {method}", unit="steps", enabled=False)
    job = _Dedup(output, method, threshold, progress)
    job.prepare(plan)
    with _quiet_data():
        if method == "exact":
            source, rows, from_state = _exact(job, files, rows_per_partition, summary)
        elif method == "phash":
            source, rows, from_state = _phash(job, files, int(threshold), rows_per_partition, summary)
        else:
            source, rows, from_state = _semantic(job, files, embeddings, float(threshold), clusters, summary)
        _finish(
            job, source, partitions(rows, rows_per_partition), from_state, plan, summary, len(files), started
        )
    with contextlib.suppress(OSError):
        fs.rm(job.work, recursive=True)
        parent = job.work.rsplit("/", 1)[0]
        if not fs.ls(parent, detail=False):
            fs.rmdir(parent)
    summary.wall_s = time.time() - started
    return summary


def _exact(
    job: _Dedup, files: list[str], per_partition: int, summary: DedupSummary
) -> tuple[list[str], int, bool]:
    def run(directory: str) -> dict:
        ds = _read(files, [*SAMPLE_COLUMNS, "image_sha256"])
        parts = partitions(ds.count(), per_partition)
        ds = ds.map_batches(_exact_keys, fn_kwargs={"parts": parts}, batch_format="pyarrow")
        ds = ds.groupby("part", num_partitions=parts).map_groups(
            _exact_group, fn_kwargs={"directory": directory}, batch_format="pyarrow"
        )
        return _collect(ds)

    totals = job.step(
        "groups",
        run,
        lambda t: f"{t.get('samples', 0):,} images, {t.get('groups', 0):,} groups of equal bytes",
    )
    summary.samples = totals.get("samples", 0)
    return job.files("groups"), totals.get("in_groups", 0), False


def _column(batch: pa.Table, name: str) -> pa.ChunkedArray:
    """A column, or nulls where the run's files predate it (Ray Data reads no column then)."""
    if name in batch.column_names:
        return batch[name]
    return pa.chunked_array([pa.nulls(batch.num_rows, pa.string())])


def _missing_phash(batch: pa.Table) -> pa.Table:
    decoded = pc.is_valid(batch["width"])
    missing = pc.and_(decoded, pc.is_null(_column(batch, "image_phash")))
    return pa.table(
        {"decoded": [int(pc.sum(decoded).as_py() or 0)], "missing": [int(pc.sum(missing).as_py() or 0)]}
    )


def _phash(
    job: _Dedup, files: list[str], threshold: int, per_partition: int, summary: DedupSummary
) -> tuple[list[str], int, bool]:
    def run(directory: str) -> dict:
        check = _collect(
            _read(files, ["width", "image_phash"]).map_batches(_missing_phash, batch_format="pyarrow")
        )
        if check.get("decoded") and check.get("missing") == check.get("decoded"):
            raise DedupError(
                f"the samples of {job.root} have no image_phash (the run was written before curate kept "
                "one); rerun it with curate run --overwrite to compute them"
            )
        ds = _read(files, [*SAMPLE_COLUMNS, "image_phash"])
        n = ds.count()
        parts = partitions(n * (threshold + 1), per_partition)
        ds = ds.map_batches(
            _phash_bands, fn_kwargs={"threshold": threshold, "parts": parts}, batch_format="pyarrow"
        )
        ds = ds.groupby("part", num_partitions=parts).map_groups(
            _phash_group, fn_kwargs={"threshold": threshold, "directory": directory}, batch_format="pyarrow"
        )
        totals = _collect(ds)
        totals["samples"] = totals.get("rows", 0) // (threshold + 1)
        totals["without_phash"] = check.get("missing", 0)
        return totals

    totals = job.step(
        "pairs",
        run,
        lambda t: (
            f"{t.get('samples', 0):,} image hashes in {threshold + 1} bands, "
            f"{t.get('pairs', 0):,} pairs within {threshold} bits"
        ),
    )
    summary.samples = totals.get("samples", 0)
    summary.details["pairs"] = totals.get("pairs", 0)
    if totals.get("without_phash"):
        summary.details["without_phash"] = totals["without_phash"]
    source, first, rows = job.files("pairs"), True, totals.get("edges", 0) * 4
    for round_ in range(MAX_ROUNDS):
        if not source:
            return [], 0, True

        def run_round(directory: str, source=source, first=first, rows=rows) -> dict:
            parts = partitions(rows, per_partition)
            ds = _read(source).map_batches(
                _messages, fn_kwargs={"parts": parts, "first": first}, batch_format="pyarrow"
            )
            ds = ds.groupby("part", num_partitions=parts).map_groups(
                _reduce_group, fn_kwargs={"directory": directory}, batch_format="pyarrow"
            )
            return _collect(ds)

        name = f"components-{round_:02d}"
        totals = job.step(
            name, run_round, lambda t: f"{t.get('rows', 0):,} rows, {t.get('changed', 0):,} changed"
        )
        source, rows = job.files(name), totals.get("rows", 0) * 3
        if not first and totals.get("changed", 0) == 0:
            summary.details["rounds"] = round_ + 1
            return source, totals.get("rows", 0), True
        first = False
    raise DedupError(f"connected components did not settle in {MAX_ROUNDS} rounds")


def _semantic(
    job: _Dedup,
    files: list[str],
    embeddings: list[str],
    threshold: float,
    clusters: int | None,
    summary: DedupSummary,
) -> tuple[list[str], int, bool]:
    import ray
    import ray.data

    by_shard = {shard_name(p): p for p in embeddings}

    def run_nodes(directory: str) -> dict:
        items = [{"shard": shard_name(p), "samples": p, "embeddings": by_shard[shard_name(p)]} for p in files]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _semantic_nodes, fn_kwargs={"directory": directory}, batch_size=1, batch_format="pyarrow"
        )
        dims: set[int] = set()
        problems: list[str] = []

        def check(row: dict) -> None:
            if row.get("problem"):
                problems.append(row.pop("problem"))
            row.pop("problem", None)
            if row.get("dim"):
                dims.add(row["dim"])

        totals = _sum_rows(ds.iter_rows(), check)
        if problems:
            raise DedupError(
                f"unreadable embeddings: {problems[0]}"
                + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
            )
        if len(dims) > 1:
            raise DedupError(f"the run's image embeddings have different lengths: {sorted(dims)}")
        return totals

    nodes = job.step(
        "embeddings",
        run_nodes,
        lambda t: f"{t.get('samples', 0):,} image embeddings of {t.get('dim', 0)} dims",
    )
    n = nodes.get("samples", 0)
    summary.samples = n
    node_files = job.files("embeddings")
    if not node_files:
        return [], 0, False
    k = min(n, clusters or math.ceil(math.sqrt(n)))
    kth = ray.remote(_kth_rank)
    add = ray.remote(_add_partials)
    init = ray.remote(_init_centroids)
    step = ray.remote(_update_centroids).options(num_returns=2)
    save = ray.remote(_save_array)
    load = ray.remote(_load_array)

    def run_kmeans(directory: str) -> dict:
        ds = _read(node_files)
        # Forgy's start: the k points of smallest seeded rank, found in two passes so that only
        # ranks (8 bytes a point), then k points, ever meet in one task
        ranks = ds.map_batches(_smallest_ranks, fn_kwargs={"k": k, "seed": SEED}, batch_format="pyarrow")
        limit = ray.get(kth.remote(k, *ranks.materialize().to_arrow_refs()))
        seeds = ds.map_batches(
            _rank_at_most, fn_kwargs={"limit": limit, "seed": SEED}, batch_format="pyarrow"
        )
        centroids = init.remote(k, *seeds.materialize().to_arrow_refs())
        iterations, shift = 0, float("inf")
        while iterations < KMEANS_ITERATIONS and shift > KMEANS_TOLERANCE:
            partial = ds.map_batches(_partials, fn_kwargs={"centroids": [centroids]}, batch_format="pyarrow")
            refs = partial.materialize().to_arrow_refs()
            while len(refs) > 1:  # a tree of additions: a task adds at most FAN_IN blocks' sums
                refs = [add.remote(*refs[i : i + FAN_IN]) for i in range(0, len(refs), FAN_IN)]
            centroids, shift_ref = step.remote(centroids, *refs)
            shift = ray.get(shift_ref)
            iterations += 1
        ray.get(save.remote(centroids, f"{directory}/centroids.npy"))
        return {"clusters": k, "iterations": iterations, "shift": shift}

    km = job.step(
        "kmeans",
        run_kmeans,
        lambda t: f"{t.get('clusters', 0):,} clusters after {t.get('iterations', 0)} iteration(s)",
    )
    centroids = load.remote(f"{job.work}/kmeans/centroids.npy")
    summary.details.update(clusters=km.get("clusters"), kmeans_iterations=km.get("iterations"))

    def run_pairs(directory: str) -> dict:
        parts = partitions(n * (nodes.get("dim", 1) or 1) * 4, EMBEDDING_BYTES_PER_PARTITION)
        ds = _read(node_files).map_batches(
            _assign, fn_kwargs={"centroids": [centroids]}, batch_format="pyarrow"
        )
        ds = ds.groupby("part", num_partitions=parts).map_groups(
            _cluster_group, fn_kwargs={"threshold": threshold, "directory": directory}, batch_format="pyarrow"
        )
        return _collect(ds)

    totals = job.step(
        "groups",
        run_pairs,
        lambda t: (
            f"{t.get('pairs', 0):,} pairs at cosine >= {threshold} in {t.get('clusters', 0):,} "
            f"clusters (largest {t.get('largest_cluster', 0):,})"
        ),
    )
    summary.details.update(pairs=totals.get("pairs", 0), largest_cluster=totals.get("largest_cluster", 0))
    return job.files("groups"), totals.get("in_groups", 0), False


def _finish(
    job: _Dedup,
    source: list[str],
    parts: int,
    from_state: bool,
    plan: dict[str, Any],
    summary: DedupSummary,
    shards: int,
    started: float,
) -> None:
    """The members' rows per shard, written under a temporary directory renamed into place."""
    final = result_dir(job.output, job.method)

    def write(directory: str) -> None:
        totals: dict[str, Any] = {}
        if source:
            ds = _read(source).map_batches(
                _result_rows,
                fn_kwargs={"method": job.method, "from_state": from_state},
                batch_format="pyarrow",
            )
            ds = ds.groupby("shard", num_partitions=parts).map_groups(
                _result_group, fn_kwargs={"directory": directory}, batch_format="pyarrow"
            )
            totals = _collect(ds)
        summary.groups = totals.get("groups", 0)
        summary.in_groups = totals.get("in_groups", 0)
        meta = {
            "method": job.method,
            "threshold": job.threshold,
            "plan": plan,
            "samples": summary.samples,
            "groups": summary.groups,
            "in_groups": summary.in_groups,
            "duplicates": summary.duplicates,
            "result_shards": totals.get("shards", 0),
            "shards": shards,
            "details": summary.details,
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "wall_s": round(time.time() - started, 3),
            "curate_version": __version__,
        }
        write_atomic(f"{directory}/{MARKER}", json.dumps(meta, indent=1).encode())
        job.progress.note(
            f"  result: {summary.groups:,} groups holding {summary.in_groups:,} samples, "
            f"{summary.duplicates:,} duplicates -> {final}"
        )
        job.progress.update(1)

    protocols = job.fs.protocol if isinstance(job.fs.protocol, tuple) else (job.fs.protocol,)
    if "file" in protocols or "local" in protocols:
        job.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
        with atomic_path(final) as tmp:
            tmp.mkdir()
            write(str(tmp))
    else:  # object storage has no directory rename: the marker, written last, is the commit
        tmp = temp_name(final)
        write(tmp)
        if job.fs.exists(final):
            job.fs.rm(final, recursive=True)
        job.fs.mv(tmp, final, recursive=True)
