"""What the rules and the model filters did in a run: each one's drops (and, for an alt-text rule,
the alt-texts it flagged, which cost the sample only that candidate), and the distribution and
histogram of every score column they wrote. Runs written before a column existed simply lack it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import duckdb

from curate.explore.tables import fmt_num, text_table
from curate.explore.views import RunOutput
from curate.models import AESTHETIC_BELOW_THRESHOLD, NSFW_ABOVE_THRESHOLD, WATERMARK_ABOVE_THRESHOLD
from curate.rules import ALT_TEXT_REASONS, IMAGE_REASONS
from curate.schema import STATUS_DROPPED

HISTOGRAM_BINS = 10


@dataclass(frozen=True)
class ScoreColumn:
    """A samples column a rule or filter writes, and where its threshold lives in the pipeline."""

    column: str
    section: str  # the pipeline section that writes it
    threshold: tuple[str, ...]  # the path of its threshold under the pipeline
    bound: str  # "max": drops above the threshold, "min": below
    reason: str | None  # the drop reason, when the filter drops by itself
    unit_range: bool  # a probability: histogram over [0, 1]


SCORES = (
    ScoreColumn("nsfw_score", "nsfw", ("nsfw", "max_score"), "max", NSFW_ABOVE_THRESHOLD, True),
    ScoreColumn(
        "watermark_score", "watermark", ("watermark", "max_score"), "max", WATERMARK_ABOVE_THRESHOLD, True
    ),
    ScoreColumn(
        "aesthetic_score", "aesthetic", ("aesthetic", "min_score"), "min", AESTHETIC_BELOW_THRESHOLD, False
    ),
    ScoreColumn(
        "alt_text_language_score",
        "rules.alt_text",
        ("rules", "alt_text", "min_language_score"),
        "min",
        None,  # with the language itself, one rule: counted under alt_text_language
        True,
    ),
)


def _columns(con: duckdb.DuckDBPyConnection) -> dict[str, str]:
    return {name: str(kind) for name, kind, *_ in con.sql("DESCRIBE samples").fetchall()}


def _threshold(pipeline: dict[str, Any], path: tuple[str, ...]) -> float | None:
    value: Any = pipeline
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def histogram(
    con: duckdb.DuckDBPyConnection, column: str, lo: float, hi: float, bins: int = HISTOGRAM_BINS
) -> dict[str, list]:
    """Counts of ``column`` in ``bins`` equal bins over [lo, hi] (the last bin closed)."""
    width = (hi - lo) / bins if hi > lo else 1.0
    rows = dict(
        con.sql(
            f"SELECT least(greatest(floor(({column}::DOUBLE - {lo!r}) / {width!r}), 0), {bins - 1})::INT, "
            f"count(*) FROM samples WHERE {column} IS NOT NULL AND isfinite({column}) GROUP BY 1"
        ).fetchall()
    )
    return {
        "edges": [round(lo + width * i, 6) for i in range(bins + 1)],
        "counts": [int(rows.get(i, 0)) for i in range(bins)],
    }


def _score_stats(con: duckdb.DuckDBPyConnection, score: ScoreColumn, pipeline: dict) -> dict[str, Any] | None:
    n, lo, hi, mean, p10, p50, p90 = con.sql(
        f"SELECT count(v), min(v), max(v), avg(v), quantile_cont(v, 0.1), quantile_cont(v, 0.5), "
        f"quantile_cont(v, 0.9) FROM (SELECT {score.column}::DOUBLE AS v FROM samples) "
        "WHERE v IS NOT NULL AND isfinite(v)"
    ).fetchall()[0]
    if not n:
        return None
    span = (0.0, 1.0) if score.unit_range else (float(lo), float(hi))
    dropped = None
    if score.reason is not None:
        dropped = int(
            con.sql(
                f"SELECT count(*) FROM samples WHERE status = '{STATUS_DROPPED}' "
                f"AND reason = '{score.reason}'"
            ).fetchall()[0][0]
        )
    return {
        "section": score.section,
        "threshold": _threshold(pipeline, score.threshold),
        "bound": score.bound,
        "reason": score.reason,
        "dropped": dropped,
        "count": int(n),
        **{
            k: round(float(v), 6)
            for k, v in (("min", lo), ("p10", p10), ("p50", p50), ("p90", p90), ("max", hi))
        },
        "mean": round(float(mean), 6),
        "histogram": histogram(con, score.column, *span),
    }


def quality_stats(con: duckdb.DuckDBPyConnection, run: RunOutput) -> dict[str, Any]:
    """``rules``: per rule, the samples it dropped and (alt-text rules) the alt-texts it flagged;
    ``scores``: per score column, its filter's threshold and drops, quantiles and histogram;
    ``languages``: the alt-texts' detected languages, most frequent first (at most 12)."""
    columns = _columns(con)
    pipeline = (run.manifest or {}).get("pipeline") or {}
    reasons = dict(
        con.sql(
            f"SELECT reason, count(*) FROM samples WHERE status = '{STATUS_DROPPED}' "
            "AND reason IS NOT NULL GROUP BY 1"
        ).fetchall()
    )
    flagged: dict[str, int] = {}
    if "rule" in columns.get("candidates", ""):  # runs before the rules have no such field
        flagged = dict(
            con.sql(
                "SELECT c.rule, count(*) FROM (SELECT unnest(candidates) AS c FROM samples) "
                "WHERE c.rule IS NOT NULL GROUP BY 1"
            ).fetchall()
        )
    rules = {}
    for rule in (*IMAGE_REASONS, *ALT_TEXT_REASONS):
        dropped, n_flagged = int(reasons.get(rule, 0)), int(flagged.get(rule, 0))
        if dropped or n_flagged:
            kind = "image" if rule in IMAGE_REASONS else "alt_text"
            rules[rule] = {
                "kind": kind,
                "dropped": dropped,
                "flagged": n_flagged if kind == "alt_text" else None,
            }
    scores = {}
    for score in SCORES:
        if score.column in columns:
            info = _score_stats(con, score, pipeline)
            if info is not None:
                scores[score.column] = info
    languages: dict[str, int] = {}
    if "alt_text_language" in columns:
        languages = {
            str(lang): int(n)
            for lang, n in con.sql(
                "SELECT alt_text_language, count(*) AS n FROM samples WHERE alt_text_language IS NOT NULL "
                "GROUP BY 1 ORDER BY n DESC, 1 LIMIT 12"
            ).fetchall()
        }
    return {"rules": rules, "scores": scores, "languages": languages}


def rule_rows(quality: dict[str, Any]) -> list[tuple[Any, ...]]:
    """One row per rule and per filter that dropped or flagged anything: (name, kind, samples
    dropped, alt-texts flagged)."""
    rows = [
        (rule, info["kind"], info["dropped"], "-" if info["flagged"] is None else info["flagged"])
        for rule, info in quality["rules"].items()
    ]
    for info in quality["scores"].values():
        if info["reason"] is not None:
            rows.append((info["reason"], info["section"], info["dropped"], "-"))
    return rows


RULE_HEADERS = ("rule or filter", "kind", "samples dropped", "alt-texts flagged")
SCORE_HEADERS = ("score", "threshold", "n", "min", "p10", "p50", "p90", "max", "mean")


def score_rows(quality: dict[str, Any]) -> list[tuple[Any, ...]]:
    rows = []
    for column, info in quality["scores"].items():
        threshold = "-" if info["threshold"] is None else f"{info['bound']} {fmt_num(info['threshold'])}"
        rows.append(
            (
                column,
                threshold,
                info["count"],
                *(fmt_num(info[k]) for k in ("min", "p10", "p50", "p90", "max", "mean")),
            )
        )
    return rows


def format_quality(quality: dict[str, Any]) -> list[str]:
    """The terminal lines of :func:`quality_stats` (none when no rule or filter left a trace)."""
    lines: list[str] = []
    if quality["rules"] or any(i["reason"] for i in quality["scores"].values()):
        lines += ["", "rules and filters (an alt-text flagged by a rule is scored but never kept)"]
        lines.append(text_table(RULE_HEADERS, rule_rows(quality), right=[False, False, True, True]))
    if quality["scores"]:
        lines += ["", "rule and filter scores"]
        lines.append(text_table(SCORE_HEADERS, score_rows(quality), right=[False, False] + [True] * 7))
        lines += ["", f"score histograms ({HISTOGRAM_BINS} equal bins from the first edge to the last)"]
        rows = []
        for column, info in quality["scores"].items():
            hist = info["histogram"]
            edges = f"{fmt_num(hist['edges'][0])}..{fmt_num(hist['edges'][-1])}"
            rows.append((column, edges, " ".join(str(c) for c in hist["counts"])))
        lines.append(text_table(("score", "range", "counts per bin"), rows, right=[False, False, False]))
    if quality["languages"]:
        shown = ", ".join(f"{lang} {n:,}" for lang, n in quality["languages"].items())
        lines += ["", f"alt-text languages: {shown}"]
    return lines
