"""Paths the training scripts hand to Ray Train workers, which run in another directory."""

from __future__ import annotations

from pathlib import Path

from train.lib.launch import absolute_local, absolute_shards


def test_local_paths_become_absolute_and_the_rest_stays(tmp_path, monkeypatch):
    (tmp_path / "out" / "tiny" / "clip").mkdir(parents=True)
    (tmp_path / "s.tar").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert absolute_local("out/tiny/clip") == str(tmp_path / "out" / "tiny" / "clip")
    assert Path(absolute_local("out/tiny/clip")).is_absolute()
    # a hub id, an architecture name, a URL and nothing are not paths here
    for value in ("Salesforce/blip-image-captioning-base", "vit-b-32", "s3://bucket/x.tar", None, ""):
        assert absolute_local(value) == value
    assert absolute_shards(["s.tar", "gs://b/0.tar"]) == [str(tmp_path / "s.tar"), "gs://b/0.tar"]
