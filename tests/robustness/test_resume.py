"""Crashes: SIGKILL the driver at several points, kill a model actor mid-run, and check
that resuming ends with the same rows as an uninterrupted run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from curate.io.reader import expand_inputs, shard_refs
from curate.pipeline import run_pipeline
from tests.helpers import image_bytes, make_shard, start_local_ray, wait_for

pytestmark = pytest.mark.slow
N_SHARDS, PER_SHARD = 6, 6


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("in")
    for s in range(N_SHARDS):
        make_shard(
            d / f"{s:05d}.tar",
            [
                {
                    "key": f"{s}{i:03d}",
                    "image": image_bytes(32, 24, "jpg", seed=s * 100 + i),
                    "txt": f"thing {s} {i}",
                }
                for i in range(PER_SHARD)
            ],
        )
    return d


@pytest.fixture(scope="module")
def pipeline_file(tiny_models, tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("cfg") / "p.yaml"
    p.write_text(
        f"""name: resume
seed: 3
read: {{resources: {{batch_size: 4}}}}
captioner: {{model: {tiny_models["captioner"]}, num_captions: 2, max_new_tokens: 5,
            resources: {{device: cpu, batch_size: 2}}}}
ranker: {{model: {tiny_models["clip"]}, resources: {{device: cpu}}}}
policy: {{top_k: 2}}
"""
    )
    return p


def _rows(out: Path) -> list[tuple]:
    t = pq.read_table(out / "samples").to_pylist()
    return sorted(
        (r["shard"], r["key"], r["status"], r["reason"], r["caption"], tuple(r["captions"])) for r in t
    )


def _cli(pipeline: Path, inputs: Path, out: Path, ray_tmp: str) -> subprocess.Popen:
    env = dict(os.environ, RAY_TMPDIR=ray_tmp)
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "curate",
            "run",
            str(pipeline),
            "--input",
            str(inputs / "*.tar"),
            "--output",
            str(out),
            "--num-cpus",
            "4",
            "--quiet",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _kill_ray_leftovers(ray_tmp: str) -> None:
    """A SIGKILLed driver cannot stop its embedded Ray; stop what it left behind."""
    subprocess.run(["pkill", "-9", "-f", ray_tmp], check=False)


@pytest.fixture(scope="module")
def clean_rows(pipeline_file, shards, tmp_path_factory) -> list[tuple]:
    out = tmp_path_factory.mktemp("clean") / "out"
    ray_tmp = tempfile.mkdtemp(prefix="rk-")
    proc = _cli(pipeline_file, shards, out, ray_tmp)
    log, _ = proc.communicate(timeout=600)
    _kill_ray_leftovers(ray_tmp)
    assert proc.returncode == 0, log[-3000:]
    rows = _rows(out)
    assert len(rows) == N_SHARDS * PER_SHARD
    return rows


@pytest.mark.parametrize("kill_after", ["pipeline_marker", "first_shard", "most_shards"])
def test_sigkill_driver_then_resume(kill_after, pipeline_file, shards, clean_rows, tmp_path):
    out = tmp_path / "out"
    ray_tmp = tempfile.mkdtemp(prefix="rk-")
    done = lambda: len(list((out / "samples").glob("*.parquet"))) if (out / "samples").exists() else 0  # noqa: E731
    condition = {
        "pipeline_marker": lambda: (out / "_pipeline.json").exists(),
        "first_shard": lambda: done() >= 1,
        "most_shards": lambda: done() >= N_SHARDS - 2,
    }[kill_after]
    proc = _cli(pipeline_file, shards, out, ray_tmp)
    try:
        assert wait_for(condition, 300, every=0.1), (
            proc.communicate(timeout=5)[0][-2000:] if proc.poll() is not None else "timeout"
        )
        finished_before = done()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        _kill_ray_leftovers(ray_tmp)
    assert finished_before < N_SHARDS or kill_after == "most_shards"

    resume_tmp = tempfile.mkdtemp(prefix="rk-")
    again = _cli(pipeline_file, shards, out, resume_tmp)
    log, _ = again.communicate(timeout=600)
    _kill_ray_leftovers(resume_tmp)
    assert again.returncode == 0, log[-3000:]
    # a commit task already running when the driver died can still finish before its Ray
    # is stopped: at least the shards done before the kill are skipped, never redone
    # (when they completed the rest too, the resume has nothing to do)
    skipped = re.search(r"(\d+) already done", log) or re.search(r"nothing to do: all (\d+) shard", log)
    assert skipped and int(skipped.group(1)) >= finished_before, log[-2000:]
    assert _rows(out) == clean_rows
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


def test_actor_killed_mid_run_is_restarted(pipeline_file, shards, clean_rows, tmp_path):
    """SIGKILL a captioner actor process while it works; Ray restarts it and retries."""
    from curate.config import load_pipeline

    start_local_ray()
    cfg = load_pipeline(pipeline_file)
    killed: list[int] = []

    def killer() -> None:
        def find() -> list[int]:
            ps = subprocess.run(
                ["pgrep", "-f", "CaptionStage"], capture_output=True, text=True
            ).stdout.split()
            return [int(p) for p in ps if int(p) != os.getpid()]

        # as soon as the actor exists: waiting for the first committed shard as well let a fast
        # machine finish the whole run (and end the actors) before the kill
        if wait_for(lambda: bool(find()), 120, every=0.1):
            time.sleep(1.0)  # let it load its model and take a batch
            for pid in find():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    result = run_pipeline(cfg, shard_refs(expand_inputs(str(shards / "*.tar"))), str(tmp_path / "out"))
    t.join(timeout=5)
    assert killed, "no captioner actor process was found to kill"
    assert result.counts["total"] == N_SHARDS * PER_SHARD
    assert _rows(tmp_path / "out") == clean_rows
