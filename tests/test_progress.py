"""The one progress display: a live line on a terminal, a line every few seconds in a log,
and the console kept for it while Ray's own output goes to a log file."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap

from curate.progress import Progress


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_in_a_log_a_line_every_few_seconds_with_rate_counts_and_eta(monkeypatch):
    clock = Clock()
    monkeypatch.setattr("curate.progress.time.monotonic", clock)
    log = io.StringIO()
    p = Progress("curate run", total=100, stream=log, every_s=10, live=False)
    for _ in range(5):  # 5 samples a second for 5 s: nothing printed yet
        clock.now += 1
        p.update(5, {"kept": 3, "dropped": 2, "error": 0})
    assert log.getvalue() == ""
    clock.now += 5
    p.update(0)
    (line,) = log.getvalue().splitlines()
    assert line == (
        "curate run: 25 of 100 samples | 2.50 samples/s | kept 15 dropped 10 error 0 | ETA 30s | elapsed 10s"
    )
    p.note("  shard 00000: 25 samples")
    p.close()  # the figures again at the end, below the note
    assert log.getvalue().splitlines()[1:] == ["  shard 00000: 25 samples", line]


def test_in_a_log_the_last_line_is_not_repeated_at_close(monkeypatch):
    clock = Clock()
    monkeypatch.setattr("curate.progress.time.monotonic", clock)
    log = io.StringIO()
    p = Progress("curate dedup", total=2, unit="steps", stream=log, every_s=10, live=False)
    clock.now += 11
    p.update(2)
    p.close()
    assert len(log.getvalue().splitlines()) == 1
    clock.now += 1
    p.update(0, {"pairs": 3})  # new figures since the last line: close shows them
    p.close()
    assert len(log.getvalue().splitlines()) == 2


def test_on_a_terminal_one_line_redrawn_and_notes_above_it(monkeypatch):
    clock = Clock()
    monkeypatch.setattr("curate.progress.time.monotonic", clock)
    tty = io.StringIO()
    p = Progress("train", unit="steps", stream=tty, live=True)
    clock.now += 1
    p.update(10)
    p.set(loss=0.25)
    clock.now += 1
    p.update(10)
    p.note("epoch 1 done")
    p.close()
    text = tty.getvalue()
    assert text.count("\n") == 2  # the note and the final line; progress redraws in place
    assert "\r\x1b[Ktrain: 20 steps | 10.00 steps/s | loss 0.25 | elapsed 2s" in text
    assert "\r\x1b[Kepoch 1 done\n" in text


def test_a_disabled_display_prints_nothing():
    out = io.StringIO()
    p = Progress("x", stream=out, live=False, every_s=0, enabled=False)
    p.update(5)
    p.note("n")
    p.close()
    assert out.getvalue() == ""


def test_quiet_ray_output_sends_the_process_output_to_the_log_and_keeps_the_console(tmp_path):
    """C-level writes to descriptors 1 and 2 (Ray's core logs) go to the file too."""
    script = textwrap.dedent(
        f"""
        import os, sys
        from curate.progress import quiet_ray_output
        with quiet_ray_output({str(tmp_path / "run.log")!r}) as (out, err, path):
            print("library noise on stdout")
            print("library warning on stderr", file=sys.stderr)
            os.write(2, b"C++ core log line\\n")
            print("ours on the console", file=err)
            print("our summary", file=out)
        print("after: stdout again")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["our summary", "after: stdout again"]
    assert done.stderr.splitlines() == ["ours on the console"]
    log = (tmp_path / "run.log").read_text().splitlines()
    assert log == ["library noise on stdout", "library warning on stderr", "C++ core log line"]
