"""Benchmark: does ``curate dedup`` keep the driver's memory flat as the run grows?

For each scale (1x and 10x the demo by default) it builds a run over that many copies of the
demo's shards (the same tars under other names, so a 10x run holds every demo image ten
times), then runs ``curate dedup OUT --method M`` as a subprocess for each method, on its own
embedded Ray, and samples the ``curate dedup`` process itself every 0.1 s (psutil; not the
Ray workers, raylet or GCS it starts): peak RSS, and its CPU time (user + system, last
seen). exact and phash run over a ``pipelines/convert.yaml`` run (no models); semantic over a
run of the same pipeline with the demo's ranker (its ITC head, ``pipelines/models/
bridge-filter``) and ``output.write_embeddings: true``.

    python bench/dedup.py                                   # 1x and 10x, every method
    python bench/dedup.py --scales 1,10 --semantic-scales 1,3 --json bench/dedup.json

It prints a table (peak driver RSS, its CPU seconds, wall time, groups found per method and
scale, and the RSS growth per added sample) and writes the figures as JSON. Figures, not
assertions: flatness is read off the table. The runs stay in --work (resumed when there), so a
second call reruns only the dedups.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
CONVERT = REPO / "pipelines" / "convert.yaml"
RANKER = REPO / "pipelines" / "models" / "bridge-filter"
METHODS = ("exact", "phash", "semantic")
PERIOD_S = 0.1


@dataclass
class DedupFigures:
    method: str
    scale: int
    shards: int
    samples: int = 0  # samples compared
    groups: int = 0
    in_groups: int = 0
    duplicates: int = 0
    wall_s: float = 0.0  # the subprocess's wall time, Ray's start-up included
    dedup_wall_s: float = 0.0  # _dedup.json's wall time: the dedup itself
    driver_peak_rss_mb: float = 0.0
    driver_start_rss_mb: float = 0.0  # RSS at the first sample (the interpreter, before Ray)
    driver_cpu_s: float = 0.0
    rss_samples: int = 0
    details: dict = field(default_factory=dict)


class DriverSampler:
    """Peak RSS and CPU time of one process (not its children), every ``PERIOD_S``."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak_rss = 0
        self.first_rss = 0
        self.cpu_s = 0.0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with self.proc.oneshot():
                    rss = self.proc.memory_info().rss
                    cpu = self.proc.cpu_times()
            except psutil.Error:
                return
            self.first_rss = self.first_rss or rss
            self.peak_rss = max(self.peak_rss, rss)
            self.cpu_s = cpu.user + cpu.system
            self.samples += 1
            time.sleep(PERIOD_S)

    def __enter__(self) -> DriverSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def curate(*args: str) -> list[str]:
    """A ``curate`` command line, run by this interpreter's entry point."""
    return [str(Path(sys.executable).parent / "curate"), *args]


def run_logged(cmd: list[str], log: Path) -> None:
    """Run a command with its output in ``log``; raise with the log's tail on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        f.write(f"$ {' '.join(cmd)}\n".encode())
        f.flush()
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    if code:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise SystemExit(f"failed ({code}): {' '.join(cmd)}\n" + "\n".join(tail))


def make_inputs(demo: list[Path], scale: int, work: Path) -> Path:
    """``scale`` copies of the demo's shards under other names (hard links where possible)."""
    directory = work / f"in-{scale}x"
    directory.mkdir(parents=True, exist_ok=True)
    for copy in range(scale):
        for shard in demo:
            target = directory / f"c{copy:02d}_{shard.name}"
            if target.exists():
                continue
            try:
                os.link(shard, target)
            except OSError:
                shutil.copyfile(shard, target)
    return directory


def make_run(inputs: Path, out: Path, semantic: bool, num_cpus: int | None, log: Path) -> None:
    """A finished curate run over ``inputs`` (a rerun resumes or has nothing to do)."""
    args = ["run", str(CONVERT), "--input", f"{inputs}/*.tar", "--output", str(out), "--quiet"]
    if semantic:
        args += [
            "--set",
            f"ranker.model={RANKER}",
            "--set",
            "ranker.resources.device=cpu",
            "--set",
            "decode.max_side=448",  # the bridge sees 224 px, as pipelines/demo.yaml decodes
            "--set",
            "output.write_embeddings=true",
        ]
    if num_cpus:
        args += ["--num-cpus", str(num_cpus)]
    started = time.perf_counter()
    run_logged(curate(*args), log)
    print(f"  run {out.name}: ready in {time.perf_counter() - started:.0f}s", flush=True)


def measure_dedup(out: Path, method: str, scale: int, num_cpus: int | None, log: Path) -> DedupFigures:
    """One ``curate dedup`` from scratch, its driver sampled while it runs."""
    shutil.rmtree(out / "dedup" / method, ignore_errors=True)
    shutil.rmtree(out / "_dedup" / method, ignore_errors=True)
    cmd = curate("dedup", str(out), "--method", method, "--quiet")
    if num_cpus:
        cmd += ["--num-cpus", str(num_cpus)]
    figs = DedupFigures(method=method, scale=scale, shards=len(list((out / "samples").glob("*.parquet"))))
    with open(log, "ab") as f:
        f.write(f"$ {' '.join(cmd)}\n".encode())
        f.flush()
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
        with DriverSampler(proc.pid) as sampler:
            code = proc.wait()
        figs.wall_s = time.perf_counter() - started
    if code:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise SystemExit(f"curate dedup --method {method} failed ({code}) on {out}\n" + "\n".join(tail))
    meta = json.loads((out / "dedup" / method / "_dedup.json").read_text())
    figs.samples, figs.groups = meta["samples"], meta["groups"]
    figs.in_groups, figs.duplicates = meta["in_groups"], meta["duplicates"]
    figs.dedup_wall_s = meta.get("wall_s", 0.0)
    figs.details = meta.get("details", {})
    figs.driver_peak_rss_mb = sampler.peak_rss / 2**20
    figs.driver_start_rss_mb = sampler.first_rss / 2**20
    figs.driver_cpu_s = sampler.cpu_s
    figs.rss_samples = sampler.samples
    return figs


def growth(rows: list[DedupFigures]) -> dict[str, dict[str, float]]:
    """Per method: peak driver RSS at the largest scale over the smallest, and the bytes it grew
    by per added sample (what the driver would hold per sample, were it not flat)."""
    out = {}
    for method in METHODS:
        mine = sorted((r for r in rows if r.method == method), key=lambda r: r.scale)
        if len(mine) < 2:
            continue
        small, big = mine[0], mine[-1]
        added = max(1, big.samples - small.samples)
        out[method] = {
            "scales": [small.scale, big.scale],
            "peak_rss_ratio": big.driver_peak_rss_mb / small.driver_peak_rss_mb,
            "peak_rss_delta_mb": big.driver_peak_rss_mb - small.driver_peak_rss_mb,
            "rss_bytes_per_added_sample": (big.driver_peak_rss_mb - small.driver_peak_rss_mb) * 2**20 / added,
            "cpu_s_ratio": big.driver_cpu_s / max(small.driver_cpu_s, 1e-9),
        }
    return out


def print_table(rows: list[DedupFigures], grown: dict[str, dict[str, float]]) -> None:
    print()
    print(
        f"{'method':<9} {'scale':>5} {'shards':>6} {'samples':>8} {'groups':>7} {'dups':>6} "
        f"{'wall s':>7} {'dedup s':>7} {'drv RSS MB':>10} {'drv CPU s':>9}"
    )
    for r in rows:
        print(
            f"{r.method:<9} {r.scale:>4}x {r.shards:>6} {r.samples:>8,} {r.groups:>7,} {r.duplicates:>6,} "
            f"{r.wall_s:>7.1f} {r.dedup_wall_s:>7.1f} {r.driver_peak_rss_mb:>10.1f} {r.driver_cpu_s:>9.1f}"
        )
    for method, g in grown.items():
        lo, hi = g["scales"]
        print(
            f"{method}: driver peak RSS {hi}x / {lo}x = {g['peak_rss_ratio']:.3f} "
            f"({g['peak_rss_delta_mb']:+.1f} MB, "
            f"{g['rss_bytes_per_added_sample']:+,.0f} B per added sample); "
            f"driver CPU {hi}x / {lo}x = {g['cpu_s_ratio']:.2f}"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", default="data/openclipart/*.tar", help="the demo's shards (a glob)")
    ap.add_argument("--scales", default="1,10", help="copies of the demo for exact and phash")
    ap.add_argument("--semantic-scales", default=None, help="copies for semantic (default: --scales)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    ap.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of each embedded Ray")
    ap.add_argument("--work", default=None, help="where the inputs and runs go (default: a temp dir)")
    ap.add_argument("--json", default=None, help="where to write the figures (default: WORK/dedup.json)")
    args = ap.parse_args()

    pattern = args.input if os.path.isabs(args.input) else str(REPO / args.input)
    demo = sorted(Path(p) for p in glob.glob(pattern))
    if not demo:
        raise SystemExit(f"no shards match {args.input}: run make demo-data first")
    methods = [m for m in args.methods.split(",") if m]
    scales = [int(s) for s in args.scales.split(",")]
    semantic_scales = [int(s) for s in (args.semantic_scales or args.scales).split(",")]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="curate-bench-dedup-"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "bench.log"
    print(f"bench/dedup.py: {len(demo)} demo shard(s) from {args.input}; work in {work} (log: {log})")

    rows: list[DedupFigures] = []
    plan = [(m, s) for m in methods for s in (semantic_scales if m == "semantic" else scales)]
    for method, scale in sorted(plan, key=lambda p: (p[0] == "semantic", p[1], METHODS.index(p[0]))):
        semantic = method == "semantic"
        out = work / f"{'emb' if semantic else 'run'}-{scale}x"
        make_run(make_inputs(demo, scale, work), out, semantic, args.num_cpus, log)
        figs = measure_dedup(out, method, scale, args.num_cpus, log)
        rows.append(figs)
        print(
            f"  dedup {method} {scale}x: {figs.samples:,} samples, {figs.groups:,} groups, "
            f"{figs.duplicates:,} duplicates; {figs.wall_s:.1f}s; driver peak RSS "
            f"{figs.driver_peak_rss_mb:.1f} MB, CPU {figs.driver_cpu_s:.1f}s",
            flush=True,
        )
    rows.sort(key=lambda r: (METHODS.index(r.method), r.scale))
    grown = growth(rows)
    print_table(rows, grown)
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "input": args.input,
        "period_s": PERIOD_S,
        "dedups": [asdict(r) for r in rows],
        "growth": grown,
    }
    path = Path(args.json) if args.json else work / "dedup.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"figures: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
