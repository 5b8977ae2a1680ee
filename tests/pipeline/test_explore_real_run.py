"""`curate query/stats/report` on the output of a real pipeline run (local Ray, tiny
models), with figures cross-checked against pyarrow, and the report in Chromium."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from curate.cli import main
from curate.config import pipeline_from_dict
from curate.io.reader import expand_inputs, shard_refs
from curate.pipeline import run_pipeline
from tests.explore.chromium import body_count, render
from tests.helpers import image_bytes, make_shard, start_local_ray


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
                "resources": {"device": "cpu"},
            },
            "filter": {"model": str(tiny_models["itm"]), "resources": {"device": "cpu"}},
            "ranker": {"model": str(tiny_models["clip"]), "resources": {"device": "cpu"}},
            # a threshold in the middle of the tiny ITM's scores gives kept and dropped samples
            "policy": {"itm_threshold": 0.5, "top_k": 2},
        }
    )
    out = d / "out"
    run_pipeline(cfg, shard_refs(expand_inputs(str(d / "in" / "*.tar"))), str(out))
    return out


def _query_json(capsys, out: Path, sql: str) -> list[dict]:
    assert main(["query", str(out), sql, "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_query_views_match_the_parquet(real_run, tmp_path, capsys):
    rows = pq.read_table(real_run / "samples").to_pylist()
    got = _query_json(capsys, real_run, "SELECT status, count(*) AS n FROM samples GROUP BY 1")
    assert {r["status"]: r["n"] for r in got} == dict(Counter(r["status"] for r in rows))
    got = _query_json(capsys, real_run, "SELECT source, count(*) AS n FROM candidates GROUP BY 1")
    assert {r["source"]: r["n"] for r in got} == dict(
        Counter(c["source"] for r in rows for c in r["candidates"])
    )
    # the best candidate of each kept sample is its caption
    got = _query_json(capsys, real_run, "SELECT key, text FROM candidates WHERE is_best")
    assert {r["key"]: r["text"] for r in got} == {
        r["key"]: r["caption"] for r in rows if r["status"] == "kept"
    }
    leak = tmp_path / "leak.csv"
    assert main(["query", str(real_run), f"COPY samples TO '{leak}'"]) == 2
    assert not leak.exists()


def test_stats_match_the_parquet(real_run, capsys):
    rows = pq.read_table(real_run / "samples").to_pylist()
    assert main(["stats", str(real_run), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    counts = Counter(r["status"] for r in rows)
    assert stats["counts"]["total"] == len(rows) == 18
    assert stats["counts"]["kept"] == counts["kept"] and stats["counts"]["error"] == counts["error"] == 2
    assert stats["keep_rate"] == pytest.approx(counts["kept"] / len(rows), abs=1e-6)
    assert stats["reasons"] == dict(Counter(r["reason"] for r in rows if r["status"] == "dropped"))
    syn = [c["clip_score"] for r in rows for c in r["candidates"] if c["source"] == "synthetic"]
    assert stats["sources"]["synthetic"]["clip_score"]["count"] == len(syn)
    assert stats["sources"]["synthetic"]["clip_score"]["max"] == pytest.approx(max(syn), abs=1e-5)
    assert stats["warnings"] == []


def test_report_of_a_real_run_in_chromium(real_run, tmp_path):
    assert main(["report", str(real_run)]) == 0
    page = (real_run / "report.html").read_text()
    assert 'src="http' not in page
    assert page.count("data:image/png;base64,") >= 3  # score histograms, outcomes, lengths
    # every card's image was read back from the input tars (the broken images are error rows,
    # which no grid shows)
    cards = page.count('<figure class="card">')
    assert cards > 0 and page.count("data:image/jpeg;base64,") == cards and 'class="noimg"' not in page
    shown = render(real_run / "report.html", tmp_path, height=3000)
    assert body_count(shown, "broken-images") == 0, shown.body
    assert body_count(shown, "images") == page.count("<img ")
