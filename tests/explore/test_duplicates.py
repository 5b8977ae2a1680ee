"""A run without dedup results: the views, stats and report are as before, plus an empty
duplicates view and a report section that says how to get one."""

from __future__ import annotations

from curate import explore
from curate.schema import SAMPLES_SCHEMA


def test_without_dedup_the_samples_view_is_the_parquet_columns(run_out):
    cols = [r["column_name"] for r in explore.run_query(run_out, "DESCRIBE samples").to_pylist()]
    assert cols == SAMPLES_SCHEMA.names
    described = explore.run_query(run_out, "DESCRIBE duplicates").to_pylist()
    assert [r["column_name"] for r in described] == [
        "shard",
        "key",
        "method",
        "group",
        "duplicate_of",
        "group_size",
    ]
    assert explore.run_query(run_out, "SELECT count(*) AS n FROM duplicates").to_pylist() == [{"n": 0}]


def test_without_dedup_stats_and_report_say_so(run_out):
    stats = explore.compute_stats(run_out)
    assert stats["duplicates"] == {"methods": {}, "flagged": 0, "flagged_kept": 0, "kept_unique": None}
    assert "duplicate groups" not in explore.format_stats(stats)
    page = explore.render_report(run_out)
    section = page.split('<section id="duplicates">')[1].split("</section>")[0]
    assert "no dedup results: run <code>curate dedup OUT" in section
