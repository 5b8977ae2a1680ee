"""``download_package`` on a real ``.deb`` built here and a fake ``apt-get`` (the real one needs the web)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from curate.data.debian import download_package
from curate.data.items import FetchError
from tests.data.trees import build_deb, fake_apt_get, txt

needs_dpkg = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")


@needs_dpkg
def test_download_package_uses_apt_once_and_updates_only_for_unknown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pkg = tmp_path / "pkgdir"
    txt(pkg / "usr/share/fake/hello.txt", "hi\n")
    deb = build_deb(pkg, "fake-pkg", "1:1.0-1", tmp_path)
    assert deb.name == "fake-pkg_1%3a1.0-1_all.deb"
    log = tmp_path / "apt.log"
    fake_apt_get(tmp_path / "bin", {"fake-pkg": deb}, log)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")

    cache = tmp_path / "cache"
    root = download_package("fake-pkg", cache)
    assert root == cache / "extracted" / deb.name.removesuffix(".deb")
    assert (cache / deb.name).is_file()
    assert (root / "usr/share/fake/hello.txt").read_text() == "hi\n"
    assert log.read_text().splitlines() == ["download fake-pkg", "update", "download fake-pkg"]

    again = download_package("fake-pkg", cache)  # cached: apt is not called again
    assert again == root
    assert len(log.read_text().splitlines()) == 3
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]


@needs_dpkg
def test_unknown_package_is_a_clear_error_and_leaves_no_download_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_apt_get(tmp_path / "bin", {}, tmp_path / "apt.log")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    cache = tmp_path / "cache"
    with pytest.raises(FetchError, match="apt-get download no-such-pkg failed:\nE: Unable to locate"):
        download_package("no-such-pkg", cache)
    assert list(cache.iterdir()) == []


def test_missing_apt_tools_name_the_way_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get on it
    with pytest.raises(FetchError, match=r"apt-get not found.*--source DIR"):
        download_package("anything", tmp_path / "cache")
