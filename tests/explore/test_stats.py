"""``curate stats``: the figures of the hand-written run output, as JSON and as text."""

from __future__ import annotations

import json
import re

import pytest

from curate import explore
from curate.cli import main
from tests.explore.run_output import make_run_output


def test_stats_numbers(run_out, capsys):
    assert main(["stats", str(run_out), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["counts"] == {"kept": 4, "dropped": 3, "error": 1, "total": 8}
    assert stats["keep_rate"] == 0.5
    assert stats["reasons"] == {"itm_below_threshold": 2, "clip_below_threshold": 1}
    assert stats["errors"] == {"cannot identify image file": 1}
    assert stats["shards"]["00001"] == {
        "samples": 3,
        "kept": 1,
        "dropped": 1,
        "error": 1,
        "keep_rate": pytest.approx(1 / 3, abs=1e-6),
        "fault": None,
    }
    alt, syn, kale = (stats["sources"][s] for s in ("alt", "synthetic", "kale"))
    assert (alt["candidates"], alt["kept"], alt["best"]) == (7, 1, 1)
    assert (syn["candidates"], syn["kept"], syn["best"]) == (7, 2, 2)
    assert (kale["candidates"], kale["kept"], kale["best"]) == (1, 1, 1)
    # alt ITM scores sorted: .1 .2 .3 .55 .7 .9 .95; p10 interpolates at position 0.6
    assert alt["itm_score"] == pytest.approx(
        {
            "count": 7,
            "mean": 3.7 / 7,
            "min": 0.1,
            "p10": 0.16,
            "p25": 0.25,
            "p50": 0.55,
            "p75": 0.8,
            "p90": 0.92,
            "max": 0.95,
        },
        abs=1e-5,
    )
    # synthetic CLIP scores sorted: .18 .21 .22 .25 .32 .33 .35
    assert syn["clip_score"] == pytest.approx(
        {
            "count": 7,
            "mean": 1.86 / 7,
            "min": 0.18,
            "p10": 0.198,
            "p25": 0.215,
            "p50": 0.25,
            "p75": 0.325,
            "p90": 0.338,
            "max": 0.35,
        },
        abs=1e-5,
    )
    assert kale["clip_score"]["p50"] == pytest.approx(0.38, abs=1e-6)
    # best captions: 3, 4, 3 and 9 words
    best = stats["caption_length"]["best"]
    assert best["words"] == pytest.approx(
        {
            "count": 4,
            "mean": 4.75,
            "min": 3,
            "p10": 3,
            "p25": 3,
            "p50": 3.5,
            "p75": 5.25,
            "p90": 7.5,
            "max": 9,
        }
    )
    assert best["chars"]["max"] == len("a red bicycle leaning on a wall in Amsterdam")
    assert best["histogram_words"] == {
        "0": 0,
        "1-4": 3,
        "5-9": 1,
        "10-19": 0,
        "20-49": 0,
        "50-99": 0,
        "100+": 0,
    }
    assert stats["throughput"] == {
        "wall_s": 4.0,
        "samples_per_s": 2.0,
        "started_at": "2025-01-01T00:00:00+00:00",
        "finished_at": "2025-01-01T00:00:04+00:00",
    }
    assert stats["policy"] == {"itm_threshold": 0.5, "top_k": 1, "min_clip_score": 0.2}
    assert stats["warnings"] == []


def _table_rows(text: str, title: str) -> list[list[str]]:
    """The cells of the terminal table printed under ``title`` (header and rule skipped)."""
    block = text.split(f"\n{title}\n", 1)[1].split("\n\n", 1)[0].splitlines()
    return [re.split(r"\s*\|\s*", line.strip()) for line in block[2:]]


def test_stats_text(run_out, capsys):
    assert main(["stats", str(run_out)]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^kept\s+4\s+\(50\.0%\)$", text, flags=re.M)
    assert re.search(r"^throughput\s+2 samples/s over 4 s", text, flags=re.M)
    assert _table_rows(text, "drop reasons") == [
        ["itm_below_threshold", "2", "25.0%"],
        ["clip_below_threshold", "1", "12.5%"],
    ]
    quantiles = _table_rows(text, "score quantiles by source")
    assert quantiles[0][:5] == ["alt", "itm_score", "7", "0.1", "0.16"]
    lengths = _table_rows(text, "caption length in words (count per word-count bucket on the right)")
    # text, n, min, p10, p50, p90, max, mean, then the word-count buckets 0, 1-4, 5-9, ...
    assert lengths[0] == [
        "best caption",
        "4",
        "3",
        "3",
        "3.5",
        "7.5",
        "9",
        "4.75",
        "0",
        "3",
        "1",
        "0",
        "0",
        "0",
        "0",
    ]
    # shard, samples, kept, dropped, error, keep, fault (none)
    assert _table_rows(text, "shards") == [
        ["00000", "3", "2", "1", "0", "66.7%", ""],
        ["00001", "3", "1", "1", "1", "33.3%", ""],
        ["00002", "2", "1", "1", "0", "50.0%", ""],
    ]


def test_stats_warns_on_manifest_mismatch(tmp_path):
    out = make_run_output(tmp_path)
    assert explore.compute_stats(out)["warnings"] == []
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["counts"]["total"] = 9
    manifest["shards"]["00003"] = {
        "samples": 0,
        "kept": 0,
        "dropped": 0,
        "error": 0,
        "fault": "truncated tar",
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    stats = explore.compute_stats(out)
    assert stats["warnings"] == [
        "manifest counts differ from the Parquet rows (total: manifest 9 vs parquet 8)",
        "1 shard(s) reported a fault: 00003",
    ]
    assert stats["shards"]["00003"]["fault"] == "truncated tar"
    (out / "manifest.json").unlink()
    stats = explore.compute_stats(out)
    assert stats["throughput"] is None
    assert stats["warnings"] == [f"no manifest.json in {out} (the run may not have finished)"]
