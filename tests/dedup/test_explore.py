"""A deduplicated run seen through curate query, stats and report, and docs/queries.md's
duplicates SQL run in plain duckdb against it."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import duckdb
import pyarrow.parquet as pq

from curate import explore
from curate.explore.views import duplicates_view_sql
from curate.schema import SAMPLES_SCHEMA
from tests.dedup.conftest import copy_run

DOCS = Path(__file__).resolve().parents[2] / "docs" / "queries.md"


def _duplicate_blocks() -> list[str]:
    return [b for b in re.findall(r"```sql\n(.*?)```", DOCS.read_text(), flags=re.S) if "duplicate" in b]


def test_the_samples_view_gains_two_columns(dedup_run):
    cols = [r[0] for r in duckdb_describe(dedup_run.out)]
    assert cols == [*SAMPLES_SCHEMA.names, "duplicate_of", "duplicate_method"]
    rows = explore.run_query(dedup_run.out, "SELECT count(*) AS n FROM samples").to_pylist()
    assert rows == [{"n": len(dedup_run.truth)}]  # the join adds no rows


def duckdb_describe(out: Path) -> list[tuple]:
    return [tuple(r.values()) for r in explore.run_query(out, "DESCRIBE samples").to_pylist()]


def test_docs_duplicate_queries_run_in_plain_duckdb_and_agree(dedup_run):
    blocks = _duplicate_blocks()
    assert len(blocks) >= 4
    setup = next(b for b in blocks if "CREATE VIEW samples" in b)
    normalize = lambda s: " ".join(s.split())  # noqa: E731
    assert normalize(explore.samples_view_sql("out/samples/*.parquet", dedup=True)) in normalize(setup)
    assert normalize(duplicates_view_sql("out/dedup/*/*.parquet")) in normalize(setup)
    plain = duckdb.connect()
    for statement in plain.extract_statements(setup.replace("'out/", f"'{dedup_run.out}/")):
        plain.execute(statement.query)
    for block in blocks:
        if block is setup:
            continue
        expected = plain.sql(block).fetchall()
        assert expected, block
        got = explore.run_query(dedup_run.out, block).to_pylist()
        assert got == [dict(zip(plain.sql(block).columns, row)) for row in expected], block
    per_method = dict(
        (r[0], r[3]) for r in plain.sql(next(b for b in blocks if "per method" in b)).fetchall()
    )
    assert per_method == {"exact": dedup_run.exact.duplicates, "phash": dedup_run.phash.duplicates}
    bits = plain.sql(next(b for b in blocks if "pHash distance" in b)).fetchall()
    size = dict(
        ((r[0], r[1]), r[2])
        for r in plain.sql("SELECT shard, key, group_size FROM duplicates WHERE method = 'phash'").fetchall()
    )
    # a group is a connected component: each member is within 4 bits of another member, so at
    # most 4 bits per step from the representative
    phash_rows = [r for r in bits if r[3] == "phash"]
    assert phash_rows and all(r[-1] <= 4 * (size[(r[0], r[1])] - 1) for r in phash_rows)
    assert all(r[-1] == 0 for r in bits if r[3] == "exact")
    kept, unique = plain.sql(next(b for b in blocks if "--no-duplicates" in b)).fetchall()[0]
    assert kept == len(dedup_run.truth) and unique == kept - dedup_run.phash.duplicates


def test_stats_count_the_groups(dedup_run):
    stats = explore.compute_stats(dedup_run.out)
    dups = stats["duplicates"]
    assert set(dups["methods"]) == {"exact", "phash"}
    exact = dups["methods"]["exact"]
    assert exact["groups"] == dedup_run.exact.groups and exact["duplicates"] == dedup_run.exact.duplicates
    assert exact["compared"] == len(dedup_run.truth) and exact["threshold"] is None and not exact["stale"]
    phash = dups["methods"]["phash"]
    assert (phash["groups"], phash["in_groups"]) == (dedup_run.phash.groups, dedup_run.phash.in_groups)
    assert phash["kept_duplicates"] == phash["duplicates"]  # a convert run keeps every sample
    # exact's groups lie inside phash's (equal bytes, equal hashes): phash names every duplicate
    assert dups["flagged"] == phash["duplicates"]
    assert dups["kept_unique"] == len(dedup_run.truth) - phash["duplicates"]
    text = explore.format_stats(stats)
    assert "duplicate groups (curate dedup" in text
    assert re.search(rf"phash\s+\|\s+4\s+\|\s+150\s+\|\s+{phash['groups']}\s+\|", text), text
    assert f"export --no-duplicates keeps {dups['kept_unique']:,} of 150 kept samples" in text


def test_stats_warn_when_the_run_changed_after_the_dedup(dedup_run, tmp_path):
    out = copy_run(dedup_run.out, tmp_path / "run")
    shutil.copytree(dedup_run.out / "dedup", out / "dedup")
    path = out / "samples" / "00002.parquet"
    pq.write_table(pq.read_table(path), path, compression="gzip")  # same rows, other file
    stats = explore.compute_stats(out)
    assert stats["duplicates"]["methods"]["phash"]["stale"]
    assert any("before the run's samples changed" in w for w in stats["warnings"])


def test_the_report_shows_each_duplicate_beside_its_representative(dedup_run, tmp_path):
    page = explore.render_report(dedup_run.out, max_samples=6)
    section = page.split('<section id="duplicates">')[1].split("</section>")[0]
    assert "<h3>exact</h3>" in section and "<h3>phash</h3>" in section
    pairs = section.split('<div class="pair">')[1:]
    assert len(pairs) == 12  # 6 per method
    for pair in pairs:
        assert pair.count("<img ") == 2, pair[:300]
        assert "duplicate:" in pair and "representative:" in pair
    assert re.search(r"group of \d+ · \d bits apart", section)
    assert "6 of " in section
