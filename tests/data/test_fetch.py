"""``curate data fetch``: tiny fixture trees in the real Debian package layouts, read back as WebDataset."""

from __future__ import annotations

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
import webdataset as wds
from PIL import Image

from curate.data import fetch as F

REPO = Path(__file__).resolve().parents[2]

SVG_TEMPLATE = """<?xml version="1.0" encoding="UTF-8" standalone="no"?>
<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}">
  <metadata>
    <rdf:RDF xmlns:cc="http://web.resource.org/cc/" xmlns:dc="http://purl.org/dc/elements/1.1/"
             xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
      <cc:Work rdf:about="">
        <dc:title>{title}</dc:title>
        <dc:description>{description}</dc:description>
        <dc:subject><rdf:Bag>{keywords}</rdf:Bag></dc:subject>
        <dc:publisher><cc:Agent rdf:about="http://www.openclipart.org/"><dc:title>Publisher Name</dc:title>
        </cc:Agent></dc:publisher>
        <dc:creator><cc:Agent><dc:title>Jane Artist</dc:title></cc:Agent></dc:creator>
        <dc:date>19 08 2005</dc:date>
        <dc:language>en</dc:language>
        <cc:license rdf:resource="http://web.resource.org/cc/PublicDomain"/>
      </cc:Work>
    </rdf:RDF>
  </metadata>
  <rect x="2" y="2" width="{rw}" height="{rh}" fill="#c03020"/>
</svg>
"""


def _png(path: Path, size: tuple[int, int] = (40, 30), color: tuple[int, ...] = (200, 30, 30, 255)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGBA", size, color).save(path)


def _svg(path: Path, title: str, description: str = "", keywords: tuple[str, ...] = (), w: int = 60) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lis = "".join(f"<rdf:li>{k}</rdf:li>" for k in keywords)
    path.write_text(
        SVG_TEMPLATE.format(w=w, h=40, rw=w - 4, rh=36, title=title, description=description, keywords=lis)
    )


def _txt(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def build_tuxpaint(root: Path) -> Path:
    """A tuxpaint-stamps-default root: ``usr/share/tuxpaint/stamps/CATEGORY/.../NAME.{png,svg,txt,dat}``."""
    stamps = root / F.TUXPAINT_SUBDIR
    _png(stamps / "animals/birds/crow.png")
    _txt(stamps / "animals/birds/crow.txt", "A crow.\nfr.utf8=Un corbeau.\nde.utf8=Eine Krähe.\n")
    _txt(stamps / "animals/birds/crow.dat", "noflip\n")
    _png(stamps / "animals/banner.png", size=(3000, 100))  # downscaled to 512 x 17
    _txt(stamps / "animals/banner.txt", "\ufeffA very long   banner.\n")  # BOM + extra spaces
    _png(stamps / "food/apple.png")
    _txt(stamps / "food/apple.txt", "An apple.\n")
    _png(stamps / "food/apple_mirror.png")  # tuxpaint's flipped copy: no .txt of its own
    _png(stamps / "food/pear.png")  # no .txt at all
    _txt(stamps / "seasonal/gift.txt", "A gift.\n")  # no image
    _svg(stamps / "town/sign.svg", "unused")
    _txt(stamps / "town/sign.txt", "A road sign.\n")
    _png(stamps / "town/both.png")
    _svg(stamps / "town/both.svg", "unused")  # png + svg: the png is used
    _txt(stamps / "town/both.txt", "A house.\n")
    _png(stamps / "town/empty.png")
    _txt(stamps / "town/empty.txt", "fr.utf8=Vide.\n")  # only a translation: no English line
    (stamps / "town/broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    _txt(stamps / "town/broken.txt", "A broken picture.\n")
    for i in range(30):  # enough stamps that every split gets some
        _png(stamps / f"misc/thing_{i:02d}.png", color=(i * 8, 100, 50, 255))
        _txt(stamps / f"misc/thing_{i:02d}.txt", f"Thing number {i}.\n")
    return root


TUX_FOUND = 10 + 30  # crow banner apple apple_mirror pear gift sign both empty broken + 30 things
TUX_SKIPPED = {
    "mirror_variant": 1,
    "no_caption": 1,
    "no_image": 1,
    "svg_only": 1,
    "empty_caption": 1,
    "unreadable_image": 1,
}


def build_openclipart(root: Path) -> Path:
    """openclipart-png + openclipart-svg extracted into one root (same relative paths, .png / .svg)."""
    png, svg = root / F.OPENCLIPART_PNG_SUBDIR, root / F.OPENCLIPART_SVG_SUBDIR
    _png(png / "animals/frog_01.png")
    _svg(svg / "animals/frog_01.svg", "2 dead frogs", "A frog... nothing more", ("frog", "green", "swamp"))
    _png(png / "animals/huge_01.png", size=(3000, 100))
    _svg(svg / "animals/huge_01.svg", "huge banner")
    # the same file symlinked into a second category (as the real packages do)
    (png / "signs").mkdir(parents=True)
    (svg / "signs").mkdir(parents=True)
    os.symlink("../animals/frog_01.png", png / "signs/frog_01.png")
    os.symlink("../animals/frog_01.svg", svg / "signs/frog_01.svg")
    _svg(svg / "shapes/vector_only.svg", "a star")  # no png
    _png(png / "shapes/raster_only.png")  # no svg: no alt-text
    _png(png / "shapes/untitled.png")
    _svg(svg / "shapes/untitled.svg", "")
    _png(png / "shapes/badxml.png")
    (svg / "shapes/badxml.svg").write_text("<svg><metadata>")
    _png(png / "tools/hammer_01.png", size=(64, 64), color=(0, 0, 255, 128))
    _svg(svg / "tools/hammer_01.svg", "hammer &amp; nails", "", ("tool",))
    return root


OC_SKIPPED = {
    "duplicate_symlink": 1,
    "svg_only": 1,
    "no_caption": 1,
    "empty_caption": 1,
    "unreadable_metadata": 1,
}


def read_shards(directory: Path) -> dict[str, dict]:
    """key -> {ext: bytes} through the webdataset library."""
    urls = sorted(str(p) for p in directory.glob("*.tar"))
    if not urls:
        return {}
    out = {}
    for sample in wds.WebDataset(urls, shardshuffle=False):
        out[sample["__key__"]] = {k: v for k, v in sample.items() if not k.startswith("__")}
    return out


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------- tuxpaint


def test_tuxpaint_layout_captions_splits_and_report(tmp_path: Path) -> None:
    source = build_tuxpaint(tmp_path / "src")
    out = tmp_path / "out"
    report = F.fetch_tuxpaint(source, out, shard_size=1000, max_side=512)

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
            assert meta["split"] == split == F.split_for(meta["stamp"])
            assert meta["category"] == meta["stamp"].rsplit("/", 1)[0]
            assert "png" in sample
            by_id[meta["stamp"]] = {**meta, "_png": sample["png"]}
            all_keys.append(key)
    assert len(all_keys) == len(set(all_keys)) == written  # keys unique across splits

    crow = by_id["animals/birds/crow"]
    assert crow["caption"] == "A crow."  # line 1 only: the translations are not the caption
    assert crow["path"] == "animals/birds/crow.png" and crow["category"] == "animals/birds"
    assert crow["stamp_options"] == ["noflip"]
    assert crow["_png"] == (source / F.TUXPAINT_SUBDIR / "animals/birds/crow.png").read_bytes()  # unchanged

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
    report = F.fetch_tuxpaint(source, out, shard_size=4, max_side=512)
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
    F.fetch_tuxpaint(source, out, shard_size=3, max_side=512)
    first = tree_bytes(out)
    again = F.fetch_tuxpaint(source, out, shard_size=3, max_side=512, workers=3, force=True)
    assert not again.reused
    assert tree_bytes(out) == first  # same bytes in, same bytes out; threads change nothing

    F.fetch_tuxpaint(source, out, shard_size=1000, max_side=512)  # fewer, larger shards
    names = sorted(p.name for p in (out / "train").iterdir())
    assert names == ["00000.parquet", "00000.tar", "00000_stats.json"]


def test_up_to_date_output_is_reused_until_inputs_or_shards_change(tmp_path: Path) -> None:
    source = build_tuxpaint(tmp_path / "src")
    out = tmp_path / "out"
    first = F.fetch_tuxpaint(source, out, max_side=512)
    snapshot = tree_bytes(out)
    second = F.fetch_tuxpaint(source, out, max_side=512)
    assert second.reused and not first.reused
    assert second.written == first.written and second.skipped == first.skipped
    assert tree_bytes(out) == snapshot

    (out / "val/00000.tar").unlink()  # a lost shard is rebuilt
    assert not F.fetch_tuxpaint(source, out, max_side=512).reused
    assert tree_bytes(out) == snapshot

    assert not F.fetch_tuxpaint(source, out, max_side=256).reused  # other options
    _txt(source / F.TUXPAINT_SUBDIR / "animals/birds/crow.txt", "A black crow.\n")  # other input
    report = F.fetch_tuxpaint(source, out, max_side=256)
    assert not report.reused
    captions = {
        json.loads(s["json"])["stamp"]: s["txt"]
        for split in ("train", "val", "test")
        for s in read_shards(out / split).values()
    }
    assert captions["animals/birds/crow"] == b"A black crow."


def test_limit_keeps_keys_and_splits_stable(tmp_path: Path) -> None:
    source = build_tuxpaint(tmp_path / "src")
    full = F.fetch_tuxpaint(source, tmp_path / "full", max_side=512)
    part = F.fetch_tuxpaint(source, tmp_path / "part", max_side=512, limit=5)
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
    report = F.fetch_tuxpaint(source, tmp_path / "out", max_side=512, rasterize_svg=True)
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


def test_parse_svg_metadata_takes_the_works_title_not_the_agents() -> None:
    data = SVG_TEMPLATE.format(
        w=10,
        h=10,
        rw=6,
        rh=6,
        title=" milk\n  bottle ",
        description="a glass of milk",
        keywords="<rdf:li>food</rdf:li><rdf:li> beverage </rdf:li>",
    ).encode()
    md = F.parse_svg_metadata(data)
    assert md.title == "milk bottle"
    assert md.description == "a glass of milk"
    assert md.keywords == ["food", "beverage"]
    assert md.creator == "Jane Artist"
    assert md.license == "http://web.resource.org/cc/PublicDomain"
    alt = data.replace(
        b"<dc:title> milk\n  bottle </dc:title>",
        b'<dc:title><rdf:Alt><rdf:li xml:lang="en">Milk</rdf:li><rdf:li xml:lang="fr">Lait</rdf:li>'
        b"</rdf:Alt></dc:title>",
    )
    assert F.parse_svg_metadata(alt).title == "Milk"
    untitled = data.replace(b"<dc:title> milk\n  bottle </dc:title>", b"")
    assert F.parse_svg_metadata(untitled).title is None  # not the creator's or publisher's name
    no_work = (
        b'<svg xmlns:dc="http://purl.org/dc/elements/1.1/"><metadata>'
        b"<dc:creator><dc:title>Someone</dc:title></dc:creator>"
        b"<other><dc:title>Bare title</dc:title></other></metadata></svg>"
    )
    assert F.parse_svg_metadata(no_work).title == "Bare title"
    assert F.parse_svg_metadata(no_work.replace(b"Bare title", b"")).title is None


def test_openclipart_alt_text_metadata_downscale_and_skips(tmp_path: Path) -> None:
    source = build_openclipart(tmp_path / "src")
    out = tmp_path / "out"
    report = F.fetch_openclipart(source, out, shard_size=1000, max_side=512)

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
    F.fetch_openclipart(source, out, shard_size=1000, max_side=512, force=True)
    assert tree_bytes(out) == first


def test_openclipart_accepts_two_package_roots(tmp_path: Path) -> None:
    merged = build_openclipart(tmp_path / "merged")
    png_root, svg_root = tmp_path / "png", tmp_path / "svg"
    for root, sub in ((png_root, F.OPENCLIPART_PNG_SUBDIR), (svg_root, F.OPENCLIPART_SVG_SUBDIR)):
        shutil.copytree(merged / sub, root / sub, symlinks=True)
    a = F.fetch_openclipart(merged, tmp_path / "a", max_side=512)
    b = F.fetch_openclipart([png_root, svg_root], tmp_path / "b", max_side=512)
    assert a.written == b.written and a.skipped == b.skipped
    assert (tmp_path / "a/00000.tar").read_bytes() == (tmp_path / "b/00000.tar").read_bytes()


def test_too_large_is_counted(tmp_path: Path) -> None:
    source = build_openclipart(tmp_path / "src")
    report = F.fetch_openclipart(source, tmp_path / "out", max_side=512, max_pixels=250_000)
    assert report.skipped["too_large"] == 1  # the 3000 x 100 banner


# ------------------------------------------------------------------- apt


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_download_package_uses_apt_once_and_updates_only_for_unknown(tmp_path: Path, monkeypatch) -> None:
    pkg = tmp_path / "pkgdir"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "DEBIAN/control").write_text(
        "Package: fake-pkg\nVersion: 1:1.0-1\nArchitecture: all\nMaintainer: t <t@t>\nDescription: t\n"
    )
    _txt(pkg / "usr/share/fake/hello.txt", "hi\n")
    deb = tmp_path / "fake-pkg_1%3a1.0-1_all.deb"
    build = ["dpkg-deb", "--root-owner-group", "-b", str(pkg), str(deb)]
    subprocess.run(build, check=True, capture_output=True)

    bin_dir, log = tmp_path / "bin", tmp_path / "apt.log"
    bin_dir.mkdir()
    fake = bin_dir / "apt-get"
    updated = tmp_path / "updated"  # apt knows the package only after "apt-get update"
    fake.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {log}\n'
        f'if [ "$1" = update ]; then touch {updated}; exit 0; fi\n'
        f'if [ ! -e {updated} ]; then echo "E: Unable to locate package $2" >&2; exit 100; fi\n'
        f'cp {deb} "./$(basename {deb})"\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    cache = tmp_path / "cache"
    root = F.download_package("fake-pkg", cache)
    assert root == cache / "extracted" / deb.name.removesuffix(".deb")
    assert (cache / deb.name).is_file()
    assert (root / "usr/share/fake/hello.txt").read_text() == "hi\n"
    assert log.read_text().splitlines() == ["download fake-pkg", "update", "download fake-pkg"]

    again = F.download_package("fake-pkg", cache)  # cached: apt is not called again
    assert again == root
    assert len(log.read_text().splitlines()) == 3
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]


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
