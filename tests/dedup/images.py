"""The dedup test set: real clip art, byte copies and resized, re-encoded copies under other keys.

Originals are the 100 openclipart drawings of fixtures/openclipart_128.tar.gz (see
make_fixture.py). The set adds, under keys of their own and in other shards:

- byte-identical copies of 20 originals (``b-NN``),
- resized and re-encoded copies of 30 other originals (``r-NN``): JPEG at other qualities,
  WebP, PNG, smaller and larger than the original, one transform each from :data:`TRANSFORMS`.

Ground truth: a sample's *origin* is the original it was made from (an original is its own).
The drawings also hold four real near-duplicate pairs (NATIVE); their samples share an origin.
Two of them are byte-identical in the fixture (000000027 and 000000046 in the demo data already;
000000014 and 000000039 once shrunk to 128 px).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

from PIL import Image

from tests.helpers import make_shard

FIXTURE = Path(__file__).parent / "fixtures" / "openclipart_128.tar.gz"
# real near-duplicates among the originals: the same drawing twice, or one drawing recoloured
NATIVE = [
    ("000000027", "000000046"),
    ("000000014", "000000039"),
    ("000000028", "000000029"),
    ("000000062", "000000063"),
]
# (scale of the longer side, format, quality)
TRANSFORMS = [
    (0.5, "JPEG", 75),
    (0.75, "JPEG", 40),
    (1.5, "JPEG", 90),
    (0.6, "WEBP", 60),
    (2.0, "PNG", None),
    (0.4, "JPEG", 20),
]


@dataclass(frozen=True)
class Sample:
    shard: str
    key: str
    origin: str  # key of the original it copies (its own key for an original)
    kind: str  # "original", "byte" or "reencoded"
    sha256: str  # of the image bytes in the shard

    @property
    def id(self) -> str:
        return f"{self.shard}/{self.key}"


def originals() -> list[tuple[str, bytes, bytes, bytes]]:
    """(key, png, txt, json) of the fixture, in key order."""
    files: dict[str, dict[str, bytes]] = {}
    with gzip.open(FIXTURE, "rb") as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            files.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return [(k, f["png"], f["txt"], f["json"]) for k, f in sorted(files.items())]


def reencode(png: bytes, scale: float, fmt: str, quality: int | None) -> bytes:
    img = Image.open(io.BytesIO(png)).convert("RGBA")
    flat = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img).convert("RGB")
    size = (max(8, round(flat.width * scale)), max(8, round(flat.height * scale)))
    out = io.BytesIO()
    flat.resize(size, Image.Resampling.LANCZOS).save(out, fmt, **({"quality": quality} if quality else {}))
    return out.getvalue()


def build_shards(directory: Path) -> tuple[list[Path], list[Sample]]:
    """Three input shards: originals 0-49, originals 50-99 with the byte copies, the re-encoded
    copies (copies sit in other shards than their originals, and in the same one)."""
    items = originals()
    shards: dict[str, list[dict]] = {"00000": [], "00001": [], "00002": []}
    truth: list[Sample] = []

    def add(
        shard: str, key: str, image: bytes, fmt: str, txt: bytes, meta: bytes, origin: str, kind: str
    ) -> None:
        shards[shard].append({"key": key, "image": image, "format": fmt, "txt": txt, "json": meta})
        truth.append(Sample(shard, key, origin, kind, hashlib.sha256(image).hexdigest()))

    for i, (key, png, txt, meta) in enumerate(items):
        add("00000" if i < 50 else "00001", key, png, "png", txt, meta, key, "original")
    for n, (key, png, txt, meta) in enumerate(items[0:20]):  # byte copies, in 00001
        add("00001", f"b-{n:02d}", png, "png", txt, meta, key, "byte")
    for n, (key, png, txt, meta) in enumerate(items[40:70]):  # re-encoded copies, in 00002
        scale, fmt, quality = TRANSFORMS[n % len(TRANSFORMS)]
        ext = {"JPEG": "jpg", "WEBP": "webp", "PNG": "png"}[fmt]
        add("00002", f"r-{n:02d}", reencode(png, scale, fmt, quality), ext, txt, meta, key, "reencoded")
    paths = [make_shard(directory / f"{name}.tar", samples) for name, samples in shards.items()]
    return paths, truth


def same_origin(truth: list[Sample]) -> dict[str, str]:
    """Sample id -> the id of its origin class (native near-duplicates merged)."""
    merged = {a: a for a, _ in NATIVE}
    merged.update({b: a for a, b in NATIVE})
    by_key = {s.key: s for s in truth if s.kind == "original"}
    return {s.id: by_key[merged.get(s.origin, s.origin)].id for s in truth}


def true_pairs(truth: list[Sample], kinds: tuple[str, ...] | None = None) -> set[frozenset[str]]:
    """Unordered pairs of samples with the same origin class; ``kinds`` keeps pairs with a
    copy of those kinds (and its original)."""
    origin = same_origin(truth)
    by_class: dict[str, list[Sample]] = {}
    for s in truth:
        by_class.setdefault(origin[s.id], []).append(s)
    pairs = set()
    for members in by_class.values():
        for a, b in combinations(members, 2):
            if kinds is None or a.kind in kinds or b.kind in kinds:
                pairs.add(frozenset((a.id, b.id)))
    return pairs


def equal_bytes(truth: list[Sample]) -> set[frozenset[str]]:
    """Unordered pairs of samples whose image bytes are identical."""
    by_sha: dict[str, list[str]] = {}
    for s in truth:
        by_sha.setdefault(s.sha256, []).append(s.id)
    return {frozenset(p) for ids in by_sha.values() for p in combinations(sorted(ids), 2)}


def found_pairs(groups: dict[str, list[str]]) -> set[frozenset[str]]:
    """Every unordered pair inside the groups (group -> member ids)."""
    return {frozenset(p) for members in groups.values() for p in combinations(sorted(members), 2)}


def precision_recall(found: set[frozenset[str]], truth: set[frozenset[str]]) -> tuple[float, float]:
    hit = len(found & truth)
    return (hit / len(found) if found else 1.0), (hit / len(truth) if truth else 1.0)
