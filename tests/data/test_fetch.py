"""``curate data fetch``: whole fetches over tiny fixture trees in the real Debian package layouts."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate.data import fetch as F
from curate.data.fetch import FetchOptions, OptionError
from curate.data.sources import OPENCLIPART_PNG_SUBDIR, OPENCLIPART_SVG_SUBDIR, TUXPAINT_SUBDIR, split_for
from tests.data.trees import (
    OC_SKIPPED,
    TUX_FOUND,
    TUX_SKIPPED,
    build_deb,
    build_openclipart,
    build_tuxpaint,
    fake_apt_get,
    read_shards,
    tree_bytes,
    txt,
)

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------- tuxpaint


def test_tuxpaint_layout_captions_splits_and_report(tmp_path: Path) -> None:
    source = build_tuxpaint(tmp_path / "src")
    out = tmp_path / "out"
    report = F.fetch_tuxpaint(source, out, FetchOptions(shard_size=1000, max_side=512))

    assert report.found == report.available == TUX_FOUND
    assert report.skipped == dict(sorted(TUX_SKIPPED.items()))
    written = TUX_FOUND - sum(TUX_SKIPPED.values())
    assert report.total_written == written
    assert report.found == report.total_written + sum(report.skipped.values())
    assert set(report.written) == {"train", "val", "test"}
    assert all(n > 0 for n in report.written.values()), report.written
    assert report.resized == 1

    saved = json.loads((out / F.REPORT_NAME).read_text())
    assert saved["skipped"] == report.skipped and saved["written"] == report.written
    assert {(s["id"], s["reason"]) for s in saved["skipped_items"]} >= {
        ("food/apple_mirror", "mirror_variant"),
        ("food/pear", "no_caption"),
        ("seasonal/gift", "no_image"),
        ("town/sign", "svg_only"),
        ("town/empty", "empty_caption"),
        ("town/broken", "unreadable_image"),
    }

    by_id: dict[str, dict] = {}
    all_keys: list[str] = []
    for split in ("train", "val", "test"):
        samples = read_shards(out / split)
        assert len(samples) == report.written[split]
        for key, sample in samples.items():
            assert len(key) == 9 and key.isdigit()
            meta = json.loads(sample["json"])
            assert meta["key"] == key
            assert meta["caption"] == sample["txt"].decode("utf-8")
            assert meta["split"] == split == split_for(meta["stamp"])
            assert meta["category"] == meta["stamp"].rsplit("/", 1)[0]
            assert "png" in sample
            by_id[meta["stamp"]] = {**meta, "_png": sample["png"]}
            all_keys.append(key)
    assert len(all_keys) == len(set(all_keys)) == written  # keys unique across splits

    crow = by_id["animals/birds/crow"]
    assert crow["caption"] == "A crow."  # line 1 only: the translations are not the caption
    assert crow["path"] == "animals/birds/crow.png" and crow["category"] == "animals/birds"
    assert crow["stamp_options"] == ["noflip"]
    assert crow["_png"] == (source / TUXPAINT_SUBDIR / "animals/birds/crow.png").read_bytes()  # unchanged

    banner = by_id["animals/banner"]
    assert banner["caption"] == "A very long banner."
    assert (banner["width"], banner["height"]) == (512, 17)
    assert (banner["original_width"], banner["original_height"]) == (3000, 100)
    with Image.open(io.BytesIO(banner["_png"])) as im:
        assert im.size == (512, 17) and im.mode == "RGBA"

    assert by_id["town/both"]["source_format"] == "png"
    assert by_id["misc/thing_07"]["caption"] == "Thing number 7."


def test_tuxpaint_tar_members_and_sidecars(tmp_path: Path) -> None:
    source = build_tuxpaint(tmp_path / "src")
    out = tmp_path / "out"
    report = F.fetch_tuxpaint(source, out, FetchOptions(shard_size=4, max_side=512))
    train = out / "train"
    tars = sorted(p.name for p in train.glob("*.tar"))
    assert tars == [f"{i:05d}.tar" for i in range(report.shards["train"])]
    assert report.shards["train"] == -(-report.written["train"] // 4)
    assert not list(out.rglob(".*.tmp"))

    with tarfile.open(train / "00000.tar") as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        assert all(m.mtime == 0 and m.uid == 0 and m.mode == 0o644 for m in members)
    assert len(names) == 12
    keys = sorted({n.split(".")[0] for n in names})
    assert len(keys) == 4
    assert sorted(n.split(".", 1)[1] for n in names) == ["json"] * 4 + ["png"] * 4 + ["txt"] * 4

    table = pq.read_table(train / "00000.parquet")
    assert {"key", "caption", "status", "width", "height", "original_width", "original_height"} <= set(
        table.column_names
    )
    assert table.column("key").to_pylist() == keys
    assert set(table.column("status").to_pylist()) == {"success"}
    stats = json.loads((train / "00000_stats.json").read_text())
    assert stats == {"count": 4, "successes": 4, "failed": 0}


def test_rerun_is_byte_identical_and_removes_stale_shards(tmp_path: Path) -> None:
    source = build_tuxpaint(tmp_path / "src")
    out = tmp_path / "out"
    F.fetch_tuxpaint(source, out, FetchOptions(shard_size=3, max_side=512))
    first = tree_bytes(out)
    again = F.fetch_tuxpaint(source, out, FetchOptions(shard_size=3, max_side=512, workers=3, force=True))
    assert not again.reused
    assert tree_bytes(out) == first  # same bytes in, same bytes out; threads change nothing

    F.fetch_tuxpaint(source, out, FetchOptions(shard_size=1000, max_side=512))  # fewer, larger shards
    names = sorted(p.name for p in (out / "train").iterdir())
    assert names == ["00000.parquet", "00000.tar", "00000_stats.json"]


def test_up_to_date_output_is_reused_until_inputs_or_shards_change(tmp_path: Path) -> None:
    source = build_tuxpaint(tmp_path / "src")
    out = tmp_path / "out"
    first = F.fetch_tuxpaint(source, out, FetchOptions(max_side=512))
    snapshot = tree_bytes(out)
    second = F.fetch_tuxpaint(source, out, FetchOptions(max_side=512))
    assert second.reused and not first.reused
    assert second.written == first.written and second.skipped == first.skipped
    assert tree_bytes(out) == snapshot

    (out / "val/00000.tar").unlink()  # a lost shard is rebuilt
    assert not F.fetch_tuxpaint(source, out, FetchOptions(max_side=512)).reused
    assert tree_bytes(out) == snapshot

    assert not F.fetch_tuxpaint(source, out, FetchOptions(max_side=256)).reused  # other options
    txt(source / TUXPAINT_SUBDIR / "animals/birds/crow.txt", "A black crow.\n")  # other input
    report = F.fetch_tuxpaint(source, out, FetchOptions(max_side=256))
    assert not report.reused
    captions = {
        json.loads(s["json"])["stamp"]: s["txt"]
        for split in ("train", "val", "test")
        for s in read_shards(out / split).values()
    }
    assert captions["animals/birds/crow"] == b"A black crow."


def test_limit_keeps_keys_and_splits_stable(tmp_path: Path) -> None:
    source = build_tuxpaint(tmp_path / "src")
    full = F.fetch_tuxpaint(source, tmp_path / "full", FetchOptions(max_side=512))
    part = F.fetch_tuxpaint(source, tmp_path / "part", FetchOptions(max_side=512, limit=5))
    assert part.found == 5 and part.available == full.available
    assert part.found == part.total_written + sum(part.skipped.values())
    for split in ("train", "val", "test"):
        part_samples = read_shards(tmp_path / "part" / split)
        full_samples = read_shards(tmp_path / "full" / split)
        for key, sample in part_samples.items():
            assert full_samples[key]["json"] == sample["json"]


def test_svg_rasterised_on_request(tmp_path: Path) -> None:
    pytest.importorskip("cairosvg")
    source = build_tuxpaint(tmp_path / "src")
    report = F.fetch_tuxpaint(source, tmp_path / "out", FetchOptions(max_side=512, rasterize_svg=True))
    assert "svg_only" not in report.skipped and report.rasterized == 1
    samples = {}
    for split in ("train", "val", "test"):
        samples.update(read_shards(tmp_path / "out" / split))
    sign = next(json.loads(s["json"]) for s in samples.values() if s["txt"] == b"A road sign.")
    assert sign["source_format"] == "svg" and (sign["width"], sign["height"]) == (60, 40)


def test_missing_source_layout_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(F.FetchError, match="usr/share/tuxpaint/stamps"):
        F.fetch_tuxpaint(tmp_path, tmp_path / "out")
    with pytest.raises(F.FetchError, match="does not exist"):
        F.fetch_tuxpaint(tmp_path / "nope", tmp_path / "out")


# -------------------------------------------------------------- openclipart


def test_openclipart_alt_text_metadata_downscale_and_skips(tmp_path: Path) -> None:
    source = build_openclipart(tmp_path / "src")
    out = tmp_path / "out"
    report = F.fetch_openclipart(source, out, FetchOptions(shard_size=1000, max_side=512))

    assert report.found == 8
    assert report.skipped == dict(sorted(OC_SKIPPED.items()))
    assert report.written == {"all": 3} and report.shards == {"all": 1}
    assert report.found == report.total_written + sum(report.skipped.values())
    assert (out / "00000.tar").is_file() and (out / "00000.parquet").is_file()

    samples = read_shards(out)
    metas = {json.loads(s["json"])["id"]: (json.loads(s["json"]), s) for s in samples.values()}
    assert set(metas) == {"animals/frog_01", "animals/huge_01", "tools/hammer_01"}

    frog, frog_sample = metas["animals/frog_01"]
    assert frog_sample["txt"] == b"2 dead frogs"
    assert frog["title"] == "2 dead frogs" and frog["description"] == "A frog... nothing more"
    assert frog["keywords"] == ["frog", "green", "swamp"]
    assert frog["creator"] == "Jane Artist"
    assert frog["png_path"] == "usr/share/openclipart/png/animals/frog_01.png"
    assert frog["svg_path"] == "usr/share/openclipart/svg/animals/frog_01.svg"
    assert frog["also_in"] == ["signs/frog_01"]

    huge, huge_sample = metas["animals/huge_01"]
    assert (huge["width"], huge["height"]) == (512, 17)
    assert (huge["original_width"], huge["original_height"]) == (3000, 100)
    with Image.open(io.BytesIO(huge_sample["png"])) as im:
        assert im.size == (512, 17)

    hammer, hammer_sample = metas["tools/hammer_01"]
    assert hammer["caption"] == "hammer & nails"
    with Image.open(io.BytesIO(hammer_sample["png"])) as im:
        assert im.mode == "RGBA"

    items = {s["id"]: s["reason"] for s in json.loads((out / F.REPORT_NAME).read_text())["skipped_items"]}
    assert items == {
        "signs/frog_01": "duplicate_symlink",
        "shapes/vector_only": "svg_only",
        "shapes/raster_only": "no_caption",
        "shapes/untitled": "empty_caption",
        "shapes/badxml": "unreadable_metadata",
    }

    first = tree_bytes(out)
    F.fetch_openclipart(source, out, FetchOptions(shard_size=1000, max_side=512, force=True))
    assert tree_bytes(out) == first


def test_openclipart_accepts_two_package_roots(tmp_path: Path) -> None:
    merged = build_openclipart(tmp_path / "merged")
    png_root, svg_root = tmp_path / "png", tmp_path / "svg"
    for root, sub in ((png_root, OPENCLIPART_PNG_SUBDIR), (svg_root, OPENCLIPART_SVG_SUBDIR)):
        shutil.copytree(merged / sub, root / sub, symlinks=True)
    a = F.fetch_openclipart(merged, tmp_path / "a", FetchOptions(max_side=512))
    b = F.fetch_openclipart([png_root, svg_root], tmp_path / "b", FetchOptions(max_side=512))
    assert a.written == b.written and a.skipped == b.skipped
    assert (tmp_path / "a/00000.tar").read_bytes() == (tmp_path / "b/00000.tar").read_bytes()


def test_too_large_is_counted(tmp_path: Path) -> None:
    source = build_openclipart(tmp_path / "src")
    report = F.fetch_openclipart(source, tmp_path / "out", FetchOptions(max_side=512, max_pixels=250_000))
    assert report.skipped["too_large"] == 1  # the 3000 x 100 banner


# ------------------------------------------------------------ options, apt


def test_options_out_of_range_name_the_option() -> None:
    for name, bad in (
        ("shard_size", 0),
        ("shard_size", 2.5),
        ("max_side", -1),
        ("limit", -1),
        ("limit", True),
        ("max_pixels", 0),
        ("workers", 0),
    ):
        with pytest.raises(OptionError, match=f"^{name} must be an integer >= [01], got ") as info:
            FetchOptions(**{name: bad})
        assert info.value.option == name
    FetchOptions(max_side=0, limit=0, workers=1)  # the bounds themselves are fine


def test_options_must_be_fetch_options(tmp_path: Path) -> None:
    source = build_tuxpaint(tmp_path / "src")
    with pytest.raises(TypeError, match="options must be a FetchOptions, got int: 1000"):
        F.fetch_tuxpaint(source, tmp_path / "out", 1000)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()


def test_report_records_the_output_options_only(tmp_path: Path) -> None:
    source = build_openclipart(tmp_path / "src")
    out = tmp_path / "out"
    F.fetch_openclipart(source, out, FetchOptions(shard_size=2, max_side=512))
    saved = json.loads((out / F.REPORT_NAME).read_text())
    assert list(saved["options"].items()) == [
        ("shard_size", 2),
        ("max_side", 512),
        ("limit", None),
        ("rasterize_svg", False),
        ("max_pixels", 1 << 30),
    ]
    # threads do not change the output, so they do not make it out of date
    assert F.fetch_openclipart(source, out, FetchOptions(shard_size=2, max_side=512, workers=4)).reused


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_fetch_dataset_downloads_records_the_package_and_reuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deb = build_deb(build_tuxpaint(tmp_path / "pkg"), "tuxpaint-stamps-default", "1:2024.10.25-1", tmp_path)
    log = tmp_path / "apt.log"
    fake_apt_get(tmp_path / "bin", {"tuxpaint-stamps-default": deb}, log, known=True)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    cache, out = tmp_path / "cache", tmp_path / "out"
    options = FetchOptions(shard_size=7, max_side=512)

    report = F.fetch_dataset("tuxpaint", out, options, cache=cache)
    root = cache / "extracted" / deb.name.removesuffix(".deb")
    assert report.packages == {"tuxpaint-stamps-default": deb.name}
    assert report.sources == [str(root)]
    saved = (out / F.REPORT_NAME).read_bytes()
    assert json.loads(saved)["packages"] == report.packages
    assert log.read_text().splitlines() == ["download tuxpaint-stamps-default"]

    # the same shards as a fetch from the extracted root
    F.fetch_tuxpaint(root, tmp_path / "direct", options)
    shards = {k: v for k, v in tree_bytes(out).items() if k != F.REPORT_NAME}
    assert shards == {k: v for k, v in tree_bytes(tmp_path / "direct").items() if k != F.REPORT_NAME}

    again = F.fetch_dataset("tuxpaint", out, options, cache=cache)
    assert again.reused and again.packages == report.packages
    assert (out / F.REPORT_NAME).read_bytes() == saved
    assert len(log.read_text().splitlines()) == 1  # cached .deb: apt not called again

    with pytest.raises(F.FetchError, match="unknown dataset 'nope'; known: tuxpaint, openclipart"):
        F.fetch_dataset("nope", out)


# ------------------------------------------------------------------- CLI


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "curate", "data", "fetch", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_fetch_from_source(tmp_path: Path) -> None:
    source = build_tuxpaint(tmp_path / "src")
    out = tmp_path / "out"
    proc = _cli("tuxpaint", "--source", str(source), "--output", str(out), "--max-side", "512", "-q")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / F.REPORT_NAME).read_text())
    assert report["found"] == TUX_FOUND and report["options"]["max_side"] == 512
    assert "svg_only=1" in proc.stdout
    assert (out / "train/00000.tar").is_file()


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from curate.cli import main

    def run(*args: str) -> tuple[int, str]:
        code = main(["data", "fetch", *args])
        return code, capsys.readouterr().err

    code, err = run("nosuchset", "--output", str(tmp_path / "out"))
    assert code == 2
    assert "unknown dataset 'nosuchset'" in err and "tuxpaint" in err and "openclipart" in err

    missing = tmp_path / "not-there"
    code, err = run("tuxpaint", "--source", str(missing), "--output", str(tmp_path / "out"))
    assert code == 2 and str(missing) in err

    code, err = run("openclipart", "--source", str(tmp_path), "--output", str(tmp_path / "out"))
    assert code == 2 and "usr/share/openclipart/png" in err
    assert not (tmp_path / "out").exists()

    source = build_tuxpaint(tmp_path / "src")
    for flag, value, expected in (
        ("--max-side", "-1", "--max-side must be an integer >= 0, got -1"),
        ("--shard-size", "0", "--shard-size must be an integer >= 1, got 0"),
        ("--workers", "0", "--workers must be an integer >= 1, got 0"),
    ):
        code, err = run("tuxpaint", "--source", str(source), "--output", str(tmp_path / "out"), flag, value)
        assert code == 2 and expected in err, err
    assert not (tmp_path / "out").exists()


def test_cli_defaults_are_the_library_defaults() -> None:
    from curate.cli import build_parser

    args = build_parser().parse_args(["data", "fetch", "tuxpaint", "--output", "x", "--workers", "1"])
    defaults = FetchOptions()
    for field in dataclasses.fields(FetchOptions):
        assert getattr(args, field.name) == getattr(defaults, field.name), field.name
    assert args.cache == F.DEFAULT_CACHE
