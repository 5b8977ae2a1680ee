"""curate query / stats / report over a realistic run output.

``make_run_output`` writes what a run leaves behind (input tars with real images, sample
Parquet in the output contract, curated shards, a manifest) so these tests do not need
Ray or models; it can later be replaced by a real pipeline run over the same inputs.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from curate import inspect
from curate.cli import main
from curate.schema import SAMPLES_SCHEMA

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "queries.md"
CHROMIUM = Path("/usr/bin/chromium")


def _cand(text, source, itm, clip, kept):
    return {"text": text, "source": source, "itm_score": itm, "clip_score": clip, "kept": kept}


def _image(kind: str, color: str, ext: str) -> bytes:
    """A small real image: a shape on a background (RGBA for the clip-art PNG)."""
    mode = "RGBA" if kind == "clipart" else "RGB"
    img = Image.new(mode, (64, 48), (0, 0, 0, 0) if mode == "RGBA" else "white")
    draw = ImageDraw.Draw(img)
    if kind == "circle":
        draw.ellipse((8, 4, 56, 44), fill=color)
    else:
        draw.rectangle((8, 8, 56, 40), fill=color)
    buf = io.BytesIO()
    img.save(buf, format={"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG"}[ext])
    return buf.getvalue()


# shard -> samples; "image" is (shape, colour, ext) or raw bytes (a corrupt file)
SAMPLES = {
    "00000": [
        dict(
            key="k0000",
            status="kept",
            image=("square", "red", "png"),
            alt="a red square",
            caption="a red box",
            candidates=[
                _cand("a red square", "alt", 0.9, 0.30, False),
                _cand("a red box", "synthetic", 0.8, 0.32, True),
            ],
        ),
        dict(
            key="k0001",
            status="kept",
            image=("square", "blue", "jpg"),
            alt="blue <b>sky</b> & sea",
            caption="blue <b>sky</b> & sea",
            candidates=[
                _cand("blue <b>sky</b> & sea", "alt", 0.95, 0.40, True),
                _cand("a blue picture", "synthetic", 0.6, 0.25, False),
            ],
        ),
        dict(
            key="k0002",
            status="dropped",
            reason="no_caption_passed_itm",
            image=("circle", "green", "jpeg"),
            alt="buy cheap watches",
            candidates=[
                _cand("buy cheap watches", "alt", 0.1, 0.05, False),
                _cand("a green square", "synthetic", 0.4, 0.22, False),
            ],
        ),
    ],
    "00001": [
        dict(
            key="k0100",
            status="kept",
            image=("circle", "gold", "png"),
            alt="<script>alert(1)</script>",
            caption="a yellow circle",
            candidates=[
                _cand("<script>alert(1)</script>", "alt", 0.2, 0.10, False),
                _cand("a yellow circle", "synthetic", 0.7, 0.35, True),
            ],
        ),
        dict(
            key="k0101",
            status="dropped",
            reason="below_min_clip_score",
            image=("clipart", "purple", "png"),
            alt="photo",
            candidates=[
                _cand("photo", "alt", 0.55, 0.15, False),
                _cand("a shape", "synthetic", 0.6, 0.18, False),
            ],
        ),
        dict(
            key="k0102",
            status="error",
            image=b"\xff\xd8 not really a jpeg",
            image_ext="jpg",
            alt="broken",
            error="cannot identify image file\nTraceback (most recent call last): ...",
        ),
    ],
    # the input tar of this shard is gone after the run: the report must cope
    "00002": [
        dict(
            key="k0200",
            status="dropped",
            reason="no_caption_passed_itm",
            image=("square", "purple", "jpg"),
            alt="lost image",
            candidates=[
                _cand("lost image", "alt", 0.3, 0.20, False),
                _cand("a purple thing", "synthetic", 0.45, 0.21, False),
            ],
        ),
        dict(
            key="k0201",
            status="kept",
            image=("square", "teal", "png"),
            alt="bike",
            caption="a red bicycle leaning on a wall in Amsterdam",
            candidates=[
                _cand("bike", "alt", 0.7, 0.28, False),
                _cand("a red bicycle leaning on a wall in Amsterdam", "kale", 0.85, 0.38, True),
                _cand("a bicycle", "synthetic", 0.8, 0.33, False),
            ],
        ),
    ],
}
MISSING_INPUT_SHARD = "00002"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_run_output(tmp_path: Path, name: str = "out") -> Path:
    """Write input tars and the output of a curation run over them; return the output dir.

    8 samples in 3 shards: 4 kept, 3 dropped (2 no_caption_passed_itm, 1 below_min_clip_score),
    1 error. Policy: itm_threshold 0.5, min_clip_score 0.2, top_k 1.
    """
    inputs = tmp_path / "inputs"
    inputs.mkdir(exist_ok=True)
    out = tmp_path / name
    (out / "samples").mkdir(parents=True)
    (out / "shards").mkdir()
    shard_info = {}
    with tarfile.open(out / "shards" / "00000.tar", "w") as curated:
        for shard, samples in SAMPLES.items():
            tar_path = inputs / f"{shard}.tar"
            rows = []
            with tarfile.open(tar_path, "w") as tar:
                for s in samples:
                    if isinstance(s["image"], bytes):
                        data, ext = s["image"], s["image_ext"]
                    else:
                        data, ext = _image(*s["image"]), s["image"][2]
                    meta = json.dumps({"url": f"https://example.com/{s['key']}.{ext}", "key": s["key"]})
                    _add(tar, f"{s['key']}.{ext}", data)
                    _add(tar, f"{s['key']}.txt", s["alt"].encode())
                    _add(tar, f"{s['key']}.json", meta.encode())
                    kept = s["status"] == "kept"
                    decoded = s["status"] != "error"
                    cands = s.get("candidates")
                    rows.append(
                        {
                            "key": s["key"],
                            "shard": shard,
                            "status": s["status"],
                            "reason": s.get("reason"),
                            "error": s.get("error"),
                            "alt_text": s["alt"],
                            "width": 64 if decoded else None,
                            "height": 48 if decoded else None,
                            "caption": s.get("caption") if kept else None,
                            "captions": [c["text"] for c in cands if c["kept"]] if kept else None,
                            "candidates": cands,
                            "url": f"https://example.com/{s['key']}.{ext}",
                            "image_ext": ext,
                            "image_sha256": hashlib.sha256(data).hexdigest(),
                            "source_url": str(tar_path),
                            "meta": meta,
                        }
                    )
                    if kept:
                        _add(curated, f"{s['key']}.{ext}", data)
                        _add(curated, f"{s['key']}.txt", s["caption"].encode())
                        _add(
                            curated,
                            f"{s['key']}.json",
                            json.dumps({**json.loads(meta), "alt_text": s["alt"]}).encode(),
                        )
            pq.write_table(
                pa.Table.from_pylist(rows, schema=SAMPLES_SCHEMA), out / "samples" / f"{shard}.parquet"
            )
            statuses = [r["status"] for r in rows]
            shard_info[shard] = {
                "samples": len(rows),
                "kept": statuses.count("kept"),
                "dropped": statuses.count("dropped"),
                "error": statuses.count("error"),
                "fault": None,
            }
            if shard == MISSING_INPUT_SHARD:
                tar_path.unlink()
    manifest = {
        "curate_version": "0.1.0",
        "pipeline": {"name": "test", "policy": {"itm_threshold": 0.5, "top_k": 1, "min_clip_score": 0.2}},
        "input": [str(inputs / f"{s}.tar") for s in SAMPLES],
        "output": str(out),
        "models": {
            "captioner": {"model": "tiny-blip", "revision": "abc123"},
            "filter": {"model": "tiny-itm", "revision": None},
            "ranker": {"model": "tiny-clip", "revision": None},
        },
        "packages": {"duckdb": duckdb.__version__},
        "counts": {"kept": 4, "dropped": 3, "error": 1, "total": 8},
        "reasons": {"no_caption_passed_itm": 2, "below_min_clip_score": 1},
        "shards": shard_info,
        "started_at": "2025-01-01T00:00:00+00:00",
        "finished_at": "2025-01-01T00:00:04+00:00",
        "wall_s": 4.0,
        "samples_per_s": 2.0,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


@pytest.fixture(scope="module")
def run_out(tmp_path_factory) -> Path:
    return make_run_output(tmp_path_factory.mktemp("run"))


def _query(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["query", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------- query


def test_query_table(run_out, capsys):
    code, out, _ = _query(
        capsys, str(run_out), "SELECT status, count(*) AS n FROM samples GROUP BY ALL ORDER BY ALL"
    )
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split("|")[0].strip() == "status"
    assert [re.split(r"\s*\|\s*", line.strip()) for line in lines[2:5]] == [
        ["dropped", "3"],
        ["error", "1"],
        ["kept", "4"],
    ]
    assert lines[-1] == "(3 rows)"


def test_query_table_truncates_and_escapes(run_out, capsys):
    code, out, _ = _query(
        capsys, str(run_out), "SELECT key, error FROM samples ORDER BY key", "--max-rows", "2"
    )
    assert code == 0
    assert "(8 rows, first 2 shown" in out
    code, out, _ = _query(capsys, str(run_out), "SELECT error FROM samples WHERE status = 'error'")
    assert "cannot identify image file\\nTraceback" in out  # a newline in data cannot break the table
    code, out, _ = _query(capsys, str(run_out), "SELECT chr(27) || '[31mred' AS x")
    assert "\x1b" not in out and "\\x1b[31mred" in out


def test_query_csv_json_jsonl(run_out, capsys):
    sql = "SELECT key, status, caption FROM samples WHERE shard = '00000' ORDER BY key"
    code, out, _ = _query(capsys, str(run_out), sql, "--format", "csv")
    assert code == 0
    assert out.splitlines() == [
        "key,status,caption",
        "k0000,kept,a red box",
        "k0001,kept,blue <b>sky</b> & sea",
        "k0002,dropped,",
    ]
    code, out, _ = _query(capsys, str(run_out), sql, "--format", "json")
    assert json.loads(out) == [
        {"key": "k0000", "status": "kept", "caption": "a red box"},
        {"key": "k0001", "status": "kept", "caption": "blue <b>sky</b> & sea"},
        {"key": "k0002", "status": "dropped", "caption": None},
    ]
    code, out, _ = _query(capsys, str(run_out), sql, "--format", "jsonl")
    assert [json.loads(line)["key"] for line in out.splitlines()] == ["k0000", "k0001", "k0002"]


def test_query_to_file(run_out, tmp_path, capsys):
    sql = "SELECT key, source, text, clip_score FROM candidates WHERE is_best ORDER BY key"
    target = tmp_path / "best.parquet"
    code, _, err = _query(capsys, str(run_out), sql, "--to", str(target))  # format from the extension
    assert code == 0 and str(target) in err
    table = pq.read_table(target)
    assert table.column("key").to_pylist() == ["k0000", "k0001", "k0100", "k0201"]
    assert table.column("source").to_pylist() == ["synthetic", "alt", "synthetic", "kale"]
    csv_target = tmp_path / "best.txt"
    code, _, _ = _query(capsys, str(run_out), sql, "--format", "csv", "--to", str(csv_target))
    assert code == 0 and csv_target.read_text().splitlines()[0] == "key,source,text,clip_score"
    code, _, err = _query(capsys, str(run_out), sql, "--to", str(tmp_path / "best.xyz"))
    assert code == 2 and "--format" in err
    code, _, err = _query(capsys, str(run_out), sql, "--to", str(run_out / "samples" / "extra.parquet"))
    assert code == 2 and "samples directory" in err


def test_query_parquet_to_stdout(run_out, capsysbinary):
    assert main(["query", str(run_out), "SELECT key FROM samples ORDER BY key", "--format", "parquet"]) == 0
    data = capsysbinary.readouterr().out
    assert data[:4] == b"PAR1"
    assert pq.read_table(io.BytesIO(data)).num_rows == 8


@pytest.mark.parametrize(
    "sql",
    [
        "COPY samples TO '/tmp/curate-test-x.csv'",
        "COPY (SELECT 1 AS key) TO '{samples}/00000.parquet' (FORMAT parquet, USE_TMP_FILE false)",
        "CREATE TABLE t AS SELECT * FROM samples",
        "ATTACH '/tmp/curate-test-x.duckdb' AS x",
        "INSTALL httpfs",
        "SET enable_external_access = true",
        "SELECT 1; COPY samples TO '/tmp/curate-test-x.csv'",
    ],
)
def test_query_refuses_writes(run_out, capsys, sql):
    before = {p.name: p.read_bytes() for p in (run_out / "samples").iterdir()}
    code, out, err = _query(capsys, str(run_out), sql.format(samples=run_out / "samples"))
    assert code == 2
    assert "curate query: error:" in err and out == ""
    assert not Path("/tmp/curate-test-x.csv").exists() and not Path("/tmp/curate-test-x.duckdb").exists()
    assert {p.name: p.read_bytes() for p in (run_out / "samples").iterdir()} == before


def test_locked_connection_refuses_files_even_for_select(run_out):
    con = inspect.connect(run_out)
    with pytest.raises(duckdb.Error, match="disabled by configuration"):
        inspect.execute(con, "SELECT * FROM read_csv('/etc/passwd')").fetchall()
    with pytest.raises(duckdb.Error, match="locked"):
        con.execute("SET enable_external_access = true")
    # DuckDB alone would let a COPY overwrite an allowed file: execute() must refuse it
    with pytest.raises(inspect.ReadOnlyQueryError):
        inspect.execute(con, f"COPY samples TO '{run_out}/samples/00000.parquet'")
    con.close()


def test_query_errors(run_out, tmp_path, capsys):
    code, _, err = _query(capsys, str(run_out), "SELEC * FROM samples")
    assert code == 2 and "Parser Error" in err
    code, _, err = _query(capsys, str(run_out), "SELECT nope FROM samples")
    assert code == 2 and "nope" in err
    missing = tmp_path / "nowhere"
    code, _, err = _query(capsys, str(missing), "SELECT 1")
    assert code == 2 and str(missing) in err
    empty = tmp_path / "empty"
    (empty / "samples").mkdir(parents=True)
    for command in (["query", str(empty), "SELECT 1"], ["stats", str(empty)], ["report", str(empty)]):
        assert main(command) == 2
        assert str(empty / "samples") in capsys.readouterr().err


def test_candidates_view(run_out):
    table = inspect.run_query(
        run_out,
        "SELECT key, candidate_index, source, score_rank, is_best FROM candidates "
        "ORDER BY key, candidate_index",
    )
    rows = {(r["key"], r["candidate_index"]): r for r in table.to_pylist()}
    assert len(rows) == 15  # 7 samples with candidates: 2 each, k0201 has 3; the error row has none
    assert rows[("k0201", 2)] == {
        "key": "k0201",
        "candidate_index": 2,
        "source": "kale",
        "score_rank": 1,
        "is_best": True,
    }
    assert rows[("k0201", 3)]["score_rank"] == 2 and rows[("k0201", 1)]["score_rank"] == 3
    assert sum(r["is_best"] for r in rows.values()) == 4
    assert not any(r["is_best"] for r in rows.values() if r["key"] in {"k0002", "k0101", "k0200"})


# ---------------------------------------------------------------- docs/queries.md


def _doc_blocks() -> list[str]:
    return re.findall(r"```sql\n(.*?)```", DOCS.read_text(), flags=re.S)


def test_docs_view_definitions_match_the_library():
    setup = next(b for b in _doc_blocks() if "CREATE VIEW candidates" in b)
    normalize = lambda s: " ".join(s.split())  # noqa: E731
    assert normalize(inspect.CANDIDATES_VIEW_SQL) in normalize(setup)
    assert normalize(inspect.samples_view_sql("out/samples/*.parquet")) in normalize(setup)


def test_docs_queries_run(run_out):
    """Every SQL block in docs/queries.md runs in plain duckdb; view queries also via curate query."""
    blocks = _doc_blocks()
    assert len(blocks) >= 6
    plain = duckdb.connect()
    for block in blocks:
        sql = block.replace("'out/", f"'{run_out}/")
        if "CREATE VIEW" in block:
            for statement in plain.extract_statements(sql):
                plain.execute(statement.query)
            continue
        expected = plain.sql(sql).fetchall()
        assert expected, f"docs query returned nothing:\n{block}"
        if "'out/" not in block:
            assert inspect.run_query(run_out, block).to_pylist() == [
                dict(zip(plain.sql(sql).columns, row)) for row in expected
            ], block
    # answers the docs promise, on this data
    keep = dict(
        plain.sql(
            "SELECT shard, keep_rate FROM ("
            + next(b for b in blocks if "keep rate per shard" in b).rstrip("; \n")
            + ")"
        ).fetchall()
    )
    assert keep == {
        "00000": pytest.approx(2 / 3, abs=1e-3),
        "00001": pytest.approx(1 / 3, abs=1e-3),
        "00002": pytest.approx(0.5),
    }
    lost = plain.sql(next(b for b in blocks if "lost to a synthetic" in b).replace("'out/", f"'{run_out}/"))
    assert sorted(r[lost.columns.index("key")] for r in lost.fetchall()) == ["k0000", "k0100"]
    wins = plain.sql(next(b for b in blocks if "which source wins" in b)).fetchall()
    assert {r[0]: r[1] for r in wins} == {"synthetic": 2, "alt": 1, "kale": 1}


def test_docs_hugging_face_datasets(run_out):
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset("parquet", data_files=str(run_out / "samples" / "*.parquet"), split="train")
    assert ds.num_rows == 8 and "candidates" in ds.column_names


# ---------------------------------------------------------------- stats


def test_stats_numbers(run_out, capsys):
    assert main(["stats", str(run_out), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["counts"] == {"kept": 4, "dropped": 3, "error": 1, "total": 8}
    assert stats["keep_rate"] == 0.5
    assert stats["reasons"] == {"no_caption_passed_itm": 2, "below_min_clip_score": 1}
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


def test_stats_text(run_out, capsys):
    assert main(["stats", str(run_out)]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^kept\s+4\s+\(50\.0%\)$", text, flags=re.M)
    assert re.search(r"^throughput\s+2 samples/s over 4 s", text, flags=re.M)
    assert re.search(r"^no_caption_passed_itm\s+\|\s+2\s+\|\s+25\.0%$", text, flags=re.M)
    assert re.search(r"^alt\s+\|\s+itm_score\s+\|\s+7\s+\|\s+0\.1\s+\|\s+0\.16\s+\|", text, flags=re.M)
    assert "caption length in words" in text and "shards" in text


def test_stats_warns_on_manifest_mismatch(tmp_path):
    out = make_run_output(tmp_path)
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
    stats = inspect.compute_stats(out)
    assert any("total: manifest 9 vs parquet 8" in w for w in stats["warnings"])
    assert stats["shards"]["00003"]["fault"] == "truncated tar"
    (out / "manifest.json").unlink()
    stats = inspect.compute_stats(out)
    assert stats["throughput"] is None and any("no manifest.json" in w for w in stats["warnings"])


# ---------------------------------------------------------------- report


@pytest.fixture(scope="module")
def report_page(run_out) -> Path:
    """The report written once by the CLI to its default place, OUT/report.html."""
    assert main(["report", str(run_out)]) == 0
    return run_out / "report.html"


def test_report_contents(report_page):
    page = report_page.read_text()
    # untrusted captions are escaped: the only script is the report's own check
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "blue &lt;b&gt;sky&lt;/b&gt; &amp; sea" in page
    assert page.count("<script>") == 1
    assert 'src="http' not in page and "src='http" not in page  # self-contained
    for section in ("summary", "outcomes", "scores", "lengths", "kept", "dropped", "beat-alt", "shards"):
        assert f'<section id="{section}">' in page
    beat = page.split('<section id="beat-alt">')[1].split("</section>")[0]
    assert beat.count('<figure class="card">') == 3  # k0000, k0100 (synthetic) and k0201 (KALE)
    assert "image not available: input shard not readable" in page  # k0200: input tar deleted
    kept = page.split('<section id="kept">')[1].split("</section>")[0]
    assert kept.count('<figure class="card">') == 4 and kept.count("<img ") == 4  # k0201 from OUT/shards
    assert page.count("data:image/png;base64,") >= 4  # two score plots, outcomes, lengths


def test_report_compare(run_out, tmp_path, capsys):
    other = make_run_output(tmp_path, name="out-b")
    table = pq.read_table(other / "samples" / "00000.parquet").to_pylist()
    table[2].update(status="kept", reason=None, caption="a green square", captions=["a green square"])
    table[2]["candidates"][1]["kept"] = True
    pq.write_table(pa.Table.from_pylist(table, schema=SAMPLES_SCHEMA), other / "samples" / "00000.parquet")
    target = tmp_path / "compare.html"
    assert (
        main(["report", str(run_out), "--compare", str(other), "--output", str(target), "--samples", "8"])
        == 0
    )
    assert capsys.readouterr().out.strip() == str(target)
    page = target.read_text()
    assert '<section id="compare">' in page and '<div class="cols">' in page
    changed = page.split('<section id="changed">')[1].split("</section>")[0]
    assert "samples whose status or caption changed (1)" in changed and "k0002" in changed
    compare = page.split('<section id="compare">')[1].split("</section>")[0]
    assert re.search(
        r"samples kept</td><td class=\"n\">4</td><td class=\"n\">5</td><td class=\"n\">1<", compare
    )


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    command = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=90, check=False)


def test_report_in_headless_chromium(report_page, tmp_path):
    """Open the page in a real browser: every image and plot decodes; the screenshot is not blank."""
    if not CHROMIUM.exists():
        pytest.skip("needs Debian chromium at /usr/bin/chromium (apt-get install -y chromium)")
    shot = tmp_path / "report.png"
    result = _chromium(
        "--dump-dom",
        "--virtual-time-budget=5000",
        f"--screenshot={shot}",
        "--window-size=1280,4200",
        "--hide-scrollbars",
        report_page.as_uri(),
        profile=tmp_path / "profile",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    body = re.search(r"<body[^>]*>", result.stdout).group(0)
    # set by the report's own script on load: it ran (CSP hash right) and no image failed
    assert 'data-broken-images="0"' in body, body
    assert 'data-images="13"' in body, body  # 4 plots + 4 kept + 2 dropped (1 placeholder) + 3 beat-alt
    assert "alert(1)" not in result.stdout.replace("&lt;script&gt;alert(1)&lt;/script&gt;", "")
    assert shot.is_file(), result.stderr[-2000:]
    with Image.open(shot) as img:
        assert img.size == (1280, 4200)
        colors = img.convert("RGB").resize((160, 525)).getcolors(maxcolors=1 << 16)
        assert colors is not None and len(colors) > 50  # text, plots and thumbnails, not a blank page
    if os.environ.get("CURATE_REPORT_SCREENSHOT"):  # keep a copy to look at
        shutil.copy(shot, os.environ["CURATE_REPORT_SCREENSHOT"])
