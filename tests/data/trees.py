"""Tiny fixture trees in the real Debian package layouts, and helpers to read fetched shards back."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import webdataset as wds
from PIL import Image

from curate.data.sources import OPENCLIPART_PNG_SUBDIR, OPENCLIPART_SVG_SUBDIR, TUXPAINT_SUBDIR

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


def png(path: Path, size: tuple[int, int] = (40, 30), color: tuple[int, ...] = (200, 30, 30, 255)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGBA", size, color).save(path)


def svg(path: Path, title: str, description: str = "", keywords: tuple[str, ...] = (), w: int = 60) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lis = "".join(f"<rdf:li>{k}</rdf:li>" for k in keywords)
    path.write_text(
        SVG_TEMPLATE.format(w=w, h=40, rw=w - 4, rh=36, title=title, description=description, keywords=lis)
    )


def txt(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def build_tuxpaint(root: Path) -> Path:
    """A tuxpaint-stamps-default root: ``usr/share/tuxpaint/stamps/CATEGORY/.../NAME.{png,svg,txt,dat}``."""
    stamps = root / TUXPAINT_SUBDIR
    png(stamps / "animals/birds/crow.png")
    txt(stamps / "animals/birds/crow.txt", "A crow.\nfr.utf8=Un corbeau.\nde.utf8=Eine Krähe.\n")
    txt(stamps / "animals/birds/crow.dat", "noflip\n")
    png(stamps / "animals/banner.png", size=(3000, 100))  # downscaled to 512 x 17
    txt(stamps / "animals/banner.txt", "\ufeffA very long   banner.\n")  # BOM + extra spaces
    png(stamps / "food/apple.png")
    txt(stamps / "food/apple.txt", "An apple.\n")
    png(stamps / "food/apple_mirror.png")  # tuxpaint's flipped copy: no .txt of its own
    png(stamps / "food/pear.png")  # no .txt at all
    txt(stamps / "seasonal/gift.txt", "A gift.\n")  # no image
    svg(stamps / "town/sign.svg", "unused")
    txt(stamps / "town/sign.txt", "A road sign.\n")
    png(stamps / "town/both.png")
    svg(stamps / "town/both.svg", "unused")  # png + svg: the png is used
    txt(stamps / "town/both.txt", "A house.\n")
    png(stamps / "town/empty.png")
    txt(stamps / "town/empty.txt", "fr.utf8=Vide.\n")  # only a translation: no English line
    (stamps / "town/broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    txt(stamps / "town/broken.txt", "A broken picture.\n")
    for i in range(30):  # enough stamps that every split gets some
        png(stamps / f"misc/thing_{i:02d}.png", color=(i * 8, 100, 50, 255))
        txt(stamps / f"misc/thing_{i:02d}.txt", f"Thing number {i}.\n")
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
    pngs, svgs = root / OPENCLIPART_PNG_SUBDIR, root / OPENCLIPART_SVG_SUBDIR
    png(pngs / "animals/frog_01.png")
    svg(svgs / "animals/frog_01.svg", "2 dead frogs", "A frog... nothing more", ("frog", "green", "swamp"))
    png(pngs / "animals/huge_01.png", size=(3000, 100))
    svg(svgs / "animals/huge_01.svg", "huge banner")
    # the same file symlinked into a second category (as the real packages do)
    (pngs / "signs").mkdir(parents=True)
    (svgs / "signs").mkdir(parents=True)
    os.symlink("../animals/frog_01.png", pngs / "signs/frog_01.png")
    os.symlink("../animals/frog_01.svg", svgs / "signs/frog_01.svg")
    svg(svgs / "shapes/vector_only.svg", "a star")  # no png
    png(pngs / "shapes/raster_only.png")  # no svg: no alt-text
    png(pngs / "shapes/untitled.png")
    svg(svgs / "shapes/untitled.svg", "")
    png(pngs / "shapes/badxml.png")
    (svgs / "shapes/badxml.svg").write_text("<svg><metadata>")
    png(pngs / "tools/hammer_01.png", size=(64, 64), color=(0, 0, 255, 128))
    svg(svgs / "tools/hammer_01.svg", "hammer &amp; nails", "", ("tool",))
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


def build_deb(tree: Path, package: str, version: str, out_dir: Path) -> Path:
    """A real ``.deb`` of ``tree`` (its ``usr/...`` files), as ``apt-get download`` would name it."""
    (tree / "DEBIAN").mkdir(parents=True, exist_ok=True)
    (tree / "DEBIAN/control").write_text(
        f"Package: {package}\nVersion: {version}\nArchitecture: all\nMaintainer: t <t@t>\nDescription: t\n"
    )
    deb = out_dir / f"{package}_{version.replace(':', '%3a')}_all.deb"
    build = ["dpkg-deb", "--root-owner-group", "-b", str(tree), str(deb)]
    subprocess.run(build, check=True, capture_output=True)
    return deb


def fake_apt_get(bin_dir: Path, debs: dict[str, Path], log: Path, *, known: bool = False) -> None:
    """An ``apt-get`` on ``bin_dir`` serving ``debs`` (package -> .deb) and logging each call.

    The real one needs the network; this one knows the packages only after ``apt-get
    update`` unless ``known``, which is what ``download_package``'s update retry is for.
    """
    bin_dir.mkdir(parents=True, exist_ok=True)
    updated = bin_dir / "updated"
    if known:
        updated.touch()
    cases = "".join(f'  {name}) cp {deb} "./{deb.name}" ;;\n' for name, deb in debs.items())
    script = bin_dir / "apt-get"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {log}\n'
        f'if [ "$1" = update ]; then touch {updated}; exit 0; fi\n'
        f'if [ ! -e {updated} ]; then echo "E: Unable to locate package $2" >&2; exit 100; fi\n'
        f'case "$2" in\n{cases}'
        '  *) echo "E: Unable to locate package $2" >&2; exit 100 ;;\n'
        "esac\n"
    )
    script.chmod(0o755)
