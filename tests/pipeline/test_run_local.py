"""End to end on a real local Ray: every input sample becomes exactly one row."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from curate.config import pipeline_from_dict
from curate.io.reader import expand_inputs, shard_refs
from curate.pipeline import OutputConflictError, run_pipeline
from curate.schema import SAMPLES_SCHEMA
from tests.helpers import image_bytes, make_shard


def _config(models: dict[str, Path], **policy) -> dict:
    return {
        "name": "test",
        "seed": 7,
        "captioner": {
            "model": str(models["captioner"]),
            "num_captions": 3,
            "max_new_tokens": 6,
            "resources": {"device": "cpu"},
        },
        "filter": {"model": str(models["itm"]), "resources": {"device": "cpu", "batch_size": 8}},
        "ranker": {"model": str(models["clip"]), "resources": {"device": "cpu", "batch_size": 8}},
        "policy": policy or {"itm_threshold": 0.0, "top_k": 2},
        "read": {"resources": {"batch_size": 4}},
        "decode": {"min_side": 8},
    }


def _good(key: str, seed: int, fmt: str = "jpg") -> dict:
    return {
        "key": key,
        "image": image_bytes(40, 30, fmt=fmt, seed=seed),
        "format": fmt,
        "txt": f"alt text {key}",
        "json": {"url": f"http://example.invalid/{key}.{fmt}", "key": key},
    }


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    d = tmp_path / "in"
    make_shard(d / "00000.tar", [_good(f"0{i:03d}", i) for i in range(6)])
    make_shard(
        d / "00001.tar",
        [
            _good("1000", 10, "png"),
            {"key": "1001", "image": b"not an image", "txt": "garbage bytes"},
            {"key": "1002", "image": image_bytes(4, 4, seed=3), "txt": "too small"},
            {"key": "1003", "txt": "text without an image"},
            _good("1004", 11, "webp"),
            {"key": "1005", "image": image_bytes(20, 20, seed=5)},  # no alt-text: captions only
        ],
    )
    # a tar cut in the middle: the samples before the cut still come through
    full = make_shard(tmp_path / "full.tar", [_good(f"2{i:03d}", 20 + i) for i in range(5)])
    with tarfile.open(full) as tar:
        cut = next(m.offset_data for m in tar.getmembers() if m.name == "2003.jpg") + 50
    (d / "00002.tar").write_bytes(full.read_bytes()[:cut])
    (d / "00003.tar").write_bytes(b"this is not a tar file at all" * 40)
    return d


def _count_input_groups(path: Path) -> int:
    """Sample groups we can parse before any fault, counted independently of curate."""
    keys = []
    try:
        with tarfile.open(path, "r|*") as tar:
            for m in tar:
                k = m.name.split(".", 1)[0]
                if not keys or keys[-1] != k:
                    keys.append(k)
    except tarfile.TarError:
        pass
    return len(keys)


def test_full_run_accounts_for_every_sample(ray_local, tiny_models, inputs, tmp_path):
    cfg = pipeline_from_dict(_config(tiny_models))
    shards = shard_refs(expand_inputs(str(inputs / "{00000..00003}.tar")))
    out = tmp_path / "out"
    result = run_pipeline(cfg, shards, str(out))

    table = pq.read_table(out / "samples")
    assert table.schema.remove_metadata().equals(SAMPLES_SCHEMA)
    rows = {(r["shard"], r["key"]): r for r in table.to_pylist()}
    assert len(rows) == table.num_rows  # no duplicates
    expected = sum(_count_input_groups(p) for p in sorted(inputs.glob("*.tar")))
    assert table.num_rows == expected == result.counts["total"]
    assert _count_input_groups(inputs / "00002.tar") == 4  # 2003 is cut inside its image

    by_key = {k: r for (_, k), r in rows.items()}
    assert by_key["1001"]["status"] == "error" and "undecodable image" in by_key["1001"]["error"]
    assert by_key["1002"]["status"] == "dropped" and by_key["1002"]["reason"] == "image_too_small"
    assert by_key["1003"]["status"] == "error" and "no image member" in by_key["1003"]["error"]
    assert by_key["2002"]["status"] == "kept"
    assert by_key["2003"]["status"] == "error" and "cut off" in by_key["2003"]["error"]
    assert by_key["1005"]["alt_text"] is None and by_key["1005"]["status"] == "kept"
    assert all(c["source"] == "synthetic" for c in by_key["1005"]["candidates"])
    kept = [r for r in rows.values() if r["status"] == "kept"]
    assert kept
    for r in kept:
        assert r["caption"] == r["captions"][0]
        assert 1 <= len(r["captions"]) <= 2
        scored = [c for c in r["candidates"]]
        assert all(c["itm_score"] is not None and c["clip_score"] is not None for c in scored)
        kept_texts = [c["text"] for c in scored if c["kept"]]
        assert sorted(kept_texts) == sorted(r["captions"])
        best = max(scored, key=lambda c: c["clip_score"])
        assert r["caption"] == best["text"]
        assert (r["width"], r["height"]) == ((20, 20) if r["key"] == "1005" else (40, 30))

    metas = json.loads((out / "manifest.json").read_text())
    assert metas["counts"]["total"] == expected
    assert metas["shards"]["00003"]["fault"] and metas["shards"]["00003"]["samples"] == 0
    assert "unreadable tar" in metas["shards"]["00002"]["fault"]
    assert metas["models"]["captioner"]["model"] == str(tiny_models["captioner"])
    assert metas["packages"]["ray"]

    # curated WebDataset: kept samples only, readable by the webdataset library as is
    n_tar = 0
    for sample in wds.WebDataset(
        [str(p) for p in sorted((out / "shards").glob("*.tar"))], shardshuffle=False
    ):
        n_tar += 1
        meta = json.loads(sample["json"])
        assert sample["txt"].decode() == meta["caption"] == meta["captions"][0]["text"]
    assert n_tar == len(kept)
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]

    # DuckDB reads the output as users will
    got = dict(duckdb.sql(f"SELECT status, count(*) FROM '{out}/samples/*.parquet' GROUP BY 1").fetchall())
    assert sum(got.values()) == expected and got["kept"] == len(kept)

    # a finished run re-run is a no-op; a new shard is processed alone
    again = run_pipeline(cfg, shards, str(out))
    assert again.nothing_to_do and again.counts == result.counts
    make_shard(inputs / "00004.tar", [_good("4000", 40)])
    grown = run_pipeline(cfg, shard_refs(expand_inputs(str(inputs / "*.tar"))), str(out))
    assert grown.shards_processed == 1 and grown.shards_skipped == 4
    assert grown.counts["total"] == expected + 1

    # a different pipeline never mixes into this output without --overwrite
    other = pipeline_from_dict(_config(tiny_models, itm_threshold=0.9))
    with pytest.raises(OutputConflictError, match="different pipeline"):
        run_pipeline(other, shards, str(out))
    fresh = run_pipeline(other, shards[:1], str(out), overwrite=True)
    assert fresh.shards_processed == 1 and fresh.counts["total"] == 6


def _samples(out: Path) -> list[dict]:
    return sorted(pq.read_table(out / "samples").to_pylist(), key=lambda r: (r["shard"], r["key"]))


def test_rows_do_not_depend_on_batching_actors_or_output(ray_local, tiny_models, inputs, tmp_path):
    """A sample's captions are drawn from the run seed and its own key: other block and
    model batch sizes, another actor count and another output give the same rows."""
    shards = shard_refs([str(inputs / "00000.tar"), str(inputs / "00001.tar")])
    a = _config(tiny_models)  # blocks of 4, the captioner's default batch of 8, one actor each
    b = _config(tiny_models)
    b["read"]["resources"]["batch_size"] = 3
    b["captioner"]["resources"].update(batch_size=2, concurrency=2)
    b["filter"]["resources"]["batch_size"] = 3
    b["ranker"]["resources"]["batch_size"] = 5
    run_pipeline(pipeline_from_dict(a), shards, str(tmp_path / "a"))
    run_pipeline(pipeline_from_dict(b), shards, str(tmp_path / "elsewhere" / "b"))
    rows_a, rows_b = _samples(tmp_path / "a"), _samples(tmp_path / "elsewhere" / "b")
    assert len(rows_a) == 12 and sum(len(r["captions"]) for r in rows_a) > 0
    assert sum(c["source"] == "synthetic" for r in rows_a for c in r["candidates"]) >= 10
    # every column the same; the scores only to float32 rounding: a scorer batch of another
    # size sums in another order (CLIP embeddings of one image differ by ~1e-7 between batches)
    assert _without_scores(rows_a) == _without_scores(rows_b)
    assert _scores(rows_b) == pytest.approx(_scores(rows_a), abs=1e-6)


def _without_scores(rows: list[dict]) -> list[dict]:
    drop = ("itm_score", "clip_score")
    return [
        {**r, "candidates": [{k: v for k, v in c.items() if k not in drop} for c in r["candidates"]]}
        for r in rows
    ]


def _scores(rows: list[dict]) -> list[float]:
    return [c[k] for r in rows for c in r["candidates"] for k in ("itm_score", "clip_score")]


# `curate ARGS`, then which model libraries the driver process had imported: only actors need them
_CLI = (
    "import sys; from curate.cli import main; rc = main(sys.argv[1:]); "
    "print('driver imported:', [m for m in ('torch', 'transformers') if m in sys.modules]); sys.exit(rc)"
)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_cli_embedded_ray_with_overrides_and_failures(tiny_models, inputs, tmp_path):
    """The real CLI in a fresh process (its own embedded Ray)."""
    pipeline = tmp_path / "alt_only.yaml"
    pipeline.write_text(
        "name: alt_only\nranker:\n  model: {}\n  resources: {{device: cpu}}\npolicy:\n  top_k: 1\n".format(
            tiny_models["clip"]
        )
    )
    out = tmp_path / "out"
    proc = _cli(
        "run",
        str(pipeline),
        "--input",
        str(inputs / "{00000..00001}.tar"),
        "--output",
        str(out),
        "--set",
        "decode.min_side=8",
        "--num-cpus",
        "4",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "samples/s" in proc.stdout and "kept=" in proc.stdout
    assert "driver imported: []" in proc.stdout  # a few hundred MB and seconds saved per run
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["pipeline"]["decode"]["min_side"] == 8
    assert manifest["counts"]["total"] == 12
    again = _cli(
        "run",
        str(pipeline),
        "--input",
        str(inputs / "{00000..00001}.tar"),
        "--output",
        str(out),
        "--set",
        "decode.min_side=8",
        cwd=tmp_path,
    )
    assert again.returncode == 0 and "nothing to do" in again.stdout

    # every shard unreadable: the run says so and exits non-zero
    bad = _cli(
        "run",
        str(pipeline),
        "--input",
        str(inputs / "00003.tar"),
        "--output",
        str(tmp_path / "bad"),
        "--num-cpus",
        "4",
        cwd=tmp_path,
    )
    assert bad.returncode == 1, bad.stderr[-2000:]
    assert "every shard was unreadable" in bad.stderr

    # GPUs declared on a machine without any: a clear error, not a hang
    gpu = _cli(
        "run",
        str(pipeline),
        "--input",
        str(inputs / "00000.tar"),
        "--output",
        str(tmp_path / "gpu"),
        "--set",
        "ranker.resources.num_gpus=1",
        "--num-cpus",
        "4",
        cwd=tmp_path,
    )
    assert gpu.returncode == 2 and "ranker.resources.num_gpus=1" in gpu.stderr
