"""Query results to files and streams, with DuckDB's own writers (CSV, JSON, JSONL, Parquet)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO

import duckdb

from curate.explore.views import sql_string

_EXPORT_EXTENSIONS = {
    ".csv": "csv",
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
}


def export_format(fmt: str | None, dest: str | os.PathLike[str] | None) -> str:
    """The output format: the one asked for, else guessed from ``--to``'s extension."""
    if fmt and fmt != "table":
        return fmt
    if dest is not None:
        guessed = _EXPORT_EXTENSIONS.get(Path(dest).suffix.lower())
        if guessed:
            return guessed
        if fmt == "table":
            raise ValueError(
                f"cannot write a terminal table to a file: {dest} (use --format csv|json|parquet)"
            )
        raise ValueError(f"cannot tell the format of {dest} from its extension; pass --format")
    return fmt or "table"


def write_result(rel: duckdb.DuckDBPyRelation, fmt: str, dest: str | os.PathLike[str]) -> None:
    """Stream a result to a file with DuckDB's own writers.

    The copy runs on a second, empty connection that only sees the result stream, so the
    locked connection that ran the user's SQL never gets write access.
    """
    options = {
        "csv": "FORMAT csv, HEADER true",
        "json": "FORMAT json, ARRAY true",
        "jsonl": "FORMAT json",
        "parquet": "FORMAT parquet",
    }
    if fmt not in options:
        raise ValueError(f"unknown export format {fmt!r}; choose from {', '.join(options)}")
    reader = rel.to_arrow_reader()
    writer = duckdb.connect(":memory:")
    try:
        writer.register("query_result", reader)
        path = os.path.abspath(os.fspath(dest))
        writer.execute(f"COPY query_result TO {sql_string(path)} ({options[fmt]})")
    finally:
        writer.close()


def write_result_to_stream(rel: duckdb.DuckDBPyRelation, fmt: str, stream: BinaryIO) -> None:
    """Write a result to a binary stream (stdout) through a private temporary file."""
    with tempfile.TemporaryDirectory(prefix="curate-query-") as tmp:
        path = os.path.join(tmp, f"result.{fmt}")
        write_result(rel, fmt, path)
        with open(path, "rb") as f:
            shutil.copyfileobj(f, stream)
