"""A real Ray cluster on loopback: `ray start --head`, `ray job submit`, `ray stop`.

This is what users do on a cluster, with the shipped demo pipeline and tiny models
swapped in by `--set`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import pytest

from tests.helpers import image_bytes, make_shard

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(args: list[str], env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "ray"
    return subprocess.run([str(exe), *args], env=env, capture_output=True, text=True, timeout=timeout)


# The head answers before its job agent has registered, most often on a loaded machine;
# the submission is refused before any job exists, so it is safe to send again.
AGENT_NOT_READY = "No available agent to submit job"


def _submit(args: list[str], env: dict, timeout: int, wait_s: float = 120.0) -> subprocess.CompletedProcess:
    deadline = time.monotonic() + wait_s
    while True:
        job = _ray(args, env, timeout=timeout)
        if (
            job.returncode == 0
            or AGENT_NOT_READY not in job.stdout + job.stderr
            or time.monotonic() > deadline
        ):
            return job
        time.sleep(3)


def test_ray_start_head_and_job_submit(tiny_models, tmp_path):
    import ray

    if ray.is_initialized():
        ray.shutdown()  # `ray stop` below would kill this process's Ray otherwise
    shards = tmp_path / "shards"
    for s in range(2):
        make_shard(
            shards / f"{s:05d}.tar",
            [
                {"key": f"{s}{i:03d}", "image": image_bytes(32, 24, seed=s * 10 + i), "txt": f"a thing {i}"}
                for i in range(4)
            ],
        )
    out = tmp_path / "out"
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = "token"  # Ray 2.5x enables token auth on `ray start`; the client must send it
    # `ray start` never creates a token, and ~/.ray/auth_token exists only where something
    # made one: this test brings its own, for the head and the job client alike
    env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    env["HF_HUB_OFFLINE"] = "1"
    temp_dir = tempfile.mkdtemp(prefix="rc-")  # short: Ray's socket paths have a length limit
    port, dash = _free_port(), _free_port()
    started = _ray(
        [
            "start",
            "--head",
            f"--port={port}",
            f"--dashboard-port={dash}",
            "--dashboard-host=127.0.0.1",
            "--num-cpus=4",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        env,
    )
    assert started.returncode == 0, started.stderr[-3000:]
    try:
        job = _submit(
            [
                "job",
                "submit",
                "--address",
                f"http://127.0.0.1:{dash}",
                "--working-dir",
                str(REPO),
                "--",
                "curate",
                "run",
                "pipelines/demo.yaml",
                "--input",
                f"{shards}/{{00000..00001}}.tar",
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
            ],
            env,
            timeout=600,
        )
        assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
        assert "succeeded" in (job.stdout + job.stderr)
        assert "cluster at" in job.stdout + job.stderr  # joined the cluster, no embedded Ray
    finally:
        stopped = _ray(["stop", "--force"], env)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert stopped.returncode == 0
    rows = duckdb.sql(f"SELECT status, count(*) FROM '{out}/samples/*.parquet' GROUP BY 1").fetchall()
    assert dict(rows) == {"kept": 8}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["pipeline"]["name"] == "demo" and manifest["counts"]["total"] == 8
