"""``curate stats`` and the report on what the rules and the model filters did: runs that have
the columns (written here into the hand-made run output) and runs from before they existed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.explore.report import render_report
from curate.explore.stats import compute_stats, format_stats
from curate.schema import SAMPLES_SCHEMA


def _copy(run_out: Path, dest: Path) -> Path:
    shutil.copytree(run_out, dest)
    return dest


def _rewrite(run: Path, edit) -> None:
    for path in sorted((run / "samples").glob("*.parquet")):
        table = pq.read_table(path)
        pq.write_table(edit(table), path)


def test_a_run_from_before_the_rules_has_no_quality_section(run_out, tmp_path):
    old = _copy(run_out, tmp_path / "old")
    new_columns = [
        "alt_text_language",
        "alt_text_language_score",
        "aesthetic_score",
        "nsfw_score",
        "watermark_score",
    ]

    def drop(table: pa.Table) -> pa.Table:  # the samples layout before rules and filters
        table = table.drop_columns(new_columns)
        fields = [f for f in SAMPLES_SCHEMA.field("candidates").type.value_type if f.name != "rule"]
        old_type = pa.list_(pa.struct(fields))
        rows = [
            [{k: v for k, v in c.items() if k != "rule"} for c in cs or []]
            for cs in table["candidates"].to_pylist()
        ]
        index = table.schema.get_field_index("candidates")
        return table.set_column(index, "candidates", pa.array(rows, old_type))

    _rewrite(old, drop)
    stats = compute_stats(old)
    assert stats["quality"] == {"rules": {}, "scores": {}, "languages": {}}
    assert "rules and filters" not in format_stats(stats)
    assert "no rules or model filters in this run" in render_report(old)


def test_rules_and_filters_show_their_drops_and_histograms(run_out, tmp_path):
    run = _copy(run_out, tmp_path / "run")
    n_total = sum(pq.read_metadata(p).num_rows for p in (run / "samples").glob("*.parquet"))

    def fill(table: pa.Table) -> pa.Table:
        n = table.num_rows
        nsfw = [i / max(n - 1, 1) for i in range(n)]  # 0 .. 1, evenly
        table = table.set_column(
            table.schema.get_field_index("nsfw_score"), "nsfw_score", pa.array(nsfw, pa.float32())
        )
        # the first sample dropped by the NSFW filter, the second by an image rule
        status = table["status"].to_pylist()
        reason = table["reason"].to_pylist()
        status[0], reason[0] = "dropped", "nsfw_above_threshold"
        status[1], reason[1] = "dropped", "aspect_ratio"
        table = table.set_column(table.schema.get_field_index("status"), "status", pa.array(status))
        table = table.set_column(table.schema.get_field_index("reason"), "reason", pa.array(reason))
        # every alt-text candidate flagged by the language rule
        rows = [
            [{**c, "rule": "alt_text_language" if c["source"] == "alt" else None} for c in cs or []]
            for cs in table["candidates"].to_pylist()
        ]
        index = table.schema.get_field_index("candidates")
        table = table.set_column(index, "candidates", pa.array(rows, SAMPLES_SCHEMA.field("candidates").type))
        langs = pa.array(["it"] * n)
        return table.set_column(table.schema.get_field_index("alt_text_language"), "alt_text_language", langs)

    _rewrite(run, fill)
    flagged = sum(
        c["source"] == "alt"
        for p in (run / "samples").glob("*.parquet")
        for cs in pq.read_table(p)["candidates"].to_pylist()
        for c in cs or []
    )
    stats = compute_stats(run)
    quality = stats["quality"]
    files = len(list((run / "samples").glob("*.parquet")))
    assert quality["rules"]["aspect_ratio"] == {"kind": "image", "dropped": files, "flagged": None}
    assert quality["rules"]["alt_text_language"] == {"kind": "alt_text", "dropped": 0, "flagged": flagged}
    nsfw = quality["scores"]["nsfw_score"]
    assert nsfw["dropped"] == files and nsfw["reason"] == "nsfw_above_threshold"
    assert nsfw["count"] == n_total and sum(nsfw["histogram"]["counts"]) == n_total
    assert nsfw["histogram"]["edges"][0] == 0 and nsfw["histogram"]["edges"][-1] == 1
    assert nsfw["min"] == 0 and nsfw["max"] == pytest.approx(1)
    assert quality["languages"] == {"it": n_total}
    text = format_stats(stats)
    assert "nsfw_above_threshold" in text and "aspect_ratio" in text and "alt-text languages: it" in text
    page = render_report(run)
    assert "nsfw_score histogram" in page and "alt_text_language" in page
