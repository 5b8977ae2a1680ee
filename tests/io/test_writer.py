from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from curate.io.reader import ShardRef, sanitize_key
from curate.io.writer import (
    PARTS_DIR,
    IncompleteRunError,
    RunWriter,
    ShardStreamWriter,
    ShardTracker,
    clear_leftovers,
    clear_temp_files,
    commit_shard,
    done_shards,
    read_shard_metas,
    write_part,
)
from curate.schema import (
    CANDIDATE_TYPE,
    ROW_SAMPLE,
    ROW_SHARD_END,
    SAMPLES_SCHEMA,
    SOURCE_ALT,
    SOURCE_SYNTHETIC,
    STATUS_DROPPED,
    STATUS_ERROR,
    STATUS_KEPT,
    empty_row,
)
from tests.helpers import image_bytes

PNG = image_bytes(20, 10, "png", seed=1)
JPG = image_bytes(16, 16, "jpg", seed=2)


def ref(tmp_path: Path, name: str = "00000") -> ShardRef:
    return ShardRef(url=str(tmp_path / "in" / f"{name}.tar"), name=name)


def sample(shard: ShardRef, seq: int, key: str, status: str, **fields) -> dict:
    row = empty_row()
    row.update(row_type=ROW_SAMPLE, key=key, shard=shard.name, seq=seq, status=status, source_url=shard.url)
    row.update(fields)
    return row


def kept(shard: ShardRef, seq: int, key: str, image: bytes = PNG, ext: str = "png") -> dict:
    candidates = [
        {"text": "the alt text", "source": SOURCE_ALT, "itm_score": 0.7, "clip_score": 0.21, "kept": True},
        {
            "text": "a synthetic caption",
            "source": SOURCE_SYNTHETIC,
            "itm_score": 0.9,
            "clip_score": 0.33,
            "kept": True,
        },
        {
            "text": "a bad caption",
            "source": SOURCE_SYNTHETIC,
            "itm_score": 0.1,
            "clip_score": 0.05,
            "kept": False,
        },
    ]
    return sample(
        shard,
        seq,
        key,
        STATUS_KEPT,
        alt_text="the alt text",
        width=20,
        height=10,
        caption="a synthetic caption",
        captions=["a synthetic caption", "the alt text"],
        candidates=candidates,
        url=f"http://example.com/{key}.{ext}",
        image_ext=ext,
        image_sha256=hashlib.sha256(image).hexdigest(),
        meta=json.dumps({"url": f"http://example.com/{key}.{ext}"}),
        image=image,
        pixels=b"\x00" * 30,
    )


def dropped(shard: ShardRef, seq: int, key: str) -> dict:
    candidates = [{"text": "junk", "source": SOURCE_ALT, "itm_score": 0.1, "clip_score": None, "kept": False}]
    return sample(
        shard,
        seq,
        key,
        STATUS_DROPPED,
        reason="itm_below_threshold",
        alt_text="junk",
        width=20,
        height=10,
        candidates=candidates,
        image_ext="png",
    )


def errored(shard: ShardRef, seq: int, key: str) -> dict:
    return sample(shard, seq, key, STATUS_ERROR, error="undecodable image: garbage", image_ext="jpg")


def shard_end(shard: ShardRef, total: int, fault: str | None = None) -> dict:
    row = empty_row()
    row.update(row_type=ROW_SHARD_END, shard=shard.name, key="", seq=-1, status=ROW_SHARD_END)
    row.update(source_url=shard.url, shard_total=total, shard_error=fault)
    return row


def shard_rows(shard: ShardRef) -> list[dict]:
    return [
        kept(shard, 0, "000000"),
        dropped(shard, 1, "000001"),
        errored(shard, 2, "000002"),
        kept(shard, 3, "dir.v1/000003", image=JPG, ext="jpg"),
    ]


def all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture
def finished(tmp_path) -> tuple[Path, ShardRef, dict]:
    """A run of one shard, rows arriving out of order, shard_end in the middle."""
    out = tmp_path / "out"
    shard = ref(tmp_path)
    rows = shard_rows(shard)
    writer = RunWriter(str(out), [shard])
    assert writer.add_rows([rows[3], rows[1]]) == []
    assert writer.add_rows([shard_end(shard, 4)]) == []
    (meta,) = writer.add_rows([rows[2], rows[0]])
    writer.close()
    return out, shard, meta


def test_layout_and_meta(finished):
    out, shard, meta = finished
    assert all_files(out) == ["_shards/00000.json", "samples/00000.parquet", "shards/00000.tar"]
    assert meta["shard"] == "00000" and meta["url"] == shard.url
    assert (meta["samples"], meta["kept"], meta["dropped"], meta["error"]) == (4, 2, 1, 1)
    assert meta["reasons"] == {"itm_below_threshold": 1}
    assert meta["fault"] is None
    assert read_shard_metas(str(out)) == {"00000": meta}
    assert done_shards(str(out)) == {"00000"}


def test_parquet_matches_the_samples_schema(finished):
    out, _, _ = finished
    table = pq.read_table(out / "samples" / "00000.parquet")
    assert table.schema.equals(SAMPLES_SCHEMA, check_metadata=False), table.schema
    assert table.schema.field("candidates").type == pa.list_(CANDIDATE_TYPE)
    assert table.num_rows == 4


def test_parquet_rows_sorted_by_seq_with_values(finished):
    out, shard, _ = finished
    rows = pq.read_table(out / "samples" / "00000.parquet").to_pylist()
    assert [r["key"] for r in rows] == ["000000", "000001", "000002", "dir.v1/000003"]
    first, drop, err, last = rows
    assert first["status"] == STATUS_KEPT and first["reason"] is None and first["error"] is None
    assert first["caption"] == "a synthetic caption"
    assert first["captions"] == ["a synthetic caption", "the alt text"]
    assert first["candidates"][1] == {
        "text": "a synthetic caption",
        "source": SOURCE_SYNTHETIC,
        "itm_score": pytest.approx(0.9),
        "clip_score": pytest.approx(0.33),
        "kept": True,
        "rule": None,  # no alt-text rule ran
    }
    assert [c["kept"] for c in first["candidates"]] == [True, True, False]
    assert (first["width"], first["height"]) == (20, 10)
    assert first["image_sha256"] == hashlib.sha256(PNG).hexdigest()
    assert first["shard"] == "00000" and first["source_url"] == shard.url
    assert first["url"] == "http://example.com/000000.png"
    assert drop["status"] == STATUS_DROPPED and drop["reason"] == "itm_below_threshold"
    assert drop["caption"] is None and drop["captions"] == []
    assert drop["candidates"][0]["clip_score"] is None
    assert err["status"] == STATUS_ERROR and err["error"] == "undecodable image: garbage"
    assert err["candidates"] == [] and err["width"] is None
    assert last["image_ext"] == "jpg"


def test_curated_tar_reads_with_webdataset(finished):
    out, _, _ = finished
    dataset = wds.WebDataset(str(out / "shards" / "00000.tar"), shardshuffle=False, empty_check=False)
    # rows arrived 3 before 0; the commit merges the parts in seq order
    samples = list(dataset)
    assert [s["__key__"] for s in samples] == [sanitize_key("000000"), sanitize_key("dir.v1/000003")]
    first, second = samples
    assert {k for k in first if not k.startswith("__")} == {"png", "txt", "json"}
    assert first["png"] == PNG
    assert second["jpg"] == JPG
    for s in samples:
        assert s["txt"].decode() == "a synthetic caption"
        meta = json.loads(s["json"])
        assert meta["caption"] == "a synthetic caption"
        assert [c["text"] for c in meta["captions"]] == ["a synthetic caption", "the alt text"]
        assert meta["captions"][0]["source"] == SOURCE_SYNTHETIC
        assert meta["captions"][0]["clip_score"] == pytest.approx(0.33)
        assert meta["captions"][0]["itm_score"] == pytest.approx(0.9)
        assert meta["captions"][1]["source"] == SOURCE_ALT
        assert meta["alt_text"] == "the alt text"
        assert (meta["width"], meta["height"]) == (20, 10)
    assert json.loads(second["json"])["key"] == "dir.v1/000003"  # the original key is on record


def test_no_temp_files_left(finished):
    out, _, _ = finished
    leftovers = [f for f in all_files(out) if ".tmp" in f or os.path.basename(f).startswith(".")]
    assert leftovers == []


def test_without_tars(tmp_path):
    shard = ref(tmp_path)
    writer = RunWriter(str(tmp_path / "out"), [shard], write_tars=False)
    writer.add_rows([*shard_rows(shard), shard_end(shard, 4)])
    writer.close()
    assert all_files(tmp_path / "out") == ["_shards/00000.json", "samples/00000.parquet"]


def test_shard_fault_and_empty_shard(tmp_path):
    shard = ref(tmp_path)
    writer = RunWriter(str(tmp_path / "out"), [shard])
    (meta,) = writer.add_rows([shard_end(shard, 0, fault="unreadable tar x before any sample: ReadError")])
    writer.close()
    assert meta["samples"] == 0 and meta["fault"].startswith("unreadable tar")
    table = pq.read_table(tmp_path / "out" / "samples" / "00000.parquet")
    assert table.num_rows == 0
    assert table.schema.equals(SAMPLES_SCHEMA, check_metadata=False)


def test_unfinished_status_becomes_an_error_row(tmp_path):
    shard = ref(tmp_path)
    writer = RunWriter(str(tmp_path / "out"), [shard])
    writer.add_rows([sample(shard, 0, "a", "pending"), shard_end(shard, 1)])
    writer.close()
    (row,) = pq.read_table(tmp_path / "out" / "samples" / "00000.parquet").to_pylist()
    assert row["status"] == STATUS_ERROR
    assert "unfinished" in row["error"]


def test_a_block_becomes_a_part_and_a_summary(tmp_path):
    out = tmp_path / "out"
    shard = ref(tmp_path)
    rows = shard_rows(shard)
    (summary,) = write_part([rows[3], rows[1]], str(out))
    assert summary["shard"] == "00000" and summary["rows"] == 2 and summary["total"] is None
    part = Path(summary["part"])
    assert part.parent == out / PARTS_DIR / "00000" and part.name.startswith("000000000001-")
    table = pq.read_table(part)
    assert table.column("seq").to_pylist() == [1, 3]  # sorted within the part
    # only the kept sample's image travels to the commit
    assert [x is not None for x in table.column("image").to_pylist()] == [False, True]
    (end,) = write_part([shard_end(shard, 4, fault="cut")], str(out))
    assert summary["kept"] == 1 and summary["dropped"] == 1 and summary["error"] == 0
    assert end == {
        "shard": "00000",
        "part": None,
        "rows": 0,
        "kept": 0,
        "dropped": 0,
        "error": 0,
        "total": 4,
        "fault": "cut",
        "meta": None,
    }
    assert done_shards(str(out)) == set()  # parts are not a finished shard


def test_a_block_of_two_shards_gives_a_summary_each(tmp_path):
    a, b = ref(tmp_path, "a"), ref(tmp_path, "b")
    summaries = write_part([kept(a, 0, "x"), shard_end(a, 1), kept(b, 5, "y")], str(tmp_path / "out"))
    assert sorted((s["shard"], s["rows"], s["total"]) for s in summaries) == [("a", 1, 1), ("b", 1, None)]


def test_an_incomplete_shard_is_never_committed(tmp_path):
    out = tmp_path / "out"
    shard = ref(tmp_path)
    tracker = ShardTracker(str(out), [shard])
    assert tracker.add(write_part([shard_rows(shard)[0]], str(out))[0]) is None
    assert tracker.add(write_part([shard_end(shard, 2)], str(out))[0]) is None
    with pytest.raises(IncompleteRunError, match=r"'00000': \(1, 2\)"):
        tracker.close()
    assert not (out / "samples" / "00000.parquet").exists()


def test_commit_refuses_parts_that_miss_rows(tmp_path):
    out = tmp_path / "out"
    shard = ref(tmp_path)
    (summary,) = write_part([shard_rows(shard)[0]], str(out))
    with pytest.raises(IncompleteRunError, match="1 rows for 2 samples"):
        commit_shard(str(out), shard, [summary["part"]], total=2)
    assert not (out / "samples" / "00000.parquet").exists()
    assert not [f for f in all_files(out) if f.startswith(("samples", "_shards"))]


def test_commit_merges_only_the_reported_parts(tmp_path):
    """A retried block writes a second part for the same rows; only the reported one counts."""
    out = tmp_path / "out"
    shard = ref(tmp_path)
    rows = shard_rows(shard)
    write_part(rows[:2], str(out))  # the lost attempt's part: on disk, never reported
    (first,) = write_part(rows[:2], str(out))
    (second,) = write_part([*rows[2:], shard_end(shard, 4)], str(out))
    meta = commit_shard(str(out), shard, [second["part"], first["part"]], total=4)
    assert meta["samples"] == 4 and (meta["kept"], meta["dropped"], meta["error"]) == (2, 1, 1)
    keys = pq.read_table(out / "samples" / "00000.parquet").column("key").to_pylist()
    assert keys == ["000000", "000001", "000002", "dir.v1/000003"]
    assert not (out / PARTS_DIR / "00000").exists()  # every part is gone, the lost one too


def test_a_retried_commit_after_success_returns_the_same_meta(tmp_path):
    out = tmp_path / "out"
    shard = ref(tmp_path)
    (summary,) = write_part([*shard_rows(shard), shard_end(shard, 4)], str(out))
    meta = commit_shard(str(out), shard, [summary["part"]], total=4)
    before = (out / "samples" / "00000.parquet").read_bytes()
    assert commit_shard(str(out), shard, [summary["part"]], total=4) == meta
    assert (out / "samples" / "00000.parquet").read_bytes() == before


def test_leftovers_of_a_crashed_run_are_cleared(tmp_path):
    out = tmp_path / "out"
    shard = ref(tmp_path)
    write_part(shard_rows(shard)[:2], str(out))
    (out / "samples").mkdir(parents=True)
    (out / "samples" / ".00000.parquet.tmp-1-abc").write_bytes(b"half")
    clear_leftovers(str(out))
    assert all_files(out) == []
    assert done_shards(str(out)) == set()


def test_temp_files_go_and_committed_files_stay(tmp_path):
    """After every shard is committed, a lost node's half-written files are removed."""
    out = tmp_path / "out"
    shard = ref(tmp_path)
    (summary,) = write_part([*shard_rows(shard), shard_end(shard, 4)], str(out))
    commit_shard(str(out), shard, [summary["part"]], total=4)
    committed = all_files(out)
    (out / "shards" / ".00000.tar.tmp-19688-16c9283b").write_bytes(b"half")
    (out / "samples" / ".00000.parquet.tmp-19688-16c9283c").write_bytes(b"half")
    clear_temp_files(str(out))
    assert all_files(out) == committed
    assert done_shards(str(out)) == {"00000"}


def test_run_writer_close_raises_on_incomplete_shards(tmp_path):
    out = tmp_path / "out"
    a, b, c = ref(tmp_path, "a"), ref(tmp_path, "b"), ref(tmp_path, "c")
    writer = RunWriter(str(out), [a, b, c])
    writer.add_rows([kept(a, 0, "x"), shard_end(a, 1)])  # complete
    writer.add_rows([kept(b, 0, "y"), shard_end(b, 3)])  # 1 of 3 rows
    with pytest.raises(IncompleteRunError) as info:
        writer.close()
    message = str(info.value)
    assert "'b': (1, 3)" in message
    assert "'c'" in message  # never seen
    # the finished shard stays; the incomplete one leaves nothing behind
    assert all_files(out) == ["_shards/a.json", "samples/a.parquet", "shards/a.tar"]


def test_rows_for_an_unknown_shard_are_refused(tmp_path):
    writer = RunWriter(str(tmp_path / "out"), [ref(tmp_path, "a")])
    with pytest.raises(IncompleteRunError, match="unknown shard 'zzz'"):
        writer.add_rows([kept(ref(tmp_path, "zzz"), 0, "x")])


# -- DuckDB, the way users read the output --------------------------------------------------------


@pytest.fixture
def two_shards(tmp_path) -> Path:
    out = tmp_path / "out"
    s0, s1 = ref(tmp_path, "00000"), ref(tmp_path, "00001")
    writer = RunWriter(str(out), [s0, s1])
    writer.add_rows([*shard_rows(s0), shard_end(s0, 4)])
    writer.add_rows([kept(s1, 0, "a"), dropped(s1, 1, "b"), dropped(s1, 2, "c"), shard_end(s1, 3)])
    writer.close()
    return out


def test_duckdb_status_counts(two_shards):
    got = duckdb.sql(
        f"SELECT status, count(*) FROM '{two_shards}/samples/*.parquet' GROUP BY 1 ORDER BY 1"
    ).fetchall()
    assert got == [("dropped", 3), ("error", 1), ("kept", 3)]


def test_duckdb_list_lambda_over_candidates(two_shards):
    got = duckdb.sql(
        f"""
        SELECT key, len(list_filter(candidates, lambda c: c.source = 'alt')) AS n_alt,
               list_transform(list_filter(candidates, lambda c: c.kept), lambda c: c.text) AS kept_texts
        FROM '{two_shards}/samples/00000.parquet'
        ORDER BY key
        """
    ).fetchall()
    assert got == [
        ("000000", 1, ["the alt text", "a synthetic caption"]),
        ("000001", 1, []),
        ("000002", 0, []),
        ("dir.v1/000003", 1, ["the alt text", "a synthetic caption"]),
    ]
    best = duckdb.sql(
        f"""
        SELECT max(c.clip_score) FROM (
            SELECT unnest(candidates) AS c FROM '{two_shards}/samples/*.parquet' WHERE status = 'kept'
        )
        """
    ).fetchall()[0][0]
    assert best == pytest.approx(0.33)


def test_a_task_that_holds_whole_shards_writes_them_without_parts(tmp_path):
    """Read, decode and write in one task (a pipeline without models): no parts, no commit task."""
    out = tmp_path / "out"
    a, b = ref(tmp_path, "a"), ref(tmp_path, "b")
    writer = ShardStreamWriter(str(out))
    (first,) = writer([kept(a, 1, "y"), kept(a, 0, "x")], a.url)
    assert first["meta"] is None and first["rows"] == 2
    assert done_shards(str(out)) == set()  # nothing final before the shard's end
    (last,) = writer([dropped(a, 2, "z"), shard_end(a, 3)], a.url)
    meta = json.loads(last["meta"])
    assert (meta["samples"], meta["kept"], meta["dropped"]) == (3, 2, 1)
    assert pq.read_table(out / "samples" / "a.parquet").column("key").to_pylist() == ["x", "y", "z"]
    assert [s["__key__"] for s in wds.WebDataset(str(out / "shards" / "a.tar"), shardshuffle=False)] == [
        "x",
        "y",
    ]
    tracker = ShardTracker(str(out), [a, b])
    assert tracker.add(first) is None
    assert tracker.add(last).meta == meta  # done: no commit to start
    writer([kept(b, 0, "q")], b.url)
    writer.abort()  # the task failed mid-shard: b leaves nothing behind
    assert all_files(out) == ["_shards/a.json", "samples/a.parquet", "shards/a.tar"]
