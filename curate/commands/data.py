"""``curate data fetch NAME --output DIR``: real image/alt-text data from Debian packages.

Argument parsing only: the flags become a :class:`curate.data.fetch.FetchOptions`; the
work is in :mod:`curate.data` (imported lazily so ``curate --help`` stays fast). The
defaults below repeat ``FetchOptions``'s for the help text; a test keeps them equal.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

DATASET_HELP = {
    "tuxpaint": "tuxpaint-stamps-default: ~950 human-captioned stamps, split train/val/test (seed set)",
    "openclipart": "openclipart-png + openclipart-svg: ~8,100 clip-art images, SVG dc:title alt-text "
    "(noisy web-like set)",
    "emoji": "emoji-datasource-twitter (npm): ~1,900 Twemoji PNGs with their Unicode names (held-out "
    "evaluation domain)",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``data`` with its ``fetch`` subcommand."""
    data = subparsers.add_parser("data", help="fetch real image/alt-text datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    epilog = "datasets:\n" + "\n".join(f"  {n:12s} {h}" for n, h in DATASET_HELP.items())
    fetch = data_sub.add_parser(
        "fetch",
        help="download a Debian-packaged dataset and write img2dataset-style WebDataset shards",
        description="Download (apt-get download + dpkg-deb -x, cached) or read an extracted package "
        "and write img2dataset-style shards: NNNNN.tar (+ .parquet, _stats.json) in DIR (openclipart) "
        "or DIR/{train,val,test} (tuxpaint), with counts of everything written or skipped in "
        "DIR/_fetch_report.json. A rerun over unchanged inputs reuses the output.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fetch.add_argument("name", metavar="NAME", help="dataset: " + ", ".join(DATASET_HELP))
    fetch.add_argument("--output", "-o", required=True, type=Path, metavar="DIR", help="output directory")
    fetch.add_argument(
        "--source",
        action="append",
        type=Path,
        default=None,
        metavar="DIR",
        help="already-extracted package root (repeatable, e.g. the two openclipart roots); skips apt",
    )
    fetch.add_argument(
        "--cache",
        type=Path,
        default=Path("~/.cache/curate/debs"),
        metavar="DIR",
        help="where .deb files are downloaded and extracted (default: %(default)s)",
    )
    fetch.add_argument(
        "--shard-size", type=int, default=1000, metavar="N", help="samples per tar (default: %(default)s)"
    )
    fetch.add_argument(
        "--limit", type=int, default=None, metavar="N", help="only the first N items (sorted by path)"
    )
    fetch.add_argument(
        "--max-side",
        type=int,
        metavar="N",
        default=1024,
        help="downscale images whose long side exceeds this (0: never; default: %(default)s)",
    )
    fetch.add_argument(
        "--max-pixels",
        type=int,
        metavar="N",
        default=1 << 30,
        help="skip images with more pixels than this as too_large (default: %(default)s)",
    )
    fetch.add_argument(
        "--rasterize-svg",
        action="store_true",
        help="render SVG-only items with cairosvg instead of skipping them (needs cairosvg + libcairo)",
    )
    fetch.add_argument(
        "--workers",
        type=int,
        metavar="N",
        default=os.cpu_count() or 1,
        help="threads decoding/resizing images; output does not depend on it (default: %(default)s)",
    )
    fetch.add_argument(
        "--force",
        action="store_true",
        help="rewrite the shards even when DIR already holds them for the same inputs and options",
    )
    fetch.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    fetch.set_defaults(func=run_fetch)


def run_fetch(args: argparse.Namespace) -> int:
    """Run a fetch; exit 2 for usage errors (unknown dataset, missing source, bad option), 1 if it fails."""
    from curate.data.fetch import DATASETS, FetchError, FetchOptions, OptionError, fetch_dataset

    if args.name not in DATASETS:
        known = "\n".join(f"  {n}: {DATASET_HELP.get(n, DATASETS[n].description)}" for n in DATASETS)
        print(f"curate data fetch: unknown dataset {args.name!r}; known datasets:\n{known}", file=sys.stderr)
        return 2
    for source in args.source or []:
        if not source.is_dir():
            print(f"curate data fetch: --source directory does not exist: {source}", file=sys.stderr)
            return 2
    try:
        options = FetchOptions(
            shard_size=args.shard_size,
            max_side=args.max_side,
            limit=args.limit,
            rasterize_svg=args.rasterize_svg,
            max_pixels=args.max_pixels,
            workers=args.workers,
            force=args.force,
        )
    except OptionError as exc:
        print(f"curate data fetch: --{exc.option.replace('_', '-')} {exc.message}", file=sys.stderr)
        return 2

    def progress(done: int, total: int) -> None:
        if done == total or done % 500 == 0:
            print(f"  {args.name}: {done}/{total} items", file=sys.stderr, flush=True)

    started = time.monotonic()
    try:
        report = fetch_dataset(
            args.name,
            args.output,
            options,
            sources=args.source,
            cache=args.cache,
            progress=None if args.quiet else progress,
        )
    except FetchError as exc:
        print(f"curate data fetch: {exc}", file=sys.stderr)
        # a source tree without the package layout is a usage error, like a missing --source
        return 2 if args.source else 1
    print(report.summary())
    print(f"  took {time.monotonic() - started:.1f}s")
    counts = {"found": report.found, "written": report.written, "skipped": report.skipped}
    print("  " + json.dumps(counts, sort_keys=True))
    return 0
