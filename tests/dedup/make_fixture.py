"""Rebuild tests/dedup/fixtures/openclipart_128.tar.gz from the demo data (``make demo-data``).

The first 100 openclipart samples of ``data/openclipart/*.tar`` (Debian's openclipart-png:
public-domain clip art, with its real titles as alt-text), each image shrunk to at most 128 px
and stored as a 64-colour PNG in a gzipped tar, so the fixture stays small (about 230 KB) while
the images stay real drawings. The set holds the demo data's own duplicates: byte-identical
images (000000027 and 000000046; 000000014 and 000000039, the same penguin, once shrunk) and
near-identical renders (000000028 and 000000029, one flamingo drawn in outline and in colour;
000000062 and 000000063).

    python -m tests.dedup.make_fixture
"""

from __future__ import annotations

import gzip
import io
import sys
import tarfile
from pathlib import Path

from PIL import Image

from curate.io.files import tar_bytes, write_atomic

REPO = Path(__file__).resolve().parents[2]
FIXTURE = Path(__file__).parent / "fixtures" / "openclipart_128.tar.gz"
COUNT = 100
SIDE = 128


def shrink(data: bytes) -> bytes:
    img = Image.open(io.BytesIO(data)).convert("RGBA")
    img.thumbnail((SIDE, SIDE), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.quantize(64).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def main() -> int:
    members: dict[str, dict[str, bytes]] = {}
    for path in sorted((REPO / "data" / "openclipart").glob("*.tar")):
        with tarfile.open(path) as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()
    keys = sorted(k for k, files in members.items() if "png" in files)[:COUNT]
    if len(keys) < COUNT:
        print(
            f"need {COUNT} samples in data/openclipart (make demo-data), found {len(keys)}", file=sys.stderr
        )
        return 1
    out = []
    for key in keys:
        files = members[key]
        out += [
            (f"{key}.png", shrink(files["png"])),
            (f"{key}.txt", files["txt"]),
            (f"{key}.json", files["json"]),
        ]
    write_atomic(FIXTURE, gzip.compress(tar_bytes(out), mtime=0))
    print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size:,} bytes, {len(keys)} samples)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
