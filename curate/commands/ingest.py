"""``curate ingest URLS --output DIR``: download a URL + alt-text list with img2dataset."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from curate.config import URL_LIST_FORMATS, IngestConfig, IngestResources

_DEFAULTS = IngestConfig()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ingest",
        help="download a URL + alt-text list into WebDataset shards (img2dataset)",
        description="Download a URL list (parquet, csv, tsv, jsonl, json or txt; LAION, DataComp, CC12M) "
        "with img2dataset into WebDataset shards that `curate run` reads. Inside `ray job submit` "
        "(or with RAY_ADDRESS) the downloads run on the Ray cluster, else in local processes. A rerun "
        "downloads only unfinished shards. Needs: pip install 'curate[img2dataset]'.",
    )
    p.add_argument("urls", help="URL list file, or a directory of list files of one format")
    p.add_argument("--output", "-o", required=True, help="output directory or fsspec URL for the shards")
    p.add_argument(
        "--input-format", choices=URL_LIST_FORMATS, default=None, help="default: from the file name"
    )
    p.add_argument("--url-col", default=_DEFAULTS.url_col, help="URL column (LAION: URL)")
    p.add_argument(
        "--caption-col",
        default=_DEFAULTS.caption_col,
        help="alt-text column (LAION: TEXT); '' for none; default %(default)s",
    )
    p.add_argument("--image-size", type=int, default=_DEFAULTS.image_size, help="default %(default)s")
    p.add_argument(
        "--resize-mode",
        choices=["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"],
        default=_DEFAULTS.resize_mode,
        help="default %(default)s",
    )
    p.add_argument(
        "--resize-always",
        action="store_true",
        help="also upscale images smaller than --image-size (default: only shrink bigger ones)",
    )
    p.add_argument("--encode-format", choices=["jpg", "png", "webp"], default=_DEFAULTS.encode_format)
    p.add_argument("--min-image-size", type=int, default=_DEFAULTS.min_image_size)
    p.add_argument(
        "--timeout", type=float, default=_DEFAULTS.timeout, help="seconds per request; default %(default)s"
    )
    p.add_argument("--retries", type=int, default=_DEFAULTS.retries, help="default %(default)s")
    p.add_argument("--samples-per-shard", type=int, default=_DEFAULTS.samples_per_shard)
    p.add_argument("--processes", type=int, default=None, help="download processes (default: one per CPU)")
    p.add_argument("--threads", type=int, default=_DEFAULTS.resources.threads, help="threads per process")
    p.add_argument(
        "--distributor",
        choices=["auto", "multiprocessing", "ray"],
        default=_DEFAULTS.resources.distributor,
        help="auto: ray inside a Ray job (RAY_JOB_ID / RAY_ADDRESS set), else multiprocessing",
    )
    p.add_argument("--ray-address", default=None, help="Ray cluster for --distributor ray")
    p.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="show img2dataset's and Ray's own output here instead of in OUTPUT/_logs/ingest-TIMESTAMP.log",
    )
    p.add_argument(
        "--incremental-mode",
        choices=["incremental", "overwrite", "extend"],
        default=_DEFAULTS.incremental_mode,
        help="incremental: skip finished shards (default); overwrite: start fresh; extend: add new shards",
    )
    p.add_argument("--user-agent-token", default=_DEFAULTS.user_agent_token, help="default %(default)s")
    p.add_argument(
        "--ignore-opt-out-headers",
        action="store_true",
        help="download even when X-Robots-Tag says noai/noimageai/noindex/noimageindex",
    )
    p.set_defaults(func=cmd_ingest)


def cmd_ingest(args: argparse.Namespace) -> int:
    from curate.config import ConfigError
    from curate.ingest import IngestError, MissingExtraError, plan_ingest, run_ingest

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = IngestConfig(
        input_format=args.input_format,
        url_col=args.url_col,
        caption_col=args.caption_col or None,
        image_size=args.image_size,
        resize_mode=args.resize_mode,
        resize_only_if_bigger=not args.resize_always,
        encode_format=args.encode_format,
        min_image_size=args.min_image_size,
        timeout=args.timeout,
        retries=args.retries,
        samples_per_shard=args.samples_per_shard,
        resources=IngestResources(
            processes=args.processes, threads=args.threads, distributor=args.distributor
        ),
        incremental_mode=args.incremental_mode,
        user_agent_token=args.user_agent_token,
        respect_opt_out_headers=not args.ignore_opt_out_headers,
    )
    try:
        cfg._validate("ingest")
        plan = plan_ingest(args.urls, args.output, cfg)
    except (ConfigError, IngestError, MissingExtraError) as exc:
        print(f"curate ingest: error: {exc}", file=sys.stderr)
        return 2
    from curate.progress import Progress, quiet_ray_output

    stamp = time.strftime("%Y%m%d-%H%M%S")
    log = f"{plan.output}/_logs/ingest-{stamp}.log" if "://" not in plan.output else None
    with quiet_ray_output(log, verbose=args.verbose) as (out, err, log_path):
        print(
            f"curate ingest: {plan.urls} URLs in {len(plan.files)} list file(s) -> {len(plan.expected)} "
            f"shard(s) in {plan.output}, {len(plan.todo)} to download",
            file=err,
        )
        if log_path:
            print(
                f"curate ingest: img2dataset's and Ray's output go to {log_path} (-v shows them here)",
                file=err,
            )
        progress = Progress("curate ingest", unit="URLs", stream=err)
        result = run_ingest(plan, ray_address=args.ray_address, progress=progress)
        progress.close()
        for line in result.summary_lines():
            print(f"curate ingest: {line}", file=out)
        if not result.complete:
            return 1
        print(
            f"curate ingest: next: curate run PIPELINE --input '{result.shard_glob}' --output OUT", file=out
        )
        return 0
