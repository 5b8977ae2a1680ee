"""curate dedup on a real run: byte copies, resized and re-encoded copies, real near-duplicates.

The figures the docs quote (docs/dedup.md) come from test_phash_precision_and_recall's output.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from curate.dedup.results import DedupError, read_results
from curate.dedup.run import run_dedup
from curate.explore import run_query
from curate.progress import Progress
from tests.dedup.conftest import copy_run
from tests.dedup.images import equal_bytes, found_pairs, precision_recall, true_pairs


def _groups(out: Path, method: str) -> dict[str, list[str]]:
    rows = run_query(
        out, f"SELECT shard, key, \"group\" FROM duplicates WHERE method = '{method}'"
    ).to_pylist()
    groups: dict[str, list[str]] = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(f"{r['shard']}/{r['key']}")
    return groups


def _group_of(groups: dict[str, list[str]]) -> dict[str, str]:
    return {m: g for g, members in groups.items() for m in members}


def test_exact_pairs_every_byte_copy_with_its_original_and_nothing_else(dedup_run):
    groups = _groups(dedup_run.out, "exact")
    group_of = _group_of(groups)
    by_key = {s.key: s for s in dedup_run.truth if s.kind == "original"}
    copies = [s for s in dedup_run.truth if s.kind == "byte"]
    for copy in copies:
        original = by_key[copy.origin]
        assert group_of.get(copy.id) is not None and group_of[copy.id] == group_of.get(original.id), copy
    # exactly the samples with equal bytes: the copies, and the drawing set's own identical pairs
    assert found_pairs(groups) == equal_bytes(dedup_run.truth)
    assert frozenset(("00000/000000027", "00000/000000046")) in found_pairs(groups)
    assert not any(s.kind == "reencoded" and s.id in group_of for s in dedup_run.truth)
    assert dedup_run.exact.samples == len(dedup_run.truth)


def test_phash_precision_and_recall(dedup_run, capsys):
    groups = _groups(dedup_run.out, "phash")
    group_of = _group_of(groups)
    by_key = {s.key: s for s in dedup_run.truth if s.kind == "original"}
    reencoded = [s for s in dedup_run.truth if s.kind == "reencoded"]
    paired = [
        s for s in reencoded if s.id in group_of and group_of[s.id] == group_of.get(by_key[s.origin].id)
    ]
    copy_recall = len(paired) / len(reencoded)
    byte_paired = all(
        group_of.get(s.id) == group_of.get(by_key[s.origin].id) is not None
        for s in dedup_run.truth
        if s.kind == "byte"
    )
    found = found_pairs(groups)
    precision, recall = precision_recall(found, true_pairs(dedup_run.truth))
    _, copies_recall = precision_recall(found, true_pairs(dedup_run.truth, ("byte", "reencoded")))
    with capsys.disabled():
        print(
            f"\nphash (threshold {dedup_run.phash.threshold}) on {len(dedup_run.truth)} samples: "
            f"re-encoded copies paired {len(paired)}/{len(reencoded)} = {copy_recall:.3f}; "
            f"pair precision {precision:.3f} ({len(found)} pairs found), pair recall {recall:.3f} "
            f"(copies only {copies_recall:.3f})"
        )
    assert byte_paired
    assert copy_recall >= 0.8
    assert precision >= 0.95
    # unrelated originals stay unflagged: every original in a group has a true match in it
    origin_truth = true_pairs(dedup_run.truth)
    for members in groups.values():
        for m in members:
            assert any(frozenset((m, o)) in origin_truth for o in members if o != m), (m, members)


def test_representative_is_the_smallest_kept_and_the_view_names_it(dedup_run):
    rows = run_query(
        dedup_run.out,
        "SELECT shard, key, status, duplicate_of, duplicate_method FROM samples ORDER BY shard, key",
    ).to_pylist()
    groups = _groups(dedup_run.out, "phash")
    for members in groups.values():
        rep = min(members)  # every sample is kept and unscored in a convert run: smallest shard/key
        for row in rows:
            sid = f"{row['shard']}/{row['key']}"
            if sid in members:
                assert row["duplicate_method"] in ("exact", "phash")
                assert row["duplicate_of"] == (None if sid == rep else row["duplicate_of"])
    by_id = {f"{r['shard']}/{r['key']}": r for r in rows}
    assert by_id["00001/b-00"]["duplicate_of"] == "00000/000000000"
    assert by_id["00001/b-00"]["duplicate_method"] == "exact"  # exact comes first when both grouped it
    unique = [r for r in rows if r["duplicate_method"] is None]
    assert unique and all(r["duplicate_of"] is None for r in unique)


def test_a_rerun_has_nothing_to_do(dedup_run):
    again = run_dedup(str(dedup_run.out), "phash")
    assert again.up_to_date and again.groups == dedup_run.phash.groups
    other = read_results(str(dedup_run.out))["phash"].meta
    assert other["threshold"] == 4 and other["samples"] == len(dedup_run.truth)


class Interrupted(RuntimeError):
    pass


def test_an_interrupted_dedup_resumes_and_partitions_change_nothing(dedup_run, tmp_path, monkeypatch):
    """Stopped before its result was written, a dedup reuses its finished steps; with many small
    partitions (every shuffle split 10+ ways) it finds exactly the same groups."""
    import curate.dedup.run as run_module

    out = copy_run(dedup_run.out, tmp_path / "copy")

    def stop(*args, **kwargs):
        raise Interrupted("stopped before the result")

    monkeypatch.setattr(run_module, "_finish", stop)
    with pytest.raises(Interrupted):
        run_dedup(str(out), "phash", rows_per_partition=60)
    assert (out / "_dedup" / "phash" / "pairs" / "_done.json").exists()
    assert not (out / "dedup" / "phash").exists()
    monkeypatch.undo()
    log = io.StringIO()
    resumed = run_dedup(
        str(out), "phash", rows_per_partition=60, progress=Progress("t", stream=log, live=False)
    )
    assert "finished before; reused" in log.getvalue()
    assert not (out / "_dedup").exists()
    a = pq.read_table(dedup_run.out / "dedup" / "phash" / "00001.parquet").to_pylist()
    b = pq.read_table(out / "dedup" / "phash" / "00001.parquet").to_pylist()
    assert a == b
    assert _groups(out, "phash") == _groups(dedup_run.out, "phash")
    assert resumed.groups == dedup_run.phash.groups


def test_clear_errors_before_any_work(dedup_run, tmp_path):
    with pytest.raises(DedupError, match="does not apply to --method exact"):
        run_dedup(str(dedup_run.out), "exact", 3)
    with pytest.raises(DedupError, match="0 to 16"):
        run_dedup(str(dedup_run.out), "phash", 2.5)
    with pytest.raises(DedupError, match=r"cosine similarity in \(0, 1\]"):
        run_dedup(str(dedup_run.out), "semantic", 1.5)
    with pytest.raises(DedupError, match=r"run with --set output\.write_embeddings=true"):
        run_dedup(str(dedup_run.out), "semantic")
    unfinished = copy_run(dedup_run.out, tmp_path / "unfinished")
    (unfinished / "samples" / "00002.parquet").unlink()
    with pytest.raises(DedupError, match="unfinished: 1 input shard"):
        run_dedup(str(unfinished), "exact")
    (unfinished / "manifest.json").unlink()
    with pytest.raises(DedupError, match=r"has no manifest\.json"):
        run_dedup(str(unfinished), "exact")


def test_a_run_from_before_image_phash_is_told_what_to_do(dedup_run, tmp_path):
    old = copy_run(dedup_run.out, tmp_path / "old")
    for path in (old / "samples").glob("*.parquet"):
        table = pq.read_table(path)
        pq.write_table(table.drop_columns(["image_phash"]), path)
    with pytest.raises(DedupError, match=r"no image_phash .* curate run --overwrite"):
        run_dedup(str(old), "phash")


def test_the_command_line(dedup_run, tmp_path, capsys):
    from curate.cli import main

    assert main(["dedup", str(dedup_run.out), "--method", "exact", "--threshold", "2"]) == 2
    assert "does not apply" in capsys.readouterr().err
    assert main(["dedup", str(tmp_path), "--method", "exact"]) == 2
    assert "no samples Parquet" in capsys.readouterr().err
    assert main(["dedup", str(dedup_run.out), "--method", "phash"]) == 0  # done already: no Ray
    said = capsys.readouterr().out
    assert "nothing to do" in said and f"{dedup_run.phash.groups} groups" in said
    meta = json.loads((dedup_run.out / "dedup" / "phash" / "_dedup.json").read_text())
    assert meta["groups"] == dedup_run.phash.groups and meta["duplicates"] == dedup_run.phash.duplicates
    shutil.rmtree(tmp_path, ignore_errors=True)
