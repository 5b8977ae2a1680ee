"""Debian packages as a data source: ``apt-get download`` and ``dpkg-deb -x`` into a cache.

Only package registries are reachable from this project's machines, so the real
image/alt-text sets come as ``.deb`` files. Nothing is installed: a package is
downloaded once, extracted once, and both are reused by later fetches.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from curate.data.items import FetchError
from curate.io.files import atomic_path

DEFAULT_CACHE = Path("~/.cache/curate/debs")


def download_package(name: str, cache: Path = DEFAULT_CACHE) -> Path:
    """Download (``apt-get download``) and extract (``dpkg-deb -x``) a package into ``cache``.

    Returns the extracted root, ``cache/extracted/<.deb name without .deb>``. A cached ``.deb`` and its
    extraction are reused, so a second call costs nothing; ``apt-get update`` runs only
    when the package is unknown to apt. Both steps go through temporary names, so an
    interrupted run leaves no half file that a later run would trust.
    """
    cache = Path(cache).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    deb = _cached_deb(cache, name)
    if deb is None:
        tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=cache))
        try:
            proc = _run(["apt-get", "download", name], cwd=tmp)
            if proc.returncode != 0 and _unknown_package(proc.stdout + proc.stderr):
                update = _run(["apt-get", "update"])
                if update.returncode != 0:
                    raise FetchError(f"apt-get update failed:\n{_tail(update.stdout + update.stderr)}")
                proc = _run(["apt-get", "download", name], cwd=tmp)
            if proc.returncode != 0:
                raise FetchError(f"apt-get download {name} failed:\n{_tail(proc.stdout + proc.stderr)}")
            debs = sorted(tmp.glob(f"{name}_*.deb"))
            if not debs:
                raise FetchError(f"apt-get download {name} succeeded but left no {name}_*.deb in {tmp}")
            for found in debs:
                os.replace(found, cache / found.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        deb = _cached_deb(cache, name)
        assert deb is not None
    root = cache / "extracted" / deb.name.removesuffix(".deb")
    if not root.is_dir():
        with atomic_path(root, replace=False) as tmp:  # another fetch may extract it first
            proc = _run(["dpkg-deb", "-x", str(deb), str(tmp)])
            if proc.returncode != 0:
                raise FetchError(f"dpkg-deb -x {deb} failed:\n{_tail(proc.stdout + proc.stderr)}")
    return root


def _cached_deb(cache: Path, name: str) -> Path | None:
    # Debian package names have no "_", so NAME_*.deb matches only this package
    debs = sorted(cache.glob(f"{name}_*.deb"), key=lambda p: (p.stat().st_mtime, p.name))
    return debs[-1] if debs else None


def _unknown_package(output: str) -> bool:
    markers = ("Unable to locate package", "has no installation candidate", "Can't select candidate")
    return any(m in output for m in markers)


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise FetchError(
            f"{cmd[0]} not found: fetching needs Debian's apt tools, or pass --source DIR "
            "with an already-extracted package root"
        ) from exc


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])
