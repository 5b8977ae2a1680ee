"""Fetch real image/alt-text pairs from Debian packages into img2dataset-layout WebDataset shards.

Only package registries are reachable from this project's machines, so the real data
comes from Debian packages (:mod:`curate.data.debian`): the tuxpaint stamps, the
human-captioned seed set, split train/val/test; and openclipart, clip art with
web-like SVG alt-text, the set to curate (:mod:`curate.data.sources`). This module
runs a fetch: a reader lists the items, a thread pool encodes their images
(:mod:`curate.data.encode`) and the shard writer writes them in item order
(:mod:`curate.data.shards`).

Nothing is dropped silently: every discovered item is either written or counted
under a skip reason in ``_fetch_report.json``. The same input bytes give the same
output bytes (sorted discovery, keys from the item's position, fixed tar headers, no
timestamps), whatever the number of threads.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from curate.data.debian import DEFAULT_CACHE, download_package
from curate.data.emoji import EMOJI_PACKAGE, EmojiSource, download_npm_package
from curate.data.encode import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_SIDE,
    encode_item,
    no_pillow_bomb_check,
    require_rasterizer,
)
from curate.data.items import FetchError, Skip
from curate.data.shards import SHARD_SUFFIXES, ShardWriter
from curate.data.sources import ALL_SPLIT, OpenclipartSource, Source, TuxpaintSource
from curate.io.files import write_atomic

DEFAULT_SHARD_SIZE = 1000
KEY_DIGITS = 9
# Part of the up-to-date fingerprint: bump when the same input would now give other output.
FORMAT_VERSION = 1
REPORT_NAME = "_fetch_report.json"


class OptionError(ValueError):
    """A fetch option out of range; ``option`` names the :class:`FetchOptions` field."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option} {message}")
        self.option = option
        self.message = message


@dataclass(frozen=True)
class FetchOptions:
    """How a fetch encodes and shards its items.

    The first five fields decide the output bytes: they are recorded in the report's
    ``options`` and in its fingerprint. ``workers`` and ``force`` only decide how the
    fetch runs (threads; rewrite even when the output is up to date).
    """

    shard_size: int = DEFAULT_SHARD_SIZE  # samples per tar
    max_side: int = DEFAULT_MAX_SIDE  # downscale images whose long side exceeds this (0: never)
    limit: int | None = None  # only the first N items in path order
    rasterize_svg: bool = False  # render SVG-only items (needs cairosvg) instead of skipping them
    max_pixels: int = DEFAULT_MAX_PIXELS  # skip larger images as too_large instead of decoding them
    workers: int = 1  # threads encoding images
    force: bool = False

    def __post_init__(self) -> None:
        bounds = {"shard_size": 1, "max_side": 0, "limit": 0, "max_pixels": 1, "workers": 1}
        for name, low in bounds.items():
            value = getattr(self, name)
            if name == "limit" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise OptionError(name, f"must be an integer >= {low}, got {value!r}")

    def recorded(self) -> dict[str, Any]:
        """The options the output depends on, as the report records them (this order)."""
        return {
            "shard_size": self.shard_size,
            "max_side": self.max_side,
            "limit": self.limit,
            "rasterize_svg": self.rasterize_svg,
            "max_pixels": self.max_pixels,
        }


@dataclass(frozen=True)
class DatasetSpec:
    """A fetchable dataset: the packages it comes from, what it is for, and its reader.

    ``download`` fetches and extracts one package into the cache (Debian's apt by default,
    npm for the emoji set); ``archive`` is the suffix the report names the package file by.
    """

    name: str
    packages: tuple[str, ...]
    description: str
    source: Callable[[Sequence[Path]], Source] = field(repr=False, compare=False)  # extracted roots -> reader
    download: Callable[[str, Path], Path] = field(default=download_package, repr=False, compare=False)
    archive: str = ".deb"


DATASETS: dict[str, DatasetSpec] = {
    "tuxpaint": DatasetSpec(
        "tuxpaint",
        ("tuxpaint-stamps-default",),
        "~950 stamps with human-written English captions (seed set, train/val/test)",
        TuxpaintSource,
    ),
    "openclipart": DatasetSpec(
        "openclipart",
        ("openclipart-png", "openclipart-svg"),
        "~8,100 clip-art images with SVG dc:title alt-text (noisy web-like set)",
        OpenclipartSource,
    ),
    "emoji": DatasetSpec(
        "emoji",
        (EMOJI_PACKAGE,),
        "~1,900 Twemoji PNGs (npm) with their Unicode names (held-out evaluation domain)",
        EmojiSource,
        download=download_npm_package,
        archive=".tgz",
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


ProgressFn = Callable[[int, int], None]  # (items done, items in all)


def fetch_tuxpaint(
    source_root: Path | Sequence[Path],
    output: Path,
    options: FetchOptions | None = None,
    *,
    progress: ProgressFn | None = None,
) -> FetchReport:
    """Write the tuxpaint seed set to ``output/{train,val,test}/NNNNN.tar``.

    Output that a previous run wrote from the same files with the same options is
    kept as it is (``report.reused``) unless ``options.force``.
    """
    sources = _as_list(source_root)
    return _fetch(TuxpaintSource(sources), sources, Path(output), _options(options), progress)


def fetch_openclipart(
    source_roots: Path | Sequence[Path],
    output: Path,
    options: FetchOptions | None = None,
    *,
    progress: ProgressFn | None = None,
) -> FetchReport:
    """Write the openclipart web-like set to ``output/NNNNN.tar`` (no split: it is the set to curate).

    ``source_roots``: one root holding both packages, or the two extracted roots.
    Up-to-date output is reused unless ``options.force``, as in :func:`fetch_tuxpaint`.
    """
    sources = _as_list(source_roots)
    return _fetch(OpenclipartSource(sources), sources, Path(output), _options(options), progress)


def fetch_dataset(
    name: str,
    output: Path,
    options: FetchOptions | None = None,
    *,
    sources: Sequence[Path] | None = None,
    cache: Path = DEFAULT_CACHE,
    progress: ProgressFn | None = None,
) -> FetchReport:
    """Fetch dataset ``name``: from ``sources`` if given, else download its packages into ``cache``."""
    if name not in DATASETS:
        raise FetchError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    options = _options(options)
    if options.rasterize_svg:
        require_rasterizer()  # before any download
    packages: dict[str, str] = {}
    if sources:
        roots = _as_list(sources)
    else:
        roots = []
        spec = DATASETS[name]
        for package in spec.packages:
            root = spec.download(package, cache)
            roots.append(root)
            packages[package] = f"{root.name}{spec.archive}"
    source = DATASETS[name].source(roots)
    return _fetch(source, roots, Path(output), options, progress, packages)


def _options(options: FetchOptions | None) -> FetchOptions:
    if options is None:
        return FetchOptions()
    if not isinstance(options, FetchOptions):  # e.g. the shard size, where it once went
        raise TypeError(f"options must be a FetchOptions, got {type(options).__name__}: {options!r}")
    return options


def _as_list(roots: Path | Sequence[Path]) -> list[Path]:
    if isinstance(roots, (str, os.PathLike)):
        return [Path(roots)]
    return [Path(r) for r in roots]


def _fetch(
    source: Source,
    sources: list[Path],
    output: Path,
    options: FetchOptions,
    progress: ProgressFn | None,
    packages: dict[str, str] | None = None,
) -> FetchReport:
    """Discover, encode (on ``options.workers`` threads, in order) and write; then save the report."""
    if options.rasterize_svg:
        require_rasterizer()
    recorded = options.recorded()
    fingerprint = _fingerprint(source.name, source.data_roots, recorded)
    if not options.force:
        previous = _reusable_report(output, fingerprint)
        if previous is not None:
            if packages and previous.packages != packages:
                previous.packages = packages
                _write_report(previous)
            return previous
    items, available = source.items(options.limit)
    report = FetchReport(
        dataset=source.name,
        output=str(output),
        sources=[str(s) for s in sources],
        packages=dict(packages or {}),
        available=available,
        found=len(items),
        options=recorded,
        fingerprint=fingerprint,
    )
    split_names = list(source.splits)
    splitted = split_names != [ALL_SPLIT]
    writers = {s: ShardWriter(output / s if splitted else output, options.shard_size) for s in split_names}
    skipped: Counter[str] = Counter()
    encode = functools.partial(
        encode_item,
        max_side=options.max_side,
        max_pixels=options.max_pixels,
        rasterize_svg=options.rasterize_svg,
    )
    with no_pillow_bomb_check():
        results = _ordered_map(encode, items, options.workers)
        for index, (item, result) in enumerate(zip(items, results)):
            key = f"{index:0{KEY_DIGITS}d}"
            if isinstance(result, Skip):
                skipped[result.reason] += 1
                report.skipped_items.append(
                    {"id": item.id, "key": key, "reason": result.reason, "detail": result.detail}
                )
            else:
                split = source.split_of(item)
                caption = item.caption or ""
                meta = {
                    **item.meta,
                    "key": key,
                    "caption": caption,
                    "dataset": source.name,
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
            for suffix in SHARD_SUFFIXES:
                path = writer.directory / f"{name}{suffix}"
                report.outputs[path.relative_to(output).as_posix()] = path.stat().st_size
    report.skipped = dict(sorted(skipped.items()))
    _write_report(report)
    return report


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

    Names, sizes, mtimes and symlink targets of the input trees, the options, the
    output format (``FORMAT_VERSION``) and the encoder versions.
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
