"""Files written whole or not at all, and the one WebDataset tar writer.

Every output of the project (run shards, fetched data, training subsets, checkpoints,
cached features, reports) is written under a temporary name beside its final one and
renamed when complete, so a crash never leaves a half-written file under a final name.
Temporary names start with a dot and carry ``.tmp-``: :func:`is_temp` recognises a
crashed writer's leftovers, and listings of finished files skip them.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tarfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

import fsspec

TMP_MARK = ".tmp-"


def output_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and root path of a local path or fsspec URL, without a trailing slash."""
    fs, root = fsspec.core.url_to_fs(url)
    return fs, root.rstrip("/")


def temp_name(path: str) -> str:
    """A unique temporary name beside ``path``: ``DIR/.BASE.tmp-PID-RANDOM``."""
    directory, _, base = str(path).rpartition("/")
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    name = f".{base}{TMP_MARK}{token}"
    return f"{directory}/{name}" if directory else name


def is_temp(name: str) -> bool:
    """A crashed writer's leftover (a name from :func:`temp_name`)."""
    base = name.rstrip("/").rsplit("/", 1)[-1]
    return base.startswith(".") and TMP_MARK in base


class AtomicFile:
    """A binary file under a temporary name that :meth:`commit` renames to ``path``, for a
    writer that stays open across calls (a shard filled sample by sample); :meth:`abort`
    removes it. ``fs`` is any fsspec filesystem (default: the one of ``path``)."""

    def __init__(self, path: str | os.PathLike[str], fs: fsspec.AbstractFileSystem | None = None) -> None:
        if fs is None:
            fs, path = fsspec.core.url_to_fs(str(path))
        self.fs, self.path = fs, str(path)
        self.tmp = temp_name(self.path)
        self.file: IO[bytes] = fs.open(self.tmp, "wb")

    def commit(self) -> None:
        self.file.close()
        self.fs.mv(self.tmp, self.path)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.file.close()
        with contextlib.suppress(Exception):
            if self.fs.exists(self.tmp):
                self.fs.rm(self.tmp)


@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike[str], fs: fsspec.AbstractFileSystem | None = None
) -> Iterator[IO[bytes]]:
    """A binary file to write that appears under ``path`` only when the block exits cleanly;
    on an error the temporary file is removed and the error propagates."""
    out = AtomicFile(path, fs)
    try:
        yield out.file
    except BaseException:
        out.abort()
        raise
    out.commit()


def write_atomic(
    path: str | os.PathLike[str], data: bytes, fs: fsspec.AbstractFileSystem | None = None
) -> None:
    """Write ``data`` to ``path`` (temporary name, then rename)."""
    with atomic_open(path, fs) as f:
        f.write(data)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], *, replace: bool = True) -> Iterator[Path]:
    """A local temporary path beside ``target`` for a writer that wants a path, not a file
    object (``torch.save``, ``save_pretrained`` of a directory, ``dpkg-deb -x``).

    When the block exits cleanly the temporary file or directory is renamed onto
    ``target``; an existing ``target`` is replaced, or, with ``replace=False``, kept (another
    process finished the same work first) and the temporary one dropped. On an error the
    temporary path is removed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(temp_name(str(target)))
    try:
        yield tmp
        if target.exists() and (target.is_dir() and not target.is_symlink()):
            if not replace:
                return
            shutil.rmtree(target)
        elif target.exists() and not replace:
            return
        os.replace(tmp, target)
    finally:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


class TarWriter:
    """WebDataset members to a tar stream: ``add(name, data)`` in the order they should be read.

    Members get mode 0644 and mtime 0, so the same members always give the same bytes.
    PAX (the default) stores any name; USTAR matches what img2dataset writes.
    """

    def __init__(self, fileobj: IO[bytes], *, format: int = tarfile.PAX_FORMAT) -> None:
        self._tar = tarfile.open(fileobj=fileobj, mode="w", format=format)  # noqa: SIM115 - closed in close()
        self.names: set[str] = set()

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        info.mtime = 0
        self._tar.addfile(info, io.BytesIO(data))
        self.names.add(name)

    def add_all(self, members: Iterable[tuple[str, bytes]]) -> None:
        for name, data in members:
            self.add(name, data)

    def close(self) -> None:
        self._tar.close()

    def __enter__(self) -> TarWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def tar_bytes(members: Iterable[tuple[str, bytes]], *, format: int = tarfile.PAX_FORMAT) -> bytes:
    """A whole tar of ``members`` in memory."""
    buf = io.BytesIO()
    with TarWriter(buf, format=format) as tar:
        tar.add_all(members)
    return buf.getvalue()


def write_tar(
    path: str | os.PathLike[str],
    members: Iterable[tuple[str, bytes]],
    *,
    format: int = tarfile.PAX_FORMAT,
    fs: fsspec.AbstractFileSystem | None = None,
) -> str:
    """Stream ``members`` into the tar at ``path`` (local or fsspec URL), atomically."""
    path = str(path)
    if fs is None:
        fs, path = fsspec.core.url_to_fs(path)
    parent = path.rpartition("/")[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with atomic_open(path, fs) as f, TarWriter(f, format=format) as tar:
        tar.add_all(members)
    return path
