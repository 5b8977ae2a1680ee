"""``curate run PIPELINE --input ... --output ...``"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time

from curate.commands.ray_options import add_ray_options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="curate WebDataset shards with a pipeline file",
        description="Run a pipeline over input shards. Locally it starts an embedded Ray; "
        "inside `ray job submit` (or with --ray-address / RAY_ADDRESS) it joins the cluster.",
    )
    p.add_argument("pipeline", help="pipeline YAML file, e.g. pipelines/blip2.yaml")
    p.add_argument(
        "--input",
        "-i",
        action="append",
        default=None,
        help="input tars: paths, globs, brace ranges 'shards/{00000..00099}.tar' or fsspec URLs; repeatable. "
        "Or one URL list (.parquet/.csv/.tsv/.jsonl/.json/.txt): downloaded into OUT/_ingest with "
        "img2dataset (the pipeline's ingest section), then curated. Default: the pipeline's ingest.urls",
    )
    p.add_argument("--output", "-o", required=True, help="output directory or fsspec URL")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a pipeline field, e.g. --set captioner.num_captions=5 (YAML values); repeatable",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="delete this output's previous results and start fresh"
    )
    add_ray_options(
        p,
        "run",
        quiet_help="no progress and no per-shard lines",
        ray_output="Ray's own output (its progress dumps, warnings, workers' output)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="load and check the pipeline, resolve its models and inputs, print the plan "
        "(stages, actors and their resources, models, shards to do and done); start nothing, write nothing",
    )
    p.set_defaults(func=cmd_run)


def looks_like_path(value: str) -> bool:
    """A model value that cannot be a Hugging Face id ('name' or 'namespace/name')."""
    return value.startswith((".", "/", "~")) or value.count("/") >= 2 or "\\" in value or value.endswith("/")


def resolve_local_models(cfg, pipeline_path: str, overridden: frozenset[str] = frozenset()) -> None:
    """Make every local model path absolute, so actors on any node and in any directory find it.

    A relative path in the pipeline file is looked up against the file's own directory,
    then the current one; a ``--set`` value (a section in ``overridden``) against the
    current directory first. A value that is not found stays a Hugging Face id, unless it
    can only be a path: that raises ConfigError naming the field and every path tried,
    before any work starts.
    """
    from curate.config import PACKAGED_PREFIX, ConfigError

    here = os.getcwd()
    beside = os.path.dirname(os.path.abspath(pipeline_path))
    for name, m in {**cfg.models(), **cfg.heads()}.items():  # heads: weights inside another actor
        value = m.model
        if value.startswith(PACKAGED_PREFIX):
            continue
        expanded = os.path.expanduser(value)
        if os.path.isabs(expanded):
            tried = [expanded]
        else:
            bases = (here, beside) if name in overridden else (beside, here)
            tried = list(dict.fromkeys(os.path.join(b, expanded) for b in bases))
        found = next((t for t in tried if os.path.exists(t)), None)
        if found is not None:
            m.model = os.path.abspath(found)
        elif os.path.isabs(expanded) or looks_like_path(value):
            raise ConfigError(
                f"{name}.model: {value!r} is a local path that does not exist (tried {', '.join(tried)})"
            )


def overridden_sections(overrides: list[str]) -> frozenset[str]:
    """The sections whose ``model`` a ``--set`` gives: their paths are the command line's."""
    from curate.config import parse_override

    return frozenset(path[0] for path, _ in map(parse_override, overrides) if path[-1] == "model")


def url_list_input(inputs: list[str] | None, cfg) -> str | None:
    """The URL list to download before curating, or None when the inputs are tars."""
    from curate.ingest import is_url_list
    from curate.io.reader import InputError

    if not inputs:
        if cfg.ingest is not None and cfg.ingest.urls:
            return cfg.ingest.urls
        raise InputError("--input is required (tars or a URL list) unless the pipeline sets ingest.urls")
    lists = [s for s in inputs if is_url_list(s)]
    if lists and len(inputs) > 1:
        raise InputError(f"a URL list is curated on its own; got {len(inputs)} inputs: {', '.join(inputs)}")
    return lists[0] if lists else None


def gpu_shortfall(cfg) -> str | None:
    """Stages that declare GPUs on a cluster that has none would wait forever: say so."""
    import ray

    need = {name: m.resources.num_gpus for name, m in cfg.models().items() if m.resources.num_gpus > 0}
    if not need:
        return None
    have = ray.cluster_resources().get("GPU", 0)
    if have > 0:
        return None
    stages = ", ".join(f"{n}.resources.num_gpus={g:g}" for n, g in need.items())
    fix = " ".join(f"--set {n}.resources.num_gpus=0 --set {n}.resources.device=cpu" for n in need)
    return f"the pipeline declares GPUs ({stages}) but the Ray cluster has none; to run on CPU: {fix}"


def cmd_run(args: argparse.Namespace) -> int:
    from curate.config import ConfigError, IngestConfig, load_pipeline
    from curate.ingest import INGEST_DIR, IngestError, MissingExtraError, plan_ingest
    from curate.io.reader import InputError, resolve_inputs, shard_refs

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # fail on bad configuration and inputs before any work starts
    try:
        cfg = load_pipeline(args.pipeline, args.overrides)
        resolve_local_models(cfg, args.pipeline, overridden_sections(args.overrides))
        url_list = url_list_input(args.input, cfg)
        inputs = None if url_list else resolve_inputs(args.input)
    except (ConfigError, InputError) as exc:
        print(f"curate run: error: {exc}", file=sys.stderr)
        return 2
    urls = inputs.urls if inputs is not None else []
    if inputs is not None and inputs.skipped_note():
        print(f"curate run: {inputs.skipped_note()}", file=sys.stderr)
    output = args.output
    in_job = bool(os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_JOB_SUBMISSION_ID"))
    if "://" not in output:
        if in_job and not os.path.isabs(output):
            print(
                f"curate run: warning: relative --output {output!r} inside a Ray job resolves against "
                f"the job's unpacked working dir ({os.getcwd()}); pass an absolute path or a URL",
                file=sys.stderr,
            )
        output = os.path.abspath(output)
    plan = None
    if url_list:
        try:
            plan = plan_ingest(url_list, f"{output.rstrip('/')}/{INGEST_DIR}", cfg.ingest or IngestConfig())
        except (IngestError, MissingExtraError) as exc:
            print(f"curate run: error: {exc}", file=sys.stderr)
            return 2

    if args.dry_run:
        from curate.plan import print_plan

        return print_plan(cfg, args.pipeline, shard_refs(urls), output, url_list, args.overwrite)

    from curate.progress import quiet_ray_output

    stamp = time.strftime("%Y%m%d-%H%M%S")
    local = "://" not in output
    log = (
        f"{output}/_logs/run-{stamp}.log"
        if local
        else os.path.join(tempfile.gettempdir(), f"curate-run-{stamp}.log")
    )
    with quiet_ray_output(log, verbose=args.verbose) as (out, err, log_path):
        if log_path:
            print(f"curate run: Ray's own messages go to {log_path} (-v shows them here)", file=err)
        return _execute(args, cfg, plan, urls, output, out, err)


def _execute(args: argparse.Namespace, cfg, plan, urls: list[str], output: str, out, err) -> int:
    """Start or join Ray, download a URL list if given, run, and report on ``out``/``err``."""
    from curate.ingest import run_ingest
    from curate.io.reader import shard_refs
    from curate.pipeline import OutputConflictError, init_ray, run_pipeline
    from curate.progress import Progress

    started = time.time()
    where = init_ray(args.ray_address, args.num_cpus, log_to_driver=args.verbose)
    problem = gpu_shortfall(cfg)
    if problem:
        if where.startswith("embedded"):
            print(f"curate run: error: {problem}", file=err)
            return 2
        print(f"curate run: warning: {problem}; waiting for the autoscaler to add GPU nodes", file=err)
    if plan is not None:
        downloads = Progress("curate run: ingest", unit="URLs", stream=err, enabled=not args.quiet)
        ingested = run_ingest(plan, ray_address=args.ray_address, progress=downloads)
        downloads.close()
        for line in ingested.summary_lines():
            print(f"curate run: ingest: {line}", file=err)
        if not ingested.complete:
            print("curate run: error: the download is incomplete; nothing curated", file=err)
            return 1
        urls = ingested.shards
    shards = shard_refs(urls)
    print(f"curate run: pipeline {cfg.name!r}, {len(shards)} shard(s) -> {output} on {where}", file=err)

    progress = Progress("curate run", unit="samples", stream=err, enabled=not args.quiet)

    def on_shard(meta: dict) -> None:
        fault = f"  FAULT: {meta['fault']}" if meta.get("fault") else ""
        progress.note(
            f"  shard {meta['shard']}: {meta['samples']} samples, kept {meta['kept']}, "
            f"dropped {meta['dropped']}, error {meta['error']}{fault}"
        )

    try:
        result = run_pipeline(
            cfg, shards, output, overwrite=args.overwrite, on_shard=on_shard, progress=progress
        )
    except OutputConflictError as exc:
        print(f"curate run: error: {exc}", file=err)
        return 2
    if not result.nothing_to_do:
        progress.close()
    if result.nothing_to_do:
        print(
            f"curate run: nothing to do: all {result.shards_total} shard(s) are already in {output} "
            "(--overwrite starts fresh)",
            file=out,
        )
    else:
        print(
            f"curate run: done in {time.time() - started:.1f}s: "
            f"{result.shards_processed} shard(s) processed, "
            f"{result.shards_skipped} already done; {result.samples_processed} samples at "
            f"{result.samples_per_s:.2f} samples/s",
            file=out,
        )
    c = result.counts
    print(
        f"curate run: totals kept={c.get('kept', 0)} dropped={c.get('dropped', 0)} error={c.get('error', 0)} "
        f"of {c.get('total', 0)}; samples: {output}/samples/*.parquet, curated shards: {output}/shards/*.tar",
        file=out,
    )
    if result.all_unreadable:
        print(
            f"curate run: error: every shard was unreadable: {', '.join(result.unreadable_shards)} "
            f"(see {output}/manifest.json)",
            file=err,
        )
        return 1
    return 0
