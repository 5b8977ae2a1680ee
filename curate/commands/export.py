"""``curate export OUT --to DIR [--no-duplicates] [--samples-per-shard N]``"""

from __future__ import annotations

import argparse
import os
import sys

from curate.commands.ray_options import add_ray_options

EXIT_USAGE = 2


def register(sub: argparse._SubParsersAction) -> None:
    from curate.export import DEFAULT_SAMPLES_PER_SHARD

    p = sub.add_parser(
        "export",
        help="write the final training shards of a run (kept samples, resharded, duplicates left out)",
        description="Write the kept samples of a finished run as WebDataset tars DIR/00000.tar, "
        "00001.tar, ... (KEY.<ext>, KEY.txt, KEY.json exactly as OUT/shards/*.tar has them), N samples per "
        "tar, by Ray tasks. The training stage reads DIR as it reads OUT/shards. A rerun with the same "
        "options finishes an interrupted export or has nothing to do.",
    )
    p.add_argument("out", help="run output directory or fsspec URL")
    p.add_argument("--to", required=True, metavar="DIR", help="directory (or fsspec URL) for the tars")
    p.add_argument(
        "--no-duplicates",
        action="store_true",
        help="leave out every sample a curate dedup of the run names a duplicate (keeping each group's "
        "representative); needs curate dedup OUT first",
    )
    p.add_argument(
        "--samples-per-shard",
        type=int,
        default=DEFAULT_SAMPLES_PER_SHARD,
        metavar="N",
        help=f"samples per output tar (default {DEFAULT_SAMPLES_PER_SHARD:,}; the last tar holds the rest)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace another export already in DIR")
    add_ray_options(p, "export")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from curate.export import ExportError, check_export

    output = args.out if "://" in args.out else os.path.abspath(args.out)
    dest = args.to if "://" in args.to else os.path.abspath(args.to)
    try:
        check_export(output, dest, args.no_duplicates, args.samples_per_shard)
    except ExportError as exc:
        print(f"curate export: error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    from curate.commands.dedup import log_path
    from curate.progress import quiet_ray_output

    with quiet_ray_output(log_path(output, "export"), verbose=args.verbose) as (out, err, log):
        if log:
            print(f"curate export: Ray's own messages go to {log} (-v shows them here)", file=err)
        return _execute(args, output, dest, out, err)


def _execute(args: argparse.Namespace, output: str, dest: str, out, err) -> int:
    import ray

    from curate.commands.dedup import ray_failure
    from curate.export import ExportError, run_export
    from curate.pipeline import init_ray
    from curate.progress import Progress

    where = init_ray(args.ray_address, args.num_cpus, log_to_driver=args.verbose)
    print(f"curate export: {output} -> {dest} on {where}", file=err)
    progress = Progress("curate export", unit="samples", stream=err, enabled=not args.quiet)
    try:
        summary = run_export(
            output,
            dest,
            no_duplicates=args.no_duplicates,
            samples_per_shard=args.samples_per_shard,
            overwrite=args.overwrite,
            progress=progress,
        )
    except ExportError as exc:
        print(f"curate export: error: {exc}", file=err)
        return EXIT_USAGE
    except ray.exceptions.RayError as exc:
        print(f"curate export: error: a task failed: {ray_failure(exc)}", file=err)
        return 1
    if summary.up_to_date:
        print(f"curate export: nothing to do: {dest} already holds this export", file=out)
    else:
        progress.close()
    left = f", {summary.left_out:,} duplicates left out" if args.no_duplicates else ""
    print(
        f"curate export: {summary.samples:,} kept samples in {summary.shards:,} tar(s){left} -> {dest}"
        + (f" ({summary.written:,} written in {summary.wall_s:.1f}s)" if not summary.up_to_date else ""),
        file=out,
    )
    return 0
