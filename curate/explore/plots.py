"""The report's plots as inline PNG data URIs (matplotlib's Agg canvas, no display needed)."""

from __future__ import annotations

import base64
import io
import math
from typing import Any

import duckdb

from curate.explore.stats import word_count_sql
from curate.explore.views import SCORE_THRESHOLDS
from curate.schema import STATUS_DROPPED, STATUS_ERROR, STATUS_KEPT

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


def score_histogram(con: duckdb.DuckDBPyConnection, score: str, threshold: float | None) -> str | None:
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
                label=f"{SCORE_THRESHOLDS[score]} = {threshold:g}",
            )
        ax.set_title(f"{source} (n={len(kept) + len(rest)})", fontsize=10)
        ax.set_xlabel(score, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_ylabel("candidates", fontsize=9)
    axes[-1].legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return _png_uri(fig)


def outcome_chart(stats: dict[str, Any]) -> str | None:
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


def length_chart(con: duckdb.DuckDBPyConnection) -> str | None:
    series: dict[str, list[int]] = {}
    for name, words in con.sql(
        f"SELECT 'best caption', {word_count_sql('caption')} FROM samples WHERE caption IS NOT NULL "
        f"UNION ALL SELECT coalesce(source, '(none)'), {word_count_sql('text')} FROM candidates "
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


def quality_histogram(con: duckdb.DuckDBPyConnection, column: str, info: dict[str, Any]) -> str | None:
    """One rule's or filter's score (``curate.explore.quality``), kept vs not kept samples stacked
    over the histogram's bins, its threshold drawn."""
    data: tuple[list[float], list[float]] = ([], [])
    for value, kept in con.sql(
        f"SELECT {column}::DOUBLE, status = '{STATUS_KEPT}' FROM samples "
        f"WHERE {column} IS NOT NULL AND isfinite({column})"
    ).fetchall():
        data[0 if kept else 1].append(value)
    if not data[0] and not data[1]:
        return None
    edges = info["histogram"]["edges"]
    fig = _figure(5.0, 2.4)
    ax = fig.subplots()
    ax.hist(
        [data[0], data[1]],
        bins=edges,
        stacked=True,
        histtype="stepfilled",
        color=[_STATUS_COLORS[STATUS_KEPT], "#c8c8c8"],
        label=["kept", "not kept"],
    )
    if info.get("threshold") is not None:
        ax.axvline(
            info["threshold"],
            color="#c23b3b",
            linestyle="--",
            linewidth=1.5,
            label=f"{info['bound']} {info['threshold']:g}",
        )
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel(column, fontsize=9)
    ax.set_ylabel("samples", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return _png_uri(fig)
