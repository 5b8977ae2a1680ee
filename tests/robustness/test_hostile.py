"""Hostile input end to end on a real local Ray: every sample is a row with a specific
status and reason, the run exits cleanly, nothing is written outside the output."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import webdataset as wds

from curate.config import pipeline_from_dict
from curate.io.reader import expand_inputs, shard_refs
from curate.pipeline import run_pipeline
from tests.robustness.hostile import dump, expected_faults, write_hostile_shards


def test_every_hostile_case_is_a_row(ray_local, tiny_models, tmp_path: Path):
    inputs = tmp_path / "in"
    expected = write_hostile_shards(inputs)
    cfg = pipeline_from_dict(
        {
            "name": "hostile",
            "ranker": {"model": str(tiny_models["clip"]), "resources": {"device": "cpu", "batch_size": 4}},
            "policy": {"top_k": 1},
            "decode": {"min_side": 8},
            "read": {"resources": {"batch_size": 5}},
        }
    )
    out = tmp_path / "out"
    before = {p for p in tmp_path.rglob("*")}
    result = run_pipeline(cfg, shard_refs(expand_inputs(str(inputs / "*.tar"))), str(out))

    rows = pq.read_table(out / "samples").to_pylist()
    got = {(r["shard"], r["key"]): r for r in rows}
    assert len(got) == len(rows), "duplicate rows"
    want = {(s, k): v for s, d in expected.items() for k, v in d.items()}
    assert set(got) == set(want), dump(sorted(set(got) ^ set(want)))
    for key, (status, detail) in want.items():
        row = got[key]
        assert row["status"] == status, dump(row)
        if status == "dropped":
            assert row["reason"] == detail, dump(row)
        elif status == "error":
            assert detail in row["error"], dump(row)
        else:
            assert row["caption"] and row["width"] >= 8
    assert result.counts["total"] == len(want)

    manifest = json.loads((out / "manifest.json").read_text())
    for shard, fault in expected_faults().items():
        got_fault = manifest["shards"][shard]["fault"]
        assert (got_fault is None) if fault is None else (fault in got_fault), (shard, got_fault)

    # curated tars: odd keys are sanitised into safe member names, nothing escapes OUT
    names = []
    for path in sorted((out / "shards").glob("*.tar")):
        import tarfile

        with tarfile.open(path) as tar:
            names += tar.getnames()
    assert names and all("/" not in n and ".." not in n.split(".")[0] for n in names)
    kept = sum(1 for r in rows if r["status"] == "kept")
    assert (
        sum(1 for _ in wds.WebDataset([str(p) for p in (out / "shards").glob("*.tar")], shardshuffle=False))
        == kept
    )
    created = {p for p in tmp_path.rglob("*")} - before
    assert all(out in p.parents or p == out for p in created), [p for p in created if out not in p.parents]
