"""`curate query/stats/report` on the output of a real pipeline run (local Ray, tiny
models), with figures cross-checked against pyarrow, and the report in Chromium."""

from __future__ import annotations

import json
import re
import subprocess
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from curate.cli import main
from curate.config import pipeline_from_dict
from curate.io.reader import expand_inputs, shard_refs
from curate.pipeline import run_pipeline
from tests.helpers import image_bytes, make_shard, start_local_ray

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def real_run(tiny_models, tmp_path_factory) -> Path:
    start_local_ray()
    d = tmp_path_factory.mktemp("run")
    for s in range(2):
        samples = [
            {
                "key": f"{s}{i:03d}",
                "image": image_bytes(40, 32, "png", seed=s * 50 + i),
                "txt": f"picture {i}",
            }
            for i in range(8)
        ]
        samples.append({"key": f"{s}bad", "image": b"broken", "txt": "broken image"})
        make_shard(d / "in" / f"{s:05d}.tar", samples)
    cfg = pipeline_from_dict(
        {
            "name": "inspect",
            "captioner": {
                "model": str(tiny_models["captioner"]),
                "num_captions": 3,
                "max_new_tokens": 6,
                "device": "cpu",
            },
            "filter": {"model": str(tiny_models["itm"]), "device": "cpu"},
            "ranker": {"model": str(tiny_models["clip"]), "device": "cpu"},
            # a threshold in the middle of the tiny ITM's scores gives kept and dropped samples
            "policy": {"itm_threshold": 0.5, "top_k": 2},
        }
    )
    out = d / "out"
    run_pipeline(cfg, shard_refs(expand_inputs(str(d / "in" / "*.tar"))), str(out))
    return out


def test_query_views_match_the_parquet(real_run, capsys):
    rows = pq.read_table(real_run / "samples").to_pylist()
    assert (
        main(
            [
                "query",
                str(real_run),
                "SELECT status, count(*) AS n FROM samples GROUP BY 1",
                "--format",
                "json",
            ]
        )
        == 0
    )
    got = {r["status"]: r["n"] for r in json.loads(capsys.readouterr().out)}
    assert got == dict(Counter(r["status"] for r in rows))
    assert (
        main(
            [
                "query",
                str(real_run),
                "SELECT source, count(*) AS n FROM candidates GROUP BY 1",
                "--format",
                "json",
            ]
        )
        == 0
    )
    got = {r["source"]: r["n"] for r in json.loads(capsys.readouterr().out)}
    assert got == dict(Counter(c["source"] for r in rows for c in r["candidates"]))
    assert main(["query", str(real_run), "COPY samples TO '/tmp/curate-leak.csv'"]) == 2


def test_stats_match_the_parquet(real_run, capsys):
    rows = pq.read_table(real_run / "samples").to_pylist()
    assert main(["stats", str(real_run), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    counts = Counter(r["status"] for r in rows)
    assert stats["counts"]["total"] == len(rows) == 18
    assert stats["counts"]["kept"] == counts["kept"] and stats["counts"]["error"] == counts["error"] == 2
    assert stats["keep_rate"] == pytest.approx(counts["kept"] / len(rows), abs=1e-6)
    syn = [c["clip_score"] for r in rows for c in r["candidates"] if c["source"] == "synthetic"]
    assert stats["sources"]["synthetic"]["clip_score"]["count"] == len(syn)
    assert stats["sources"]["synthetic"]["clip_score"]["max"] == pytest.approx(max(syn), abs=1e-5)


def test_report_of_a_real_run_in_chromium(real_run, tmp_path):
    assert main(["report", str(real_run)]) == 0
    page = (real_run / "report.html").read_text()
    assert "data:image/png;base64," in page and 'src="http' not in page
    if not CHROMIUM.exists():
        pytest.skip("needs Debian chromium at /usr/bin/chromium (apt-get install -y chromium)")
    shot = tmp_path / "report.png"
    result = subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--dump-dom",
            "--virtual-time-budget=5000",
            f"--screenshot={shot}",
            "--window-size=1280,3000",
            (real_run / "report.html").as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    body = re.search(r"<body[^>]*>", result.stdout).group(0)
    assert 'data-broken-images="0"' in body, body
    n_images = int(re.search(r'data-images="(\d+)"', body).group(1))
    assert n_images >= 6  # plots and thumbnails read back from the input and curated tars
    assert shot.is_file()
