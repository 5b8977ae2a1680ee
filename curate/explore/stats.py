"""Summary statistics of a run: counts and drop reasons, score quantiles per source,
caption lengths, what each rule and filter dropped with its score histograms, per-shard
figures and throughput, as a dict and as terminal text."""

from __future__ import annotations

import math
import os
from typing import Any

import duckdb

from curate.dedup.results import files_fingerprint
from curate.explore.quality import format_quality, quality_stats
from curate.explore.tables import fmt_num, fmt_pct, terminal_safe, text_table
from curate.explore.views import (
    SCORE_COLUMNS,
    RunOutput,
    connect,
    fetch_dicts,
    open_run,
    sql_ident,
    sql_string,
)
from curate.schema import STATUS_DROPPED, STATUS_ERROR, STATUS_KEPT, STATUSES

_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
_WORD_BUCKETS = ((0, 0), (1, 4), (5, 9), (10, 19), (20, 49), (50, 99), (100, None))


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


def word_count_sql(column: str) -> str:
    """The number of whitespace-separated words in a text column (the stats and the plot agree)."""
    return f"len(regexp_extract_all({column}, '\\S+'))"


def _length_stats(con: duckdb.DuckDBPyConnection, source_sql: str) -> dict[str, Any] | None:
    """Length of texts in words and characters, with a word-count histogram."""
    words = _distribution(con, word_count_sql("t"), source_sql)
    if words is None:
        return None
    buckets = []
    for lo, hi in _WORD_BUCKETS:
        label = str(lo) if hi == lo else (f"{lo}+" if hi is None else f"{lo}-{hi}")
        cond = f"w >= {lo}" + ("" if hi is None else f" AND w <= {hi}")
        buckets.append(f"count(*) FILTER (WHERE {cond}) AS {sql_ident(label)}")
    hist_row = con.sql(
        f"SELECT {', '.join(buckets)} FROM (SELECT {word_count_sql('t')} AS w FROM ({source_sql}) "
        "WHERE t IS NOT NULL)"
    )
    histogram = dict(zip(hist_row.columns, (int(v) for v in hist_row.fetchall()[0])))
    return {
        "count": words["count"],
        "words": words,
        "chars": _distribution(con, "length(t)", source_sql),
        "histogram_words": histogram,
    }


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
        for row in fetch_dicts(
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
        for row in fetch_dicts(
            con.sql(
                "SELECT coalesce(source, '(none)') AS source, count(*) AS candidates, "
                "count(*) FILTER (WHERE kept) AS kept, count(*) FILTER (WHERE is_best) AS best "
                "FROM candidates GROUP BY ALL ORDER BY source"
            )
        ):
            name = row["source"]
            where = "source IS NULL" if name == "(none)" else f"source = {sql_string(name)}"
            entry = {"candidates": int(row["candidates"]), "kept": int(row["kept"]), "best": int(row["best"])}
            for score in SCORE_COLUMNS:
                entry[score] = _distribution(con, score, f"SELECT {score} FROM candidates WHERE {where}")
            sources[name] = entry

        duplicates = duplicate_stats(con, run)
        quality = quality_stats(con, run)
        lengths: dict[str, Any] = {
            "best": _length_stats(con, "SELECT caption AS t FROM samples WHERE caption IS NOT NULL"),
            "by_source": {
                name: _length_stats(
                    con,
                    "SELECT text AS t FROM candidates WHERE text IS NOT NULL AND "
                    + ("source IS NULL" if name == "(none)" else f"source = {sql_string(name)}"),
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
    stale = [m for m, d in duplicates["methods"].items() if d["stale"]]
    if stale:
        warnings.append(
            f"the dedup ({', '.join(stale)}) was computed before the run's samples changed: "
            f"rerun curate dedup {run.root} --method {stale[0]}"
        )
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
        "duplicates": duplicates,
        "quality": quality,
        "throughput": throughput,
        "policy": run.policy or None,
        "models": manifest.get("models") or {},
        "curate_version": manifest.get("curate_version"),
        "warnings": warnings,
    }


def duplicate_stats(con: duckdb.DuckDBPyConnection, run: RunOutput) -> dict[str, Any]:
    """Per ``curate dedup`` method: its threshold, samples compared, groups, their members,
    duplicates (members that are not the representative), kept duplicates, the largest group,
    and whether the run's samples changed since; overall, the samples any method names a
    duplicate and what ``curate export --no-duplicates`` keeps."""
    methods: dict[str, dict[str, Any]] = {}
    if not run.dedup:
        return {"methods": methods, "flagged": 0, "flagged_kept": 0, "kept_unique": None}
    current = files_fingerprint(str(run.root), list(run.sample_files))
    counted = {
        row["method"]: row
        for row in fetch_dicts(
            con.sql(
                'SELECT d.method, count(DISTINCT d."group") AS groups, count(*) AS in_groups, '
                "count(d.duplicate_of) AS duplicates, "
                f"count(d.duplicate_of) FILTER (WHERE s.status = '{STATUS_KEPT}') AS kept_duplicates, "
                "max(d.group_size) AS largest_group "
                "FROM duplicates AS d LEFT JOIN (SELECT shard, key, status FROM samples) AS s "
                "ON d.shard = s.shard AND d.key = s.key GROUP BY d.method"
            )
        )
    }
    for method, result in run.dedup.items():
        row = counted.get(method, {})
        methods[method] = {
            "threshold": result.meta.get("threshold"),
            "compared": int(result.meta.get("samples") or 0),
            "groups": int(row.get("groups") or 0),
            "in_groups": int(row.get("in_groups") or 0),
            "duplicates": int(row.get("duplicates") or 0),
            "kept_duplicates": int(row.get("kept_duplicates") or 0),
            "largest_group": int(row.get("largest_group") or 0),
            "finished_at": result.meta.get("finished_at"),
            "stale": (result.meta.get("plan") or {}).get("samples") != current,
        }
    flagged, flagged_kept, kept_unique = con.sql(
        "SELECT count(duplicate_of), "
        f"count(duplicate_of) FILTER (WHERE status = '{STATUS_KEPT}'), "
        f"count(*) FILTER (WHERE status = '{STATUS_KEPT}' AND duplicate_of IS NULL) FROM samples"
    ).fetchall()[0]
    return {
        "methods": methods,
        "flagged": int(flagged),
        "flagged_kept": int(flagged_kept),
        "kept_unique": int(kept_unique),
    }


DUPLICATE_HEADERS = (
    "method",
    "threshold",
    "compared",
    "groups",
    "in groups",
    "duplicates",
    "kept dups",
    "largest",
)


def duplicate_rows(stats: dict[str, Any]) -> list[tuple[Any, ...]]:
    """The methods of :func:`duplicate_stats` as rows under :data:`DUPLICATE_HEADERS`."""
    return [
        (
            method + (" (stale)" if d["stale"] else ""),
            "-" if d["threshold"] is None else fmt_num(d["threshold"]),
            d["compared"],
            d["groups"],
            d["in_groups"],
            d["duplicates"],
            d["kept_duplicates"],
            d["largest_group"],
        )
        for method, d in stats["duplicates"]["methods"].items()
    ]


SHARD_HEADERS = ("shard", "samples", "kept", "dropped", "error", "keep", "fault")


def shard_rows(stats: dict[str, Any], limit: int) -> list[tuple[Any, ...]]:
    """The first ``limit`` shards of :func:`compute_stats` as rows under :data:`SHARD_HEADERS`."""
    return [
        (
            name,
            s["samples"],
            s["kept"],
            s["dropped"],
            s["error"],
            fmt_pct(s["kept"], s["samples"]),
            s.get("fault") or "",
        )
        for name, s in list(stats["shards"].items())[:limit]
    ]


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
        lines.append(
            f"{status:<11} {counts[status]:>{len(f'{total:,}')},}  ({fmt_pct(counts[status], total)})"
        )
    lines.append(f"keep rate   {fmt_pct(counts[STATUS_KEPT], total)}")
    tp = stats.get("throughput")
    if tp:
        lines.append(
            f"throughput  {fmt_num(tp.get('samples_per_s'))} samples/s over {fmt_num(tp.get('wall_s'))} s"
            f" ({tp.get('started_at') or '?'} -> {tp.get('finished_at') or '?'})"
        )
    else:
        lines.append("throughput  - (no manifest)")
    policy = stats.get("policy") or {}
    if policy:
        lines.append("policy      " + "  ".join(f"{k}={fmt_num(v)}" for k, v in policy.items()))
    for role, info in (stats.get("models") or {}).items():
        if isinstance(info, dict):
            rev = f"@{info['revision']}" if info.get("revision") else ""
            lines.append(f"model       {role}: {info.get('model', '?')}{rev}")

    if stats["reasons"]:
        lines += ["", "drop reasons"]
        lines.append(
            text_table(
                ["reason", "samples", "share"],
                [(r, n, fmt_pct(n, total)) for r, n in stats["reasons"].items()],
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
            for score in SCORE_COLUMNS:
                d = info.get(score)
                if d:
                    rows.append(
                        [
                            source,
                            score,
                            d["count"],
                            *(
                                fmt_num(d[k])
                                for k in ("min", "p10", "p25", "p50", "p75", "p90", "max", "mean")
                            ),
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

    lines += format_quality(stats["quality"])

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
                *(fmt_num(w[k]) for k in ("min", "p10", "p50", "p90", "max", "mean")),
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

    dups = stats.get("duplicates") or {}
    if dups.get("methods"):
        lines += ["", "duplicate groups (curate dedup; a group's representative is not a duplicate)"]
        lines.append(text_table(DUPLICATE_HEADERS, duplicate_rows(stats), right=[False] + [True] * 7))
        kept = counts[STATUS_KEPT]
        lines.append(
            f"any method: {dups['flagged']:,} duplicates, {dups['flagged_kept']:,} of them kept; "
            f"export --no-duplicates keeps {dups['kept_unique']:,} of {kept:,} kept samples"
        )

    shards = stats["shards"]
    if shards:
        lines += ["", "shards"]
        rows = shard_rows(stats, max_shards)
        lines.append(text_table(SHARD_HEADERS, rows, right=[False, True, True, True, True, True, False]))
        if len(shards) > max_shards:
            lines.append(f"... {len(shards) - max_shards:,} more shard(s); see --json")
    if stats["warnings"]:
        lines += ["", "warnings"]
        lines.extend(f"  - {terminal_safe(w)}" for w in stats["warnings"])
    return "\n".join(lines)
