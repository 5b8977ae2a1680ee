"""The options every command that runs on Ray shares: where Ray is, and what it prints."""

from __future__ import annotations

import argparse


def add_ray_options(
    parser: argparse.ArgumentParser,
    log_name: str,
    quiet_help: str = "no progress lines",
    ray_output: str = "Ray's own output",
) -> None:
    """``--ray-address``, ``--num-cpus``, ``--quiet`` and ``--verbose``, one wording for every command.

    ``log_name`` names the log Ray's output goes to without ``--verbose``
    (``OUT/_logs/LOG_NAME-TIMESTAMP.log``, as ``curate.commands.dedup.log_path`` writes it).
    """
    parser.add_argument(
        "--ray-address", default=None, help="Ray cluster to join (default: RAY_ADDRESS or embedded)"
    )
    parser.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of the embedded Ray")
    parser.add_argument("--quiet", "-q", action="store_true", help=quiet_help)
    parser.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help=f"show {ray_output} here instead of in OUT/_logs/{log_name}-TIMESTAMP.log",
    )
