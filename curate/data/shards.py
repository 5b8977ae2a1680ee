"""The shard writer: encoded samples -> img2dataset-layout WebDataset shards with sidecars.

Output is what img2dataset writes: ``00000.tar`` holding ``KEY.png|jpg``, ``KEY.txt``,
``KEY.json`` per sample, with ``00000.parquet`` and ``00000_stats.json`` beside it.
"""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curate.io.files import AtomicFile, TarWriter, atomic_open, is_temp, write_atomic

SHARD_SUFFIXES = (".tar", ".parquet", "_stats.json")
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
        """Add one sample; ``meta`` becomes ``KEY.json`` and fills the sidecar row."""
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
        keep = {f"{n}{suffix}" for n in self.written for suffix in SHARD_SUFFIXES}
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
