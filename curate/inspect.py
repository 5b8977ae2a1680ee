"""Look inside a run's output: read-only SQL, summary statistics and an HTML report.

A run directory holds ``samples/*.parquet`` (one row per input sample, see
:mod:`curate.schema`), ``shards/*.tar`` (the curated WebDataset) and ``manifest.json``.
Everything here only reads it: the SQL connection is locked down so a query cannot write
files, and the report reads images from the input tars named in ``source_url`` (falling
back to the curated shards for kept samples), showing a placeholder when neither can be read.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import html
import io
import json
import math
import os
import re
import shutil
import tarfile
import tempfile
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import duckdb
import pyarrow as pa

from curate.io.files import write_atomic
from curate.schema import SOURCE_ALT, STATUS_DROPPED, STATUS_ERROR, STATUS_KEPT, STATUSES

# The view over the sample rows; ``{files}`` is a DuckDB list of Parquet paths or a glob.
SAMPLES_VIEW_SQL = "CREATE VIEW samples AS SELECT * FROM read_parquet({files}, union_by_name = true);"

# One row per scored text. ``score`` is what ranking uses (CLIP when present, else ITM);
# ``score_rank`` is 1 for the highest score in the sample (ties share a rank);
# ``is_best`` marks the candidate that became the sample's ``caption``.
# docs/queries.md repeats this text verbatim for plain ``duckdb`` users (a test checks it).
CANDIDATES_VIEW_SQL = """\
CREATE VIEW candidates AS
SELECT
    key, shard, status, reason, candidate_index,
    cand.source AS source, cand.text AS text,
    cand.itm_score AS itm_score, cand.clip_score AS clip_score, cand.kept AS kept,
    coalesce(cand.clip_score, cand.itm_score) AS score,
    list_position(
        list_reverse_sort(list_transform(candidates, lambda d: coalesce(d.clip_score, d.itm_score))),
        coalesce(cand.clip_score, cand.itm_score)
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

_EXPORT_EXTENSIONS = {
    ".csv": "csv",
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
}
_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
_SCORES = ("itm_score", "clip_score")
# score column -> the policy threshold drawn on its histogram
_THRESHOLDS = {"itm_score": "itm_threshold", "clip_score": "min_clip_score"}
_WORD_BUCKETS = ((0, 0), (1, 4), (5, 9), (10, 19), (20, 49), (50, 99), (100, None))


class RunOutputError(ValueError):
    """The directory is not a run output (missing, or without samples Parquet)."""


class ReadOnlyQueryError(ValueError):
    """A query tried something other than reading (COPY, CREATE, ATTACH, ...)."""


@dataclass(frozen=True)
class RunOutput:
    """A run directory, its sample Parquet files and its manifest (None when absent)."""

    root: Path
    sample_files: tuple[str, ...]
    manifest: dict[str, Any] | None
    manifest_problem: str | None = None

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
    return RunOutput(root=root, sample_files=files, manifest=manifest, manifest_problem=problem)


def _sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def samples_view_sql(files: Sequence[str] | str) -> str:
    """The ``samples`` view over explicit files (a list) or a glob (a string)."""
    target = _sql_string(files) if isinstance(files, str) else "[" + ", ".join(map(_sql_string, files)) + "]"
    return SAMPLES_VIEW_SQL.format(files=target)


def connect(out: str | os.PathLike[str] | RunOutput, *, read_only: bool = True) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the ``samples`` and ``candidates`` views.

    With ``read_only`` (the default) the connection can read only the run's sample files
    and its own private spill directory, and its configuration is locked so a query
    cannot undo that. DuckDB still lets a COPY overwrite an allowed file, so user SQL must
    also go through :func:`execute`, which admits SELECT-like statements only.
    """
    run = open_run(out)
    con = duckdb.connect(":memory:")
    con.execute(samples_view_sql(run.sample_files))
    con.execute(CANDIDATES_VIEW_SQL)
    if read_only:
        spill = tempfile.mkdtemp(prefix="curate-duckdb-")
        weakref.finalize(con, shutil.rmtree, spill, ignore_errors=True)
        con.execute(f"SET temp_directory = {_sql_string(spill)}")
        con.execute("SET python_enable_replacements = false")
        con.execute("SET allowed_paths = $paths", {"paths": list(run.sample_files)})
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


def export_format(fmt: str | None, dest: str | os.PathLike[str] | None) -> str:
    """The output format: the one asked for, else guessed from ``--to``'s extension."""
    if fmt and fmt != "table":
        return fmt
    if dest is not None:
        guessed = _EXPORT_EXTENSIONS.get(Path(dest).suffix.lower())
        if guessed:
            return guessed
        if fmt == "table":
            raise ValueError(
                f"cannot write a terminal table to a file: {dest} (use --format csv|json|parquet)"
            )
        raise ValueError(f"cannot tell the format of {dest} from its extension; pass --format")
    return fmt or "table"


def write_result(rel: duckdb.DuckDBPyRelation, fmt: str, dest: str | os.PathLike[str]) -> None:
    """Stream a result to a file with DuckDB's own writers.

    The copy runs on a second, empty connection that only sees the result stream, so the
    locked connection that ran the user's SQL never gets write access.
    """
    options = {
        "csv": "FORMAT csv, HEADER true",
        "json": "FORMAT json, ARRAY true",
        "jsonl": "FORMAT json",
        "parquet": "FORMAT parquet",
    }
    if fmt not in options:
        raise ValueError(f"unknown export format {fmt!r}; choose from {', '.join(options)}")
    reader = rel.to_arrow_reader()
    writer = duckdb.connect(":memory:")
    try:
        writer.register("query_result", reader)
        path = os.path.abspath(os.fspath(dest))
        writer.execute(f"COPY query_result TO {_sql_string(path)} ({options[fmt]})")
    finally:
        writer.close()


def write_result_to_stream(rel: duckdb.DuckDBPyRelation, fmt: str, stream: BinaryIO) -> None:
    """Write a result to a binary stream (stdout) through a private temporary file."""
    with tempfile.TemporaryDirectory(prefix="curate-query-") as tmp:
        path = os.path.join(tmp, f"result.{fmt}")
        write_result(rel, fmt, path)
        with open(path, "rb") as f:
            shutil.copyfileobj(f, stream)


# ---------------------------------------------------------------- terminal tables

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _terminal_safe(text: str) -> str:
    """Untrusted web text must not move the cursor or recolour the terminal."""
    return _CONTROL.sub(lambda m: _ESCAPES.get(m.group(), f"\\x{ord(m.group()):02x}"), text)


def _cell(value: Any, max_width: int) -> str:
    if value is None:
        text = "NULL"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, bytes):
        text = f"<{len(value)} bytes>"
    elif isinstance(value, (list, dict)):
        text = json.dumps(value, ensure_ascii=False, default=str)
    else:
        text = str(value)
    text = _terminal_safe(text)
    if max_width > 0 and len(text) > max_width:
        text = text[: max(max_width - 1, 1)] + "…"
    return text


def text_table(
    headers: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    right: Sequence[bool] | None = None,
    max_width: int = 60,
) -> str:
    """Aligned plain-text table; ``right`` marks numeric columns."""
    cells = [[_cell(v, max_width) for v in row] for row in rows]
    heads = [_cell(h, max_width) for h in headers]
    widths = [len(h) for h in heads]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row)]
    right = list(right) if right is not None else [False] * len(heads)

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right)]
        return " | ".join(parts).rstrip()

    out = [line(heads), "-+-".join("-" * w for w in widths)]
    out.extend(line(row) for row in cells)
    return "\n".join(out)


def _is_numeric(arrow_type: pa.DataType) -> bool:
    return (
        pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type) or pa.types.is_decimal(arrow_type)
    )


def format_query_result(rel: duckdb.DuckDBPyRelation, *, max_rows: int = 100, max_width: int = 60) -> str:
    """Render a result as a terminal table, streaming so a huge result is only counted."""
    reader = rel.to_arrow_reader()
    schema = reader.schema
    rows: list[list[Any]] = []
    total = 0
    for batch in reader:
        total += batch.num_rows
        room = max_rows - len(rows) if max_rows > 0 else batch.num_rows
        if room > 0:
            part = batch.slice(0, room).to_pylist()
            rows.extend([record[name] for name in schema.names] for record in part)
    right = [_is_numeric(field.type) for field in schema]
    body = text_table(schema.names, rows, right=right, max_width=max_width)
    if len(rows) < total:
        footer = f"({total:,} rows, first {len(rows):,} shown; use --max-rows 0 or --format csv for all)"
    else:
        footer = f"({total:,} row{'s' if total != 1 else ''})"
    return f"{body}\n{footer}"


# ---------------------------------------------------------------- statistics


def _round(value: Any, digits: int = 6) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, digits)
    return value


def _distribution(con: duckdb.DuckDBPyConnection, expr: str, source_sql: str) -> dict[str, Any] | None:
    """count/mean/min/quantiles/max of ``expr`` over the rows of ``source_sql``."""
    quantiles = "[" + ", ".join(str(q) for q in _QUANTILES) + "]"
    row = con.sql(
        f"SELECT count(v), avg(v), min(v), quantile_cont(v, {quantiles}), max(v) "
        f"FROM (SELECT ({expr})::DOUBLE AS v FROM ({source_sql})) WHERE v IS NOT NULL"
    ).fetchall()[0]
    count = int(row[0])
    if count == 0:
        return None
    stats: dict[str, Any] = {"count": count, "mean": _round(row[1]), "min": _round(row[2])}
    for q, v in zip(_QUANTILES, row[3]):
        stats[f"p{round(q * 100)}"] = _round(v)
    stats["max"] = _round(row[4])
    return stats


def _word_count_sql(column: str) -> str:
    return f"len(regexp_extract_all({column}, '\\S+'))"


def _length_stats(con: duckdb.DuckDBPyConnection, source_sql: str) -> dict[str, Any] | None:
    """Length of texts in words and characters, with a word-count histogram."""
    words = _distribution(con, _word_count_sql("t"), source_sql)
    if words is None:
        return None
    buckets = []
    for lo, hi in _WORD_BUCKETS:
        label = str(lo) if hi == lo else (f"{lo}+" if hi is None else f"{lo}-{hi}")
        cond = f"w >= {lo}" + ("" if hi is None else f" AND w <= {hi}")
        buckets.append(f"count(*) FILTER (WHERE {cond}) AS {_sql_ident(label)}")
    hist_row = con.sql(
        f"SELECT {', '.join(buckets)} FROM (SELECT {_word_count_sql('t')} AS w FROM ({source_sql}) "
        "WHERE t IS NOT NULL)"
    )
    histogram = dict(zip(hist_row.columns, (int(v) for v in hist_row.fetchall()[0])))
    return {
        "count": words["count"],
        "words": words,
        "chars": _distribution(con, "length(t)", source_sql),
        "histogram_words": histogram,
    }


def _sql_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _fetch_dicts(rel: duckdb.DuckDBPyRelation) -> list[dict[str, Any]]:
    return [dict(zip(rel.columns, row)) for row in rel.fetchall()]


def compute_stats(out: str | os.PathLike[str] | RunOutput) -> dict[str, Any]:
    """Counts, keep rate, score quantiles per source, caption lengths and throughput.

    Numbers come from the Parquet rows; throughput and shard faults from the manifest,
    whose counts are cross-checked (a mismatch usually means an unfinished run).
    """
    run = open_run(out)
    con = connect(run)
    try:
        counts = {status: 0 for status in STATUSES}
        other_statuses: dict[str, int] = {}
        for status, n in con.sql("SELECT status, count(*) FROM samples GROUP BY status").fetchall():
            if status in counts:
                counts[status] = int(n)
            else:
                other_statuses[str(status)] = int(n)
        total = sum(counts.values()) + sum(other_statuses.values())
        reasons = {
            str(reason): int(n)
            for reason, n in con.sql(
                "SELECT coalesce(reason, '(no reason)'), count(*) AS n FROM samples "
                f"WHERE status = '{STATUS_DROPPED}' GROUP BY ALL ORDER BY n DESC, 1"
            ).fetchall()
        }
        errors = {
            str(message): int(n)
            for message, n in con.sql(
                "SELECT coalesce(split_part(error, chr(10), 1)[:200], '(no message)') AS e, count(*) AS n "
                f"FROM samples WHERE status = '{STATUS_ERROR}' GROUP BY ALL ORDER BY n DESC, e LIMIT 20"
            ).fetchall()
        }
        shards: dict[str, dict[str, Any]] = {}
        for row in _fetch_dicts(
            con.sql(
                "SELECT shard, count(*) AS samples, "
                f"count(*) FILTER (WHERE status = '{STATUS_KEPT}') AS kept, "
                f"count(*) FILTER (WHERE status = '{STATUS_DROPPED}') AS dropped, "
                f"count(*) FILTER (WHERE status = '{STATUS_ERROR}') AS error "
                "FROM samples GROUP BY shard ORDER BY shard"
            )
        ):
            name = str(row.pop("shard"))
            row = {k: int(v) for k, v in row.items()}
            row["keep_rate"] = _round(row["kept"] / row["samples"]) if row["samples"] else None
            row["fault"] = None
            shards[name] = row
        manifest_shards = (run.manifest or {}).get("shards") or {}
        for name, info in manifest_shards.items() if isinstance(manifest_shards, dict) else ():
            entry = shards.setdefault(
                str(name),
                {"samples": 0, "kept": 0, "dropped": 0, "error": 0, "keep_rate": None, "fault": None},
            )
            if isinstance(info, dict):
                entry["fault"] = info.get("fault")

        sources: dict[str, dict[str, Any]] = {}
        for row in _fetch_dicts(
            con.sql(
                "SELECT coalesce(source, '(none)') AS source, count(*) AS candidates, "
                "count(*) FILTER (WHERE kept) AS kept, count(*) FILTER (WHERE is_best) AS best "
                "FROM candidates GROUP BY ALL ORDER BY source"
            )
        ):
            name = row["source"]
            where = "source IS NULL" if name == "(none)" else f"source = {_sql_string(name)}"
            entry = {"candidates": int(row["candidates"]), "kept": int(row["kept"]), "best": int(row["best"])}
            for score in _SCORES:
                entry[score] = _distribution(con, score, f"SELECT {score} FROM candidates WHERE {where}")
            sources[name] = entry

        lengths: dict[str, Any] = {
            "best": _length_stats(con, "SELECT caption AS t FROM samples WHERE caption IS NOT NULL"),
            "by_source": {
                name: _length_stats(
                    con,
                    "SELECT text AS t FROM candidates WHERE text IS NOT NULL AND "
                    + ("source IS NULL" if name == "(none)" else f"source = {_sql_string(name)}"),
                )
                for name in sources
            },
        }
    finally:
        con.close()

    manifest = run.manifest or {}
    warnings: list[str] = []
    if run.manifest_problem:
        warnings.append(run.manifest_problem)
    if other_statuses:
        warnings.append(f"rows with unknown status: {other_statuses}")
    manifest_counts = manifest.get("counts") if isinstance(manifest.get("counts"), dict) else None
    if manifest_counts is not None:
        mismatched = {
            k: (manifest_counts.get(k), v)
            for k, v in {**counts, "total": total}.items()
            if manifest_counts.get(k) is not None and manifest_counts.get(k) != v
        }
        if mismatched:
            detail = ", ".join(f"{k}: manifest {m} vs parquet {p}" for k, (m, p) in mismatched.items())
            warnings.append(f"manifest counts differ from the Parquet rows ({detail})")
    faults = {name: s["fault"] for name, s in shards.items() if s.get("fault")}
    if faults:
        warnings.append(f"{len(faults)} shard(s) reported a fault: " + ", ".join(sorted(faults)))

    throughput = None
    if manifest:
        wall = manifest.get("wall_s")
        rate = manifest.get("samples_per_s")
        if rate is None and isinstance(wall, (int, float)) and wall > 0:
            rate = total / wall
        throughput = {
            "wall_s": _round(wall) if isinstance(wall, float) else wall,
            "samples_per_s": _round(rate) if isinstance(rate, float) else rate,
            "started_at": manifest.get("started_at"),
            "finished_at": manifest.get("finished_at"),
        }
    return {
        "output": str(run.root),
        "parquet_files": len(run.sample_files),
        "counts": {**counts, "total": total},
        "keep_rate": _round(counts[STATUS_KEPT] / total) if total else None,
        "reasons": reasons,
        "errors": errors,
        "shards": shards,
        "sources": sources,
        "caption_length": lengths,
        "throughput": throughput,
        "policy": run.policy or None,
        "models": manifest.get("models") or {},
        "curate_version": manifest.get("curate_version"),
        "warnings": warnings,
    }


def _pct(n: int, total: int) -> str:
    return f"{100.0 * n / total:.1f}%" if total else "-"


def _num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def format_stats(stats: dict[str, Any], *, max_shards: int = 30) -> str:
    """The plain-text form of :func:`compute_stats` for a terminal."""
    counts = stats["counts"]
    total = counts["total"]
    lines = [
        f"run         {stats['output']}",
        f"samples     {total:,} in {len(stats['shards']):,} shard(s), "
        f"{stats['parquet_files']:,} Parquet file(s)",
    ]
    for status in STATUSES:
        lines.append(f"{status:<11} {counts[status]:>{len(f'{total:,}')},}  ({_pct(counts[status], total)})")
    lines.append(f"keep rate   {_pct(counts[STATUS_KEPT], total)}")
    tp = stats.get("throughput")
    if tp:
        lines.append(
            f"throughput  {_num(tp.get('samples_per_s'))} samples/s over {_num(tp.get('wall_s'))} s"
            f" ({tp.get('started_at') or '?'} -> {tp.get('finished_at') or '?'})"
        )
    else:
        lines.append("throughput  - (no manifest)")
    policy = stats.get("policy") or {}
    if policy:
        lines.append("policy      " + "  ".join(f"{k}={_num(v)}" for k, v in policy.items()))
    for role, info in (stats.get("models") or {}).items():
        if isinstance(info, dict):
            rev = f"@{info['revision']}" if info.get("revision") else ""
            lines.append(f"model       {role}: {info.get('model', '?')}{rev}")

    if stats["reasons"]:
        lines += ["", "drop reasons"]
        lines.append(
            text_table(
                ["reason", "samples", "share"],
                [(r, n, _pct(n, total)) for r, n in stats["reasons"].items()],
                right=[False, True, True],
            )
        )
    if stats["errors"]:
        lines += ["", "errors (first line of the message)"]
        lines.append(
            text_table(["error", "samples"], stats["errors"].items(), right=[False, True], max_width=90)
        )

    if stats["sources"]:
        lines += ["", "candidates by source (best = became the caption)"]
        lines.append(
            text_table(
                ["source", "candidates", "kept", "best"],
                [(s, v["candidates"], v["kept"], v["best"]) for s, v in stats["sources"].items()],
                right=[False, True, True, True],
            )
        )
        rows = []
        for source, info in stats["sources"].items():
            for score in _SCORES:
                d = info.get(score)
                if d:
                    rows.append(
                        [
                            source,
                            score,
                            d["count"],
                            *(_num(d[k]) for k in ("min", "p10", "p25", "p50", "p75", "p90", "max", "mean")),
                        ]
                    )
        if rows:
            lines += ["", "score quantiles by source"]
            lines.append(
                text_table(
                    ["source", "score", "n", "min", "p10", "p25", "p50", "p75", "p90", "max", "mean"],
                    rows,
                    right=[False, False] + [True] * 9,
                )
            )

    length_rows = []
    lengths = stats["caption_length"]
    named = [("best caption", lengths.get("best")), *(lengths.get("by_source") or {}).items()]
    bucket_labels: list[str] = []
    for name, info in named:
        if not info:
            continue
        bucket_labels = list(info["histogram_words"])
        w = info["words"]
        length_rows.append(
            [
                name,
                info["count"],
                *(_num(w[k]) for k in ("min", "p10", "p50", "p90", "max", "mean")),
                *info["histogram_words"].values(),
            ]
        )
    if length_rows:
        lines += ["", "caption length in words (count per word-count bucket on the right)"]
        lines.append(
            text_table(
                ["text", "n", "min", "p10", "p50", "p90", "max", "mean", *bucket_labels],
                length_rows,
                right=[False] + [True] * (7 + len(bucket_labels)),
            )
        )

    shards = stats["shards"]
    if shards:
        lines += ["", "shards"]
        items = list(shards.items())
        rows = [
            (
                name,
                s["samples"],
                s["kept"],
                s["dropped"],
                s["error"],
                _pct(s["kept"], s["samples"]),
                s.get("fault") or "",
            )
            for name, s in items[:max_shards]
        ]
        lines.append(
            text_table(
                ["shard", "samples", "kept", "dropped", "error", "keep", "fault"],
                rows,
                right=[False, True, True, True, True, True, False],
            )
        )
        if len(items) > max_shards:
            lines.append(f"... {len(items) - max_shards:,} more shard(s); see --json")
    if stats["warnings"]:
        lines += ["", "warnings"]
        lines.extend(f"  - {_terminal_safe(w)}" for w in stats["warnings"])
    return "\n".join(lines)


# ---------------------------------------------------------------- images


@dataclass
class _Thumb:
    data_uri: str | None = None
    width: int = 0
    height: int = 0
    problem: str | None = None


def _is_local(url: str) -> tuple[bool, str]:
    import fsspec

    protocol, path = fsspec.core.split_protocol(url)
    if protocol in (None, "file", "local"):
        return True, os.path.abspath(os.path.expanduser(path))
    return False, url


@contextlib.contextmanager
def _open_tar(url: str) -> Iterator[tarfile.TarFile]:
    local, path = _is_local(url)
    if local:
        with tarfile.open(path, mode="r:*") as tar:
            yield tar
    else:
        import fsspec

        with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            yield tar


def _read_members(url: str, wanted: set[tuple[str, str]]) -> tuple[dict[tuple[str, str], bytes], str | None]:
    """Read the members named (key, ext) from one tar, stopping once all are found."""
    from curate.io.reader import split_member_name

    found: dict[tuple[str, str], bytes] = {}
    try:
        with _open_tar(url) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = split_member_name(member.name)
                if name in wanted and name not in found:
                    f = tar.extractfile(member)
                    found[name] = f.read() if f is not None else b""
                    if len(found) == len(wanted):
                        break
    except (OSError, tarfile.TarError, ValueError, ImportError) as exc:
        # a truncated tar still gives what came before the cut
        return found, f"{type(exc).__name__}: {exc}"
    return found, None


def _thumbnail(data: bytes, size: int) -> _Thumb:
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (size * 2, size * 2))
            img = ImageOps.exif_transpose(img)
            img.thumbnail((size, size))
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                canvas = Image.new("RGB", rgba.size, (255, 255, 255))
                canvas.paste(rgba, mask=rgba.getchannel("A"))
                img = canvas
            else:
                img = img.convert("RGB")
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=82)
    except Exception as exc:  # any decoder failure is a placeholder, never a broken page
        return _Thumb(problem=f"image could not be decoded ({type(exc).__name__})")
    uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return _Thumb(data_uri=uri, width=img.width, height=img.height)


def load_thumbnails(
    run: RunOutput, rows: Sequence[dict[str, Any]], size: int = 160
) -> dict[tuple[str, str], _Thumb]:
    """Thumbnails for sample rows, keyed by (shard, key).

    Images come from the input tar (``source_url``); kept samples fall back to the
    curated shards. A row whose bytes cannot be found or decoded gets a problem text.
    """
    from curate.io.reader import IMAGE_EXTS, sanitize_key

    def wanted_names(row: dict[str, Any], key: str) -> list[tuple[str, str]]:
        ext = (row.get("image_ext") or "").lower()
        return [(key, ext)] if ext else [(key, e) for e in IMAGE_EXTS]

    result: dict[tuple[str, str], _Thumb] = {}
    by_url: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_url.setdefault(row.get("source_url") or "", []).append(row)
    raw: dict[tuple[str, str], bytes] = {}
    problems: dict[tuple[str, str], str] = {}
    for url, group in by_url.items():
        if not url:
            for row in group:
                problems[(row["shard"], row["key"])] = "image not available: the row names no input shard"
            continue
        wanted = {name for row in group for name in wanted_names(row, row["key"])}
        found, fault = _read_members(url, wanted)
        for row in group:
            ident = (row["shard"], row["key"])
            data = next((found[n] for n in wanted_names(row, row["key"]) if n in found), None)
            if data is not None and _sha_ok(data, row.get("image_sha256")):
                raw[ident] = data
            elif fault and not found:
                problems[ident] = "image not available: input shard not readable"
            else:
                problems[ident] = "image not available: not found in the input shard"

    # kept samples are also in the curated shards
    missing = [r for r in rows if (r["shard"], r["key"]) not in raw and r.get("status") == STATUS_KEPT]
    shard_tars = sorted((run.root / "shards").glob("*.tar")) if missing else []
    if missing and shard_tars:
        names: dict[tuple[str, str], list[tuple[str, str]]] = {}
        for row in missing:
            keys = {row["key"], sanitize_key(row["key"])}
            names[(row["shard"], row["key"])] = [n for k in sorted(keys) for n in wanted_names(row, k)]
        pending = {n for ns in names.values() for n in ns}
        for tar_path in shard_tars:
            found, _ = _read_members(str(tar_path), pending)
            for ident, candidates in names.items():
                if ident in raw:
                    continue
                row = next(r for r in missing if (r["shard"], r["key"]) == ident)
                for n in candidates:
                    if n in found and _sha_ok(found[n], row.get("image_sha256")):
                        raw[ident] = found[n]
                        problems.pop(ident, None)
                        break
            if all(ident in raw for ident in names):
                break

    for row in rows:
        ident = (row["shard"], row["key"])
        if ident in raw:
            result[ident] = _thumbnail(raw[ident], size)
        else:
            result[ident] = _Thumb(problem=problems.get(ident, "image not available"))
    return result


def _sha_ok(data: bytes, expected: str | None) -> bool:
    return not expected or hashlib.sha256(data).hexdigest() == expected


# ---------------------------------------------------------------- plots

_SOURCE_COLORS = {"alt": "#d9822b", "synthetic": "#2b7bd9", "kale": "#3a9e4f"}
_STATUS_COLORS = {STATUS_KEPT: "#3a9e4f", STATUS_DROPPED: "#d9822b", STATUS_ERROR: "#c23b3b"}


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("curate report needs matplotlib: pip install matplotlib") from exc
    fig = Figure(figsize=(width, height), dpi=100, layout="tight")
    FigureCanvasAgg(fig)
    return fig


def _png_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _score_histogram(con: duckdb.DuckDBPyConnection, score: str, threshold: float | None) -> str | None:
    """Per-source histograms of one score, kept vs not kept stacked, the threshold drawn."""
    data: dict[str, tuple[list[float], list[float]]] = {}
    for source, value, kept in con.sql(
        f"SELECT coalesce(source, '(none)'), {score}::DOUBLE, coalesce(kept, false) FROM candidates "
        f"WHERE {score} IS NOT NULL AND isfinite({score}) ORDER BY 1"
    ).fetchall():
        data.setdefault(source, ([], []))[0 if kept else 1].append(value)
    if not data:
        return None
    values = [v for kept, rest in data.values() for v in kept + rest]
    lo, hi = min(values), max(values)
    if threshold is not None:
        lo, hi = min(lo, threshold), max(hi, threshold)
    if score == "itm_score":
        lo, hi = min(lo, 0.0), max(hi, 1.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    bins = [lo + (hi - lo) * i / 25 for i in range(26)]
    from matplotlib.ticker import MaxNLocator

    n = len(data)
    fig = _figure(min(3.4 * n, 12), 2.6)
    axes = fig.subplots(1, n, sharex=True, squeeze=False)[0]
    for ax, (source, (kept, rest)) in zip(axes, data.items()):
        color = _SOURCE_COLORS.get(source, "#777777")
        ax.hist(
            [kept, rest],
            bins=bins,
            stacked=True,
            histtype="stepfilled",
            color=[color, "#c8c8c8"],
            label=["kept", "not kept"],
        )
        if threshold is not None:
            ax.axvline(
                threshold,
                color="#c23b3b",
                linestyle="--",
                linewidth=1.5,
                label=f"{_THRESHOLDS[score]} = {threshold:g}",
            )
        ax.set_title(f"{source} (n={len(kept) + len(rest)})", fontsize=10)
        ax.set_xlabel(score, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_ylabel("candidates", fontsize=9)
    axes[-1].legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return _png_uri(fig)


def _outcome_chart(stats: dict[str, Any]) -> str | None:
    counts = stats["counts"]
    labels, values, colors = [STATUS_KEPT], [counts[STATUS_KEPT]], [_STATUS_COLORS[STATUS_KEPT]]
    for reason, n in stats["reasons"].items():
        labels.append(f"dropped: {reason}")
        values.append(n)
        colors.append(_STATUS_COLORS[STATUS_DROPPED])
    labels.append(STATUS_ERROR)
    values.append(counts[STATUS_ERROR])
    colors.append(_STATUS_COLORS[STATUS_ERROR])
    if not any(values):
        return None
    fig = _figure(6.5, 0.45 * len(labels) + 0.8)
    ax = fig.subplots()
    ypos = list(range(len(labels)))[::-1]
    ax.barh(ypos, values, color=colors)
    ax.set_yticks(ypos)
    ax.set_yticklabels([lbl if len(lbl) <= 48 else lbl[:47] + "…" for lbl in labels], fontsize=9)
    for y, v in zip(ypos, values):
        ax.text(v, y, f" {v:,}", va="center", fontsize=8)
    ax.set_xlabel("samples", fontsize=9)
    ax.margins(x=0.15)
    return _png_uri(fig)


def _length_chart(con: duckdb.DuckDBPyConnection) -> str | None:
    series: dict[str, list[int]] = {}
    for name, words in con.sql(
        f"SELECT 'best caption', {_word_count_sql('caption')} FROM samples WHERE caption IS NOT NULL "
        f"UNION ALL SELECT coalesce(source, '(none)'), {_word_count_sql('text')} FROM candidates "
        "WHERE text IS NOT NULL"
    ).fetchall():
        series.setdefault(name, []).append(int(words))
    if not series:
        return None
    top = max(max(v) for v in series.values())
    bins = list(range(0, top + 2))
    if len(bins) > 60:
        step = math.ceil(len(bins) / 60)
        bins = list(range(0, top + step + 1, step))
    fig = _figure(6.5, 2.6)
    ax = fig.subplots()
    for name, values in series.items():
        color = "#222222" if name == "best caption" else _SOURCE_COLORS.get(name, "#777777")
        ax.hist(
            values, bins=bins, histtype="step", linewidth=1.6, color=color, label=f"{name} (n={len(values)})"
        )
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("words", fontsize=9)
    ax.set_ylabel("texts", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=8, frameon=False)
    return _png_uri(fig)


# ---------------------------------------------------------------- HTML

_SAMPLE_COLUMNS = (
    "shard, key, status, reason, error, alt_text, caption, candidates, source_url, image_ext, image_sha256, "
    "width, height"
)
_BEST_SOURCE = "list_filter(candidates, lambda c: coalesce(c.kept AND c.text = caption, false))[1].source"
_HAS_ALT = f"len(list_filter(candidates, lambda c: c.source = '{SOURCE_ALT}')) > 0"
GRIDS = (
    ("kept", "Kept samples: best caption vs alt-text", f"status = '{STATUS_KEPT}'"),
    ("dropped", "Dropped samples and why", f"status = '{STATUS_DROPPED}'"),
    (
        "beat-alt",
        "A synthetic or KALE caption beat the alt-text",
        f"status = '{STATUS_KEPT}' AND {_BEST_SOURCE} <> '{SOURCE_ALT}' AND {_HAS_ALT}",
    ),
)

# Counts images that failed to load; tests and CI read it from the dumped DOM.
_CHECK_SCRIPT = (
    "window.addEventListener('load', function () {"
    " var imgs = Array.prototype.slice.call(document.images);"
    " var broken = imgs.filter(function (i) { return !i.complete || i.naturalWidth === 0; });"
    " document.body.dataset.images = String(imgs.length);"
    " document.body.dataset.brokenImages = String(broken.length);"
    " });"
)

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d1d1f;background:#f6f7f9}
header{background:#1f2933;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}
header .sub{color:#c9d1d9;font-size:12px;word-break:break-all}
main{padding:8px 24px 40px}section{margin:18px 0}h2{font-size:17px;margin:18px 0 8px;
border-bottom:1px solid #d8dde3;padding-bottom:4px}h3{font-size:14px;margin:10px 0 6px;color:#444}
table{border-collapse:collapse;background:#fff;font-size:13px}td,th{border:1px solid #dde2e7;padding:3px 8px;
text-align:left;vertical-align:top}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.cols{display:grid;grid-template-columns:1fr 1fr;gap:18px}.cols>div{min-width:0}
.plot{max-width:100%;background:#fff;border:1px solid #e3e6ea;margin:4px 0}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(200px,1fr));gap:10px}
.card{background:#fff;border:1px solid #dde2e7;border-radius:6px;margin:0;padding:8px;font-size:12px;
overflow-wrap:anywhere}.card .thumb{height:160px;display:flex;align-items:center;justify-content:center;
background:#eef1f4;border-radius:4px;margin-bottom:6px}.card img{max-width:100%;max-height:160px}
.noimg{color:#6b7280;font-style:italic;padding:8px;text-align:center}
.meta{color:#6b7280;font-size:11px;margin-bottom:4px}.cap{margin:3px 0}.score{color:#6b7280;font-size:11px}
.src{display:inline-block;border-radius:3px;padding:0 4px;margin-right:4px;font-size:10px;color:#fff;
background:#777}.src-alt{background:#d9822b}.src-synthetic{background:#2b7bd9}.src-kale{background:#3a9e4f}
.badge{display:inline-block;border-radius:3px;padding:0 5px;color:#fff;font-size:10px}
.st-kept{background:#3a9e4f}.st-dropped{background:#d9822b}.st-error{background:#c23b3b}
.reason{color:#a4461d}.warn{color:#a4461d}.empty{color:#6b7280;font-style:italic}
.lost{text-decoration:line-through;color:#6b7280}
"""


def _e(value: Any) -> str:
    """Escape for HTML text and attribute values: captions are untrusted web text."""
    return html.escape("" if value is None else str(value), quote=True)


def _fmt_score(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"


def _table(
    headers: Sequence[str] | None, rows: Iterable[Sequence[Any]], numeric: Sequence[bool] | None = None
) -> str:
    rows = [list(row) for row in rows]
    width = len(headers) if headers else max((len(r) for r in rows), default=0)
    numeric = list(numeric) if numeric is not None else [False] * width
    head = ""
    if headers:
        cells = "".join(f'<th class="{"n" if n else ""}">{_e(h)}</th>' for h, n in zip(headers, numeric))
        head = f"<thead><tr>{cells}</tr></thead>"
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="{"n" if n else ""}">{_e(_num(v) if n else v)}</td>' for v, n in zip(row, numeric)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table>{head}<tbody>{body}</tbody></table>"


def _img(uri: str | None, alt: str) -> str:
    return (
        f'<img class="plot" src="{uri}" alt="{_e(alt)}">'
        if uri
        else f'<p class="empty">no data for {_e(alt)}</p>'
    )


def _candidate_line(cand: dict[str, Any] | None, label: str, *, lost: bool = False) -> str:
    if cand is None:
        return f'<div class="cap"><span class="src">{_e(label)}</span><span class="empty">none</span></div>'
    source = cand.get("source") or "?"
    scores = " · ".join(
        f"{name} {_fmt_score(cand.get(f'{name}_score'))}"
        for name in ("clip", "itm")
        if cand.get(f"{name}_score") is not None
    )
    text = cand.get("text")
    text_html = (
        f'<span class="{"lost" if lost else ""}">{_e(text)}</span>'
        if text
        else '<span class="empty">(empty)</span>'
    )
    return (
        f'<div class="cap"><span class="src src-{_e(source)}">{_e(label)}</span>{text_html}'
        + (f' <span class="score">{_e(scores)}</span>' if scores else "")
        + "</div>"
    )


def _best_candidate(row: dict[str, Any]) -> dict[str, Any] | None:
    cands = row.get("candidates") or []
    caption = row.get("caption")
    best = next((c for c in cands if c.get("kept") and c.get("text") == caption), None)
    if best is None and cands:
        scored = [
            c
            for c in cands
            if (c.get("clip_score") if c.get("clip_score") is not None else c.get("itm_score")) is not None
        ]
        key = lambda c: c["clip_score"] if c.get("clip_score") is not None else c["itm_score"]  # noqa: E731
        best = max(scored, key=key) if scored else cands[0]
    return best


_ALT_LINE = '<div class="cap"><span class="src src-alt">alt</span>{}</div>'


def _card(row: dict[str, Any], thumb: _Thumb) -> str:
    if thumb.data_uri:
        size = f'width="{thumb.width}" height="{thumb.height}"'
        image = f'<img src="{thumb.data_uri}" {size} alt="{_e(row["key"])}">'
    else:
        image = f'<div class="noimg">{_e(thumb.problem)}</div>'
    status = row.get("status") or "?"
    size = f" · {row['width']}×{row['height']}" if row.get("width") and row.get("height") else ""
    meta = (
        f'<div class="meta"><span class="badge st-{_e(status)}">{_e(status)}</span> '
        f"{_e(row['shard'])}/{_e(row['key'])}{_e(size)}</div>"
    )
    parts = [meta]
    if row.get("reason"):
        parts.append(f'<div class="reason">reason: {_e(row["reason"])}</div>')
    if row.get("error"):
        parts.append(f'<div class="reason">error: {_e(str(row["error"])[:300])}</div>')
    cands = row.get("candidates") or []
    alt = next((c for c in cands if c.get("source") == SOURCE_ALT), None)
    best = _best_candidate(row)
    if status == STATUS_KEPT and best is not None:
        parts.append(_candidate_line(best, f"best: {best.get('source') or '?'}"))
        if alt is not None and alt is not best:
            parts.append(_candidate_line(alt, "alt", lost=not alt.get("kept")))
    elif best is not None:
        if best is not alt:
            parts.append(_candidate_line(best, f"top: {best.get('source') or '?'}"))
        parts.append(
            _candidate_line(alt, "alt", lost=True)
            if alt
            else _ALT_LINE.format(_e(row.get("alt_text") or "(none)"))
        )
    elif row.get("alt_text") is not None:
        parts.append(_ALT_LINE.format(_e(row.get("alt_text"))))
    caption = "".join(parts)
    return f'<figure class="card"><div class="thumb">{image}</div><figcaption>{caption}</figcaption></figure>'


def _grid(run: RunOutput, con: duckdb.DuckDBPyConnection, where: str, limit: int, thumb_size: int) -> str:
    total = con.sql(f"SELECT count(*) FROM samples WHERE {where}").fetchall()[0][0]
    if not total:
        return '<p class="empty">none</p>'
    rows = _fetch_dicts(
        con.sql(
            f"SELECT {_SAMPLE_COLUMNS} FROM samples WHERE {where} "
            f"ORDER BY hash(shard, key), shard, key LIMIT {int(limit)}"
        )
    )
    thumbs = load_thumbnails(run, rows, size=thumb_size)
    note = f'<p class="meta">{len(rows):,} of {total:,} shown (a stable pseudo-random pick)</p>'
    cards = "".join(_card(r, thumbs[(r["shard"], r["key"])]) for r in rows)
    return f'{note}<div class="grid">{cards}</div>'


def _summary(stats: dict[str, Any], run: RunOutput) -> str:
    counts, total = stats["counts"], stats["counts"]["total"]
    rows: list[tuple[str, Any]] = [
        ("output", stats["output"]),
        ("input shards", len((run.manifest or {}).get("input") or []) or len(stats["shards"])),
        ("samples", f"{total:,}"),
    ]
    rows += [(s, f"{counts[s]:,} ({_pct(counts[s], total)})") for s in STATUSES]
    tp = stats.get("throughput") or {}
    if tp:
        rows.append(
            ("throughput", f"{_num(tp.get('samples_per_s'))} samples/s, {_num(tp.get('wall_s'))} s wall")
        )
        rows.append(("started / finished", f"{tp.get('started_at') or '?'} / {tp.get('finished_at') or '?'}"))
    for k, v in (stats.get("policy") or {}).items():
        rows.append((f"policy.{k}", _num(v)))
    for role, info in (stats.get("models") or {}).items():
        if isinstance(info, dict):
            rev = f" @ {info['revision']}" if info.get("revision") else ""
            rows.append((f"model: {role}", f"{info.get('model', '?')}{rev}"))
    if stats.get("curate_version"):
        rows.append(("curate version", stats["curate_version"]))
    body = _table(None, rows)
    if stats["warnings"]:
        body += "<ul>" + "".join(f'<li class="warn">{_e(w)}</li>' for w in stats["warnings"]) + "</ul>"
    return body


def _source_table(stats: dict[str, Any]) -> str:
    rows = []
    for source, info in stats["sources"].items():
        row: list[Any] = [source, info["candidates"], info["kept"], info["best"]]
        for score in _SCORES:
            d = info.get(score) or {}
            row += [d.get("p10"), d.get("p50"), d.get("p90")]
        rows.append(row)
    headers = [
        "source",
        "candidates",
        "kept",
        "best",
        "itm p10",
        "itm p50",
        "itm p90",
        "clip p10",
        "clip p50",
        "clip p90",
    ]
    return _table(headers, rows, [False] + [True] * 9) if rows else '<p class="empty">no candidates</p>'


def _run_sections(
    run: RunOutput, stats: dict[str, Any], *, max_samples: int, thumb_size: int
) -> dict[str, str]:
    """Section id -> HTML for one run, so two runs can be laid side by side."""
    con = connect(run)
    try:
        sections: dict[str, str] = {"summary": _summary(stats, run), "outcomes": ""}
        plots = []
        for score in _SCORES:
            threshold = run.policy.get(_THRESHOLDS[score])
            uri = _score_histogram(con, score, threshold if isinstance(threshold, (int, float)) else None)
            if uri:
                plots.append(f"<h3>{_e(score)}</h3>" + _img(uri, f"{score} histogram"))
        sections["scores"] = (
            ("".join(plots) or '<p class="empty">no scores in this run</p>')
            + "<h3>by source</h3>"
            + _source_table(stats)
        )
        reasons_rows = [(STATUS_KEPT, stats["counts"][STATUS_KEPT])]
        reasons_rows += [(f"dropped: {r}", n) for r, n in stats["reasons"].items()]
        reasons_rows.append((STATUS_ERROR, stats["counts"][STATUS_ERROR]))
        outcome = _img(_outcome_chart(stats), "outcomes chart") + _table(
            ["outcome", "samples"], reasons_rows, [False, True]
        )
        if stats["errors"]:
            outcome += "<h3>errors</h3>" + _table(
                ["first line of the error", "samples"], stats["errors"].items(), [False, True]
            )
        sections["outcomes"] = outcome
        sections["lengths"] = _img(_length_chart(con), "caption length histogram")
        for grid_id, _title, where in GRIDS:
            sections[grid_id] = _grid(run, con, where, max_samples, thumb_size)
        shard_rows = [
            (
                name,
                s["samples"],
                s["kept"],
                s["dropped"],
                s["error"],
                _pct(s["kept"], s["samples"]),
                s.get("fault") or "",
            )
            for name, s in list(stats["shards"].items())[:200]
        ]
        sections["shards"] = _table(
            ["shard", "samples", "kept", "dropped", "error", "keep", "fault"],
            shard_rows,
            [False, True, True, True, True, False, False],
        )
    finally:
        con.close()
    return sections


_SECTION_TITLES = {
    "summary": "Run",
    "outcomes": "Keep / drop reasons",
    "scores": "Scores per source (dashed line: policy threshold)",
    "lengths": "Caption length",
    **{grid_id: title for grid_id, title, _ in GRIDS},
    "shards": "Shards",
}


def _comparison_table(a: dict[str, Any], b: dict[str, Any]) -> str:
    def metric_rows() -> Iterator[tuple[str, Any, Any]]:
        for key in (*STATUSES, "total"):
            yield f"samples {key}", a["counts"][key], b["counts"][key]
        yield "keep rate", a["keep_rate"], b["keep_rate"]
        for reason in sorted(set(a["reasons"]) | set(b["reasons"])):
            yield f"dropped: {reason}", a["reasons"].get(reason, 0), b["reasons"].get(reason, 0)
        for source in sorted(set(a["sources"]) | set(b["sources"])):
            sa, sb = a["sources"].get(source) or {}, b["sources"].get(source) or {}
            yield f"{source}: became the caption", sa.get("best", 0), sb.get("best", 0)
            for score in _SCORES:
                yield (
                    f"{source}: median {score}",
                    (sa.get(score) or {}).get("p50"),
                    (sb.get(score) or {}).get("p50"),
                )
        ta, tb = a.get("throughput") or {}, b.get("throughput") or {}
        yield "samples/s", ta.get("samples_per_s"), tb.get("samples_per_s")
        yield "wall s", ta.get("wall_s"), tb.get("wall_s")
        for k in sorted(set(a.get("policy") or {}) | set(b.get("policy") or {})):
            yield f"policy.{k}", (a.get("policy") or {}).get(k), (b.get("policy") or {}).get(k)

    rows = []
    for name, va, vb in metric_rows():
        delta = (
            vb - va
            if isinstance(va, (int, float)) and isinstance(vb, (int, float)) and not isinstance(va, bool)
            else None
        )
        if isinstance(delta, float):
            delta = round(delta, 6)
        rows.append((name, va, vb, delta))
    return _table(["metric", "A", "B", "B − A"], rows, [False, True, True, True])


def _changed_outcomes(a: RunOutput, b: RunOutput, max_samples: int, thumb_size: int) -> str:
    """Status transitions between two runs over the same inputs, joined on (shard, key)."""
    con = duckdb.connect(":memory:")
    try:
        con.execute(samples_view_sql(a.sample_files).replace("VIEW samples", "VIEW a"))
        con.execute(samples_view_sql(b.sample_files).replace("VIEW samples", "VIEW b"))
        matrix = con.sql(
            "SELECT coalesce(a.status, '(absent)') AS a_status, coalesce(b.status, '(absent)') AS b_status, "
            "count(*) AS samples FROM a FULL OUTER JOIN b USING (shard, key) GROUP BY ALL ORDER BY ALL"
        ).fetchall()
        a_columns = ", ".join(f"a.{c.strip()} AS {c.strip()}" for c in _SAMPLE_COLUMNS.split(","))
        b_columns = (
            "b.status AS b_status, b.reason AS b_reason, b.caption AS b_caption, b.candidates AS b_candidates"
        )
        differs = "a.status IS DISTINCT FROM b.status OR a.caption IS DISTINCT FROM b.caption"
        changed = _fetch_dicts(
            con.sql(
                f"SELECT {a_columns}, {b_columns} FROM a JOIN b USING (shard, key) WHERE {differs} "
                f"ORDER BY hash(shard, key), shard, key LIMIT {int(max_samples)}"
            )
        )
        n_changed = con.sql(f"SELECT count(*) FROM a JOIN b USING (shard, key) WHERE {differs}").fetchall()[
            0
        ][0]
    finally:
        con.close()
    html_parts = [
        "<h3>status in A → status in B</h3>",
        _table(["A", "B", "samples"], matrix, [False, False, True]),
    ]
    html_parts.append(f"<h3>samples whose status or caption changed ({n_changed:,})</h3>")
    if not changed:
        return "".join(html_parts) + '<p class="empty">none</p>'
    thumbs = load_thumbnails(a, changed, size=thumb_size)
    cards = []
    for row in changed:
        b_row = {
            **row,
            "status": row["b_status"],
            "reason": row["b_reason"],
            "caption": row["b_caption"],
            "candidates": row["b_candidates"],
            "error": None,
        }
        card_a = _card(row, thumbs[(row["shard"], row["key"])])
        b_best = _best_candidate(b_row)
        b_line = _candidate_line(b_best, f"B {row['b_status']}: {(b_best or {}).get('source') or '?'}")
        b_reason = f'<div class="reason">B reason: {_e(row["b_reason"])}</div>' if row.get("b_reason") else ""
        cards.append(card_a.replace("</figcaption>", f"{b_reason}{b_line}</figcaption>", 1))
    html_parts.append(f'<p class="meta">{len(changed):,} shown; card shows run A, last lines run B</p>')
    html_parts.append(f'<div class="grid">{"".join(cards)}</div>')
    return "".join(html_parts)


def render_report(
    out: str | os.PathLike[str] | RunOutput,
    compare: str | os.PathLike[str] | RunOutput | None = None,
    *,
    max_samples: int = 24,
    thumb_size: int = 160,
) -> str:
    """One self-contained HTML page: plots and thumbnails inline, no network, all text escaped."""
    run = open_run(out)
    other = open_run(compare) if compare is not None else None
    stats = compute_stats(run)
    sections = _run_sections(run, stats, max_samples=max_samples, thumb_size=thumb_size)
    body: list[str] = []
    if other is None:
        title = f"curate report: {run.root.name}"
        subtitle = _e(run.root)
        for sid, content in sections.items():
            body.append(f'<section id="{sid}"><h2>{_e(_SECTION_TITLES[sid])}</h2>{content}</section>')
    else:
        other_stats = compute_stats(other)
        other_sections = _run_sections(other, other_stats, max_samples=max_samples, thumb_size=thumb_size)
        title = f"curate report: {run.root.name} vs {other.root.name}"
        subtitle = f"A = {_e(run.root)}<br>B = {_e(other.root)}"
        body.append(f'<section id="compare"><h2>A vs B</h2>{_comparison_table(stats, other_stats)}</section>')
        body.append(
            f'<section id="changed"><h2>Changed outcomes</h2>'
            f"{_changed_outcomes(run, other, max_samples, thumb_size)}</section>"
        )
        for sid, content in sections.items():
            body.append(
                f'<section id="{sid}"><h2>{_e(_SECTION_TITLES[sid])}</h2><div class="cols">'
                f"<div><h3>A: {_e(run.root.name)}</h3>{content}</div>"
                f"<div><h3>B: {_e(other.root.name)}</h3>{other_sections[sid]}</div></div></section>"
            )
    script_hash = base64.b64encode(hashlib.sha256(_CHECK_SCRIPT.encode("utf-8")).digest()).decode("ascii")
    csp = f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{script_hash}'"
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n"
        '<body data-broken-images="pending">'
        f'<header><h1>{_e(title)}</h1><div class="sub">{subtitle}</div></header>\n'
        "<main>\n" + "\n".join(body) + "\n</main>\n"
        f"<script>{_CHECK_SCRIPT}</script></body></html>\n"
    )


def write_report(
    out: str | os.PathLike[str],
    compare: str | os.PathLike[str] | None = None,
    output: str | os.PathLike[str] | None = None,
    *,
    max_samples: int = 24,
) -> Path:
    """Render the report and write it (default ``OUT/report.html``); returns the path."""
    run = open_run(out)
    page = render_report(run, compare, max_samples=max_samples)
    target = Path(output) if output is not None else run.root / "report.html"
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, page.encode("utf-8"))
    return target
