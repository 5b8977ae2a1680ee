"""``curate query|stats|report``: look at a finished (or running) run's output.

Exit codes: 0 success, 2 for a bad run directory, bad SQL, a refused write or bad options.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

EXIT_USAGE = 2


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``query``, ``stats`` and ``report`` subcommands."""
    query = subparsers.add_parser(
        "query",
        help="read-only SQL (DuckDB) over a run's output",
        description=(
            "Run one read-only DuckDB query over OUT. Views: samples (one row per input sample) and "
            "candidates (one row per scored caption: key, shard, status, reason, candidate_index, source, "
            "text, itm_score, clip_score, kept, score, score_rank, is_best). Writes are refused; use --to "
            "to save the result."
        ),
    )
    query.add_argument("out", help="run output directory (holds samples/*.parquet)")
    query.add_argument(
        "sql", help='one SELECT-like statement, e.g. "SELECT status, count(*) FROM samples GROUP BY ALL"'
    )
    query.add_argument(
        "--format",
        choices=("table", "csv", "json", "jsonl", "parquet"),
        default=None,
        help="output format (default: table on the terminal; with --to, guessed from the file extension)",
    )
    query.add_argument("--to", metavar="FILE", help="write the result to FILE instead of stdout")
    query.add_argument(
        "--max-rows", type=int, default=100, help="rows shown in table format (0: all; default 100)"
    )
    query.add_argument("--max-width", type=int, default=60, help="cell width in table format (0: no limit)")
    query.set_defaults(func=cmd_query)

    stats = subparsers.add_parser(
        "stats", help="counts, keep rate, score quantiles, caption lengths, throughput"
    )
    stats.add_argument("out", help="run output directory")
    stats.add_argument("--json", action="store_true", help="print the statistics as JSON")
    stats.set_defaults(func=cmd_stats)

    report = subparsers.add_parser("report", help="self-contained HTML report with plots and image grids")
    report.add_argument("out", help="run output directory")
    report.add_argument("--compare", metavar="OTHER_OUT", help="a second run to show side by side")
    report.add_argument(
        "--output", "-o", metavar="FILE", help="where to write the page (default OUT/report.html)"
    )
    report.add_argument("--samples", type=int, default=24, help="images per grid (default 24)")
    report.set_defaults(func=cmd_report)


def _stdout_closed() -> int:
    """The reader went away (``curate query ... | head``): stop quietly, as cat does."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return 0


def _fail(command: str, message: str) -> int:
    print(f"curate {command}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def cmd_query(args: argparse.Namespace) -> int:
    """Run the query; table/CSV/JSON go to stdout, or any format to ``--to``."""
    import duckdb

    from curate import explore

    try:
        fmt = explore.export_format(args.format, args.to)
    except ValueError as exc:
        return _fail("query", str(exc))
    try:
        run = explore.open_run(args.out)
    except explore.RunOutputError as exc:
        return _fail("query", str(exc))
    if args.to:
        target = os.path.abspath(args.to)
        if target in run.sample_files or Path(target).parent == run.root / "samples":
            return _fail("query", f"refusing to write into the run's samples directory: {target}")
    if fmt == "parquet" and not args.to and sys.stdout.isatty():
        return _fail("query", "Parquet is binary: pass --to FILE or redirect stdout")
    con = None
    try:
        con = explore.connect(run)
        rel = explore.execute(con, args.sql)
        if args.to:
            explore.write_result(rel, fmt, args.to)
            print(f"wrote {os.path.abspath(args.to)}", file=sys.stderr)
        elif fmt == "table":
            print(explore.format_query_result(rel, max_rows=args.max_rows, max_width=args.max_width))
            sys.stdout.flush()
        else:
            sys.stdout.flush()
            explore.write_result_to_stream(rel, fmt, _binary_stdout())
            sys.stdout.flush()
    except BrokenPipeError:
        return _stdout_closed()
    except explore.ReadOnlyQueryError as exc:
        return _fail("query", str(exc))
    except duckdb.Error as exc:
        return _fail("query", str(exc))
    finally:
        if con is not None:
            con.close()
    return 0


class _TextWriter:
    """Binary writes onto a text stream (pytest's capture has no ``buffer``)."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def write(self, data: bytes) -> int:
        self.stream.write(data.decode("utf-8", errors="replace"))
        return len(data)


def _binary_stdout():
    buffer = getattr(sys.stdout, "buffer", None)
    return buffer if buffer is not None else _TextWriter(sys.stdout)


def cmd_stats(args: argparse.Namespace) -> int:
    """Print statistics as text or JSON."""
    import duckdb

    from curate import explore

    try:
        stats = explore.compute_stats(args.out)
    except explore.RunOutputError as exc:
        return _fail("stats", str(exc))
    except duckdb.Error as exc:
        return _fail("stats", f"could not read the samples Parquet: {exc}")
    try:
        if args.json:
            print(json.dumps(stats, indent=2, ensure_ascii=False, default=str))
        else:
            print(explore.format_stats(stats))
        sys.stdout.flush()
    except BrokenPipeError:
        return _stdout_closed()
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Write the HTML report and print its path."""
    import duckdb

    from curate import explore

    try:
        path = explore.write_report(
            args.out, compare=args.compare, output=args.output, max_samples=args.samples
        )
    except explore.RunOutputError as exc:
        return _fail("report", str(exc))
    except duckdb.Error as exc:
        return _fail("report", f"could not read the samples Parquet: {exc}")
    except RuntimeError as exc:
        return _fail("report", str(exc))
    print(path)
    return 0
