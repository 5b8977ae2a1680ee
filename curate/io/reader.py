"""Read WebDataset tars in img2dataset's layout: ``KEY.jpg|jpeg|png|webp``, ``KEY.txt``, ``KEY.json``.

Inputs are local paths, globs, brace ranges (``{00000..00099}``) or any fsspec URL.
Tars are streamed member by member, so a shard never has to fit in memory and a tar
cut in the middle still yields every sample before the cut. Every sample becomes one
row; a problem with a sample becomes that row's ``error``, a problem with the shard
becomes its ``shard_end`` row's ``shard_error``.

img2dataset writes only the downloaded images into a tar; every URL of the shard,
failures included, is in the ``NNNNN.parquet`` beside it. When that download log is
there, each URL that is not in the tar becomes an error row too (``download_status``,
``download_error``), so every URL of the list is accounted for.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import fsspec
import pyarrow.parquet as pq

from curate.schema import (
    ROW_SAMPLE,
    ROW_SHARD_END,
    STATUS_ERROR,
    STATUS_PENDING,
    empty_row,
)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
TEXT_EXT = "txt"
JSON_EXT = "json"
# columns that make a Parquet beside a tar img2dataset's download log
DOWNLOAD_LOG_COLUMNS = frozenset({"key", "status", "error_message"})
DOWNLOAD_SUCCESS = "success"

_BRACE = re.compile(r"\{([^{}]*)\}")


class InputError(ValueError):
    """The input specification names nothing readable."""


@dataclass(frozen=True)
class ShardRef:
    """One input tar: its URL and the unique name its outputs are written under."""

    url: str
    name: str


def expand_braces(spec: str) -> list[str]:
    """``a{00..02}b`` -> a00b a01b a02b; ``{x,y}`` -> x y; nested and repeated groups work."""
    match = _BRACE.search(spec)
    if not match:
        return [spec]
    body = match.group(1)
    head, tail = spec[: match.start()], spec[match.end() :]
    range_match = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if range_match:
        lo_s, hi_s = range_match.groups()
        lo, hi = int(lo_s), int(hi_s)
        width = len(lo_s) if lo_s.startswith("0") else 0
        step = 1 if hi >= lo else -1
        items = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    else:
        items = body.split(",")
    return [out for item in items for out in expand_braces(head + item + tail)]


def _has_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def is_shard_name(name: str) -> bool:
    """A WebDataset shard by its name: a tar, plain or gzipped (webdataset reads all three)."""
    return name.lower().endswith(SHARD_SUFFIXES)


def shard_stem(name: str) -> str:
    """``00000.tar`` / ``00000.tar.gz`` / ``00000.tgz`` -> ``00000``."""
    lower = name.lower()
    for suffix in SHARD_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


@dataclass
class Inputs:
    """Resolved input shards, and what a directory or pattern matched that is not a shard."""

    urls: list[str]
    # files matched by a directory or glob but skipped, counted by their kind ('.parquet', ...)
    skipped: dict[str, int]

    def skipped_note(self) -> str | None:
        if not self.skipped:
            return None
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.skipped.items()))
        total = sum(self.skipped.values())
        return (
            f"skipped {total} matched file(s) that are not shards ({kinds}): shards end in "
            f"{', '.join(SHARD_SUFFIXES)}; img2dataset's .parquet beside a tar is read with it"
        )


def _kind(name: str) -> str:
    base = name.rstrip("/").rsplit("/", 1)[-1]
    if base.endswith("_stats.json"):
        return "_stats.json"
    return "." + base.rsplit(".", 1)[-1].lower() if "." in base else "(no extension)"


def _keep_shards(paths: list[str], skipped: Counter) -> list[str]:
    shards = []
    for p in paths:
        if is_shard_name(p):
            shards.append(p)
        else:
            skipped[_kind(p)] += 1
    return shards


def resolve_inputs(specs: str | list[str]) -> Inputs:
    """Resolve input specs to a sorted, de-duplicated list of shard URLs.

    Local paths that do not exist raise InputError naming them, before any work starts;
    remote URLs are checked when read. A directory or glob takes the shards it matches
    (``.tar``, ``.tar.gz``, ``.tgz``) and counts the other files it skipped; a file named
    explicitly is taken whatever its name.
    """
    if isinstance(specs, str):
        specs = [specs]
    urls: list[str] = []
    skipped: Counter = Counter()
    wanted = "no shard (" + ", ".join(SHARD_SUFFIXES) + ")"
    for spec in specs:
        for item in expand_braces(spec):
            protocol = fsspec.core.split_protocol(item)[0]
            is_local = protocol in (None, "file", "local")
            if is_local:
                path = fsspec.core.strip_protocol(item) if protocol else item
                path = os.path.expanduser(path)
                if _has_glob(path):
                    found = sorted(str(p) for p in Path("/").glob(os.path.abspath(path).lstrip("/")))
                    found = _keep_shards([p for p in found if os.path.isfile(p)], skipped)
                    if not found:
                        raise InputError(f"input pattern matches {wanted}: {item}")
                    urls.extend(found)
                elif os.path.isdir(path):
                    found = sorted(str(p) for p in Path(path).iterdir() if p.is_file())
                    found = _keep_shards(found, skipped)
                    if not found:
                        raise InputError(f"input directory has {wanted}: {item}")
                    urls.extend(found)
                elif os.path.isfile(path):
                    urls.append(os.path.abspath(path))
                else:
                    raise InputError(f"input not found: {item}")
            elif _has_glob(item):
                fs, _, paths = fsspec.get_fs_token_paths(item)
                found = _keep_shards(sorted(paths), skipped)
                if not found:
                    raise InputError(f"input pattern matches {wanted}: {item}")
                urls.extend(fs.unstrip_protocol(p) for p in found)
            else:
                urls.append(item)
    seen: set[str] = set()
    unique = [u for u in urls if not (u in seen or seen.add(u))]
    if not unique:
        raise InputError("no input shards given")
    return Inputs(unique, dict(skipped))


def expand_inputs(specs: str | list[str]) -> list[str]:
    """The shard URLs of :func:`resolve_inputs`."""
    return resolve_inputs(specs).urls


def shard_refs(urls: list[str]) -> list[ShardRef]:
    """Name each shard by its file stem; stems that collide get a short hash of the URL."""
    stems = [_sanitize(shard_stem(Path(u.rstrip("/")).name)) or "shard" for u in urls]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    refs = []
    for url, stem in zip(urls, stems):
        name = stem if counts[stem] == 1 else f"{stem}-{hashlib.sha1(url.encode()).hexdigest()[:8]}"
        refs.append(ShardRef(url=url, name=name))
    return refs


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _sanitize(name: str) -> str:
    return _UNSAFE.sub("_", name).strip("._")[:200]


def sanitize_key(key: str) -> str:
    """A key that is safe as a file name inside a tar: no separators, no '..', no dots."""
    clean = _UNSAFE.sub("_", key.replace(".", "_")).strip("_")
    if clean != key or not clean:
        clean = (clean[:80] or "sample") + "_" + hashlib.sha1(key.encode("utf-8", "replace")).hexdigest()[:10]
    return clean


def split_member_name(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is everything before the first dot of the base name."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, ext.lower() if dot else ""


class _CutAwareTarInfo(tarfile.TarInfo):
    """Notes a stream that stops inside a header or before the end-of-archive block.

    tarfile ends the member loop there quietly, as if the archive were complete, so a
    tar cut between members would silently lose the last sample's remaining members.
    """

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError):
            tar.curate_cut = True
            raise


def iter_tar_groups(fileobj) -> Iterator[tuple[str, dict[str, bytes], list[str]]]:
    """Yield (key, {ext: bytes}, problems) for consecutive tar members sharing a key.

    Raises tarfile errors only for faults in the tar stream itself; the caller turns
    those into a shard fault after everything before the cut has been yielded.
    """
    current_key: str | None = None
    files: dict[str, bytes] = {}
    problems: list[str] = []
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=_CutAwareTarInfo) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_member_name(member.name)
                if key != current_key:
                    if current_key is not None:
                        yield current_key, files, problems
                    current_key, files, problems = key, {}, []
                f = tar.extractfile(member)
                data = f.read() if f is not None else b""
                if ext in files:
                    problems.append(f"member {member.name!r} repeats extension {ext!r}")
                    continue
                files[ext] = data
            if getattr(tar, "curate_cut", False):
                raise tarfile.ReadError("unexpected end of data (no end-of-archive block)")
    except Exception as exc:
        if current_key is not None:
            # the sample being read when the tar broke is accounted for, as an error
            yield (
                current_key,
                {},
                [f"sample cut off where the tar became unreadable ({type(exc).__name__}: {exc})"],
            )
            current_key = None
        raise
    if current_key is not None:
        yield current_key, files, problems


def sample_row(key: str, files: dict[str, bytes], problems: list[str], shard: ShardRef, seq: int) -> dict:
    """Turn one tar group into a pipeline row; problems become the row's error."""
    row = empty_row()
    row.update(row_type=ROW_SAMPLE, key=key, shard=shard.name, seq=seq, status=STATUS_PENDING)
    row["source_url"] = shard.url
    errors = list(problems)
    image_ext = next((e for e in IMAGE_EXTS if e in files), None)
    if image_ext is None:
        present = ", ".join(sorted(e or "(no extension)" for e in files)) or "nothing"
        errors.append(f"no image member (found: {present})")
    else:
        image = files[image_ext]
        row["image"] = image
        row["image_ext"] = image_ext
        row["image_sha256"] = hashlib.sha256(image).hexdigest()
    if TEXT_EXT in files:
        try:
            row["alt_text"] = files[TEXT_EXT].decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            errors.append(f"{key}.txt is not valid UTF-8 ({exc.reason} at byte {exc.start})")
    if JSON_EXT in files:
        raw = files[JSON_EXT]
        try:
            text = raw.decode("utf-8")
            meta = json.loads(text)
            row["meta"] = text
            if isinstance(meta, dict) and isinstance(meta.get("url"), str):
                row["url"] = meta["url"]
            if isinstance(meta, dict) and "error_message" in meta:  # img2dataset's download record
                row["download_status"] = _str_or_none(meta.get("status"))
                row["download_error"] = _str_or_none(meta.get("error_message"))
                row["download_sha256"] = _str_or_none(meta.get("sha256"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            errors.append(f"{key}.json is not valid JSON: {exc}")
    if errors:
        row["status"] = STATUS_ERROR
        row["error"] = "; ".join(errors)
        row["image"] = None
    return row


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def download_log_url(shard_url: str) -> str | None:
    """Where img2dataset puts a tar's download log: ``00000.tar`` -> ``00000.parquet``."""
    return shard_url[: -len(".tar")] + ".parquet" if shard_url.endswith(".tar") else None


def read_download_log(shard_url: str) -> list[dict] | None:
    """img2dataset's record of every URL of a shard, or None when the tar has none beside it."""
    url = download_log_url(shard_url)
    if url is None:
        return None
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        schema = pq.read_schema(f)
        if not DOWNLOAD_LOG_COLUMNS.issubset(schema.names):
            return None  # some other Parquet that happens to share the name
        f.seek(0)
        # exif is large and null for every URL that matters here (the failures)
        table = pq.read_table(f, columns=[n for n in schema.names if n != "exif"])
    return table.to_pylist()


def download_failure_row(entry: dict, shard: ShardRef, seq: int) -> dict:
    """A URL that img2dataset logged but did not put in the tar: an error row carrying why."""
    row = empty_row()
    row.update(row_type=ROW_SAMPLE, key=entry["key"], shard=shard.name, seq=seq, status=STATUS_ERROR)
    row["source_url"] = shard.url
    status = _str_or_none(entry.get("status")) or "unknown"
    message = _str_or_none(entry.get("error_message"))
    if status == DOWNLOAD_SUCCESS:
        row["error"] = "downloaded (per the shard's img2dataset Parquet) but missing from the tar"
    else:
        row["error"] = f"{status}: {message or 'no error message'}"
    row["url"] = _str_or_none(entry.get("url"))
    caption = entry.get("caption")
    row["alt_text"] = caption.strip() if isinstance(caption, str) else None
    row["download_status"] = status
    row["download_error"] = message
    row["download_sha256"] = _str_or_none(entry.get("sha256"))
    row["meta"] = json.dumps(entry, ensure_ascii=False, default=str)
    return row


def read_shard(shard: ShardRef, batch_size: int = 32) -> Iterator[list[dict]]:
    """Yield batches of rows for one shard, then a last batch holding its shard_end row."""
    batch: list[dict] = []
    seen: set[str] = set()
    total = 0
    fault: str | None = None
    try:
        with fsspec.open(shard.url, "rb") as fileobj:
            for key, files, problems in iter_tar_groups(fileobj):
                if key in seen:
                    problems = [*problems, f"duplicate key {key!r} in shard (not adjacent in the tar)"]
                    key = f"{key}#dup{total}"
                seen.add(key)
                batch.append(sample_row(key, files, problems, shard, total))
                total += 1
                if len(batch) >= batch_size:
                    yield batch
                    batch = []
    except FileNotFoundError as exc:
        fault = f"shard not found: {shard.url} ({exc})"
    except Exception as exc:  # any fault of the stream: the rows so far stand, the shard records it
        where = f"after {total} samples" if total else "before any sample"
        fault = f"unreadable tar {shard.url} {where}: {type(exc).__name__}: {exc}"
    # img2dataset's failed downloads are only in its download log: one error row each
    try:
        log = read_download_log(shard.url) or []
    except Exception as exc:
        log = []
        problem = f"unreadable download log {download_log_url(shard.url)}: {type(exc).__name__}: {exc}"
        fault = f"{fault}; {problem}" if fault else problem
    for entry in log:
        key = entry.get("key")
        if not isinstance(key, str) or key in seen:
            continue
        seen.add(key)
        batch.append(download_failure_row(entry, shard, total))
        total += 1
        if len(batch) >= batch_size:
            yield batch
            batch = []
    end = empty_row()
    end.update(row_type=ROW_SHARD_END, shard=shard.name, key="", seq=-1, status=ROW_SHARD_END)
    end.update(source_url=shard.url, shard_total=total, shard_error=fault)
    batch.append(end)
    yield batch


def iter_shard_rows(shards: list[ShardRef], batch_size: int = 32) -> Iterator[dict]:
    """Every row of every shard, in order: the reader without Ray (tests, benchmarks)."""
    return itertools.chain.from_iterable(
        itertools.chain.from_iterable(read_shard(s, batch_size) for s in shards)
    )


def iter_samples(shard: str | ShardRef) -> Iterator[dict]:
    """Every sample of one shard as a row (``sample_row``), in tar order: the reader outside the pipeline.

    Training and evaluation read shards the way curation does (the same key rule, image
    extensions and per-sample checks): ``key``, ``image`` bytes and ``image_ext``,
    ``alt_text``, ``meta`` (the ``KEY.json`` text), ``url``, and ``status``/``error`` for a
    sample with a problem. No download log, no ``shard_end`` row: a fault of the tar stream
    raises after the samples before it (the sample it cut off comes as an ``error`` row).
    """
    ref = shard if isinstance(shard, ShardRef) else shard_refs([shard])[0]
    with fsspec.open(ref.url, "rb") as fileobj:
        for seq, (key, files, problems) in enumerate(iter_tar_groups(fileobj)):
            yield sample_row(key, files, problems, ref, seq)
