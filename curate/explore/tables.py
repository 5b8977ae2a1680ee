"""Plain-text tables for a terminal, safe for untrusted web text, and the number formats
the terminal and HTML tables share."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from typing import Any

import duckdb
import pyarrow as pa

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def terminal_safe(text: str) -> str:
    """Untrusted web text must not move the cursor or recolour the terminal."""
    return _CONTROL.sub(lambda m: _ESCAPES.get(m.group(), f"\\x{ord(m.group()):02x}"), text)


def _cell(value: Any, max_width: int) -> str:
    if value is None:
        text = "NULL"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, bytes):
        text = f"<{len(value)} bytes>"
    elif isinstance(value, (list, dict)):
        text = json.dumps(value, ensure_ascii=False, default=str)
    else:
        text = str(value)
    text = terminal_safe(text)
    if max_width > 0 and len(text) > max_width:
        text = text[: max(max_width - 1, 1)] + "…"
    return text


def text_table(
    headers: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    right: Sequence[bool] | None = None,
    max_width: int = 60,
) -> str:
    """Aligned plain-text table; ``right`` marks numeric columns."""
    cells = [[_cell(v, max_width) for v in row] for row in rows]
    heads = [_cell(h, max_width) for h in headers]
    widths = [len(h) for h in heads]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row)]
    right = list(right) if right is not None else [False] * len(heads)

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right)]
        return " | ".join(parts).rstrip()

    out = [line(heads), "-+-".join("-" * w for w in widths)]
    out.extend(line(row) for row in cells)
    return "\n".join(out)


def _is_numeric(arrow_type: pa.DataType) -> bool:
    return (
        pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type) or pa.types.is_decimal(arrow_type)
    )


def format_query_result(rel: duckdb.DuckDBPyRelation, *, max_rows: int = 100, max_width: int = 60) -> str:
    """Render a result as a terminal table, streaming so a huge result is only counted."""
    reader = rel.to_arrow_reader()
    schema = reader.schema
    rows: list[list[Any]] = []
    total = 0
    for batch in reader:
        total += batch.num_rows
        room = max_rows - len(rows) if max_rows > 0 else batch.num_rows
        if room > 0:
            part = batch.slice(0, room).to_pylist()
            rows.extend([record[name] for name in schema.names] for record in part)
    right = [_is_numeric(field.type) for field in schema]
    body = text_table(schema.names, rows, right=right, max_width=max_width)
    if len(rows) < total:
        footer = f"({total:,} rows, first {len(rows):,} shown; use --max-rows 0 or --format csv for all)"
    else:
        footer = f"({total:,} row{'s' if total != 1 else ''})"
    return f"{body}\n{footer}"


def fmt_pct(n: int, total: int) -> str:
    """``n`` as a share of ``total`` with one decimal, ``-`` for an empty total."""
    return f"{100.0 * n / total:.1f}%" if total else "-"


def fmt_num(value: Any) -> str:
    """A figure for a table cell: thousands separators, 4 significant digits, ``-`` for none."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
