"""A run directory and read-only SQL over it: the ``samples`` and ``candidates`` views.

The connection is locked down so a query cannot write files; :func:`execute` admits
SELECT-like statements only, because DuckDB alone would still let a COPY overwrite one
of the files the connection may read.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from curate.dedup.results import DedupResult, read_results

# The SQL form of :func:`curate.schema.candidate_score` (CLIP when present, else ITM);
# ``{c}`` is the candidate struct's name.
SCORE_SQL = "coalesce({c}.clip_score, {c}.itm_score)"

# The score columns of a candidate, and the policy field that thresholds each.
SCORE_COLUMNS = ("itm_score", "clip_score")
SCORE_THRESHOLDS = {"itm_score": "itm_threshold", "clip_score": "min_clip_score"}

# The view over the sample rows; ``{files}`` is a DuckDB list of Parquet paths or a glob.
SAMPLES_VIEW_SQL = "CREATE VIEW samples AS SELECT * FROM read_parquet({files}, union_by_name = true);"

# ``curate dedup`` results (OUT/dedup/METHOD/*.parquet, curate.dedup.DEDUP_SCHEMA): one row per
# sample in a group, per method. Without any, the view is empty with the same columns.
DUPLICATES_VIEW_SQL = "CREATE VIEW duplicates AS SELECT * FROM read_parquet({files}, union_by_name = true);"
EMPTY_DUPLICATES_VIEW_SQL = (
    "CREATE VIEW duplicates AS SELECT NULL::VARCHAR AS shard, NULL::VARCHAR AS key, NULL::VARCHAR AS method, "
    'NULL::VARCHAR AS "group", NULL::VARCHAR AS duplicate_of, NULL::BIGINT AS group_size WHERE false;'
)

# With dedup results, the samples view gains two columns by a left join on (shard, key):
# ``duplicate_of``, the representative's ``shard/key`` (null for a representative or a sample in
# no group), and ``duplicate_method``, the method that grouped the sample (null when none did).
# When several methods ran, the first in METHODS order that names the sample a duplicate wins.
# docs/queries.md repeats this text verbatim for plain ``duckdb`` users (a test checks it).
_RANK = "list_position(['exact', 'phash', 'semantic'], method)"
SAMPLES_DEDUP_VIEW_SQL = f"""\
CREATE VIEW samples AS
SELECT s.*, d.duplicate_of, d.duplicate_method
FROM read_parquet({{files}}, union_by_name = true) AS s
LEFT JOIN (
    SELECT shard, key,
           arg_min(duplicate_of, {_RANK}) FILTER (WHERE duplicate_of IS NOT NULL) AS duplicate_of,
           coalesce(
               arg_min(method, {_RANK}) FILTER (WHERE duplicate_of IS NOT NULL),
               arg_min(method, {_RANK})
           ) AS duplicate_method
    FROM duplicates
    GROUP BY shard, key
) AS d ON s.shard = d.shard AND s.key = d.key;"""

# One row per scored text. ``score`` is what ranking uses (SCORE_SQL);
# ``score_rank`` is 1 for the highest score in the sample (ties share a rank);
# ``is_best`` marks the candidate that became the sample's ``caption``.
# docs/queries.md repeats this text verbatim for plain ``duckdb`` users (a test checks it).
_SCORE = SCORE_SQL.format(c="cand")
CANDIDATES_VIEW_SQL = f"""\
CREATE VIEW candidates AS
SELECT
    key, shard, status, reason, candidate_index,
    cand.source AS source, cand.text AS text,
    cand.itm_score AS itm_score, cand.clip_score AS clip_score, cand.kept AS kept,
    {_SCORE} AS score,
    list_position(
        list_reverse_sort(list_transform(candidates, lambda d: {SCORE_SQL.format(c="d")})),
        {_SCORE}
    ) AS score_rank,
    coalesce(
        candidate_index = list_position(
            list_transform(candidates, lambda d: coalesce(d.kept AND d.text = caption, false)), true
        ),
        false
    ) AS is_best
FROM (
    SELECT *, unnest(candidates) AS cand, generate_subscripts(candidates, 1) AS candidate_index
    FROM samples
);"""


class RunOutputError(ValueError):
    """The directory is not a run output (missing, or without samples Parquet)."""


class ReadOnlyQueryError(ValueError):
    """A query tried something other than reading (COPY, CREATE, ATTACH, ...)."""


@dataclass(frozen=True)
class RunOutput:
    """A run directory, its sample Parquet files and its manifest (None when absent), and the
    result files of its finished ``curate dedup`` runs by method (empty when none)."""

    root: Path
    sample_files: tuple[str, ...]
    manifest: dict[str, Any] | None
    manifest_problem: str | None = None
    dedup: dict[str, DedupResult] = field(default_factory=dict)

    @property
    def dedup_files(self) -> tuple[str, ...]:
        return tuple(f for result in self.dedup.values() for f in result.files)

    @property
    def policy(self) -> dict[str, Any]:
        pipeline = (self.manifest or {}).get("pipeline") or {}
        return dict(pipeline.get("policy") or {})


def open_run(out: str | os.PathLike[str] | RunOutput) -> RunOutput:
    """Validate a run directory up front so every command fails the same clear way."""
    if isinstance(out, RunOutput):
        return out
    root = Path(os.path.abspath(os.path.expanduser(os.fspath(out))))
    if not root.exists():
        raise RunOutputError(f"run output not found: {root}")
    if not root.is_dir():
        raise RunOutputError(f"run output is not a directory: {root}")
    samples_dir = root / "samples"
    # names starting with "." or "_" are writers' temporary or metadata files, as in Hive/Spark
    files = tuple(
        sorted(str(p) for p in samples_dir.glob("*.parquet") if p.is_file() and p.name[0] not in "._")
    )
    if not files:
        raise RunOutputError(f"no samples Parquet in run output: {samples_dir}/*.parquet")
    manifest: dict[str, Any] | None = None
    problem: str | None = None
    manifest_path = root / "manifest.json"
    if manifest_path.is_file():
        try:
            loaded = json.loads(manifest_path.read_text(encoding="utf-8"))
            if isinstance(loaded, dict):
                manifest = loaded
            else:
                problem = f"{manifest_path} is not a JSON object"
        except (OSError, ValueError) as exc:
            problem = f"{manifest_path} could not be read: {exc}"
    else:
        problem = f"no manifest.json in {root} (the run may not have finished)"
    return RunOutput(
        root=root,
        sample_files=files,
        manifest=manifest,
        manifest_problem=problem,
        dedup=read_results(str(root)),
    )


def sql_string(value: str) -> str:
    """A SQL string literal (names and paths come from the run, never trusted as SQL)."""
    return "'" + value.replace("'", "''") + "'"


def _files_sql(files: Sequence[str] | str) -> str:
    return sql_string(files) if isinstance(files, str) else "[" + ", ".join(map(sql_string, files)) + "]"


def samples_view_sql(files: Sequence[str] | str, dedup: bool = False) -> str:
    """The ``samples`` view over explicit files (a list) or a glob (a string); ``dedup`` joins
    the ``duplicates`` view (which must exist) for ``duplicate_of`` and ``duplicate_method``."""
    return (SAMPLES_DEDUP_VIEW_SQL if dedup else SAMPLES_VIEW_SQL).format(files=_files_sql(files))


def duplicates_view_sql(files: Sequence[str] | str) -> str:
    """The ``duplicates`` view over dedup result files; empty (same columns) without any."""
    if not files:
        return EMPTY_DUPLICATES_VIEW_SQL
    return DUPLICATES_VIEW_SQL.format(files=_files_sql(files))


def connect(out: str | os.PathLike[str] | RunOutput, *, read_only: bool = True) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the ``samples``, ``candidates`` and ``duplicates`` views.

    With ``read_only`` (the default) the connection can read only the run's sample files
    and its own private spill directory, and its configuration is locked so a query
    cannot undo that. DuckDB still lets a COPY overwrite an allowed file, so user SQL must
    also go through :func:`execute`, which admits SELECT-like statements only.
    """
    run = open_run(out)
    con = duckdb.connect(":memory:")
    con.execute(duplicates_view_sql(run.dedup_files))
    con.execute(samples_view_sql(run.sample_files, dedup=bool(run.dedup_files)))
    con.execute(CANDIDATES_VIEW_SQL)
    if read_only:
        spill = tempfile.mkdtemp(prefix="curate-duckdb-")
        weakref.finalize(con, shutil.rmtree, spill, ignore_errors=True)
        con.execute(f"SET temp_directory = {sql_string(spill)}")
        con.execute("SET python_enable_replacements = false")
        con.execute("SET allowed_paths = $paths", {"paths": [*run.sample_files, *run.dedup_files]})
        con.execute("SET autoinstall_known_extensions = false")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    return con


def execute(con: duckdb.DuckDBPyConnection, sql: str) -> duckdb.DuckDBPyRelation:
    """Run one read-only statement (SELECT, FROM ..., WITH, DESCRIBE, SHOW, SUMMARIZE).

    Raises ReadOnlyQueryError for anything else and duckdb.Error for bad SQL.
    """
    statements = con.extract_statements(sql)
    if len(statements) != 1:
        raise ReadOnlyQueryError(f"give exactly one SQL statement (got {len(statements)})")
    statement = statements[0]
    if statement.type != duckdb.StatementType.SELECT:
        kind = statement.type.name if hasattr(statement.type, "name") else str(statement.type)
        raise ReadOnlyQueryError(
            f"queries are read-only: only SELECT-like statements are allowed, not {kind}"
            " (write results with --to FILE instead of COPY)"
        )
    rel = con.sql(sql)
    if rel is None:  # pragma: no cover - SELECT statements always give a relation
        raise ReadOnlyQueryError("the statement returned no result")
    return rel


def run_query(out: str | os.PathLike[str] | RunOutput, sql: str) -> pa.Table:
    """Run a read-only query over a run's views and return the whole result as Arrow."""
    con = connect(out)
    try:
        return execute(con, sql).to_arrow_table()
    finally:
        con.close()


def sql_ident(name: str) -> str:
    """A quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def fetch_dicts(rel: duckdb.DuckDBPyRelation) -> list[dict[str, Any]]:
    """A small result as one dict per row."""
    return [dict(zip(rel.columns, row)) for row in rel.fetchall()]
