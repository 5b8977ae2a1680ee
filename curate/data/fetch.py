"""Fetch real image/alt-text pairs from Debian packages into img2dataset-layout WebDataset shards.

Only package registries are reachable from this project's machines, so the real data
comes from two Debian package families:

* ``tuxpaint``: ``tuxpaint-stamps-default``, ~950 stamps, each with a human-written
  English caption on line 1 of its ``.txt``. This is the seed, human-annotated set;
  it is split 80/10/10 into train/val/test by a hash of the stamp's id, so a stamp
  stays in its split whatever else changes.
* ``openclipart``: ``openclipart-png`` + ``openclipart-svg``, ~8,100 clip-art paths
  whose alt-text is the SVG's ``dc:title`` (with ``dc:description`` and ``dc:subject``
  kept in the metadata): short, often uninformative, web-like text to curate.

Output is what img2dataset writes: ``00000.tar`` holding ``KEY.png|jpg``, ``KEY.txt``,
``KEY.json`` per sample, with ``00000.parquet`` and ``00000_stats.json`` beside it.
Nothing is dropped silently: every discovered item is either written or counted
under a skip reason in ``_fetch_report.json``. The same input bytes give the same
output bytes (sorted discovery, fixed tar headers, no timestamps).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import itertools
import json
import os
import posixpath
import re
import shutil
import subprocess
import tarfile
import tempfile
import threading
import warnings
import xml.etree.ElementTree as ET
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from curate.io.files import AtomicFile, TarWriter, atomic_open, atomic_path, is_temp, write_atomic

DEFAULT_CACHE = Path("~/.cache/curate/debs")
DEFAULT_SHARD_SIZE = 1000
DEFAULT_MAX_SIDE = 1024
# Above this many pixels an image is skipped (``too_large``) instead of decoded: the
# largest openclipart PNG (20990x29700, ~623 M px) needs ~2.5 GB as RGBA, ~5 GB while resampling.
DEFAULT_MAX_PIXELS = 1 << 30
HUGE_IMAGE_PIXELS = 64_000_000  # images above this are decoded one at a time (memory)
_HUGE_IMAGE_LOCK = threading.Lock()
KEY_DIGITS = 9
# Part of the up-to-date fingerprint: bump when the same input would now give other output.
FORMAT_VERSION = 1
REPORT_NAME = "_fetch_report.json"
# (split, percent) in hash order; the seed set is split, the web-like set is not
SPLITS: tuple[tuple[str, int], ...] = (("train", 80), ("val", 10), ("test", 10))
ALL_SPLIT = "all"

TUXPAINT_SUBDIR = "usr/share/tuxpaint/stamps"
OPENCLIPART_PNG_SUBDIR = "usr/share/openclipart/png"
OPENCLIPART_SVG_SUBDIR = "usr/share/openclipart/svg"

# skip reasons (the keys of FetchReport.skipped)
SKIP_NO_IMAGE = "no_image"  # a caption file with no image beside it
SKIP_NO_CAPTION = "no_caption"  # an image with no caption source
SKIP_EMPTY_CAPTION = "empty_caption"
SKIP_UNREADABLE_CAPTION = "unreadable_caption"
SKIP_UNREADABLE_METADATA = "unreadable_metadata"  # SVG that is not well-formed XML
SKIP_SVG_ONLY = "svg_only"  # vector only and rasterising not asked for
SKIP_UNREADABLE_IMAGE = "unreadable_image"
SKIP_TOO_LARGE = "too_large"
SKIP_MIRROR = "mirror_variant"  # tuxpaint's pre-flipped ``*_mirror`` copy of a stamp
SKIP_DUPLICATE = "duplicate_symlink"  # openclipart symlinks one file into several categories

_DC = "{http://purl.org/dc/elements/1.1/}"
# elements whose dc:title names a person or organisation, not the picture
_AGENT_TAGS = frozenset({"Agent", "creator", "publisher", "rights", "contributor"})
_RDF = "{http://www.w3.org/1999/02/22-rdf-syntax-ns#}"
# tuxpaint translation lines look like ``pt_BR.utf8=...``; line 1 is the English one
_LOCALE_LINE = re.compile(r"^[A-Za-z]{2,3}(_[A-Za-z]{2,3})?(@[A-Za-z0-9]+)?\.[Uu][Tt][Ff]-?8=")
_SHARD_FILE = re.compile(r"^\d{5}(\.tar|\.parquet|_stats\.json)$")

SIDECAR_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("url", pa.string()),
        pa.field("status", pa.string()),
        pa.field("error_message", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("original_width", pa.int32()),
        pa.field("original_height", pa.int32()),
        pa.field("sha256", pa.string()),
    ]
)


class FetchError(RuntimeError):
    """A dataset could not be fetched: bad source tree, apt failure, missing optional dependency."""


@dataclass(frozen=True)
class DatasetSpec:
    """A fetchable dataset: the Debian packages it comes from and what it is for."""

    name: str
    packages: tuple[str, ...]
    description: str


DATASETS: dict[str, DatasetSpec] = {
    "tuxpaint": DatasetSpec(
        "tuxpaint",
        ("tuxpaint-stamps-default",),
        "~950 stamps with human-written English captions (seed set, train/val/test)",
    ),
    "openclipart": DatasetSpec(
        "openclipart",
        ("openclipart-png", "openclipart-svg"),
        "~8,100 clip-art images with SVG dc:title alt-text (noisy web-like set)",
    ),
}


@dataclass
class FetchReport:
    """What a fetch did: ``found == sum(written) + sum(skipped)`` always holds."""

    dataset: str
    output: str
    sources: list[str]
    packages: dict[str, str] = field(default_factory=dict)  # package -> .deb used (when downloaded)
    available: int = 0  # items discovered in the source
    found: int = 0  # items considered (``available`` cut by ``limit``)
    written: dict[str, int] = field(default_factory=dict)  # split -> samples
    shards: dict[str, int] = field(default_factory=dict)  # split -> tar files
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> items
    resized: int = 0
    rasterized: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    skipped_items: list[dict[str, str]] = field(default_factory=list)  # {id, reason, detail}
    # what the up-to-date check compares: inputs (names, sizes, mtimes), options, versions
    fingerprint: str = ""
    outputs: dict[str, int] = field(default_factory=dict)  # shard file -> size in bytes
    reused: bool = False  # this run found the output up to date and rewrote nothing (not saved)

    @property
    def total_written(self) -> int:
        return sum(self.written.values())

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["reused"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FetchReport:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def summary(self) -> str:
        """A few human-readable lines for the terminal."""
        lines = [
            f"{self.dataset}: {self.found} items found ({self.available} available), "
            f"{self.total_written} written, {sum(self.skipped.values())} skipped",
            "  written: "
            + ", ".join(f"{s}={n} ({self.shards.get(s, 0)} shards)" for s, n in self.written.items()),
        ]
        if self.skipped:
            lines.append("  skipped: " + ", ".join(f"{r}={n}" for r, n in sorted(self.skipped.items())))
        lines.append(f"  resized: {self.resized}, rasterized: {self.rasterized}")
        if self.reused:
            lines.append("  output was up to date: nothing rewritten (force to rebuild)")
        lines.append(f"  report: {Path(self.output) / REPORT_NAME}")
        return "\n".join(lines)


@dataclass(frozen=True)
class SvgMetadata:
    """The Dublin Core metadata openclipart embeds in each SVG (``cc:Work``)."""

    title: str | None
    description: str | None
    keywords: list[str]
    creator: str | None = None
    date: str | None = None
    language: str | None = None
    license: str | None = None


@dataclass
class _Item:
    """One discovered candidate sample, before its image is read."""

    id: str  # stable id: the item's path relative to its data root, without extension
    image: Path | None = None
    caption: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    skip: str | None = None
    detail: str = ""


@dataclass
class _Encoded:
    data: bytes
    ext: str
    width: int
    height: int
    original_width: int
    original_height: int
    sha256: str  # of the source file's bytes
    resized: bool = False
    rasterized: bool = False


class _Skip(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------- apt


def download_package(name: str, cache: Path = DEFAULT_CACHE) -> Path:
    """Download (``apt-get download``) and extract (``dpkg-deb -x``) a package into ``cache``.

    Returns the extracted root, ``cache/extracted/<.deb name without .deb>``. A cached ``.deb`` and its
    extraction are reused, so a second call costs nothing; ``apt-get update`` runs only
    when the package is unknown to apt. Both steps go through temporary names, so an
    interrupted run leaves no half file that a later run would trust.
    """
    cache = Path(cache).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    deb = _cached_deb(cache, name)
    if deb is None:
        tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=cache))
        try:
            proc = _run(["apt-get", "download", name], cwd=tmp)
            if proc.returncode != 0 and _unknown_package(proc.stdout + proc.stderr):
                update = _run(["apt-get", "update"])
                if update.returncode != 0:
                    raise FetchError(f"apt-get update failed:\n{_tail(update.stdout + update.stderr)}")
                proc = _run(["apt-get", "download", name], cwd=tmp)
            if proc.returncode != 0:
                raise FetchError(f"apt-get download {name} failed:\n{_tail(proc.stdout + proc.stderr)}")
            debs = sorted(tmp.glob(f"{name}_*.deb"))
            if not debs:
                raise FetchError(f"apt-get download {name} succeeded but left no {name}_*.deb in {tmp}")
            for found in debs:
                os.replace(found, cache / found.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        deb = _cached_deb(cache, name)
        assert deb is not None
    root = cache / "extracted" / deb.name.removesuffix(".deb")
    if not root.is_dir():
        with atomic_path(root, replace=False) as tmp:  # another fetch may extract it first
            proc = _run(["dpkg-deb", "-x", str(deb), str(tmp)])
            if proc.returncode != 0:
                raise FetchError(f"dpkg-deb -x {deb} failed:\n{_tail(proc.stdout + proc.stderr)}")
    return root


def _cached_deb(cache: Path, name: str) -> Path | None:
    # Debian package names have no "_", so NAME_*.deb matches only this package
    debs = sorted(cache.glob(f"{name}_*.deb"), key=lambda p: (p.stat().st_mtime, p.name))
    return debs[-1] if debs else None


def _unknown_package(output: str) -> bool:
    markers = ("Unable to locate package", "has no installation candidate", "Can't select candidate")
    return any(m in output for m in markers)


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise FetchError(
            f"{cmd[0]} not found: fetching needs Debian's apt tools, or pass --source DIR "
            "with an already-extracted package root"
        ) from exc


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


# ------------------------------------------------------------------- metadata


def parse_svg_metadata(source: Path | bytes) -> SvgMetadata:
    """Read openclipart's Dublin Core block: ``dc:title`` is the alt-text, the rest is context.

    Only the work's own fields count: ``dc:title`` also names the creator, publisher
    and rights holder (``cc:Agent``), which must not become the caption. Raises
    ``xml.etree.ElementTree.ParseError`` for an SVG that is not well-formed.
    """
    data = source.read_bytes() if isinstance(source, Path) else source
    root = ET.fromstring(data)
    work = next((el for el in root.iter() if _local(el.tag) == "Work"), None)

    def own(tag: str) -> ET.Element | None:
        if work is not None:  # the work's own child, never an Agent's
            return work.find(_DC + tag)
        for parent in root.iter():  # no cc:Work: the first such field outside any cc:Agent
            if _local(parent.tag) not in _AGENT_TAGS:
                found = parent.find(_DC + tag)
                if found is not None:
                    return found
        return None

    def text_of(el: ET.Element | None) -> str | None:
        if el is None:
            return None
        items = [li for li in el.iter(_RDF + "li")]
        if items:  # rdf:Alt of translations: take the first
            return _clean("".join(items[0].itertext())) or None
        return _clean("".join(el.itertext())) or None

    subject = own("subject")
    keywords: list[str] = []
    if subject is not None:
        items = list(subject.iter(_RDF + "li"))
        raw = ["".join(li.itertext()) for li in items] if items else (subject.text or "").split(",")
        keywords = [k for k in (_clean(r) for r in raw) if k]
    creator = own("creator")
    license_el = next(
        (el for el in (work if work is not None else root).iter() if _local(el.tag) == "license"), None
    )
    license_url = None
    if license_el is not None:
        license_url = license_el.get(_RDF + "resource") or _clean("".join(license_el.itertext())) or None
    return SvgMetadata(
        title=text_of(own("title")),
        description=text_of(own("description")),
        keywords=keywords,
        creator=text_of(creator.find(f".//{_DC}title") if creator is not None else None),
        date=text_of(own("date")),
        language=text_of(own("language")),
        license=license_url,
    )


def read_stamp_caption(path: Path) -> str:
    """Line 1 of a tuxpaint stamp ``.txt`` is its English description; the rest are translations."""
    text = path.read_bytes().decode("utf-8-sig")
    lines = text.splitlines()
    first = lines[0] if lines else ""
    if _LOCALE_LINE.match(first):  # no English line: only translations
        return ""
    return _clean(first)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _clean(text: str) -> str:
    return " ".join(text.split())


def split_for(stable_id: str, splits: Sequence[tuple[str, int]] = SPLITS) -> str:
    """Assign a split from sha1 of a stable id: fixed across runs, limits and package updates."""
    bucket = int(hashlib.sha1(stable_id.encode("utf-8")).hexdigest()[:8], 16) % 100
    total = 0
    for name, percent in splits:
        total += percent
        if bucket < total:
            return name
    return splits[-1][0]


# ------------------------------------------------------------------ discovery


def _scan(root: Path, exts: Sequence[str]) -> dict[str, dict[str, Path]]:
    """Map relative stem -> {ext: path} for files (or symlinks, even broken ones) under root."""
    stems: dict[str, dict[str, Path]] = {}
    for dirpath, _dirnames, filenames in os.walk(root):
        for filename in filenames:
            stem, dot, ext = filename.rpartition(".")
            ext = ext.lower()
            if not dot or not stem or ext not in exts:
                continue
            path = Path(dirpath) / filename
            rel = path.relative_to(root).with_name(stem).as_posix()
            stems.setdefault(rel, {})[ext] = path
    return stems


def _tuxpaint_items(stamps: Path, package_prefix: str, limit: int | None = None) -> tuple[list[_Item], int]:
    """The first ``limit`` stamps in path order (captions read only for those), and how many there are."""
    stems = _scan(stamps, ("png", "svg", "txt", "dat"))
    # a lone .dat (stamp options) is not an item
    ordered = [s for s in sorted(stems) if stems[s].keys() & {"png", "svg", "txt"}]
    items: list[_Item] = []
    for stem in ordered[:limit]:
        files = stems[stem]
        png, svg, txt = files.get("png"), files.get("svg"), files.get("txt")
        image = png or svg
        item = _Item(id=stem, image=image)
        item.meta = {
            "stamp": stem,
            "category": posixpath.dirname(stem),
            "path": _rel(image, stamps) if image else None,
            "caption_path": _rel(txt, stamps) if txt else None,
            "source_format": image.suffix.lower().lstrip(".") if image else None,
            "url": f"deb://{package_prefix}/{_rel(image, stamps)}" if image else None,
        }
        if "dat" in files:
            with contextlib.suppress(OSError, UnicodeDecodeError):
                options = [ln.strip() for ln in files["dat"].read_text("utf-8").splitlines() if ln.strip()]
                item.meta["stamp_options"] = options
        if image is None:
            item.skip, item.detail = SKIP_NO_IMAGE, _rel(txt, stamps) if txt else stem
        elif txt is None:
            base = stem.removesuffix("_mirror")
            if base != stem and base in stems:
                item.skip, item.detail = SKIP_MIRROR, base
            else:
                item.skip, item.detail = SKIP_NO_CAPTION, _rel(image, stamps)
        else:
            try:
                item.caption = read_stamp_caption(txt)
            except (OSError, UnicodeDecodeError) as exc:
                item.skip, item.detail = SKIP_UNREADABLE_CAPTION, f"{_rel(txt, stamps)}: {exc}"
            else:
                if not item.caption:
                    item.skip, item.detail = SKIP_EMPTY_CAPTION, _rel(txt, stamps)
                elif png is None:
                    item.skip, item.detail = SKIP_SVG_ONLY, _rel(image, stamps)
        items.append(item)
    return items, len(ordered)


def _openclipart_items(png_root: Path, svg_root: Path, limit: int | None = None) -> tuple[list[_Item], int]:
    """The first ``limit`` items in path order (SVGs parsed only for those), and how many there are."""
    pngs = {stem: f["png"] for stem, f in _scan(png_root, ("png",)).items()}
    svgs = {stem: f["svg"] for stem, f in _scan(svg_root, ("svg",)).items()}
    stems = sorted(set(pngs) | set(svgs))

    # openclipart symlinks one file into several categories: keep one item per real file
    def primary(stem: str) -> Path:
        return pngs.get(stem) or svgs[stem]

    groups: dict[str, list[str]] = {}
    for stem in stems:
        groups.setdefault(os.path.realpath(primary(stem)), []).append(stem)
    canonical: dict[str, str] = {}
    for group in groups.values():
        keep = next((s for s in group if not primary(s).is_symlink()), group[0])
        for stem in group:
            canonical[stem] = keep

    items: list[_Item] = []
    for stem in stems[:limit]:
        png, svg = pngs.get(stem), svgs.get(stem)
        item = _Item(id=stem, image=png or svg)
        item.meta = {
            "category": posixpath.dirname(stem),
            "png_path": f"{OPENCLIPART_PNG_SUBDIR}/{_rel(png, png_root)}" if png else None,
            "svg_path": f"{OPENCLIPART_SVG_SUBDIR}/{_rel(svg, svg_root)}" if svg else None,
            "url": f"deb://openclipart-png/{OPENCLIPART_PNG_SUBDIR}/{_rel(png, png_root)}" if png else None,
        }
        if canonical[stem] != stem:
            item.skip, item.detail = SKIP_DUPLICATE, canonical[stem]
            items.append(item)
            continue
        aliases = [s for s in groups[os.path.realpath(primary(stem))] if s != stem]
        if aliases:
            item.meta["also_in"] = aliases
        if svg is None:
            item.skip, item.detail = SKIP_NO_CAPTION, f"no SVG for {stem}"
            items.append(item)
            continue
        try:
            md = parse_svg_metadata(svg)
        except (OSError, ET.ParseError) as exc:
            item.skip, item.detail = SKIP_UNREADABLE_METADATA, f"{stem}.svg: {exc}"
            items.append(item)
            continue
        item.caption = md.title or ""
        item.meta.update(
            title=md.title,
            description=md.description,
            keywords=md.keywords,
            creator=md.creator,
            date=md.date,
            language=md.language,
            license=md.license,
        )
        if not item.caption:
            item.skip, item.detail = SKIP_EMPTY_CAPTION, f"{stem}.svg"
        elif png is None:
            item.skip, item.detail = SKIP_SVG_ONLY, f"{stem}.svg"
        items.append(item)
    return items, len(stems)


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


# --------------------------------------------------------------------- images


@contextlib.contextmanager
def _no_pillow_bomb_check() -> Iterator[None]:
    """We enforce our own ``max_pixels``; Pillow's global limit would refuse real openclipart PNGs.

    Not thread-safe (Pillow's limit is a module global); fetching is single-threaded.
    """
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _encode_raster(path: Path, max_side: int, max_pixels: int) -> _Encoded:
    """Keep an image's original bytes when they fit; otherwise downscale and re-encode.

    Call inside ``_no_pillow_bomb_check()``: ``max_pixels`` is the limit that applies.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise _Skip(SKIP_UNREADABLE_IMAGE, f"{path.name}: {exc}") from exc
    sha = hashlib.sha256(raw).hexdigest()
    try:
        im = Image.open(io.BytesIO(raw))
        width, height = im.size
        fmt = im.format
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise _Skip(SKIP_UNREADABLE_IMAGE, f"{path.name}: {type(exc).__name__}: {exc}") from exc
    if width * height > max_pixels:
        raise _Skip(SKIP_TOO_LARGE, f"{path.name}: {width}x{height} > {max_pixels} pixels")
    # one huge image at a time: a 20990x29700 RGBA PNG alone takes 2.5 GB decoded
    lock = _HUGE_IMAGE_LOCK if width * height > HUGE_IMAGE_PIXELS else contextlib.nullcontext()
    with lock:
        try:
            im.load()  # decode fully: a truncated file is caught here, not by a trainer later
        except (OSError, SyntaxError, ValueError) as exc:
            raise _Skip(SKIP_UNREADABLE_IMAGE, f"{path.name}: {type(exc).__name__}: {exc}") from exc
        needs_resize = max_side > 0 and max(width, height) > max_side
        if not needs_resize and fmt in ("PNG", "JPEG"):
            ext = "png" if fmt == "PNG" else "jpg"
            return _Encoded(raw, ext, width, height, width, height, sha)
        data, ext, size = _reencode(im, fmt, max_side if needs_resize else 0)
    return _Encoded(data, ext, size[0], size[1], width, height, sha, resized=needs_resize)


def _reencode(im: Image.Image, fmt: str | None, max_side: int) -> tuple[bytes, str, tuple[int, int]]:
    has_alpha = im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info
    if im.mode not in ("RGB", "RGBA", "L", "LA") or (has_alpha and im.mode in ("RGB", "L")):
        im = im.convert("RGBA" if has_alpha else "RGB")  # P/1/I;16/CMYK cannot be resampled well
    if max_side > 0:
        im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS, reducing_gap=3.0)
    out = io.BytesIO()
    if fmt == "JPEG" and im.mode in ("RGB", "L"):
        im.save(out, format="JPEG", quality=90)
        return out.getvalue(), "jpg", im.size
    im.save(out, format="PNG")  # keeps RGBA
    return out.getvalue(), "png", im.size


def _encode_svg(path: Path, max_side: int) -> _Encoded:
    """Render an SVG at its own size (capped at ``max_side``) with cairosvg."""
    import cairosvg  # optional: checked by _require_rasterizer before any work

    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise _Skip(SKIP_UNREADABLE_IMAGE, f"{path.name}: {exc}") from exc
    sha = hashlib.sha256(raw).hexdigest()
    try:
        png = cairosvg.svg2png(bytestring=raw)
        with Image.open(io.BytesIO(png)) as im:
            width, height = im.size
        out_w, out_h = width, height
        if max_side > 0 and max(width, height) > max_side:
            scale = max_side / max(width, height)
            out_w, out_h = max(1, round(width * scale)), max(1, round(height * scale))
            png = cairosvg.svg2png(bytestring=raw, output_width=out_w, output_height=out_h)
            with Image.open(io.BytesIO(png)) as im:
                out_w, out_h = im.size
    except Exception as exc:  # cairosvg raises many unrelated types for bad or unsafe SVGs
        raise _Skip(SKIP_UNREADABLE_IMAGE, f"{path.name}: {type(exc).__name__}: {exc}") from exc
    return _Encoded(
        png,
        "png",
        out_w,
        out_h,
        width,
        height,
        sha,
        resized=(out_w, out_h) != (width, height),
        rasterized=True,
    )


def _require_rasterizer() -> None:
    try:
        import cairosvg  # noqa: F401
    except (ImportError, OSError) as exc:  # OSError: the wheel is there but libcairo is not
        raise FetchError(
            "--rasterize-svg needs cairosvg and the system cairo library "
            f"(pip install cairosvg; apt-get install libcairo2): {exc}"
        ) from exc


# --------------------------------------------------------------------- shards


class ShardWriter:
    """Write samples into ``00000.tar``, ``00001.tar``, ... with img2dataset's sidecars.

    Each tar is written under a temporary name and renamed when complete, so a reader
    never sees half a shard; headers carry no time or owner, so output is reproducible.
    """

    def __init__(self, directory: Path, shard_size: int) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.directory = Path(directory)
        self.shard_size = shard_size
        self.written: list[str] = []  # shard names, e.g. "00000"
        self.count = 0
        self._tar: TarWriter | None = None
        self._file: AtomicFile | None = None
        self._rows: list[dict[str, Any]] = []

    def add(self, key: str, image: bytes, ext: str, caption: str, meta: dict[str, Any]) -> None:
        if self._tar is None:
            self._open()
        assert self._tar is not None
        self._tar.add(f"{key}.{ext}", image)
        self._tar.add(f"{key}.txt", caption.encode("utf-8"))
        self._tar.add(f"{key}.json", json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8"))
        self._rows.append(
            {
                "key": key,
                "caption": caption,
                "url": meta.get("url"),
                "status": "success",
                "error_message": None,
                "width": meta.get("width"),
                "height": meta.get("height"),
                "original_width": meta.get("original_width"),
                "original_height": meta.get("original_height"),
                "sha256": meta.get("sha256"),
            }
        )
        self.count += 1
        if len(self._rows) >= self.shard_size:
            self._finish()

    def close(self) -> list[str]:
        """Finish the last shard and remove shard files a previous, larger run left behind."""
        if self._tar is not None:
            self._finish()
        keep = {f"{n}{suffix}" for n in self.written for suffix in (".tar", ".parquet", "_stats.json")}
        if self.directory.is_dir():
            for path in self.directory.iterdir():
                stale = _SHARD_FILE.match(path.name) and path.name not in keep
                if stale or is_temp(path.name):
                    path.unlink()
        return self.written

    def _open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        # kept open across add() calls and committed in _finish(): a with-block cannot span them
        self._file = AtomicFile(self.directory / f"{len(self.written):05d}.tar")
        self._tar = TarWriter(self._file.file, format=tarfile.USTAR_FORMAT)

    def _finish(self) -> None:
        assert self._tar is not None and self._file is not None
        self._tar.close()
        name = f"{len(self.written):05d}"
        table = pa.Table.from_pylist(self._rows, schema=SIDECAR_SCHEMA)
        with atomic_open(self.directory / f"{name}.parquet") as f:
            pq.write_table(table, f)
        stats = {"count": len(self._rows), "successes": len(self._rows), "failed": 0}
        write_atomic(
            self.directory / f"{name}_stats.json",
            (json.dumps(stats, indent=2, sort_keys=True) + "\n").encode(),
        )
        self._file.commit()  # the tar last: it marks the shard done
        self.written.append(name)
        self._tar, self._file, self._rows = None, None, []


# ---------------------------------------------------------------------- fetch


def _resolve_subdir(sources: Sequence[Path], subdir: str, package: str) -> Path:
    for source in sources:
        if not Path(source).is_dir():
            raise FetchError(f"source directory does not exist: {source}")
    for source in sources:
        candidate = Path(source) / subdir
        if candidate.is_dir():
            return candidate
    names = ", ".join(str(s) for s in sources)
    raise FetchError(f"no {subdir}/ under {names}: expected an extracted {package} package root")


def fetch_tuxpaint(
    source_root: Path | Sequence[Path],
    output: Path,
    shard_size: int = DEFAULT_SHARD_SIZE,
    max_side: int = DEFAULT_MAX_SIDE,
    limit: int | None = None,
    *,
    rasterize_svg: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: Callable[[int, int], None] | None = None,
    workers: int = 1,
    force: bool = False,
) -> FetchReport:
    """Write the tuxpaint seed set to ``output/{train,val,test}/NNNNN.tar``.

    Output that a previous run wrote from the same files with the same options is
    kept as it is (``report.reused``) unless ``force``.
    """
    sources = _as_list(source_root)
    stamps = _resolve_subdir(sources, TUXPAINT_SUBDIR, "tuxpaint-stamps-default")
    return _write_dataset(
        "tuxpaint",
        lambda n: _tuxpaint_items(stamps, f"tuxpaint-stamps-default/{TUXPAINT_SUBDIR}", n),
        [stamps],
        Path(output),
        sources,
        split_of=lambda item: split_for(item.id),
        split_names=[s for s, _ in SPLITS],
        shard_size=shard_size,
        max_side=max_side,
        limit=limit,
        rasterize_svg=rasterize_svg,
        max_pixels=max_pixels,
        progress=progress,
        workers=workers,
        force=force,
    )


def fetch_openclipart(
    source_roots: Path | Sequence[Path],
    output: Path,
    shard_size: int = DEFAULT_SHARD_SIZE,
    max_side: int = DEFAULT_MAX_SIDE,
    limit: int | None = None,
    *,
    rasterize_svg: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: Callable[[int, int], None] | None = None,
    workers: int = 1,
    force: bool = False,
) -> FetchReport:
    """Write the openclipart web-like set to ``output/NNNNN.tar`` (no split: it is the set to curate).

    ``source_roots``: one root holding both packages, or the two extracted roots.
    Up-to-date output is reused unless ``force``, as in :func:`fetch_tuxpaint`.
    """
    sources = _as_list(source_roots)
    png_root = _resolve_subdir(sources, OPENCLIPART_PNG_SUBDIR, "openclipart-png")
    svg_root = _resolve_subdir(sources, OPENCLIPART_SVG_SUBDIR, "openclipart-svg")
    return _write_dataset(
        "openclipart",
        lambda n: _openclipart_items(png_root, svg_root, n),
        [png_root, svg_root],
        Path(output),
        sources,
        split_of=lambda item: ALL_SPLIT,
        split_names=[ALL_SPLIT],
        shard_size=shard_size,
        max_side=max_side,
        limit=limit,
        rasterize_svg=rasterize_svg,
        max_pixels=max_pixels,
        progress=progress,
        workers=workers,
        force=force,
    )


_FETCHERS: dict[str, Callable[..., FetchReport]] = {
    "tuxpaint": fetch_tuxpaint,
    "openclipart": fetch_openclipart,
}


def fetch_dataset(
    name: str,
    output: Path,
    sources: Sequence[Path] | None = None,
    cache: Path = DEFAULT_CACHE,
    shard_size: int = DEFAULT_SHARD_SIZE,
    max_side: int = DEFAULT_MAX_SIDE,
    limit: int | None = None,
    *,
    rasterize_svg: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: Callable[[int, int], None] | None = None,
    workers: int = 1,
    force: bool = False,
) -> FetchReport:
    """Fetch dataset ``name``: from ``sources`` if given, else download its packages into ``cache``."""
    if name not in DATASETS:
        raise FetchError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    if rasterize_svg:
        _require_rasterizer()
    packages: dict[str, str] = {}
    if sources:
        roots = [Path(s) for s in sources]
    else:
        roots = []
        for package in DATASETS[name].packages:
            root = download_package(package, cache)
            roots.append(root)
            packages[package] = f"{root.name}.deb"
    report = _FETCHERS[name](
        roots,
        output,
        shard_size,
        max_side,
        limit,
        rasterize_svg=rasterize_svg,
        max_pixels=max_pixels,
        progress=progress,
        workers=workers,
        force=force,
    )
    if packages:
        report.packages = packages
        _write_report(report)
    return report


def _as_list(roots: Path | Sequence[Path]) -> list[Path]:
    if isinstance(roots, (str, os.PathLike)):
        return [Path(roots)]
    return [Path(r) for r in roots]


def _write_dataset(
    dataset: str,
    discover: Callable[[int | None], tuple[list[_Item], int]],
    data_roots: list[Path],
    output: Path,
    sources: list[Path],
    *,
    split_of: Callable[[_Item], str],
    split_names: list[str],
    shard_size: int,
    max_side: int,
    limit: int | None,
    rasterize_svg: bool,
    max_pixels: int,
    progress: Callable[[int, int], None] | None,
    workers: int,
    force: bool,
) -> FetchReport:
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if rasterize_svg:
        _require_rasterizer()
    options = {
        "shard_size": shard_size,
        "max_side": max_side,
        "limit": limit,
        "rasterize_svg": rasterize_svg,
        "max_pixels": max_pixels,
    }
    fingerprint = _fingerprint(dataset, data_roots, options)
    if not force:
        previous = _reusable_report(output, fingerprint)
        if previous is not None:
            return previous
    items, available = discover(None if limit is None else max(limit, 0))
    report = FetchReport(
        dataset=dataset,
        output=str(output),
        sources=[str(s) for s in sources],
        available=available,
        found=len(items),
        options=options,
        fingerprint=fingerprint,
    )
    splitted = split_names != [ALL_SPLIT]
    writers = {s: ShardWriter(output / s if splitted else output, shard_size) for s in split_names}
    skipped: Counter[str] = Counter()
    jobs = [_job_for(item, rasterize_svg) for item in items]
    encode = functools.partial(_encode_job, max_side=max_side, max_pixels=max_pixels)
    with _no_pillow_bomb_check():
        results = _ordered_map(encode, jobs, workers)
        for index, (item, result) in enumerate(zip(items, results)):
            key = f"{index:0{KEY_DIGITS}d}"
            if isinstance(result, _Skip):
                skipped[result.reason] += 1
                report.skipped_items.append(
                    {"id": item.id, "key": key, "reason": result.reason, "detail": result.detail}
                )
            else:
                split = split_of(item)
                caption = item.caption or ""
                meta = {
                    **item.meta,
                    "key": key,
                    "caption": caption,
                    "dataset": dataset,
                    "id": item.id,
                    "width": result.width,
                    "height": result.height,
                    "original_width": result.original_width,
                    "original_height": result.original_height,
                    "sha256": result.sha256,
                    "status": "success",
                }
                if splitted:
                    meta["split"] = split
                writers[split].add(key, result.data, result.ext, caption, meta)
                report.resized += result.resized
                report.rasterized += result.rasterized
            if progress is not None:
                progress(index + 1, len(items))
    for split, writer in writers.items():
        report.shards[split] = len(writer.close())
        report.written[split] = writer.count
        for name in writer.written:
            for suffix in (".tar", ".parquet", "_stats.json"):
                path = writer.directory / f"{name}{suffix}"
                report.outputs[path.relative_to(output).as_posix()] = path.stat().st_size
    report.skipped = dict(sorted(skipped.items()))
    _write_report(report)
    return report


def _job_for(item: _Item, rasterize_svg: bool) -> tuple[str, Path] | _Skip:
    """What to do with an item: encode a raster, render an SVG, or count a skip."""
    if item.skip == SKIP_SVG_ONLY and rasterize_svg and item.image is not None:
        return ("svg", item.image)
    if item.skip:
        return _Skip(item.skip, item.detail)
    assert item.image is not None and item.caption
    return ("raster", item.image)


def _encode_job(job: tuple[str, Path] | _Skip, *, max_side: int, max_pixels: int) -> _Encoded | _Skip:
    if isinstance(job, _Skip):
        return job
    kind, path = job
    try:
        if kind == "svg":
            return _encode_svg(path, max_side)
        return _encode_raster(path, max_side, max_pixels)
    except _Skip as skip:
        return skip


def _ordered_map(fn: Callable[[Any], Any], jobs: Sequence[Any], workers: int) -> Iterator[Any]:
    """``map`` on a thread pool, in order, with a bounded window so results never pile up.

    Threads, not processes: Pillow and zlib release the GIL while decoding, resampling
    and compressing, and a process pool would re-run ``python -m curate``'s main module.
    """
    if workers <= 1:
        yield from map(fn, jobs)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="curate-fetch") as pool:
        pending: deque[Future[Any]] = deque()
        todo = iter(jobs)
        for job in itertools.islice(todo, workers * 4):
            pending.append(pool.submit(fn, job))
        while pending:
            result = pending.popleft().result()
            for job in itertools.islice(todo, 1):
                pending.append(pool.submit(fn, job))
            yield result


def _fingerprint(dataset: str, roots: Sequence[Path], options: dict[str, Any]) -> str:
    """Hash of everything the output depends on, from a stat-only walk (no file is read).

    Names, sizes, mtimes and symlink targets of the input trees, the options, this
    module's output format and the encoder versions.
    """
    import PIL

    digest = hashlib.sha256()
    head = {"format": FORMAT_VERSION, "dataset": dataset, "options": options, "pillow": PIL.__version__}
    if options.get("rasterize_svg"):
        import cairosvg

        head["cairosvg"] = cairosvg.__version__
    digest.update(json.dumps(head, sort_keys=True).encode())
    for index, root in enumerate(roots):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for filename in sorted(filenames):
                path = os.path.join(dirpath, filename)
                st = os.lstat(path)
                link = os.readlink(path) if os.path.islink(path) else ""
                rel = os.path.relpath(path, root)
                digest.update(f"{index}\0{rel}\0{st.st_size}\0{st.st_mtime_ns}\0{link}\n".encode())
    return digest.hexdigest()


def _reusable_report(output: Path, fingerprint: str) -> FetchReport | None:
    """The previous report when it was made from the same inputs and its shard files are all there."""
    try:
        saved = json.loads((output / REPORT_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("fingerprint") != fingerprint or not saved.get("outputs"):
        return None
    for rel, size in saved["outputs"].items():
        path = output / rel
        if not path.is_file() or path.stat().st_size != size:
            return None
    report = FetchReport.from_dict(saved)
    report.reused = True
    return report


def _write_report(report: FetchReport) -> None:
    output = Path(report.output)
    output.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n"  # field order
    write_atomic(output / REPORT_NAME, text.encode("utf-8"))
