"""The HTML report: one self-contained page (plots and thumbnails inline, no network, every
text escaped, a strict Content-Security-Policy), for one run or two side by side."""

from __future__ import annotations

import base64
import hashlib
import html
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import duckdb

from curate.dedup.phash import hamming
from curate.explore.plots import length_chart, outcome_chart, quality_histogram, score_histogram
from curate.explore.quality import RULE_HEADERS, SCORE_HEADERS, rule_rows, score_rows
from curate.explore.stats import DUPLICATE_HEADERS, SHARD_HEADERS, compute_stats, duplicate_rows, shard_rows
from curate.explore.tables import fmt_num, fmt_pct
from curate.explore.thumbnails import Thumbnail, load_thumbnails
from curate.explore.views import (
    SCORE_COLUMNS,
    SCORE_THRESHOLDS,
    RunOutput,
    connect,
    fetch_dicts,
    open_run,
    samples_view_sql,
    sql_string,
)
from curate.io.files import write_atomic
from curate.schema import SOURCE_ALT, STATUS_DROPPED, STATUS_ERROR, STATUS_KEPT, STATUSES, candidate_score

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
.pairs{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:10px}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:8px}
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
            f'<td class="{"n" if n else ""}">{_e(fmt_num(v) if n else v)}</td>' for v, n in zip(row, numeric)
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
    """The candidate that became the caption; for a sample without one, the top-scored text."""
    cands = row.get("candidates") or []
    caption = row.get("caption")
    best = next((c for c in cands if c.get("kept") and c.get("text") == caption), None)
    if best is None and cands:
        scored = [c for c in cands if candidate_score(c) is not None]
        best = max(scored, key=candidate_score) if scored else cands[0]
    return best


_ALT_LINE = '<div class="cap"><span class="src src-alt">alt</span>{}</div>'


def _thumb_html(row: dict[str, Any], thumb: Thumbnail) -> tuple[str, str]:
    """A sample's thumbnail (or why there is none) and its " · W×H" note, for the grids' cards."""
    if thumb.data_uri:
        size = f'width="{thumb.width}" height="{thumb.height}"'
        image = f'<img src="{thumb.data_uri}" {size} alt="{_e(row["key"])}">'
    else:
        image = f'<div class="noimg">{_e(thumb.problem)}</div>'
    size = f" · {row['width']}×{row['height']}" if row.get("width") and row.get("height") else ""
    return image, size


def _card(row: dict[str, Any], thumb: Thumbnail) -> str:
    image, size = _thumb_html(row, thumb)
    status = row.get("status") or "?"
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
    rows = fetch_dicts(
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
    rows += [(s, f"{counts[s]:,} ({fmt_pct(counts[s], total)})") for s in STATUSES]
    tp = stats.get("throughput") or {}
    if tp:
        rows.append(
            (
                "throughput",
                f"{fmt_num(tp.get('samples_per_s'))} samples/s, {fmt_num(tp.get('wall_s'))} s wall",
            )
        )
        rows.append(("started / finished", f"{tp.get('started_at') or '?'} / {tp.get('finished_at') or '?'}"))
    for k, v in (stats.get("policy") or {}).items():
        rows.append((f"policy.{k}", fmt_num(v)))
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
        for score in SCORE_COLUMNS:
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


_PAIR_COLUMNS = "shard, key, status, reason, source_url, image_ext, image_sha256, image_phash, width, height"


def _pair_side(row: dict[str, Any], thumb: Thumbnail, role: str) -> str:
    image, size = _thumb_html(row, thumb)
    status = row.get("status") or "?"
    return (
        f'<div><div class="thumb">{image}</div><div class="meta">{_e(role)}: '
        f'<span class="badge st-{_e(status)}">{_e(status)}</span> {_e(row["shard"])}/{_e(row["key"])}'
        f"{_e(size)}</div></div>"
    )


def _duplicates(
    run: RunOutput, con: duckdb.DuckDBPyConnection, stats: dict[str, Any], limit: int, thumb_size: int
) -> str:
    """Counts per method, then a stable pseudo-random pick of duplicates beside their representative."""
    dups = stats.get("duplicates") or {}
    if not dups.get("methods"):
        return (
            '<p class="empty">no dedup results: run '
            "<code>curate dedup OUT --method exact|phash|semantic</code></p>"
        )
    parts = [
        _table(DUPLICATE_HEADERS, duplicate_rows(stats), [False] + [True] * 7),
        f'<p class="meta">any method: {dups["flagged"]:,} duplicates, {dups["flagged_kept"]:,} of them kept; '
        f"export --no-duplicates keeps {dups['kept_unique']:,} of {stats['counts'][STATUS_KEPT]:,} kept "
        "samples</p>",
    ]
    dup_columns = ", ".join(f"s.{c.strip()} AS {c.strip()}" for c in _PAIR_COLUMNS.split(","))
    rep_columns = ", ".join(f"r.{c.strip()} AS rep_{c.strip()}" for c in _PAIR_COLUMNS.split(","))
    for method in dups["methods"]:
        rows = fetch_dicts(
            con.sql(
                f"SELECT d.group_size, {dup_columns}, {rep_columns} FROM duplicates AS d "
                "JOIN samples AS s ON s.shard = d.shard AND s.key = d.key "
                "JOIN samples AS r ON r.shard || '/' || r.key = d.duplicate_of "
                f"WHERE d.method = {sql_string(method)} "
                f"ORDER BY hash(d.shard, d.key), d.shard, d.key LIMIT {int(limit)}"
            )
        )
        parts.append(f"<h3>{_e(method)}</h3>")
        if not rows:
            parts.append('<p class="empty">no duplicates</p>')
            continue
        reps = [{c.strip(): row[f"rep_{c.strip()}"] for c in _PAIR_COLUMNS.split(",")} for row in rows]
        thumbs = load_thumbnails(run, [*rows, *reps], size=thumb_size)
        cards = []
        for row, rep in zip(rows, reps):
            distance = ""
            if method == "phash" and row.get("image_phash") and rep.get("image_phash"):
                distance = f" · {hamming(row['image_phash'], rep['image_phash'])} bits apart"
            cards.append(
                '<figure class="card"><div class="pair">'
                + _pair_side(row, thumbs[(row["shard"], row["key"])], "duplicate")
                + _pair_side(rep, thumbs[(rep["shard"], rep["key"])], "representative")
                + f'</div><figcaption class="meta">group of {row["group_size"]}{_e(distance)}</figcaption>'
                + "</figure>"
            )
        shown = stats["duplicates"]["methods"][method]["duplicates"]
        parts.append(f'<p class="meta">{len(rows):,} of {shown:,} shown (a stable pseudo-random pick)</p>')
        parts.append(f'<div class="pairs">{"".join(cards)}</div>')
    return "".join(parts)


def _quality(con: duckdb.DuckDBPyConnection, quality: dict[str, Any]) -> str:
    """What each rule and filter dropped or flagged, and each score's histogram."""
    rows = rule_rows(quality)
    if not rows and not quality["scores"]:
        return '<p class="empty">no rules or model filters in this run</p>'
    body = _table(RULE_HEADERS, rows, [False, False, True, True]) if rows else ""
    if quality["scores"]:
        body += _table(SCORE_HEADERS, score_rows(quality), [False, False] + [True] * 7)
        for column, info in quality["scores"].items():
            body += f"<h3>{_e(column)}</h3>" + _img(
                quality_histogram(con, column, info), f"{column} histogram"
            )
    if quality["languages"]:
        body += "<h3>alt-text languages</h3>" + _table(
            ["language", "alt-texts"], quality["languages"].items(), [False, True]
        )
    return body


def _run_sections(
    run: RunOutput, stats: dict[str, Any], *, max_samples: int, thumb_size: int
) -> dict[str, str]:
    """Section id -> HTML for one run, so two runs can be laid side by side."""
    con = connect(run)
    try:
        sections: dict[str, str] = {"summary": _summary(stats, run), "outcomes": ""}
        plots = []
        for score in SCORE_COLUMNS:
            threshold = run.policy.get(SCORE_THRESHOLDS[score])
            uri = score_histogram(con, score, threshold if isinstance(threshold, (int, float)) else None)
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
        outcome = _img(outcome_chart(stats), "outcomes chart") + _table(
            ["outcome", "samples"], reasons_rows, [False, True]
        )
        if stats["errors"]:
            outcome += "<h3>errors</h3>" + _table(
                ["first line of the error", "samples"], stats["errors"].items(), [False, True]
            )
        sections["outcomes"] = outcome
        sections["quality"] = _quality(con, stats["quality"])
        sections["lengths"] = _img(length_chart(con), "caption length histogram")
        for grid_id, _title, where in GRIDS:
            sections[grid_id] = _grid(run, con, where, max_samples, thumb_size)
        sections["duplicates"] = _duplicates(run, con, stats, max_samples, thumb_size)
        sections["shards"] = _table(
            SHARD_HEADERS, shard_rows(stats, 200), [False, True, True, True, True, False, False]
        )
    finally:
        con.close()
    return sections


_SECTION_TITLES = {
    "summary": "Run",
    "outcomes": "Keep / drop reasons",
    "scores": "Scores per source (dashed line: policy threshold)",
    "quality": "Rules and filters: drops and score histograms (dashed line: threshold)",
    "lengths": "Caption length",
    **{grid_id: title for grid_id, title, _ in GRIDS},
    "duplicates": "Duplicate groups (curate dedup): each duplicate beside its group's representative",
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
            for score in SCORE_COLUMNS:
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
        changed = fetch_dicts(
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
