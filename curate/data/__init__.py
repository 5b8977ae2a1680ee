"""Real image/alt-text data from Debian packages, written as img2dataset-style WebDataset shards.

The machines this project runs on reach only package registries, so the seed
(human-captioned) set and the noisy "web-like" set both come from Debian packages:
see :mod:`curate.data.fetch`.
"""

from curate.data.fetch import (
    DATASETS,
    FetchError,
    FetchReport,
    SvgMetadata,
    download_package,
    fetch_dataset,
    fetch_openclipart,
    fetch_tuxpaint,
    parse_svg_metadata,
    split_for,
)

__all__ = [
    "DATASETS",
    "FetchError",
    "FetchReport",
    "SvgMetadata",
    "download_package",
    "fetch_dataset",
    "fetch_openclipart",
    "fetch_tuxpaint",
    "parse_svg_metadata",
    "split_for",
]
