"""Ingest from URL lists: img2dataset's layout read back with every URL accounted for.

The end-to-end test serves real PNG/JPEG files from a local HTTP server on 127.0.0.1
(with 404s, a path slower than the timeout, an HTML page and an X-Robots-Tag opt-out),
downloads them with img2dataset for real, curates the shards and checks the samples
table has each URL exactly once with its download status and error.
"""

from __future__ import annotations

import hashlib
import http.server
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.cli import main
from curate.commands.run import url_list_input
from curate.config import ConfigError, IngestConfig, pipeline_from_dict
from curate.ingest import (
    IngestError,
    MissingExtraError,
    import_img2dataset,
    is_url_list,
    list_format,
    plan_ingest,
)
from curate.io.reader import ShardRef, iter_shard_rows
from curate.schema import ROW_SHARD_END, SAMPLES_SCHEMA, STATUS_ERROR, STATUS_PENDING
from tests.helpers import image_bytes, make_shard

HAS_IMG2DATASET = importlib.util.find_spec("img2dataset") is not None

# -- reading img2dataset's layout (no download, no img2dataset needed) -------------------


def _i2d_json(key: str, url: str, caption: str, data: bytes) -> dict:
    return {
        "url": url,
        "caption": caption,
        "key": key,
        "status": "success",
        "error_message": None,
        "width": 16,
        "height": 12,
        "original_width": 16,
        "original_height": 12,
        "exif": "{}",
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def _write_download_log(path: Path, entries: list[dict]) -> None:
    columns = ["caption", "url", "key", "status", "error_message", "exif", "sha256"]
    pq.write_table(pa.Table.from_pylist([{c: e.get(c) for c in columns} for e in entries]), path)


def _fake_i2d_shard(tmp_path: Path) -> tuple[Path, dict[str, dict]]:
    """00000.tar with two downloads; 00000.parquet also logs two failures and a lost success."""
    img_a, img_b = image_bytes(seed=1), image_bytes(seed=2)
    ok = {
        "000000000": _i2d_json("000000000", "http://x/a.png", "a cat", img_a),
        "000000002": _i2d_json("000000002", "http://x/b.png", "a dog", img_b),
    }
    tar = make_shard(
        tmp_path / "00000.tar",
        [
            {"key": k, "image": img, "format": "jpg", "txt": m["caption"], "json": m}
            for (k, m), img in zip(ok.items(), (img_a, img_b))
        ],
    )
    log = [
        ok["000000000"],
        {"caption": "gone", "url": "http://x/404", "key": "000000001", "status": "failed_to_download"}
        | {"error_message": "HTTP Error 404: Not Found"},
        ok["000000002"],
        {"caption": "  html  ", "url": "http://x/page", "key": "000000003", "status": "failed_to_resize"}
        | {"error_message": "Image decoding error"},
        {"caption": "lost", "url": "http://x/lost", "key": "000000004", "status": "success"}
        | {"error_message": None, "sha256": "ab" * 32},
    ]
    _write_download_log(tmp_path / "00000.parquet", log)
    return tar, {e["key"]: e for e in log}


def _read(tar: Path) -> tuple[list[dict], dict]:
    rows = list(iter_shard_rows([ShardRef(url=str(tar), name=tar.stem)], batch_size=2))
    assert rows[-1]["row_type"] == ROW_SHARD_END
    return rows[:-1], rows[-1]


def test_reader_accounts_for_every_url_in_the_download_log(tmp_path):
    tar, log = _fake_i2d_shard(tmp_path)
    rows, end = _read(tar)
    assert end["shard_total"] == len(rows) == len(log) and end["shard_error"] is None
    by_key = {r["key"]: r for r in rows}
    assert set(by_key) == set(log)
    assert [r["seq"] for r in rows] == list(range(len(rows)))
    for key in ("000000000", "000000002"):  # downloads: pending, with img2dataset's record
        r = by_key[key]
        assert r["status"] == STATUS_PENDING and r["image"] is not None
        assert (r["download_status"], r["download_error"]) == ("success", None)
        assert r["download_sha256"] == log[key]["sha256"] == r["image_sha256"]
    r = by_key["000000001"]
    assert r["status"] == STATUS_ERROR and r["image"] is None
    assert r["error"] == "failed_to_download: HTTP Error 404: Not Found"
    assert (r["download_status"], r["download_error"]) == ("failed_to_download", "HTTP Error 404: Not Found")
    assert (r["url"], r["alt_text"], r["source_url"]) == ("http://x/404", "gone", str(tar))
    assert json.loads(r["meta"])["key"] == "000000001"
    r = by_key["000000003"]
    assert r["error"] == "failed_to_resize: Image decoding error" and r["alt_text"] == "html"
    r = by_key["000000004"]  # logged as downloaded, absent from the tar: still one row
    assert r["status"] == STATUS_ERROR and "missing from the tar" in r["error"]
    assert r["download_sha256"] == "ab" * 32


def test_reader_ignores_a_parquet_that_is_not_a_download_log(tmp_path):
    tar, _ = _fake_i2d_shard(tmp_path)
    pq.write_table(pa.table({"key": ["x"], "other": [1]}), tmp_path / "00000.parquet")
    rows, end = _read(tar)
    assert len(rows) == 2 and end["shard_error"] is None


def test_reader_records_an_unreadable_download_log_as_a_shard_fault(tmp_path):
    tar, _ = _fake_i2d_shard(tmp_path)
    (tmp_path / "00000.parquet").write_bytes(b"not parquet")
    rows, end = _read(tar)
    assert len(rows) == 2 and all(r["status"] == STATUS_PENDING for r in rows)
    assert "unreadable download log" in end["shard_error"]


def test_plain_tars_have_no_download_columns(tmp_path, make_shard):
    tar = make_shard(
        tmp_path / "s.tar", [{"key": "a", "image": image_bytes(), "txt": "t", "json": {"url": "u"}}]
    )
    rows, _ = _read(tar)
    assert [r["download_status"] for r in rows] == [None]


def test_output_schema_has_download_columns():
    for name in ("download_status", "download_error", "download_sha256"):
        assert SAMPLES_SCHEMA.field(name).type == pa.string()


# -- URL lists: formats, columns, configuration ------------------------------------------


def test_url_list_formats_are_told_by_name():
    assert list_format("s3://b/laion/part-0.parquet") == "parquet"
    assert list_format("urls.TSV.gz") == "tsv.gz"
    assert is_url_list("urls.txt") and is_url_list("x.jsonl")
    assert not is_url_list("shards/{00000..00003}.tar") and not is_url_list("shards/")


def test_plan_names_a_missing_column_and_counts_shards(tmp_path):
    urls = tmp_path / "laion.parquet"
    pq.write_table(pa.table({"URL": [f"http://h/{i}.jpg" for i in range(7)], "TEXT": ["t"] * 7}), urls)
    with pytest.raises(IngestError, match=r"no column 'url' \(columns: URL, TEXT\)"):
        plan_ingest(str(urls), str(tmp_path / "out"))
    plan = plan_ingest(
        str(urls), str(tmp_path / "out"), IngestConfig(url_col="URL", caption_col="TEXT", samples_per_shard=3)
    )
    assert (plan.urls, plan.expected, plan.todo, plan.input_format) == (7, [0, 1, 2], [0, 1, 2], "parquet")


def test_plan_reads_csv_jsonl_txt_and_directories(tmp_path):
    (tmp_path / "a.csv").write_text("url,caption\nhttp://h/1.jpg,one\nhttp://h/2.jpg,two\n")
    assert plan_ingest(str(tmp_path / "a.csv"), str(tmp_path / "o1")).urls == 2
    (tmp_path / "b.jsonl").write_text('{"url": "http://h/1.jpg", "caption": "one"}\n')
    assert plan_ingest(str(tmp_path / "b.jsonl"), str(tmp_path / "o2")).urls == 1
    (tmp_path / "c.txt").write_text("http://h/1.jpg\nhttp://h/2.jpg\nhttp://h/3.jpg\n")
    plan = plan_ingest(str(tmp_path / "c.txt"), str(tmp_path / "o3"))
    assert (plan.urls, plan.caption_col) == (3, None)  # a .txt list has no alt-text
    lists = tmp_path / "lists"
    lists.mkdir()
    for i in range(2):
        (lists / f"{i}.csv").write_text("url,caption\nhttp://h/1.jpg,one\n")
    plan = plan_ingest(str(lists), str(tmp_path / "o4"))
    assert (plan.input_format, len(plan.files), plan.expected) == ("csv", 2, [0, 1])


def test_plan_refuses_missing_empty_and_unknown_lists(tmp_path):
    with pytest.raises(IngestError, match="URL list not found"):
        plan_ingest(str(tmp_path / "nope.parquet"), str(tmp_path / "out"))
    (tmp_path / "empty.csv").write_text("url,caption\n")
    with pytest.raises(IngestError, match="has no rows"):
        plan_ingest(str(tmp_path / "empty.csv"), str(tmp_path / "out"))
    (tmp_path / "urls.dat").write_text("http://h/1.jpg\n")
    with pytest.raises(IngestError, match="cannot tell the format"):
        plan_ingest(str(tmp_path / "urls.dat"), str(tmp_path / "out"))


def test_missing_img2dataset_names_the_extra(tmp_path, monkeypatch):
    urls = tmp_path / "u.csv"
    urls.write_text("url,caption\nhttp://h/1.jpg,one\n")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "img2dataset" else real(n, *a)
    )
    with pytest.raises(MissingExtraError, match=re.escape("pip install 'curate[img2dataset]'")):
        plan_ingest(str(urls), str(tmp_path / "out"))
    monkeypatch.setitem(sys.modules, "img2dataset", None)  # import fails
    with pytest.raises(MissingExtraError, match=re.escape("pip install 'curate[img2dataset]'")):
        import_img2dataset()


def test_ingest_cli_refuses_a_bad_list_before_any_download(tmp_path, capsys):
    urls = tmp_path / "laion.parquet"
    pq.write_table(pa.table({"URL": ["http://h/1.jpg"], "TEXT": ["t"]}), urls)
    assert main(["ingest", str(urls), "--output", str(tmp_path / "out")]) == 2
    assert "no column 'url'" in capsys.readouterr().err
    assert main(["ingest", str(urls), "--output", str(tmp_path / "out"), "--timeout", "0"]) == 2
    assert "ingest.timeout: must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_ingest_section_is_validated_by_field():
    cfg = pipeline_from_dict({"ingest": {"urls": "u.parquet", "url_col": "URL", "timeout": 3}})
    assert cfg.ingest is not None and cfg.ingest.timeout == 3.0
    with pytest.raises(ConfigError, match=r"ingest\.retries: must be >= 0"):
        pipeline_from_dict({"ingest": {"retries": -1}})
    with pytest.raises(ConfigError, match=r"ingest\.input_format: must be one of"):
        pipeline_from_dict({"ingest": {"input_format": "xlsx"}})
    with pytest.raises(ConfigError, match=r"ingest\.distrib: unknown field"):
        pipeline_from_dict({"ingest": {"distrib": "ray"}})


def test_run_takes_one_url_list_or_tars():
    cfg = pipeline_from_dict({"ingest": {"urls": "from_config.parquet"}})
    assert url_list_input(None, cfg) == "from_config.parquet"
    assert url_list_input(["u.parquet"], cfg) == "u.parquet"
    assert url_list_input(["s/{0..3}.tar"], cfg) is None
    with pytest.raises(ValueError, match="curated on its own"):
        url_list_input(["u.parquet", "s/0.tar"], cfg)
    with pytest.raises(ValueError, match="--input is required"):
        url_list_input(None, pipeline_from_dict({}))


# -- end to end: a local HTTP server, img2dataset for real, curation ----------------------

SLOW_S = 3.0  # the slow path answers after this; the download timeout is 1 s


@pytest.fixture
def image_server():
    """A threaded HTTP server on 127.0.0.1 with real images, 404s, a slow path, HTML and an opt-out."""
    files = {
        "/img/a.png": (image_bytes(64, 48, "png", seed=1), "image/png", {}),
        "/img/b.jpg": (image_bytes(80, 60, "jpg", seed=2), "image/jpeg", {}),
        "/img/big.png": (image_bytes(1024, 768, "png", seed=3), "image/png", {}),  # shrunk
        "/page.html": (b"<!doctype html><html><body>not an image</body></html>", "text/html", {}),
        "/img/optout.png": (image_bytes(32, 32, "png", seed=4), "image/png", {"X-Robots-Tag": "noai"}),
    }
    stop = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/img/slow.jpg":
                stop.wait(SLOW_S)
            if self.path in files or self.path == "/img/slow.jpg":
                data, ctype, headers = files.get(self.path, files["/img/b.jpg"])
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client gave up (the timeout path)
            else:
                self.send_error(404)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    yield base, {base + path: data for path, (data, _, _) in files.items()}
    stop.set()
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled", NO_PROXY="127.0.0.1", no_proxy="127.0.0.1"
    )
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "curate", *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.skipif(
    not HAS_IMG2DATASET, reason="img2dataset is not installed: pip install 'curate[img2dataset]'"
)
def test_ingest_then_curate_accounts_for_every_url(image_server, tmp_path):
    base, served = image_server
    expected = {
        base + "/img/a.png": ("success", None),
        base + "/img/missing.jpg": ("failed_to_download", "HTTP Error 404: Not Found"),
        base + "/img/b.jpg": ("success", None),
        base + "/img/slow.jpg": ("failed_to_download", "timed out"),
        base + "/page.html": ("failed_to_resize", "Image decoding error"),
        base + "/gone/c.png": ("failed_to_download", "HTTP Error 404: Not Found"),
        base + "/img/big.png": ("success", None),
        base + "/img/optout.png": ("failed_to_download", "Use of image disallowed by X-Robots-Tag directive"),
    }
    captions = {url: f"alt text {i}" for i, url in enumerate(expected)}
    urls = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": list(expected), "caption": list(captions.values())}), urls)
    pipeline = tmp_path / "alt_only.yaml"
    pipeline.write_text(
        "name: alt_only\npolicy: {}\n"
        "ingest:\n  timeout: 1\n  retries: 0\n  samples_per_shard: 5\n"
        "  resources: {processes: 1, threads: 4, distributor: multiprocessing}\n"
    )
    out = tmp_path / "out"

    # one command: download into OUT/_ingest, then curate
    proc = _cli(
        "run", str(pipeline), "--input", str(urls), "--output", str(out), "--num-cpus", "4", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "3 downloaded, 5 failed (4 failed_to_download, 1 failed_to_resize)" in proc.stderr, proc.stderr
    assert "HTTP Error 404: Not Found" in proc.stderr and f"shards: {out}/_ingest/*.tar" in proc.stderr
    # one progress display over the downloads (a line per finished shard), and img2dataset's
    # and Ray's own output in the run's log file instead of the console
    assert "curate run: ingest: 8 of 8 URLs" in proc.stderr, proc.stderr
    assert re.search(r"shard 00000: \d of 5 URLs downloaded", proc.stderr), proc.stderr
    (log,) = (out / "_logs").glob("run-*.log")
    assert "Starting the downloading" in log.read_text() and "Starting the downloading" not in proc.stderr
    shards = sorted(p.name for p in (out / "_ingest").glob("*.tar"))
    assert shards == ["00000.tar", "00001.tar"]  # 8 URLs at 5 per shard
    table = pq.read_table(out / "samples").to_pylist()
    assert sorted(r["url"] for r in table) == sorted(expected), "every URL exactly once"
    for r in table:
        status, message = expected[r["url"]]
        assert (r["download_status"], r["download_error"]) == (status, message), r
        assert r["alt_text"] == captions[r["url"]]
        if status == "success":
            assert r["status"] == "kept" and r["caption"] == captions[r["url"]]
            assert r["download_sha256"] == hashlib.sha256(served[r["url"]]).hexdigest()
            assert r["image_ext"] == "jpg" and min(r["width"], r["height"]) <= 512
        else:
            assert r["status"] == "error" and r["error"] == f"{status}: {message}"
            assert r["download_sha256"] is None
    big = next(r for r in table if r["url"].endswith("/big.png"))
    assert (big["width"], big["height"]) == (683, 512)  # keep_ratio: the short side to image_size
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"kept": 3, "dropped": 0, "error": 5, "total": 8}

    # `curate ingest` on its own, into a folder that already holds the shards: a rerun
    # downloads nothing and still reports every URL
    proc = _cli(
        "ingest", str(urls), "--output", str(out / "_ingest"), "--samples-per-shard", "5", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "8 URLs in 2 shard(s), already downloaded" in proc.stdout, proc.stdout
    assert "2  HTTP Error 404: Not Found" in proc.stdout and "1  timed out" in proc.stdout
    assert f"{out}/_ingest/*.tar" in proc.stdout
