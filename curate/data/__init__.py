"""Real image/alt-text data from Debian packages, written as img2dataset-style WebDataset shards.

The machines this project runs on reach only package registries, so the seed
(human-captioned) set and the noisy "web-like" set both come from Debian packages.
:mod:`curate.data.debian` downloads and extracts them, :mod:`curate.data.sources`
reads items from the extracted trees, :mod:`curate.data.encode` turns their images
into shard bytes, :mod:`curate.data.shards` writes the shards, and
:mod:`curate.data.fetch` runs the whole fetch and writes its report.
"""

from curate.data.debian import download_package
from curate.data.fetch import (
    DATASETS,
    FetchOptions,
    FetchReport,
    OptionError,
    fetch_dataset,
    fetch_openclipart,
    fetch_tuxpaint,
)
from curate.data.items import FetchError
from curate.data.sources import SvgMetadata, parse_svg_metadata, split_for

__all__ = [
    "DATASETS",
    "FetchError",
    "FetchOptions",
    "FetchReport",
    "OptionError",
    "SvgMetadata",
    "download_package",
    "fetch_dataset",
    "fetch_openclipart",
    "fetch_tuxpaint",
    "parse_svg_metadata",
    "split_for",
]
