"""``curate dedup OUT [--method exact|phash|semantic] [--threshold X]``"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from curate.commands.ray_options import add_ray_options

EXIT_USAGE = 2


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "dedup",
        help="group duplicate images across a finished run (exact bytes, perceptual hash, or embeddings)",
        description="Find groups of duplicate images over every sample of a finished run that has an "
        "image, kept and dropped, on Ray (embedded, or the cluster of --ray-address / RAY_ADDRESS), and "
        "write them to OUT/dedup/METHOD/. curate query's samples view then has duplicate_of (the group's "
        "representative: its kept sample with the best caption score) and duplicate_method; curate export "
        "--no-duplicates leaves the duplicates out. A rerun over the same samples with the same options has "
        "nothing to do; an interrupted one resumes.",
    )
    p.add_argument("out", help="run output directory or fsspec URL (holds samples/*.parquet)")
    p.add_argument(
        "--method",
        choices=("exact", "phash", "semantic"),
        default="exact",
        help="exact: equal image bytes (image_sha256); phash: perceptual hashes within --threshold bits "
        "(resized and re-encoded copies); semantic: SemDeDup over the run's image embeddings "
        "(OUT/embeddings, written with --set output.write_embeddings=true). Default: exact",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="phash: most differing bits of 64 (default 4); semantic: least cosine similarity "
        "(default 0.95); not for exact",
    )
    p.add_argument(
        "--clusters", type=int, default=None, help="semantic: k-means clusters (default: sqrt of the samples)"
    )
    add_ray_options(p, "dedup")
    p.set_defaults(func=cmd_dedup)


def log_path(output: str, command: str) -> str:
    """Where Ray's own output goes: OUT/_logs for a local run, else the temp dir."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if "://" in output:
        return os.path.join(tempfile.gettempdir(), f"curate-{command}-{stamp}.log")
    return f"{output}/_logs/{command}-{stamp}.log"


def ray_failure(exc: BaseException) -> str:
    """The first line of what went wrong inside a Ray task (its own exception, not Ray's wrapping)."""
    cause: BaseException | None = exc
    while cause is not None and (cause.__cause__ is not None or getattr(cause, "cause", None) is not None):
        cause = cause.__cause__ or cause.cause
    text = str(cause or exc).strip().splitlines()
    return f"{type(cause or exc).__name__}: {text[-1] if text else ''}"


def cmd_dedup(args: argparse.Namespace) -> int:
    from curate.dedup.results import DedupError
    from curate.dedup.run import finished_result, prepare

    output = args.out if "://" in args.out else os.path.abspath(args.out)
    try:  # everything that can be known before Ray starts
        threshold, _, _, plan = prepare(output, args.method, args.threshold, args.clusters)
    except DedupError as exc:
        print(f"curate dedup: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    done = finished_result(output, args.method, plan)
    if done is not None:  # the same samples and options: nothing to start Ray for
        _report(output, done, sys.stdout, sys.stderr)
        return 0

    from curate.progress import quiet_ray_output

    with quiet_ray_output(log_path(output, "dedup"), verbose=args.verbose) as (out, err, log):
        if log:
            print(f"curate dedup: Ray's own messages go to {log} (-v shows them here)", file=err)
        return _execute(args, output, threshold, out, err)


def _execute(args: argparse.Namespace, output: str, threshold: float | None, out, err) -> int:
    import ray

    from curate.dedup.results import DedupError
    from curate.dedup.run import run_dedup
    from curate.pipeline import init_ray
    from curate.progress import Progress

    where = init_ray(args.ray_address, args.num_cpus, log_to_driver=args.verbose)
    shown = f" (threshold {threshold:g})" if threshold is not None else ""
    print(f"curate dedup: {args.method}{shown} over {output} on {where}", file=err)
    progress = Progress(f"curate dedup {args.method}", unit="steps", stream=err, enabled=not args.quiet)
    try:
        summary = run_dedup(output, args.method, threshold, clusters=args.clusters, progress=progress)
    except DedupError as exc:
        print(f"curate dedup: error: {exc}", file=err)
        return EXIT_USAGE
    except ray.exceptions.RayError as exc:
        print(f"curate dedup: error: a task failed: {ray_failure(exc)}", file=err)
        return 1
    if not summary.up_to_date:
        progress.close()
    _report(output, summary, out, err)
    return 0


def _report(output: str, summary, out, err) -> None:
    """What was found, and how to look at it."""
    if summary.up_to_date:
        print(
            f"curate dedup: nothing to do: {summary.directory} is up to date (same samples and options)",
            file=out,
        )
    share = f" ({100 * summary.duplicates / summary.samples:.1f}%)" if summary.samples else ""
    print(
        f"curate dedup: {summary.method}: {summary.samples:,} samples compared, {summary.groups:,} groups "
        f"holding {summary.in_groups:,}, {summary.duplicates:,} duplicates{share} -> {summary.directory}"
        + (f" in {summary.wall_s:.1f}s" if not summary.up_to_date else ""),
        file=out,
    )
    if summary.details.get("without_phash"):
        print(
            f"curate dedup: warning: {summary.details['without_phash']:,} decoded samples have no "
            "image_phash (shards written before curate kept one) and were not compared; rerun them with "
            "--overwrite",
            file=err,
        )
    print(
        f'curate dedup: see them with: curate query {output} "SELECT shard, key, duplicate_of FROM samples '
        'WHERE duplicate_of IS NOT NULL"',
        file=out,
    )
