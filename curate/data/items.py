"""What passes between the source readers, the image encoder and the fetch loop.

A reader turns an extracted package tree into :class:`Item` records, one per
candidate sample, already marked with a skip reason when its caption or image is
missing; the encoder raises :class:`Skip` for an image it cannot use. Every item
ends either written or counted under one of the ``SKIP_*`` reasons (the keys of
``FetchReport.skipped``), so nothing is dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class FetchError(RuntimeError):
    """A dataset could not be fetched: bad source tree, apt failure, missing optional dependency."""


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


@dataclass
class Item:
    """One discovered candidate sample, before its image is read."""

    id: str  # stable id: the item's path relative to its data root, without extension
    image: Path | None = None
    caption: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    skip: str | None = None
    detail: str = ""


class Skip(Exception):
    """An item that is counted under ``reason`` instead of written; ``detail`` says which file and why."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail
