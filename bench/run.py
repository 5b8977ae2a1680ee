"""Benchmark: does the pipeline run at model speed?

On the same shards, models and batch sizes it measures, in one run:
- model-only ceiling: captioner, filter and ranker wrappers on pre-decoded images,
  pre-batched by each model's batch size, in a loop (samples/s);
- the full pipeline: read tar -> decode -> caption -> filter -> rank -> write, on Ray
  (samples/s end to end, including Ray and actor start-up; and marginal, from the N and
  10N runs: 9N / (wall(10N) - wall(N)), which cancels the fixed start-up cost, as the
  model-only figure excludes model loading);
- a naive loop a user would write: one image at a time through the Hugging Face
  wrappers (the transformers docs' pattern);
- peak RSS (driver + Ray workers) of the pipeline on N and 10N samples.

    python bench/run.py --pipeline pipelines/demo.yaml --input 'data/openclipart/00000.tar' --samples 200
    python bench/run.py ... --json bench/results-cpu.json

It prints a table (efficiency = pipeline / model-only, speedup = pipeline / naive,
RSS ratio 10N / N) and writes the figures as JSON. Figures, not assertions: targets are
checked by reading them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Figures:
    samples: int
    model_only_sps: float = 0.0
    model_only_breakdown_s: dict[str, float] = field(default_factory=dict)
    pipeline_sps: float = 0.0
    pipeline_marginal_sps: float = 0.0
    pipeline_wall_s: float = 0.0
    naive_sps: float = 0.0
    naive_samples: int = 0
    rss_n_mb: float = 0.0
    rss_10n_mb: float = 0.0
    rss_samples_n: int = 0
    machine: dict = field(default_factory=dict)

    @property
    def efficiency(self) -> float:
        return self.pipeline_sps / self.model_only_sps if self.model_only_sps else 0.0

    @property
    def marginal_efficiency(self) -> float:
        return self.pipeline_marginal_sps / self.model_only_sps if self.model_only_sps else 0.0

    @property
    def speedup(self) -> float:
        return self.pipeline_sps / self.naive_sps if self.naive_sps else 0.0

    @property
    def rss_ratio(self) -> float:
        return self.rss_10n_mb / self.rss_n_mb if self.rss_n_mb else 0.0


def make_input(sources: list[str], n: int, directory: Path, per_shard: int) -> list[Path]:
    """Copy the first ``n`` samples of ``sources`` into shards of ``per_shard`` (repeating if short)."""
    from curate.io.reader import expand_inputs, iter_tar_groups

    groups = []
    for url in expand_inputs(sources):
        with open(url, "rb") as f:
            for key, files, problems in iter_tar_groups(f):
                if not problems and any(e in files for e in ("jpg", "jpeg", "png", "webp")):
                    groups.append((key, files))
                if len(groups) >= n:
                    break
        if len(groups) >= n:
            break
    if not groups:
        raise SystemExit(f"no usable samples in {sources}")
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(0, n, per_shard):
        path = directory / f"{s // per_shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(s, min(n, s + per_shard)):
                key, files = groups[i % len(groups)]
                for ext, data in files.items():
                    info = tarfile.TarInfo(f"b{i:07d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def decoded_samples(paths: list[Path], cfg) -> list[tuple]:
    from curate.io.reader import iter_shard_rows, shard_refs
    from curate.stages.decode import decode_rows, row_image

    rows = [r for r in iter_shard_rows(shard_refs([str(p) for p in paths])) if r["row_type"] == "sample"]
    rows = [r for r in decode_rows(rows, cfg.decode) if r["status"] == "pending"]
    return [(row_image(r), r["alt_text"]) for r in rows]


def load_models(cfg, fuse: bool = True) -> dict:
    from curate.stages.models import CaptionStage, FilterStage, RankStage, ScoreStage, fused_scoring

    models = {}
    if cfg.captioner:
        models["captioner"] = CaptionStage(cfg.captioner, seed=cfg.seed).model
    if fuse and fused_scoring(cfg.filter, cfg.ranker):  # as the pipeline runs it: both heads in one pass
        bridge = ScoreStage(cfg.filter).model.model
        models["filter+ranker"] = lambda images, texts: bridge.itm_itc_scores(
            images, texts, cfg.filter.batch_size
        )
        return models
    if cfg.filter:
        models["filter"] = FilterStage(cfg.filter).model
    if cfg.ranker:
        models["ranker"] = RankStage(cfg.ranker).model
    return models


def model_only(cfg, models: dict, samples: list[tuple]) -> tuple[float, dict[str, float]]:
    """Each model over all samples at its own batch size, captions feeding the scorers."""
    images = [img for img, _ in samples]
    texts: list[list[str]] = [[alt] if alt else [] for _, alt in samples]
    spent: dict[str, float] = {}
    if "captioner" in models:
        bs = cfg.captioner.batch_size
        t = time.perf_counter()
        for start in range(0, len(images), bs):
            caps = models["captioner"](images[start : start + bs], seed=start)
            for j, c in enumerate(caps):
                texts[start + j].extend(c)
        spent["captioner"] = time.perf_counter() - t
    for name in ("filter", "ranker", "filter+ranker"):
        if name not in models:
            continue
        bs = getattr(cfg, name.split("+")[0]).batch_size
        t = time.perf_counter()
        for start in range(0, len(images), bs):
            models[name](images[start : start + bs], texts[start : start + bs])
        spent[name] = time.perf_counter() - t
    total = sum(spent.values())
    return len(images) / total, spent


def naive(cfg, models: dict, samples: list[tuple], limit: int) -> float:
    """One image at a time, as the transformers docs show it."""
    samples = samples[:limit]
    t = time.perf_counter()
    for i, (img, alt) in enumerate(samples):
        texts = [alt] if alt else []
        if "captioner" in models:
            texts += models["captioner"]([img], seed=i)[0]
        for name in ("filter", "ranker"):  # a user's loop calls each model on its own
            if name in models:
                for text in texts:  # one pair per call
                    models[name]([img], [[text]])
    return len(samples) / (time.perf_counter() - t)


class RSSSampler:
    """Peak resident memory of a process tree, sampled every 50 ms."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.peak = 0
        self.peak_at: list[tuple[str, int]] = []  # (process name, RSS) at the peak
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
                rss, parts = 0, []
                for p in procs:
                    with contextlib.suppress(psutil.Error):
                        one = p.memory_info().rss
                        rss += one
                        parts.append((" ".join(p.cmdline()[:3])[-60:], one))
                if rss > self.peak:
                    self.peak, self.peak_at = rss, parts
            except psutil.Error:
                pass
            time.sleep(0.05)

    def __enter__(self) -> RSSSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def pipeline_run(pipeline: str, overrides: list[str], inputs: list[Path], out: Path, num_cpus: int | None):
    """`curate run` in a subprocess (its own embedded Ray), timed, with the tree's peak RSS."""
    cmd = [sys.executable, "-m", "curate", "run", pipeline, "--output", str(out), "--quiet", "--overwrite"]
    for p in inputs:
        cmd += ["--input", str(p)]
    for o in overrides:
        cmd += ["--set", o]
    if num_cpus:
        cmd += ["--num-cpus", str(num_cpus)]
    ray_tmp = tempfile.mkdtemp(prefix="rb-")
    env = dict(os.environ, RAY_TMPDIR=ray_tmp)
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with RSSSampler(proc.pid) as rss:
        log, _ = proc.communicate()
    wall = time.perf_counter() - t
    subprocess.run(["pkill", "-9", "-f", ray_tmp], check=False)
    if proc.returncode != 0:
        raise SystemExit(f"pipeline failed ({proc.returncode}):\n{log[-3000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    shards = [m for m in manifest["shards"].values()]
    top = sorted(rss.peak_at, key=lambda x: -x[1])
    print(
        f"bench: {len(inputs)} shards, peak RSS {rss.peak / 2**20:.0f} MB in {len(top)} processes: "
        + ", ".join(f"{name.strip()} {b / 2**20:.0f}" for name, b in top[:8]),
        file=sys.stderr,
    )
    return wall, rss.peak / 2**20, manifest, shards


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipeline", default="pipelines/demo.yaml", help="pipeline file to benchmark")
    ap.add_argument("--input", action="append", required=True, help="source shards (paths/globs/braces)")
    ap.add_argument("--samples", type=int, default=200, help="N: samples for the throughput runs")
    ap.add_argument("--per-shard", type=int, default=50, help="samples per benchmark shard")
    ap.add_argument("--naive-samples", type=int, default=40, help="samples for the slow naive loop")
    ap.add_argument("--rss-n", type=int, default=0, help="N for the RSS runs (default: --samples)")
    ap.add_argument("--skip-rss", action="store_true", help="skip the N / 10N memory runs")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="pipeline override")
    ap.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of the embedded Ray")
    ap.add_argument("--json", default="bench/results.json", help="where to write the figures")
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    sys.path.insert(0, str(REPO))
    import torch

    from curate.commands.run import resolve_local_models
    from curate.config import load_pipeline

    cfg = load_pipeline(args.pipeline, args.overrides)
    resolve_local_models(cfg, args.pipeline)
    overrides = [*args.overrides] + [f"{n}.model={m.model}" for n, m in cfg.models().items()]
    work = Path(tempfile.mkdtemp(prefix="curate-bench-"))
    figs = Figures(samples=args.samples)
    figs.machine = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
    }

    inputs = make_input(args.input, args.samples, work / "n", args.per_shard)
    print(f"bench: {args.samples} samples in {len(inputs)} shards, pipeline {cfg.name}", file=sys.stderr)

    wall, rss, manifest, _ = pipeline_run(args.pipeline, overrides, inputs, work / "out-n", args.num_cpus)
    done = manifest["counts"]["total"]
    figs.pipeline_wall_s = wall
    figs.pipeline_sps = done / wall
    figs.rss_n_mb, figs.rss_samples_n = rss, done
    print(f"bench: pipeline {figs.pipeline_sps:.2f} samples/s ({wall:.1f}s)", file=sys.stderr)

    samples = decoded_samples(inputs, cfg)
    models = load_models(cfg)
    model_only(cfg, models, samples[: min(8, len(samples))])  # warm-up
    figs.model_only_sps, figs.model_only_breakdown_s = model_only(cfg, models, samples)
    print(f"bench: model-only {figs.model_only_sps:.2f} samples/s", file=sys.stderr)
    figs.naive_samples = min(args.naive_samples, len(samples))
    if "filter+ranker" in models:
        del models["filter+ranker"]
        models.update({k: v for k, v in load_models(cfg, fuse=False).items() if k != "captioner"})
    figs.naive_sps = naive(cfg, models, samples, figs.naive_samples)
    print(f"bench: naive {figs.naive_sps:.2f} samples/s", file=sys.stderr)
    del models

    if not args.skip_rss:
        n = args.rss_n or args.samples
        wall_n, done_n = wall, done
        if n != args.samples:
            small = make_input(args.input, n, work / "rss-n", args.per_shard)
            wall_n, figs.rss_n_mb, small_manifest, _ = pipeline_run(
                args.pipeline, overrides, small, work / "out-rn", args.num_cpus
            )
            done_n = small_manifest["counts"]["total"]
        big = make_input(args.input, 10 * n, work / "rss-10n", args.per_shard)
        wall_10n, figs.rss_10n_mb, big_manifest, _ = pipeline_run(
            args.pipeline, overrides, big, work / "out-10n", args.num_cpus
        )
        done_10n = big_manifest["counts"]["total"]
        figs.rss_samples_n = done_n
        # the same fixed cost (Ray start, actor and model loading) is in both runs
        if wall_10n > wall_n:
            figs.pipeline_marginal_sps = (done_10n - done_n) / (wall_10n - wall_n)
        print(
            f"bench: 10N run {done_10n} samples in {wall_10n:.1f}s; "
            f"marginal {figs.pipeline_marginal_sps:.2f} samples/s",
            file=sys.stderr,
        )

    rows = [
        ("model-only ceiling", f"{figs.model_only_sps:.2f} samples/s"),
        ("pipeline end to end", f"{figs.pipeline_sps:.2f} samples/s ({figs.pipeline_wall_s:.1f} s)"),
        ("pipeline marginal (N -> 10N)", f"{figs.pipeline_marginal_sps:.2f} samples/s"),
        ("naive loop", f"{figs.naive_sps:.2f} samples/s ({figs.naive_samples} samples)"),
        (
            "efficiency (pipeline / model-only)",
            f"{figs.efficiency:.2f} end to end, {figs.marginal_efficiency:.2f} marginal",
        ),
        ("speedup (pipeline / naive)", f"{figs.speedup:.1f}x"),
        (
            "peak RSS N / 10N",
            f"{figs.rss_n_mb:.0f} MB / {figs.rss_10n_mb:.0f} MB (ratio {figs.rss_ratio:.2f})",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"\n{'figure':<{width}}  value")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    data = {
        **asdict(figs),
        "efficiency": figs.efficiency,
        "marginal_efficiency": figs.marginal_efficiency,
        "speedup": figs.speedup,
        "rss_ratio": figs.rss_ratio,
        "pipeline": cfg.to_dict(),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(data, indent=2))
    print(f"\nfigures written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
