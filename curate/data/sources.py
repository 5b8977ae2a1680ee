"""The per-source readers: an extracted package tree -> :class:`~curate.data.items.Item` records.

* ``tuxpaint``: ``tuxpaint-stamps-default``, ~950 stamps, each with a human-written
  English caption on line 1 of its ``.txt``. This is the seed, human-annotated set;
  it is split 80/10/10 into train/val/test by a hash of the stamp's id, so a stamp
  stays in its split whatever else changes.
* ``openclipart``: ``openclipart-png`` + ``openclipart-svg``, ~8,100 clip-art paths
  whose alt-text is the SVG's ``dc:title`` (with ``dc:description`` and ``dc:subject``
  kept in the metadata): short, often uninformative, web-like text to curate.

Readers only look at files and metadata; no image is decoded here. Discovery is in
sorted path order, so keys and ``limit`` cut the same items on every run.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from curate.data.items import (
    SKIP_DUPLICATE,
    SKIP_EMPTY_CAPTION,
    SKIP_MIRROR,
    SKIP_NO_CAPTION,
    SKIP_NO_IMAGE,
    SKIP_SVG_ONLY,
    SKIP_UNREADABLE_CAPTION,
    SKIP_UNREADABLE_METADATA,
    FetchError,
    Item,
)

TUXPAINT_SUBDIR = "usr/share/tuxpaint/stamps"
OPENCLIPART_PNG_SUBDIR = "usr/share/openclipart/png"
OPENCLIPART_SVG_SUBDIR = "usr/share/openclipart/svg"

# (split, percent) in hash order; the seed set is split, the web-like set is not
SPLITS: tuple[tuple[str, int], ...] = (("train", 80), ("val", 10), ("test", 10))
ALL_SPLIT = "all"  # the one split of an unsplit set: its shards go straight into the output directory

_DC = "{http://purl.org/dc/elements/1.1/}"
# elements whose dc:title names a person or organisation, not the picture
_AGENT_TAGS = frozenset({"Agent", "creator", "publisher", "rights", "contributor"})
_RDF = "{http://www.w3.org/1999/02/22-rdf-syntax-ns#}"
# tuxpaint translation lines look like ``pt_BR.utf8=...``; line 1 is the English one
_LOCALE_LINE = re.compile(r"^[A-Za-z]{2,3}(_[A-Za-z]{2,3})?(@[A-Za-z0-9]+)?\.[Uu][Tt][Ff]-?8=")


class Source(Protocol):
    """What the fetch loop needs from a reader: its items, where they go, what the output depends on."""

    name: str
    splits: tuple[str, ...]  # output subdirectories, or ``(ALL_SPLIT,)`` for none
    data_roots: list[Path]  # the trees whose files the output depends on (the up-to-date check walks them)

    def items(self, limit: int | None = None) -> tuple[list[Item], int]:
        """The first ``limit`` items in path order, and how many there are in all."""
        ...

    def split_of(self, item: Item) -> str:
        """The split an item is written to (one of ``splits``)."""
        ...


class TuxpaintSource:
    """The tuxpaint seed set: stamps with English captions, split train/val/test by a hash of the id."""

    name = "tuxpaint"
    package = "tuxpaint-stamps-default"
    splits = tuple(s for s, _ in SPLITS)

    def __init__(self, roots: Sequence[Path]) -> None:
        self.stamps = resolve_subdir(roots, TUXPAINT_SUBDIR, self.package)
        self.data_roots = [self.stamps]

    def items(self, limit: int | None = None) -> tuple[list[Item], int]:
        return tuxpaint_items(self.stamps, f"{self.package}/{TUXPAINT_SUBDIR}", limit)

    def split_of(self, item: Item) -> str:
        return split_for(item.id)


class OpenclipartSource:
    """The openclipart web-like set: PNGs with their SVG's ``dc:title`` as alt-text, not split."""

    name = "openclipart"
    splits = (ALL_SPLIT,)

    def __init__(self, roots: Sequence[Path]) -> None:
        """``roots``: one root holding both packages, or the two extracted roots."""
        self.png_root = resolve_subdir(roots, OPENCLIPART_PNG_SUBDIR, "openclipart-png")
        self.svg_root = resolve_subdir(roots, OPENCLIPART_SVG_SUBDIR, "openclipart-svg")
        self.data_roots = [self.png_root, self.svg_root]

    def items(self, limit: int | None = None) -> tuple[list[Item], int]:
        return openclipart_items(self.png_root, self.svg_root, limit)

    def split_of(self, item: Item) -> str:
        return ALL_SPLIT


def resolve_subdir(sources: Sequence[Path], subdir: str, package: str) -> Path:
    """The first ``source/subdir`` that exists: a package's data inside one of the given roots."""
    for source in sources:
        if not Path(source).is_dir():
            raise FetchError(f"source directory does not exist: {source}")
    for source in sources:
        candidate = Path(source) / subdir
        if candidate.is_dir():
            return candidate
    names = ", ".join(str(s) for s in sources)
    raise FetchError(f"no {subdir}/ under {names}: expected an extracted {package} package root")


def split_for(stable_id: str, splits: Sequence[tuple[str, int]] = SPLITS) -> str:
    """Assign a split from sha1 of a stable id: fixed across runs, limits and package updates."""
    bucket = int(hashlib.sha1(stable_id.encode("utf-8")).hexdigest()[:8], 16) % 100
    total = 0
    for name, percent in splits:
        total += percent
        if bucket < total:
            return name
    return splits[-1][0]


# ------------------------------------------------------------------- metadata


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


def tuxpaint_items(stamps: Path, package_prefix: str, limit: int | None = None) -> tuple[list[Item], int]:
    """The first ``limit`` stamps in path order (captions read only for those), and how many there are."""
    stems = _scan(stamps, ("png", "svg", "txt", "dat"))
    # a lone .dat (stamp options) is not an item
    ordered = [s for s in sorted(stems) if stems[s].keys() & {"png", "svg", "txt"}]
    items: list[Item] = []
    for stem in ordered[:limit]:
        files = stems[stem]
        png, svg, txt = files.get("png"), files.get("svg"), files.get("txt")
        image = png or svg
        item = Item(id=stem, image=image)
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


def openclipart_items(png_root: Path, svg_root: Path, limit: int | None = None) -> tuple[list[Item], int]:
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

    items: list[Item] = []
    for stem in stems[:limit]:
        png, svg = pngs.get(stem), svgs.get(stem)
        item = Item(id=stem, image=png or svg)
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
