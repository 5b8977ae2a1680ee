"""Benchmark: does the pipeline run at model speed?

On the same shards, models and batch sizes it measures, in one run:
- model-only ceiling: captioner, filter and ranker wrappers on pre-decoded images,
  pre-batched by each model's batch size, in a loop in this process (samples/s);
- the full pipeline: read tar -> decode -> caption -> filter -> rank -> write, with
  `curate run` on its own embedded Ray, on N and on 10N samples. End to end includes Ray
  start-up and model loading in every actor; the steady rate, 9N / (wall(10N) - wall(N)),
  cancels that fixed cost, as the model-only loop excludes model loading;
- a naive script a user writes by hand (the webdataset and transformers docs' patterns):
  read the tars with webdataset, decode each image with PIL, caption it, score each
  (image, text) pair with the ITM filter and the image against all its texts with the
  ranker, one image at a time, and write a Parquet file;
- peak memory (driver + Ray workers) of the N and 10N runs: summed PSS (the footprint),
  and summed RSS (shared pages counted once per process).

    python bench/run.py --pipeline pipelines/demo.yaml --input 'data/openclipart/*.tar' --samples 32
    python bench/run.py ... --json bench/results-cpu.json

It prints a table (efficiency = steady pipeline / model-only, speedup = steady pipeline /
naive, memory ratio 10N / N) and writes the figures as JSON. Figures, not assertions:
targets are checked by reading them.

FLOPs and MFU (bench/flops.py): each model stage's FLOPs per sample, counted from the
models' configs for the texts the model-only loop scored (else those of the 10N run's
output), and MFU = FLOP/s the samples need / peak: per stage over its model-only time, and
for the pipeline at its steady rate over all GPUs. The peak is the device's dense bf16
figure from bench/flops.py's table, or --peak-tflops; on a CPU, MFU is computed only with
--peak-tflops. The JSON's `mfu`, `gpu_util_mean` and `gpu_util_steady` are fractions;
`gpu_util_mean` is NVML's mean over the 10N run (start-up included), `gpu_util_steady`
the same N -> 10N difference the steady rate takes.
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
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Figures:
    samples: int  # N
    model_only_sps: float = 0.0  # the ceiling: the better of the two layouts below
    model_only_single_sps: float = 0.0  # one process, a thread per core
    model_only_parallel_sps: float = 0.0  # a process per core, one thread each
    model_only_samples: int = 0
    model_only_breakdown_s: dict[str, float] = field(default_factory=dict)
    pipeline_n_sps: float = 0.0
    pipeline_n_wall_s: float = 0.0
    pipeline_10n_sps: float = 0.0
    pipeline_10n_wall_s: float = 0.0
    pipeline_steady_sps: float = 0.0
    naive_sps: float = 0.0
    naive_samples: int = 0
    pss_n_mb: float = 0.0  # peak summed PSS of the process tree: its real footprint
    pss_10n_mb: float = 0.0
    rss_n_mb: float = 0.0  # peak summed RSS: shared pages counted once per process
    rss_10n_mb: float = 0.0
    gpus: int = 0  # NVML's count; 0 on a CPU machine
    gpu_util_model_only_pct: float = 0.0  # mean over the model-only loop
    gpu_util_pipeline_pct: float = 0.0  # mean over the 10N run (start-up included)
    gpu_util_n_pct: float = 0.0  # mean over the N run: with the 10N one, the steady utilisation
    gpu_mem_peak_mb: float = 0.0  # peak over all GPUs during the 10N run
    # the framework alone: pipelines/convert.yaml (read, decode, policy, write; no models)
    framework_samples: int = 0  # its N
    framework_n_wall_s: float = 0.0
    framework_10n_wall_s: float = 0.0
    framework_steady_sps: float = 0.0
    driver_cpu_n_s: float = 0.0  # the driver process's CPU over the N run
    driver_cpu_10n_s: float = 0.0
    driver_rss_n_mb: float = 0.0  # the driver process's peak RSS
    driver_rss_10n_mb: float = 0.0
    # FLOPs per sample of each model stage (bench/flops.py) and the peak MFU is taken against
    flops_per_sample: dict[str, float] = field(default_factory=dict)  # model FLOPs, and "total"
    flops_per_sample_executed: dict[str, float] = field(default_factory=dict)  # as transformers runs them
    flops_inputs: dict[str, dict[str, float]] = field(default_factory=dict)  # texts and tokens counted
    flops_source: str = ""  # whose texts were counted
    flops_not_counted: list[str] = field(default_factory=list)
    peak_tflops: float = 0.0  # per GPU (or the machine, given by --peak-tflops on a CPU)
    peak_source: str = ""
    machine: dict = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)  # parts that raised; their figures stay 0

    def _ratio(self, a: float, b: float) -> float:
        return a / b if b else 0.0

    @property
    def efficiency(self) -> float:
        return self._ratio(self.pipeline_steady_sps, self.model_only_sps)

    @property
    def efficiency_10n(self) -> float:
        return self._ratio(self.pipeline_10n_sps, self.model_only_sps)

    @property
    def speedup(self) -> float:
        return self._ratio(self.pipeline_steady_sps, self.naive_sps)

    @property
    def speedup_10n(self) -> float:
        return self._ratio(self.pipeline_10n_sps, self.naive_sps)

    @property
    def steady_sps_per_gpu(self) -> float:
        return self._ratio(self.pipeline_steady_sps, self.gpus)

    @property
    def samples_per_s_per_gpu(self) -> float:
        return self.steady_sps_per_gpu

    def _flops_total(self) -> float:
        return self.flops_per_sample.get("total", 0.0)

    @property
    def mfu(self) -> float:
        """The pipeline's steady rate x FLOPs per sample over the peak of all its GPUs."""
        return _mfu(self._flops_total(), self.pipeline_steady_sps, self.peak_tflops * max(1, self.gpus))

    @property
    def mfu_10n(self) -> float:
        return _mfu(self._flops_total(), self.pipeline_10n_sps, self.peak_tflops * max(1, self.gpus))

    @property
    def mfu_model_only(self) -> float:
        """The model-only loop (one process, one device) over one device's peak."""
        return _mfu(self._flops_total(), self.model_only_single_sps, self.peak_tflops)

    @property
    def mfu_stages(self) -> dict[str, float]:
        """Each stage in the model-only loop: its FLOPs x samples / its time / the peak."""
        out = {}
        for name, spent in self.model_only_breakdown_s.items():
            if name in self.flops_per_sample and spent > 0:
                sps = self.model_only_samples / spent
                out[name] = _mfu(self.flops_per_sample[name], sps, self.peak_tflops)
        return out

    @property
    def gpu_util_mean(self) -> float:
        return self.gpu_util_pipeline_pct / 100

    @property
    def gpu_util_steady(self) -> float:
        """Busy time added from N to 10N over the wall time added: the steady rate's counterpart."""
        busy = (
            self.gpu_util_pipeline_pct * self.pipeline_10n_wall_s
            - self.gpu_util_n_pct * self.pipeline_n_wall_s
        )
        return self._ratio(busy / 100, self.pipeline_10n_wall_s - self.pipeline_n_wall_s)

    @property
    def driver_ms_per_sample(self) -> float:
        """Marginal driver CPU per sample, N -> 10N: what each further sample costs the driver."""
        extra = 9 * self.framework_samples
        return self._ratio(1000 * (self.driver_cpu_10n_s - self.driver_cpu_n_s), extra)

    @property
    def driver_ceiling_sps(self) -> float:
        """The samples/s one driver core could serve at that cost, however big the cluster."""
        return self._ratio(1000.0, self.driver_ms_per_sample)

    @property
    def driver_rss_ratio(self) -> float:
        return self._ratio(self.driver_rss_10n_mb, self.driver_rss_n_mb)

    @property
    def memory_ratio(self) -> float:
        return self._ratio(self.pss_10n_mb, self.pss_n_mb)

    @property
    def rss_ratio(self) -> float:
        return self._ratio(self.rss_10n_mb, self.rss_n_mb)


def _thumbnail(files: dict[str, bytes], side: int) -> dict[str, bytes]:
    """The sample with its image re-encoded as a JPEG of at most ``side`` px."""
    from PIL import Image

    ext = next(e for e in ("jpg", "jpeg", "png", "webp") if e in files)
    img = Image.open(io.BytesIO(files[ext])).convert("RGB")
    img.thumbnail((side, side))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    rest = {e: d for e, d in files.items() if e not in ("jpg", "jpeg", "png", "webp")}
    return {"jpg": buf.getvalue(), **rest}


def make_input(
    sources: list[str], n: int, directory: Path, per_shard: int, image_side: int = 0
) -> list[Path]:
    """Copy the first ``n`` samples of ``sources`` into shards of ``per_shard`` (repeating if short);
    ``image_side`` > 0 shrinks each image to a JPEG of that size first."""
    from curate.io.files import write_tar
    from curate.io.reader import expand_inputs, iter_tar_groups

    groups = []
    for url in expand_inputs(sources):
        with open(url, "rb") as f:
            for key, files, problems in iter_tar_groups(f):
                if not problems and any(e in files for e in ("jpg", "jpeg", "png", "webp")):
                    groups.append((key, _thumbnail(files, image_side) if image_side else files))
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
        members = (
            (f"b{i:07d}.{ext}", data)
            for i in range(s, min(n, s + per_shard))
            for ext, data in groups[i % len(groups)][1].items()
        )
        paths.append(Path(write_tar(path, members)))
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
        models["filter+ranker"] = ScoreStage(cfg.filter).model
        return models
    # a scorer returns {field: scores per image}; the loops here want the one field's lists
    if cfg.filter:
        itm = FilterStage(cfg.filter).model
        models["filter"] = lambda images, texts: itm(images, texts)["itm_score"]
    if cfg.ranker:
        clip = RankStage(cfg.ranker).model
        models["ranker"] = lambda images, texts: clip(images, texts)["clip_score"]
    return models


def model_only(
    cfg, models: dict, samples: list[tuple], texts_out: list | None = None
) -> tuple[float, dict[str, float]]:
    """Each model over all samples at its own batch size, captions feeding the scorers.
    ``texts_out`` receives each sample's texts (alt-text first), for the FLOP count."""
    images = [img for img, _ in samples]
    texts: list[list[str]] = [[alt] if alt else [] for _, alt in samples]
    if texts_out is not None:
        texts_out[:] = texts
    spent: dict[str, float] = {}
    if "captioner" in models:
        bs = cfg.captioner.resources.batch_size
        t = time.perf_counter()
        for start in range(0, len(images), bs):
            chunk = images[start : start + bs]
            caps = models["captioner"](chunk, seeds=range(start, start + len(chunk)))
            for j, c in enumerate(caps):
                texts[start + j].extend(c)
        spent["captioner"] = time.perf_counter() - t
    for name in ("filter", "ranker", "filter+ranker"):
        if name not in models:
            continue
        bs = getattr(cfg, name.split("+")[0]).resources.batch_size
        t = time.perf_counter()
        for start in range(0, len(images), bs):
            models[name](images[start : start + bs], texts[start : start + bs])
        spent[name] = time.perf_counter() - t
    total = sum(spent.values())
    return len(images) / total, spent


def _ceiling_worker(
    pipeline: str, overrides: list[str], tars: list[Path], part: slice, barrier, results
) -> None:
    """One of C single-threaded processes of the parallel ceiling: load, warm up, wait, time."""
    import torch

    from curate.config import load_pipeline

    cfg = load_pipeline(pipeline, overrides)
    samples = decoded_samples(tars, cfg)[part]
    models = load_models(cfg)
    torch.set_num_threads(1)  # after loading: a stage sets the threads its config asks for
    model_only(cfg, models, samples[:2])
    barrier.wait()
    t = time.perf_counter()
    model_only(cfg, models, samples)
    results.put((len(samples), time.perf_counter() - t))


def parallel_model_only(pipeline: str, overrides: list[str], tars: list[Path], n: int, procs: int) -> float:
    """C processes of one thread each split the samples and start together: samples / slowest wall.

    On a few cores, one-thread processes side by side use them better than one process
    with C intra-op threads; a pipeline of actors can do that, so the ceiling must too.
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(procs), ctx.Queue()
    step = -(-n // procs)
    workers = [
        ctx.Process(
            target=_ceiling_worker,
            args=(pipeline, overrides, tars, slice(i * step, min(n, (i + 1) * step)), barrier, results),
        )
        for i in range(procs)
    ]
    for w in workers:
        w.start()
    got = [results.get(timeout=1800) for _ in workers]
    for w in workers:
        w.join()
    return sum(k for k, _ in got) / max(t for _, t in got)


def naive(models: dict, tars: list[Path], limit: int, out: Path) -> tuple[float, int]:
    """The hand-written script, timed from the first read to the Parquet write (models loaded)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds

    t = time.perf_counter()
    rows = []
    ds = wds.WebDataset([str(p) for p in tars], shardshuffle=False).decode("pil")
    for i, (key, img, alt) in enumerate(ds.to_tuple("__key__", "png;jpg;jpeg;webp", "txt")):
        if i >= limit:
            break
        texts = [alt] if alt else []
        if "captioner" in models:
            texts += models["captioner"]([img], seeds=[i])[0]
        itm = [float(models["filter"]([img], [[text]])[0][0]) for text in texts] if "filter" in models else []
        clip = [float(x) for x in models["ranker"]([img], [texts])[0]] if "ranker" in models else []
        rows.append({"key": key, "texts": texts, "itm_scores": itm, "clip_scores": clip})
    pq.write_table(pa.Table.from_pylist(rows), out)
    return len(rows) / (time.perf_counter() - t), len(rows)


class _Sampler:
    """Calls ``_sample`` every ``PERIOD_S`` on a thread between ``__enter__`` and ``__exit__``."""

    PERIOD_S = 0.1

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _active(self) -> bool:
        return True

    def _sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while self._active() and not self._stop.is_set():
            self._sample()
            time.sleep(self.PERIOD_S)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class MemorySampler(_Sampler):
    """Peak memory of a process tree: summed RSS every 50 ms, summed PSS every 3 s.

    PSS (proportional set size) splits a page shared by k processes k ways, so the sum is
    the tree's real footprint; summed RSS counts shared pages (libtorch mapped by every
    actor, Ray's shared-memory object store mapped by each reader) once per process.
    Reading PSS walks each process's page tables (~150 ms for a 16-process tree), so it
    is read seldom, not to slow the run it measures; the memory of a run rises to a
    plateau, which a 3 s period catches.
    """

    PERIOD_S = 0.05  # RSS
    PSS_PERIOD_S = 3.0

    def __init__(self, pid: int) -> None:
        super().__init__()
        self.root = psutil.Process(pid)
        self.peak_pss = 0
        self.peak_rss = 0
        self.peak_at: list[tuple[str, int]] = []  # (process, PSS) at the PSS peak
        self._last_pss = 0.0
        self.root_cpu_s = 0.0  # the root process's own CPU (user + system), last seen
        self.root_peak_rss = 0

    def _tree(self) -> list[psutil.Process]:
        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return []

    def _sample_pss(self) -> None:
        pss, parts = 0, []
        for p in self._tree():
            with contextlib.suppress(psutil.Error):
                one = p.memory_full_info().pss
                pss += one
                parts.append((" ".join(p.cmdline()[:3])[-60:], one))
        if pss > self.peak_pss:
            self.peak_pss, self.peak_at = pss, parts

    def _sample(self) -> None:
        with contextlib.suppress(psutil.Error):
            times = self.root.cpu_times()
            self.root_cpu_s = times.user + times.system
            self.root_peak_rss = max(self.root_peak_rss, self.root.memory_info().rss)
        rss = 0
        for p in self._tree():
            with contextlib.suppress(psutil.Error):
                rss += p.memory_info().rss
        self.peak_rss = max(self.peak_rss, rss)
        if time.monotonic() - self._last_pss >= self.PSS_PERIOD_S:
            self._sample_pss()
            self._last_pss = time.monotonic()


class GpuSampler(_Sampler):
    """Mean utilisation (% of time a kernel ran, NVML) and peak memory of all GPUs, every 100 ms.

    Reads nothing, and reports zeros, where NVML (nvidia-ml-py) or a GPU is missing.
    """

    def __init__(self) -> None:
        super().__init__()
        self.handles: list = []
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:  # no NVML library, no driver or no GPU: a CPU machine
            self._nvml = None
        self.util_sum = 0.0
        self.samples = 0
        self.peak_mem = 0

    @property
    def mean_util(self) -> float:
        return self.util_sum / self.samples if self.samples else 0.0

    def _active(self) -> bool:
        return bool(self.handles)

    def _sample(self) -> None:
        util = [self._nvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self.handles]
        mem = sum(self._nvml.nvmlDeviceGetMemoryInfo(h).used for h in self.handles)
        self.util_sum += sum(util) / len(util)
        self.samples += 1
        self.peak_mem = max(self.peak_mem, mem)


@dataclass
class Run:
    """One `curate run` of the bench: what it did, how long, and what it held."""

    wall_s: float
    samples: int
    pss_mb: float  # peak summed PSS of the process tree
    rss_mb: float  # peak summed RSS of the process tree
    driver_cpu_s: float  # the driver process's own CPU time (its threads, not Ray's processes)
    driver_rss_mb: float  # the driver process's peak RSS
    gpu: GpuSampler


def pipeline_run(
    pipeline: str, overrides: list[str], inputs: list[Path], out: Path, num_cpus: int | None
) -> Run:
    """`curate run` in a subprocess (its own embedded Ray), timed, with the tree's peak memory."""
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
    with MemorySampler(proc.pid) as mem, GpuSampler() as gpu:
        log, _ = proc.communicate()
    wall = time.perf_counter() - t
    subprocess.run(["pkill", "-9", "-f", ray_tmp], check=False)
    if proc.returncode != 0:
        raise SystemExit(f"pipeline failed ({proc.returncode}):\n{log[-3000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    top = sorted(mem.peak_at, key=lambda x: -x[1])
    print(
        f"bench: {len(inputs)} shards, peak PSS {mem.peak_pss / 2**20:.0f} MB "
        f"(summed RSS {mem.peak_rss / 2**20:.0f} MB) in {len(top)} processes: "
        + ", ".join(f"{name.strip()} {b / 2**20:.0f}" for name, b in top[:8]),
        file=sys.stderr,
    )
    if gpu.handles:
        peak = gpu.peak_mem / 2**20
        print(f"bench: GPU utilisation {gpu.mean_util:.0f}%, peak memory {peak:.0f} MB", file=sys.stderr)
    return Run(
        wall_s=wall,
        samples=manifest["counts"]["total"],
        pss_mb=mem.peak_pss / 2**20,
        rss_mb=mem.peak_rss / 2**20,
        driver_cpu_s=mem.root_cpu_s,
        driver_rss_mb=mem.root_peak_rss / 2**20,
        gpu=gpu,
    )


def measure_pipeline(figs: Figures, args, cfg, overrides: list[str], small, big, work: Path) -> None:
    """The pipeline on N and 10N samples: end-to-end and steady samples/s, peak memory, GPU use."""
    n = figs.samples
    print(f"bench: pipeline {cfg.name} on {n} and {10 * n} samples", file=sys.stderr)
    small_run = pipeline_run(args.pipeline, overrides, small, work / "out-n", args.num_cpus)
    figs.pss_n_mb, figs.rss_n_mb, done_n = small_run.pss_mb, small_run.rss_mb, small_run.samples
    figs.pipeline_n_wall_s, figs.pipeline_n_sps = small_run.wall_s, done_n / small_run.wall_s
    figs.gpu_util_n_pct = small_run.gpu.mean_util
    big_run = pipeline_run(args.pipeline, overrides, big, work / "out-10n", args.num_cpus)
    figs.pss_10n_mb, figs.rss_10n_mb, done_10n = big_run.pss_mb, big_run.rss_mb, big_run.samples
    figs.pipeline_10n_wall_s, figs.pipeline_10n_sps = big_run.wall_s, done_10n / big_run.wall_s
    gpu = big_run.gpu
    figs.gpus, figs.gpu_util_pipeline_pct = len(gpu.handles), gpu.mean_util
    figs.gpu_mem_peak_mb = gpu.peak_mem / 2**20
    # the same fixed cost (Ray start, actor and model loading) is in both runs
    if figs.pipeline_10n_wall_s > figs.pipeline_n_wall_s:
        figs.pipeline_steady_sps = (done_10n - done_n) / (figs.pipeline_10n_wall_s - figs.pipeline_n_wall_s)
    print(
        f"bench: pipeline {done_n} samples in {figs.pipeline_n_wall_s:.1f}s, {done_10n} in "
        f"{figs.pipeline_10n_wall_s:.1f}s; steady {figs.pipeline_steady_sps:.2f} samples/s",
        file=sys.stderr,
    )


def measure_framework(figs: Figures, args, work: Path) -> None:
    """The no-model pipeline on N and 10N samples: the framework's throughput and the driver's cost."""
    n = args.framework_samples
    figs.framework_samples = n
    side = args.framework_image_side
    small = make_input(args.input, n, work / "fw-n", args.framework_per_shard, side)
    big = make_input(args.input, 10 * n, work / "fw-10n", args.framework_per_shard, side)
    pipeline = str(REPO / "pipelines" / "convert.yaml")
    print(f"bench: framework ({pipeline}) on {n} and {10 * n} samples", file=sys.stderr)
    small_run = pipeline_run(pipeline, [], small, work / "fw-out-n", args.num_cpus)
    big_run = pipeline_run(pipeline, [], big, work / "fw-out-10n", args.num_cpus)
    figs.framework_n_wall_s, figs.framework_10n_wall_s = small_run.wall_s, big_run.wall_s
    if big_run.wall_s > small_run.wall_s:
        figs.framework_steady_sps = (big_run.samples - small_run.samples) / (
            big_run.wall_s - small_run.wall_s
        )
    figs.driver_cpu_n_s, figs.driver_cpu_10n_s = small_run.driver_cpu_s, big_run.driver_cpu_s
    figs.driver_rss_n_mb, figs.driver_rss_10n_mb = small_run.driver_rss_mb, big_run.driver_rss_mb
    print(
        f"bench: framework {small_run.samples} samples in {small_run.wall_s:.1f}s "
        f"(driver {small_run.driver_cpu_s:.2f} s CPU, {small_run.driver_rss_mb:.0f} MB), "
        f"{big_run.samples} in {big_run.wall_s:.1f}s (driver {big_run.driver_cpu_s:.2f} s CPU, "
        f"{big_run.driver_rss_mb:.0f} MB); steady {figs.framework_steady_sps:.1f} samples/s",
        file=sys.stderr,
    )


def measure_model_only(figs: Figures, args, cfg, overrides: list[str], big, seen: dict) -> None:
    """The ceiling: the models alone on pre-decoded samples, in the better of the two layouts;
    ``seen`` receives the texts the timed loop scored and which samples had an alt-text."""
    import torch

    cpus = os.cpu_count() or 1
    samples = decoded_samples(big, cfg)[: args.model_samples]
    figs.model_only_samples = len(samples)
    on_gpu = any(m.resources.device != "cpu" for m in cfg.models().values()) and torch.cuda.is_available()
    if cpus > 1 and not on_gpu:  # a process per core is a CPU layout; a GPU's ceiling is one process
        figs.model_only_parallel_sps = parallel_model_only(
            args.pipeline, overrides, big[: -(-len(samples) // args.per_shard)], len(samples), cpus
        )
    models = load_models(cfg)
    # the models with the whole machine, whatever threads the pipeline gives each actor; a
    # user's script gets the same (torch's default)
    torch.set_num_threads(cpus)
    model_only(cfg, models, samples[: min(8, len(samples))])  # warm-up
    with GpuSampler() as gpu:
        figs.model_only_single_sps, figs.model_only_breakdown_s = model_only(
            cfg, models, samples, seen.setdefault("texts", [])
        )
    seen["has_alt"] = [bool(alt) for _, alt in samples]
    figs.gpus = figs.gpus or len(gpu.handles)
    figs.gpu_util_model_only_pct = gpu.mean_util
    figs.model_only_sps = max(figs.model_only_single_sps, figs.model_only_parallel_sps)
    print(
        f"bench: model-only {figs.model_only_single_sps:.2f} samples/s in 1 process of {cpus} threads, "
        f"{figs.model_only_parallel_sps:.2f} in {cpus} processes of 1",
        file=sys.stderr,
    )


def measure_naive(figs: Figures, args, cfg, big, work: Path) -> None:
    """The hand-written loop, each model called on its own (no fused scoring)."""
    import torch

    models = load_models(cfg, fuse=False)
    torch.set_num_threads(os.cpu_count() or 1)  # after loading: a stage sets the threads its config asks for
    naive(models, big, 2, work / "naive-warm-up.parquet")  # first calls (kernel selection) are not timed
    figs.naive_sps, figs.naive_samples = naive(models, big, args.naive_samples, work / "naive.parquet")
    print(f"bench: naive {figs.naive_sps:.2f} samples/s", file=sys.stderr)


def _mfu(flops_per_sample: float, samples_per_s: float, peak_tflops: float) -> float:
    from bench.flops import mfu

    return mfu(flops_per_sample, samples_per_s, peak_tflops)


def stated_peak(figs: Figures, peak_tflops: float | None) -> None:
    """The peak MFU is taken against: --peak-tflops, else the CUDA device's dense bf16 figure."""
    from bench.flops import gpu_peak

    device = figs.machine.get("cuda")
    known = gpu_peak(device) if device else None
    if peak_tflops:
        figs.peak_tflops, figs.peak_source = peak_tflops, "--peak-tflops"
    elif known:
        figs.peak_tflops, figs.peak_source = known[1], f"{device}: dense bf16 ({known[0]} in bench/flops.py)"
    elif device:
        figs.peak_source = f"MFU not computed: {device} is not in bench/flops.py's table; give --peak-tflops"
    else:
        figs.peak_source = "MFU not computed on a CPU unless --peak-tflops is given"


def measure_flops(figs: Figures, cfg, seen: dict, output_10n: Path) -> None:
    """FLOPs per sample of each model stage, for the texts the model-only loop scored, else for
    those of the 10N run's output."""
    from bench.flops import pipeline_flops, texts_from_output

    if seen.get("texts"):
        texts = seen["texts"]
        captions = [ts[int(alt) :] for ts, alt in zip(texts, seen["has_alt"])]
        figs.flops_source = f"the model-only loop's {len(texts)} samples"
    elif (output_10n / "samples").is_dir():
        texts, captions = texts_from_output(output_10n)
        figs.flops_source = f"the 10N run's output ({len(texts)} samples)"
    else:
        return
    counts, figs.flops_not_counted = pipeline_flops(cfg, texts, captions)
    figs.flops_per_sample = {k: c.per_sample for k, c in counts.items()}
    figs.flops_per_sample["total"] = sum(figs.flops_per_sample.values())
    figs.flops_per_sample_executed = {k: c.executed / max(1, c.samples) for k, c in counts.items()}
    figs.flops_per_sample_executed["total"] = sum(figs.flops_per_sample_executed.values())
    figs.flops_inputs = {
        k: {"texts_per_sample": c.texts_per_sample, "tokens_per_text": c.tokens_per_text}
        for k, c in counts.items()
    }


def flops_rows(figs: Figures) -> list[tuple[str, str]]:
    """The table's FLOP and MFU rows."""
    if not figs.flops_per_sample:
        return [("FLOPs per sample", "not counted (no model-only loop or pipeline output)")]
    fps, ran = figs.flops_per_sample, figs.flops_per_sample_executed
    stages = [k for k in fps if k != "total"]
    inputs = figs.flops_inputs
    rows = [
        (
            "FLOPs per sample",
            ", ".join(f"{k} {fps[k] / 1e9:,.1f} G" for k in stages)
            + f"; total {fps['total'] / 1e9:,.1f} G (as transformers runs them: {ran['total'] / 1e9:,.1f} G)"
            + (f"; not counted: {', '.join(figs.flops_not_counted)}" if figs.flops_not_counted else ""),
        ),
        (
            "FLOPs counted for",
            f"{figs.flops_source}: "
            + ", ".join(
                f"{k} {inputs[k]['texts_per_sample']:.1f} x {inputs[k]['tokens_per_text']:.1f} tokens"
                for k in stages
            )
            + " (captioner: captions x sampled tokens; scorers: texts x padded tokens)",
        ),
    ]
    if not figs.peak_tflops:
        return [*rows, ("MFU", figs.peak_source)]
    per_stage = ", ".join(f"{k} {v:.1%}" for k, v in figs.mfu_stages.items())
    rows += [
        (
            "MFU, pipeline",
            f"{figs.mfu:.2%} steady, {figs.mfu_10n:.2%} end to end at 10N "
            f"(peak {figs.peak_tflops:g} TFLOP/s x {max(1, figs.gpus)}; {figs.peak_source})",
        ),
        ("MFU, model-only loop", f"{figs.mfu_model_only:.2%}" + (f" ({per_stage})" if per_stage else "")),
        (
            "bound at the peak",
            f"{figs.peak_tflops * 1e12 * max(1, figs.gpus) / fps['total']:,.0f} samples/s",
        ),
    ]
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipeline", default="pipelines/demo.yaml", help="pipeline file to benchmark")
    ap.add_argument("--input", action="append", required=True, help="source shards (paths/globs/braces)")
    ap.add_argument("--samples", type=int, default=32, help="N: the pipeline runs on N and 10N samples")
    ap.add_argument("--per-shard", type=int, default=16, help="samples per benchmark shard")
    ap.add_argument("--model-samples", type=int, default=64, help="samples for the model-only loop")
    ap.add_argument("--naive-samples", type=int, default=16, help="samples for the slow naive script")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="pipeline override")
    ap.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of the embedded Ray")
    ap.add_argument(
        "--framework-samples", type=int, default=2000, help="N of the framework part (no-model pipeline)"
    )
    ap.add_argument("--framework-per-shard", type=int, default=1000, help="samples per framework shard")
    ap.add_argument(
        "--framework-image-side",
        type=int,
        default=0,
        help="re-encode the framework part's images as JPEGs of this many px (0: as they are); "
        "small images make the workers fast, so the driver's cost per sample shows at a high rate",
    )
    ap.add_argument("--json", default="bench/results.json", help="where to write the figures")
    ap.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="peak TFLOP/s per GPU (or of the machine on a CPU) that MFU is taken against; "
        "default: the CUDA device's dense bf16 figure from bench/flops.py's table",
    )
    ap.add_argument(
        "--parts",
        default="framework,pipeline,model,naive",
        help="what to measure, comma-separated (framework, pipeline, model, naive); "
        "tuning runs need only pipeline",
    )
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    sys.path.insert(0, str(REPO))
    import torch

    from curate.commands.run import overridden_sections, resolve_local_models
    from curate.config import load_pipeline

    cfg = load_pipeline(args.pipeline, args.overrides)
    resolve_local_models(cfg, args.pipeline, overridden_sections(args.overrides))
    overrides = [*args.overrides] + [f"{n}.model={m.model}" for n, m in cfg.models().items()]
    work = Path(tempfile.mkdtemp(prefix="curate-bench-"))
    n = args.samples
    figs = Figures(samples=n)
    figs.machine = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
    }
    stated_peak(figs, args.peak_tflops)

    # the same samples in both runs: the 10N input starts with the N input's samples
    small = make_input(args.input, n, work / "n", args.per_shard)
    big = make_input(args.input, 10 * n, work / "10n", args.per_shard)
    parts = {
        "framework": lambda: measure_framework(figs, args, work),
        "pipeline": lambda: measure_pipeline(figs, args, cfg, overrides, small, big, work),
        "model": lambda: measure_model_only(figs, args, cfg, overrides, big, seen),
        "naive": lambda: measure_naive(figs, args, cfg, big, work),
    }
    seen: dict = {}  # the texts the model-only loop scored, for the FLOP count
    chosen = args.parts.split(",")
    if unknown := [p for p in chosen if p not in parts]:
        raise SystemExit(f"--parts: unknown {', '.join(unknown)} (known: {', '.join(parts)})")
    for name in chosen:
        try:
            parts[name]()
        except SystemExit as exc:  # a failed pipeline run: its log tail is the message
            figs.failed.append(name)
            print(f"bench: {name} failed: {exc}", file=sys.stderr)
        except Exception:  # the other parts still measure; the exit code says it
            figs.failed.append(name)
            print(f"bench: {name} failed:\n{traceback.format_exc()}", file=sys.stderr)
    try:
        measure_flops(figs, cfg, seen, work / "out-10n")
    except Exception:  # a counter fault must not lose the measured figures
        figs.failed.append("flops")
        print(f"bench: flops failed:\n{traceback.format_exc()}", file=sys.stderr)

    fw = figs.framework_samples
    rows = [
        (
            "framework (no models) N / 10N",
            f"{fw} in {figs.framework_n_wall_s:.1f} s / {10 * fw} in {figs.framework_10n_wall_s:.1f} s; "
            f"steady {figs.framework_steady_sps:.1f} samples/s",
        ),
        (
            "driver CPU per 1,000 samples",
            f"{1000 * figs.driver_ms_per_sample:.1f} ms marginal ({figs.driver_cpu_n_s:.2f} s at N, "
            f"{figs.driver_cpu_10n_s:.2f} s at 10N): ceiling {figs.driver_ceiling_sps:,.0f} samples/s",
        ),
        (
            "driver peak RSS N / 10N",
            f"{figs.driver_rss_n_mb:.0f} MB / {figs.driver_rss_10n_mb:.0f} MB "
            f"(ratio {figs.driver_rss_ratio:.2f})",
        ),
        (
            "model-only ceiling",
            f"{figs.model_only_sps:.2f} samples/s ({figs.model_only_samples} samples; 1 process: "
            f"{figs.model_only_single_sps:.2f}, "
            + ", ".join(f"{k} {v:.1f} s" for k, v in figs.model_only_breakdown_s.items())
            + f"; {figs.machine['cpus']} one-thread processes: {figs.model_only_parallel_sps:.2f})",
        ),
        (
            "pipeline end to end, N",
            f"{figs.pipeline_n_sps:.2f} samples/s ({n} in {figs.pipeline_n_wall_s:.1f} s)",
        ),
        (
            "pipeline end to end, 10N",
            f"{figs.pipeline_10n_sps:.2f} samples/s ({10 * n} in {figs.pipeline_10n_wall_s:.1f} s)",
        ),
        ("pipeline steady (N -> 10N)", f"{figs.pipeline_steady_sps:.2f} samples/s"),
        ("naive script", f"{figs.naive_sps:.2f} samples/s ({figs.naive_samples} samples)"),
        (
            "efficiency (pipeline / model-only)",
            f"{figs.efficiency:.2f} steady, {figs.efficiency_10n:.2f} end to end at 10N",
        ),
        (
            "speedup (pipeline / naive)",
            f"{figs.speedup:.1f}x steady, {figs.speedup_10n:.1f}x end to end at 10N",
        ),
        (
            "peak memory (PSS) N / 10N",
            f"{figs.pss_n_mb:.0f} MB / {figs.pss_10n_mb:.0f} MB (ratio {figs.memory_ratio:.2f})",
        ),
        (
            "peak summed RSS N / 10N",
            f"{figs.rss_n_mb:.0f} MB / {figs.rss_10n_mb:.0f} MB (ratio {figs.rss_ratio:.2f})",
        ),
    ]
    if figs.gpus:
        rows += [
            (
                "samples/s per GPU (steady)",
                f"{figs.steady_sps_per_gpu:.2f} on {figs.gpus} x {figs.machine['cuda']}",
            ),
            (
                "GPU utilisation",
                f"{figs.gpu_util_model_only_pct:.0f}% model-only, "
                f"{figs.gpu_util_pipeline_pct:.0f}% pipeline at 10N (peak {figs.gpu_mem_peak_mb:.0f} MB), "
                f"{figs.gpu_util_steady:.0%} steady (N -> 10N)",
            ),
        ]
    rows += flops_rows(figs)
    if figs.failed:
        rows.append(("failed (figures 0)", ", ".join(figs.failed)))
    width = max(len(k) for k, _ in rows)
    print(f"\n{'figure':<{width}}  value")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    data = {
        **asdict(figs),
        "efficiency": figs.efficiency,
        "efficiency_10n": figs.efficiency_10n,
        "speedup": figs.speedup,
        "speedup_10n": figs.speedup_10n,
        "memory_ratio": figs.memory_ratio,
        "rss_ratio": figs.rss_ratio,
        "steady_sps_per_gpu": figs.steady_sps_per_gpu,
        "driver_ms_per_sample": figs.driver_ms_per_sample,
        "driver_ceiling_sps": figs.driver_ceiling_sps,
        "driver_rss_ratio": figs.driver_rss_ratio,
        "samples_per_s_per_gpu": figs.samples_per_s_per_gpu,
        "mfu": figs.mfu,
        "mfu_10n": figs.mfu_10n,
        "mfu_model_only": figs.mfu_model_only,
        "mfu_stages": figs.mfu_stages,
        "gpu_util_mean": figs.gpu_util_mean,
        "gpu_util_steady": figs.gpu_util_steady,
        "pipeline": cfg.to_dict(),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(data, indent=2))
    print(f"\nfigures written to {args.json}")
    return 1 if figs.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
