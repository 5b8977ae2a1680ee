"""The shard writer: img2dataset's layout (tar + Parquet + stats per shard), reproducible bytes."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from curate.data.shards import SIDECAR_SCHEMA, ShardWriter
from tests.data.trees import read_shards, tree_bytes


def _write(directory: Path, n: int, shard_size: int) -> ShardWriter:
    writer = ShardWriter(directory, shard_size)
    for i in range(n):
        key = f"{i:09d}"
        meta = {"key": key, "url": f"deb://x/{i}.png", "width": i + 1, "height": 2, "sha256": "ab" * 32}
        writer.add(key, f"image {i}".encode(), "png", f"caption {i} é", meta)
    writer.close()
    return writer


def test_shards_hold_image_caption_and_json_with_sidecars(tmp_path: Path) -> None:
    writer = _write(tmp_path, 5, 2)
    assert writer.written == ["00000", "00001", "00002"] and writer.count == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{n}{s}" for n in writer.written for s in (".tar", ".parquet", "_stats.json")
    )
    with tarfile.open(tmp_path / "00001.tar") as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == [
            f"00000000{k}.{e}" for k in (2, 3) for e in ("png", "txt", "json")
        ]
        assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.mode == 0o644 for m in members)
    samples = read_shards(tmp_path)
    assert samples["000000003"]["txt"] == "caption 3 é".encode()
    assert samples["000000003"]["png"] == b"image 3"
    assert json.loads(samples["000000003"]["json"])["width"] == 4

    table = pq.read_table(tmp_path / "00002.parquet")
    assert table.schema == SIDECAR_SCHEMA
    assert table.to_pylist() == [
        {
            "key": "000000004",
            "caption": "caption 4 é",
            "url": "deb://x/4.png",
            "status": "success",
            "error_message": None,
            "width": 5,
            "height": 2,
            "original_width": None,
            "original_height": None,
            "sha256": "ab" * 32,
        }
    ]
    stats = json.loads((tmp_path / "00002_stats.json").read_text())
    assert stats == {"count": 1, "successes": 1, "failed": 0}


def test_same_samples_give_the_same_bytes_and_stale_files_go(tmp_path: Path) -> None:
    _write(tmp_path / "a", 5, 2)
    _write(tmp_path / "b", 5, 2)
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")

    (tmp_path / "a/.00000.tar.tmp-123-deadbeef").write_bytes(b"a crashed writer's leftover")
    (tmp_path / "a/notes.txt").write_text("not ours")
    _write(tmp_path / "a", 5, 10)  # one shard now: 00001 and 00002 are stale
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "00000.parquet",
        "00000.tar",
        "00000_stats.json",
        "notes.txt",
    ]


def test_shard_size_below_one_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="shard_size must be >= 1, got 0"):
        ShardWriter(tmp_path, 0)
