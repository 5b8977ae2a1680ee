"""Look inside a run's output: read-only SQL, summary statistics and an HTML report.

A run directory holds ``samples/*.parquet`` (one row per input sample, see
:mod:`curate.schema`), ``shards/*.tar`` (the curated WebDataset) and ``manifest.json``.
Everything here only reads it. One module per role:

- :mod:`~curate.explore.views`: the run directory, the ``samples`` and ``candidates``
  DuckDB views and the locked, read-only connection (``curate query``);
- :mod:`~curate.explore.export`: query results to CSV, JSON, JSONL or Parquet;
- :mod:`~curate.explore.tables`: terminal tables safe for untrusted text;
- :mod:`~curate.explore.stats`: counts, reasons, score quantiles, lengths (``curate stats``);
- :mod:`~curate.explore.thumbnails`: sample images read back from the input and curated tars;
- :mod:`~curate.explore.plots`: the report's histograms and charts;
- :mod:`~curate.explore.report`: the self-contained HTML page (``curate report``).
"""

from __future__ import annotations

from curate.explore.export import export_format, write_result, write_result_to_stream
from curate.explore.report import GRIDS, render_report, write_report
from curate.explore.stats import compute_stats, format_stats
from curate.explore.tables import format_query_result, text_table
from curate.explore.thumbnails import Thumbnail, load_thumbnails
from curate.explore.views import (
    CANDIDATES_VIEW_SQL,
    SAMPLES_VIEW_SQL,
    SCORE_SQL,
    ReadOnlyQueryError,
    RunOutput,
    RunOutputError,
    connect,
    execute,
    open_run,
    run_query,
    samples_view_sql,
)

__all__ = [
    "CANDIDATES_VIEW_SQL",
    "GRIDS",
    "SAMPLES_VIEW_SQL",
    "SCORE_SQL",
    "ReadOnlyQueryError",
    "RunOutput",
    "RunOutputError",
    "Thumbnail",
    "compute_stats",
    "connect",
    "execute",
    "export_format",
    "format_query_result",
    "format_stats",
    "load_thumbnails",
    "open_run",
    "render_report",
    "run_query",
    "samples_view_sql",
    "text_table",
    "write_report",
    "write_result",
    "write_result_to_stream",
]
