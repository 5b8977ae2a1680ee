"""One progress display for every long loop: `curate run`, `curate ingest`, `curate dedup`
and the training scripts.

On a terminal it is one live line (done of total, rate, counts so far, ETA) redrawn in
place, with a line printed above it for each finished unit (a shard, an epoch); in a
log (a file, a pipe, `ray job logs`) the same line is printed every ``every_s`` seconds
instead, so logs stay short. The CLI sends Ray's own output to a log file
(:func:`quiet_ray_output`) so that this is all the console shows.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TextIO


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class Progress:
    """``update`` as work is done, ``note`` a line per finished unit, ``close`` at the end.

    ``total`` may be unknown (None) or an estimate that ``update(total=...)`` refines;
    ``counts`` (kept, dropped, error, or a loss) are shown in the order first given.
    """

    def __init__(
        self,
        label: str,
        total: float | None = None,
        unit: str = "samples",
        stream: TextIO | None = None,
        every_s: float = 10.0,
        live: bool | None = None,
        enabled: bool = True,
    ) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.stream = stream or sys.stderr
        self.every_s = every_s
        self.live = self.stream.isatty() if live is None else live
        self.enabled = enabled
        self.done = 0.0
        self.counts: dict[str, float] = {}
        self.started = time.monotonic()
        self._last_print = self.started
        self._printed: tuple | None = None  # (done, total, counts) of the last line a log got
        self._drawn = False

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        total = f" of {self.total:,.0f}" if self.total else ""
        parts = [f"{self.label}: {self.done:,.0f}{total} {self.unit}", f"{self.rate:,.2f} {self.unit}/s"]
        if self.counts:
            parts.append(" ".join(f"{k} {_fmt(v)}" for k, v in self.counts.items()))
        if self.total and self.rate > 0 and self.done < self.total:
            parts.append(f"ETA {_duration((self.total - self.done) / self.rate)}")
        parts.append(f"elapsed {_duration(time.monotonic() - self.started)}")
        return " | ".join(parts)

    def update(
        self, done: float = 0, counts: Mapping[str, float] | None = None, total: float | None = None
    ) -> None:
        """Add ``done`` units and ``counts`` (added to the running counts); ``total`` replaces the total."""
        self.done += done
        for k, v in (counts or {}).items():
            self.counts[k] = self.counts.get(k, 0) + v
        if total is not None:
            self.total = total
        self._show()

    def set(self, **values: float) -> None:
        """Counts that are a current value (a loss, a learning rate), not a running sum."""
        self.counts.update(values)
        self._show()

    def _show(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if self.live:
            if force or now - self._last_print >= 0.2:
                self.stream.write("\r\x1b[K" + self.line())
                self.stream.flush()
                self._drawn = True
                self._last_print = now
        elif force or now - self._last_print >= self.every_s:
            print(self.line(), file=self.stream, flush=True)
            self._last_print = now
            self._printed = self._state()

    def note(self, text: str) -> None:
        """A line of its own (a finished shard), above the live line."""
        if not self.enabled:
            return
        if self.live and self._drawn:
            self.stream.write("\r\x1b[K")
        print(text, file=self.stream, flush=True)
        self._printed = None  # the figures are no longer the log's last line
        if self.live:
            self._show(force=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.live:
            self.stream.write("\r\x1b[K" + self.line() + "\n")
            self.stream.flush()
        elif self._printed != self._state():  # a log already holding the final figures gets no copy
            print(self.line(), file=self.stream, flush=True)

    def _state(self) -> tuple:
        return self.done, self.total, tuple(sorted(self.counts.items()))


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:.4g}"


@contextlib.contextmanager
def quiet_ray_output(
    log_path: str | Path | None, verbose: bool = False
) -> Iterator[tuple[TextIO, TextIO, str | None]]:
    """Send everything this process writes to its stdout and stderr (Ray's and its
    libraries' warnings, the C++ core's log lines included) to ``log_path``, and yield
    (out, err) streams on the original console for the command's own lines, and the log's
    path. ``verbose`` or no ``log_path`` changes nothing."""
    if verbose or log_path is None:
        yield sys.stdout, sys.stderr, None
        return
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    out = os.fdopen(os.dup(saved[0]), "w", buffering=1)
    err = os.fdopen(os.dup(saved[1]), "w", buffering=1)
    with open(log_path, "ab", buffering=0) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield out, err, str(log_path)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            out.close()
            err.close()
