"""The emoji held-out set: the npm download on a fake ``npm``, the reader, and a fetch into shards."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pytest

from curate.data.emoji import EmojiSource, download_npm_package, emoji_caption
from curate.data.fetch import FetchOptions, fetch_dataset
from curate.data.items import FetchError
from tests.data.trees import png, read_shards

EMOJI = [
    {"name": "CROSSED SWORDS", "unified": "2694-FE0F", "image": "2694-fe0f.png",
     "short_names": ["crossed_swords"], "category": "Objects", "subcategory": "tool", "sort_order": 2,
     "has_img_twitter": True},
    {"name": "Sark Flag", "unified": "1F1E8-1F1F6", "image": "1f1e8-1f1f6.png", "short_names": ["flag-cq"],
     "category": "Flags", "subcategory": "country-flag", "sort_order": 1, "has_img_twitter": True},
    {"name": "MOUSE FACE", "unified": "1F42D", "image": "1f42d.png", "short_names": ["mouse"],
     "category": "Animals & Nature", "subcategory": "animal-mammal", "sort_order": 3,
     "has_img_twitter": False},
    {"name": None, "unified": "1F600", "image": "1f600.png", "sort_order": 4, "has_img_twitter": True},
    {"name": "SNOWFLAKE", "unified": "2744-FE0F", "image": "2744-fe0f.png", "sort_order": 5,
     "has_img_twitter": True},  # listed as present, but its file is missing
]  # fmt: skip


def build_package(root: Path) -> Path:
    """An extracted emoji-datasource-twitter tarball: ``package/emoji.json`` + ``package/img/twitter/64``."""
    pkg = root / "package"
    pkg.mkdir(parents=True)
    (pkg / "emoji.json").write_text(json.dumps(EMOJI))
    for i, entry in enumerate(EMOJI[:4]):
        png(pkg / "img/twitter/64" / entry["image"], size=(64, 64), color=(40 * i, 90, 200, 255))
    return root


def test_captions_are_the_names_in_sentence_case() -> None:
    assert emoji_caption("CROSSED SWORDS") == "Crossed swords."
    assert emoji_caption("Sark  Flag") == "Sark flag."
    assert emoji_caption("  ") == ""


def test_items_in_sort_order_with_names_metadata_and_skip_marks(tmp_path: Path) -> None:
    source = EmojiSource([build_package(tmp_path / "src")])
    items, available = source.items()
    assert available == 5
    assert [i.id for i in items] == ["1f1e8-1f1f6", "2694-fe0f", "1f42d", "1f600", "2744-fe0f"]
    swords = items[1]
    assert swords.caption == "Crossed swords." and swords.skip is None
    assert swords.meta["unicode_name"] == "CROSSED SWORDS" and swords.meta["category"] == "Objects"
    assert {i.id: i.skip for i in items if i.skip} == {
        "1f42d": "no_image",  # has_img_twitter false
        "1f600": "unreadable_metadata",  # no name
        "2744-fe0f": "no_image",  # the file is not there
    }
    assert [i.id for i in source.items(2)[0]] == ["1f1e8-1f1f6", "2694-fe0f"]


def test_a_tree_without_emoji_json_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FetchError, match=r"no emoji\.json"):
        EmojiSource([tmp_path])


def test_fetch_writes_one_unsplit_set_and_counts_every_skip(tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = fetch_dataset("emoji", out, FetchOptions(workers=1), sources=[build_package(tmp_path / "src")])
    assert report.written == {"all": 2} and report.skipped == {"no_image": 2, "unreadable_metadata": 1}
    samples = read_shards(out)
    captions = sorted(s["txt"].decode() for s in samples.values())
    assert captions == ["Crossed swords.", "Sark flag."]
    meta = json.loads(next(s["json"] for s in samples.values() if s["txt"] == b"Sark flag."))
    assert meta["dataset"] == "emoji" and meta["category"] == "Flags" and meta["short_names"] == ["flag-cq"]


def fake_npm(bin_dir: Path, tarball: Path, log: Path) -> None:
    """An ``npm`` whose ``pack SPEC --pack-destination DIR`` copies ``tarball`` to DIR, logging each call."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "npm"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> "{log}"\n'
        'if [ "$2" = "no-such-pkg@1" ]; then echo "npm error 404 Not Found" >&2; exit 1; fi\n'
        f'cp "{tarball}" "$4/emoji-datasource-twitter-16.0.0.tgz"\n'
    )
    script.chmod(0o755)


def test_download_npm_package_packs_once_and_extracts_safely(tmp_path: Path, monkeypatch) -> None:
    tree = build_package(tmp_path / "tree")
    tarball = tmp_path / "pkg.tgz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(tree / "package", arcname="package")
    log = tmp_path / "npm.log"
    fake_npm(tmp_path / "bin", tarball, log)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")

    cache = tmp_path / "cache"
    root = download_npm_package("emoji-datasource-twitter@16.0.0", cache)
    assert root == cache / "npm" / "extracted" / "emoji-datasource-twitter_16.0.0"
    assert (root / "package/emoji.json").is_file()
    assert len(EmojiSource([root]).items()[0]) == 5
    assert download_npm_package("emoji-datasource-twitter@16.0.0", cache) == root  # cached: npm not run again
    assert len(log.read_text().splitlines()) == 1
    with pytest.raises(FetchError, match="npm pack no-such-pkg@1 failed:\nnpm error 404"):
        download_npm_package("no-such-pkg@1", cache)
    assert not [p for p in (cache / "npm").iterdir() if p.name.startswith(".")]
