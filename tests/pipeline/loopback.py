"""Real multi-node Ray clusters on loopback, for tests: `ray start --head`, worker nodes
with `ray start --address`, jobs with `ray job submit`, and SIGKILL for a node.

Each cluster lives in its own temp dir and is stopped by its own processes (every process
whose command line names that dir, and their children): `ray stop` would end every Ray on
the machine, a CI run's included.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

RAY = str(Path(sys.executable).parent / "ray")
# The head answers before its job agent has registered, most often on a loaded machine;
# the submission is refused before any job exists, so it is safe to send again.
AGENT_NOT_READY = "No available agent to submit job"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agent_ports() -> list[str]:
    """Ports of a node's own agents: on one machine every node would take Ray's fixed
    defaults (the dashboard agent's 52365), and a node whose agent cannot bind has no job agent."""
    return [
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
    ]


class LoopbackCluster:
    """A head that only drives (``--num-cpus 0``) plus worker nodes added by :meth:`add_node`."""

    def __init__(self, head_cpus: int = 0) -> None:
        self.env = dict(os.environ)
        # jobs find `curate` on the PATH of the shell that ran `ray start`
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env.get('PATH', '')}"
        # Ray 2.5x enables token auth on `ray start`; `ray start` never creates a token, so
        # the cluster brings its own, for the nodes and the job client alike
        self.env["RAY_AUTH_MODE"] = "token"
        self.env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
        self.env["HF_HUB_OFFLINE"] = "1"
        self.temp_dir = tempfile.mkdtemp(prefix="rc-")  # short: Ray's socket paths have a length limit
        # every node gets its own temp dir, as on separate machines: nodes sharing one would
        # share the runtime env cache, and one node's clean-up removes a job's working dir
        # from under the other's processes
        self.temp_dirs = [self.temp_dir]
        self.port, self.dashboard = free_port(), free_port()
        self.nodes: dict[str, int] = {}  # node name -> its raylet's pid
        started = self.ray(
            "start",
            "--head",
            f"--port={self.port}",
            f"--dashboard-port={self.dashboard}",
            "--dashboard-host=127.0.0.1",
            f"--num-cpus={head_cpus}",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
            *agent_ports(),
        )
        if started.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start --head failed:\n{started.stderr[-3000:]}")

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard}"

    def ray(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([RAY, *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def _raylets(self) -> set[int]:
        return {p.pid for p in self._processes() if "raylet" in p.name()}

    def add_node(self, name: str, num_cpus: int = 4) -> None:
        """A worker node: its own raylet, object store and worker processes."""
        before = self._raylets()
        temp_dir = tempfile.mkdtemp(prefix="rn-")
        self.temp_dirs.append(temp_dir)
        started = self.ray(
            "start",
            f"--address=127.0.0.1:{self.port}",
            f"--num-cpus={num_cpus}",
            f"--resources={json.dumps({name: 1})}",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
            *agent_ports(),
        )
        if started.returncode != 0:
            raise RuntimeError(f"ray start --address failed:\n{started.stderr[-3000:]}")
        (pid,) = self._raylets() - before
        self.nodes[name] = pid

    def kill_node(self, name: str) -> int:
        """SIGKILL a worker node's raylet and every process under it (its workers, agents)."""
        raylet = psutil.Process(self.nodes.pop(name))
        victims = [raylet, *raylet.children(recursive=True)]
        for p in victims:
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGKILL)
        psutil.wait_procs(victims, timeout=30)
        return len(victims)

    def submit(self, entrypoint: list[str], working_dir: str, wait_s: float = 300.0) -> str:
        """Submit a job without waiting for it; returns its submission id."""
        job_id = f"curate-{secrets.token_hex(4)}"
        args = ["job", "submit", "--address", self.address, "--submission-id", job_id, "--no-wait"]
        args += ["--working-dir", working_dir, "--", *entrypoint]
        deadline = time.monotonic() + wait_s
        while True:
            job = self.ray(*args, timeout=300)
            if job.returncode == 0:
                return job_id
            if AGENT_NOT_READY not in job.stdout + job.stderr or time.monotonic() > deadline:
                raise RuntimeError(f"ray job submit failed:\n{(job.stdout + job.stderr)[-3000:]}")
            time.sleep(3)

    def status(self, job_id: str) -> str:
        out = self.ray("job", "status", "--address", self.address, job_id, timeout=120)
        # the CLI prints the status through its logger: "Job 'ID' succeeded", or "'ID': RUNNING"
        text = (out.stdout + out.stderr).lower()
        for word in ("SUCCEEDED", "FAILED", "STOPPED", "RUNNING", "PENDING"):
            w = word.lower()
            if f"'{job_id}': {w}" in text or f"'{job_id}' {w}" in text or f"status: {w}" in text:
                return word
        return "UNKNOWN"

    def wait(self, job_id: str, timeout: float = 600) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            state = self.status(job_id)
            if state in ("SUCCEEDED", "FAILED", "STOPPED"):
                return state
            time.sleep(2)
        return "TIMEOUT"

    def logs(self, job_id: str) -> str:
        out = self.ray("job", "logs", "--address", self.address, job_id, timeout=120)
        return out.stdout + out.stderr

    def _ours(self, arg: str) -> bool:
        if any(d in arg for d in self.temp_dirs):
            return True
        return arg.startswith(("--gcs-address=", "--gcs_address=")) and arg.endswith(f":{self.port}")

    def _processes(self) -> list[psutil.Process]:
        """The cluster's own processes: each names its temp dir or its GCS port."""
        found = []
        for p in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                if any(self._ours(arg) for arg in p.info["cmdline"] or []):
                    found.append(p)
        return found

    def stop(self) -> None:
        """SIGKILL this cluster's processes and their children; no other Ray is touched."""
        procs: dict[int, psutil.Process] = {}
        for p in self._processes():
            procs[p.pid] = p
            with contextlib.suppress(psutil.Error):
                for child in p.children(recursive=True):
                    procs[child.pid] = child
        procs.pop(os.getpid(), None)
        for p in procs.values():
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGKILL)
        psutil.wait_procs(list(procs.values()), timeout=30)
        for d in self.temp_dirs:
            shutil.rmtree(d, ignore_errors=True)

    def __enter__(self) -> LoopbackCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
