"""Thumbnails of sample images for the report, read back from the run's tars.

An image comes from its input tar (``source_url``); a kept sample falls back to the curated
shards. Every failure (a missing tar, a missing member, bytes whose sha256 differs, an
undecodable image) becomes a problem text for a placeholder, never a broken page.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import os
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from curate.explore.views import RunOutput
from curate.schema import STATUS_KEPT


@dataclass
class Thumbnail:
    """A JPEG data URI and its size, or the ``problem`` a placeholder shows instead."""

    data_uri: str | None = None
    width: int = 0
    height: int = 0
    problem: str | None = None


def _is_local(url: str) -> tuple[bool, str]:
    import fsspec

    protocol, path = fsspec.core.split_protocol(url)
    if protocol in (None, "file", "local"):
        return True, os.path.abspath(os.path.expanduser(path))
    return False, url


@contextlib.contextmanager
def _open_tar(url: str) -> Iterator[tarfile.TarFile]:
    local, path = _is_local(url)
    if local:
        with tarfile.open(path, mode="r:*") as tar:
            yield tar
    else:
        import fsspec

        with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            yield tar


def _read_members(url: str, wanted: set[tuple[str, str]]) -> tuple[dict[tuple[str, str], bytes], str | None]:
    """Read the members named (key, ext) from one tar, stopping once all are found."""
    from curate.io.reader import split_member_name

    found: dict[tuple[str, str], bytes] = {}
    try:
        with _open_tar(url) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = split_member_name(member.name)
                if name in wanted and name not in found:
                    f = tar.extractfile(member)
                    found[name] = f.read() if f is not None else b""
                    if len(found) == len(wanted):
                        break
    except (OSError, tarfile.TarError, ValueError, ImportError) as exc:
        # a truncated tar still gives what came before the cut
        return found, f"{type(exc).__name__}: {exc}"
    return found, None


def _thumbnail(data: bytes, size: int) -> Thumbnail:
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (size * 2, size * 2))
            img = ImageOps.exif_transpose(img)
            img.thumbnail((size, size))
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                canvas = Image.new("RGB", rgba.size, (255, 255, 255))
                canvas.paste(rgba, mask=rgba.getchannel("A"))
                img = canvas
            else:
                img = img.convert("RGB")
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=82)
    except Exception as exc:  # any decoder failure is a placeholder, never a broken page
        return Thumbnail(problem=f"image could not be decoded ({type(exc).__name__})")
    uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return Thumbnail(data_uri=uri, width=img.width, height=img.height)


def load_thumbnails(
    run: RunOutput, rows: Sequence[dict[str, Any]], size: int = 160
) -> dict[tuple[str, str], Thumbnail]:
    """Thumbnails for sample rows, keyed by (shard, key).

    Images come from the input tar (``source_url``); kept samples fall back to the
    curated shards. A row whose bytes cannot be found or decoded gets a problem text.
    """
    from curate.io.reader import IMAGE_EXTS, sanitize_key

    def wanted_names(row: dict[str, Any], key: str) -> list[tuple[str, str]]:
        ext = (row.get("image_ext") or "").lower()
        return [(key, ext)] if ext else [(key, e) for e in IMAGE_EXTS]

    result: dict[tuple[str, str], Thumbnail] = {}
    by_url: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_url.setdefault(row.get("source_url") or "", []).append(row)
    raw: dict[tuple[str, str], bytes] = {}
    problems: dict[tuple[str, str], str] = {}
    for url, group in by_url.items():
        if not url:
            for row in group:
                problems[(row["shard"], row["key"])] = "image not available: the row names no input shard"
            continue
        wanted = {name for row in group for name in wanted_names(row, row["key"])}
        found, fault = _read_members(url, wanted)
        for row in group:
            ident = (row["shard"], row["key"])
            data = next((found[n] for n in wanted_names(row, row["key"]) if n in found), None)
            if data is not None and _sha_ok(data, row.get("image_sha256")):
                raw[ident] = data
            elif fault and not found:
                problems[ident] = "image not available: input shard not readable"
            else:
                problems[ident] = "image not available: not found in the input shard"

    # kept samples are also in the curated shards
    missing = [r for r in rows if (r["shard"], r["key"]) not in raw and r.get("status") == STATUS_KEPT]
    shard_tars = sorted((run.root / "shards").glob("*.tar")) if missing else []
    if missing and shard_tars:
        names: dict[tuple[str, str], list[tuple[str, str]]] = {}
        for row in missing:
            keys = {row["key"], sanitize_key(row["key"])}
            names[(row["shard"], row["key"])] = [n for k in sorted(keys) for n in wanted_names(row, k)]
        pending = {n for ns in names.values() for n in ns}
        for tar_path in shard_tars:
            found, _ = _read_members(str(tar_path), pending)
            for ident, candidates in names.items():
                if ident in raw:
                    continue
                row = next(r for r in missing if (r["shard"], r["key"]) == ident)
                for n in candidates:
                    if n in found and _sha_ok(found[n], row.get("image_sha256")):
                        raw[ident] = found[n]
                        problems.pop(ident, None)
                        break
            if all(ident in raw for ident in names):
                break

    for row in rows:
        ident = (row["shard"], row["key"])
        if ident in raw:
            result[ident] = _thumbnail(raw[ident], size)
        else:
            result[ident] = Thumbnail(problem=problems.get(ident, "image not available"))
    return result


def _sha_ok(data: bytes, expected: str | None) -> bool:
    return not expected or hashlib.sha256(data).hexdigest() == expected
