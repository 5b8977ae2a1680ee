"""Command line: ``curate run|ingest|data|query|stats|report|dedup|export``.

Entry points parse arguments; library code takes typed arguments. Each subcommand
module exposes ``register(subparsers)`` and sets ``func`` on its parser; imports stay
lazy so ``curate --help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module that registers it
SUBCOMMANDS = {
    "run": "curate.commands.run",
    "ingest": "curate.commands.ingest",
    "data": "curate.commands.data",
    "query": "curate.commands.explore",
    "stats": "curate.commands.explore",
    "report": "curate.commands.explore",
    "dedup": "curate.commands.dedup",
    "export": "curate.commands.export",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="curate", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    seen: set[str] = set()
    for module_name in SUBCOMMANDS.values():
        if module_name in seen:
            continue
        seen.add(module_name)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("curate.commands"):
                continue  # subcommand not part of this installation
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
