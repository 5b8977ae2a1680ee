"""Real Ray clusters on loopback, as users run them: `ray start --head` with `--num-cpus 0`
(it only drives), worker nodes with `ray start --address`, runs with `ray job submit`.

The workers write every output file, so losing a node or the driver mid-run must still
end with exactly the rows of a clean run: a worker node's raylet SIGKILLed after the
first shard is written and a replacement node started; the job's driver SIGKILLed
mid-run and the job submitted again. Each cluster is stopped by its own processes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import duckdb
import psutil
import pyarrow.parquet as pq
import pytest

from tests.helpers import image_bytes, make_shard, wait_for
from tests.pipeline.loopback import LoopbackCluster

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
N_SHARDS, PER_SHARD = 8, 6


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("in")
    for s in range(N_SHARDS):
        make_shard(
            d / f"{s:05d}.tar",
            [
                {"key": f"{s}{i:03d}", "image": image_bytes(32, 24, seed=s * 10 + i), "txt": f"a thing {i}"}
                for i in range(PER_SHARD)
            ],
        )
    return d


def _run_args(tiny_models, shards: Path, out: Path, *extra: str) -> list[str]:
    return [
        "curate",
        "run",
        "pipelines/demo.yaml",
        "--input",
        f"{shards}/{{00000..{N_SHARDS - 1:05d}}}.tar",
        "--output",
        str(out),
        "--set",
        f"captioner.model={tiny_models['captioner']}",
        "--set",
        f"filter.model={tiny_models['itm']}",
        "--set",
        f"ranker.model={tiny_models['clip']}",
        "--set",
        "policy.itm_threshold=0.0",
        # one shard at a time, small blocks: a run long enough to be interrupted
        "--set",
        "read.resources.concurrency=1",
        "--set",
        "read.resources.batch_size=2",
        *extra,
    ]


def _rows(out: Path) -> list[tuple]:
    t = pq.read_table(out / "samples").to_pylist()
    return sorted(
        (r["shard"], r["key"], r["status"], r["reason"], r["caption"], tuple(r["captions"])) for r in t
    )


def _done(out: Path) -> int:
    return len(list((out / "samples").glob("*.parquet"))) if (out / "samples").exists() else 0


@pytest.fixture(scope="module")
def cluster():
    import ray

    if ray.is_initialized():
        ray.shutdown()  # two Rays in this process's tests at once would only compete for 2 cores
    with LoopbackCluster(head_cpus=0) as c:
        c.add_node("node-a")
        yield c


@pytest.fixture(scope="module")
def clean_rows(cluster, tiny_models, shards, tmp_path_factory) -> list[tuple]:
    out = tmp_path_factory.mktemp("clean") / "out"
    job = cluster.submit(_run_args(tiny_models, shards, out), str(REPO))
    state = cluster.wait(job)
    logs = cluster.logs(job)
    assert state == "SUCCEEDED", logs[-4000:]
    assert "cluster at" in logs  # joined the cluster, no embedded Ray
    rows = _rows(out)
    assert len(rows) == N_SHARDS * PER_SHARD
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["pipeline"]["name"] == "demo" and manifest["counts"]["total"] == N_SHARDS * PER_SHARD
    statuses = duckdb.sql(f"SELECT status, count(*) FROM '{out}/samples/*.parquet' GROUP BY 1").fetchall()
    assert dict(statuses) == {"kept": N_SHARDS * PER_SHARD}
    return rows


def test_worker_node_lost_mid_run_then_replaced(cluster, clean_rows, tiny_models, shards, tmp_path):
    out = tmp_path / "out"
    job = cluster.submit(_run_args(tiny_models, shards, out), str(REPO))
    assert wait_for(lambda: _done(out) >= 1, 300), cluster.logs(job)[-4000:]
    finished_before = _done(out)
    killed = cluster.kill_node("node-a")
    assert finished_before < N_SHARDS, "the run finished before the node could be killed"
    assert killed > 1  # the raylet and the worker processes under it
    cluster.add_node("node-b")
    state = cluster.wait(job)
    logs = cluster.logs(job)
    assert state == "SUCCEEDED", logs[-4000:]
    assert _rows(out) == clean_rows
    leftovers = [p for p in out.rglob("*") if ".tmp-" in p.name or "_parts" in p.parts]
    assert leftovers == []


def test_driver_killed_mid_run_then_job_submitted_again(cluster, clean_rows, tiny_models, shards, tmp_path):
    out = tmp_path / "out"
    job = cluster.submit(_run_args(tiny_models, shards, out), str(REPO))
    assert wait_for(lambda: _done(out) >= 1, 300), cluster.logs(job)[-4000:]

    def drivers() -> list[psutil.Process]:
        found = []
        for p in psutil.process_iter(["cmdline"]):
            cmd = p.info["cmdline"] or []
            if any(a.endswith("curate") for a in cmd[:2]) and "run" in cmd and str(out) in cmd:
                found.append(p)
        return found

    (driver,) = drivers()
    driver.kill()
    finished_before = _done(out)
    assert finished_before < N_SHARDS, "the run finished before the driver could be killed"
    assert cluster.wait(job) == "FAILED"

    again = cluster.submit(_run_args(tiny_models, shards, out), str(REPO))
    state = cluster.wait(again)
    logs = cluster.logs(again)
    assert state == "SUCCEEDED", logs[-4000:]
    # shards committed before the kill are skipped (a commit in flight may have landed too)
    skipped = re.search(r"(\d+) already done", logs)
    assert skipped and finished_before <= int(skipped.group(1)) < N_SHARDS, logs[-3000:]
    assert _rows(out) == clean_rows
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name or "_parts" in p.parts]
