"""Builders of hostile input shards: every case of the 'nothing lost' issue, with the
status and reason/error fragment curate must give each sample."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

from PIL import Image

from tests.helpers import encode_image, image_bytes, noise_image, write_tar


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A PNG whose header declares ~900 M pixels; the data is a few bytes (never decoded)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def animated_gif() -> bytes:
    frames = [noise_image(24, 24, seed=s).convert("P") for s in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


def sixteen_bit_png() -> bytes:
    img = Image.new("I;16", (24, 20))
    img.putdata([i * 100 for i in range(24 * 20)])
    return encode_image(img, "png")


def rgba_png() -> bytes:
    img = Image.new("RGBA", (24, 20), (255, 0, 0, 0))
    return encode_image(img, "png")


# key -> (members, expected status, expected reason or error fragment)
def hostile_members() -> tuple[list[tuple[str, bytes]], dict[str, tuple[str, str | None]]]:
    good = image_bytes(32, 24, "jpg", seed=1)
    truncated = image_bytes(64, 64, "jpg", seed=2)[:300]
    members: list[tuple[str, bytes]] = []
    expect: dict[str, tuple[str, str | None]] = {}

    def add(key: str, parts: list[tuple[str, bytes]], status: str, detail: str | None) -> None:
        members.extend((f"{key}.{ext}", data) for ext, data in parts)
        expect[key] = (status, detail)

    add("ok", [("jpg", good), ("txt", b"a fine photo"), ("json", b'{"url": "http://x/1"}')], "kept", None)
    add("garbage", [("jpg", b"\x00\x01garbage" * 20), ("txt", b"x")], "error", "undecodable image")
    add("truncated", [("jpg", truncated), ("txt", b"cut jpeg")], "error", "undecodable image")
    add("zero", [("jpg", b""), ("txt", b"empty file")], "error", "0 bytes")
    add("bomb", [("png", bomb_png()), ("txt", b"huge")], "error", "decompression bomb")
    add(
        "cmyk",
        [("jpg", encode_image(noise_image(24, 24, 3, mode="CMYK"), "jpg")), ("txt", b"cmyk")],
        "kept",
        None,
    )
    add("sixteen", [("png", sixteen_bit_png()), ("txt", b"16 bit")], "kept", None)
    add(
        "palette",
        [("png", encode_image(noise_image(24, 24, 4).convert("P"), "png")), ("txt", b"p")],
        "kept",
        None,
    )
    add("alpha", [("png", rgba_png()), ("txt", b"transparent")], "kept", None)
    add("anim", [("gif", animated_gif()), ("txt", b"animated")], "kept", None)
    add("tiny", [("png", image_bytes(3, 3, seed=5)), ("txt", b"too small")], "dropped", "image_too_small")
    add("notext", [("jpg", good)], "dropped", "no_text")
    add("badutf8", [("jpg", good), ("txt", b"caf\xe9 \xff")], "error", "not valid UTF-8")
    add("hugetext", [("jpg", good), ("txt", b"word " * 400_000)], "dropped", "alt_text_too_long")
    add("badjson", [("jpg", good), ("txt", b"x"), ("json", b"{not json")], "error", "not valid JSON")
    add("noimage", [("txt", b"only text"), ("json", b"{}")], "error", "no image member")
    add("dup", [("jpg", good), ("txt", b"first")], "kept", None)
    add("sep", [("jpg", good), ("txt", b"separator")], "kept", None)
    members.extend([("dup.jpg", good), ("dup.txt", b"second")])  # same key again, not adjacent
    expect["dup#dup18"] = ("error", "duplicate key")
    add("../../escape", [("jpg", good), ("txt", b"dot dot")], "kept", None)
    add("/abs/path", [("jpg", good), ("txt", b"absolute")], "kept", None)
    add("odd name \u00e9*?", [("jpg", good), ("txt", b"odd chars")], "kept", None)
    return members, expect


def write_hostile_shards(directory: Path) -> dict[str, dict[str, tuple[str, str | None]]]:
    """Write hostile shards; returns {shard: {key: (status, detail)}} for the samples in them."""
    directory.mkdir(parents=True, exist_ok=True)
    members, expect = hostile_members()
    write_tar(directory / "00000.tar", members)
    # the same keys in another shard are different samples
    write_tar(directory / "00001.tar", [("ok.jpg", image_bytes(32, 24, "jpg", 9)), ("ok.txt", b"again")])
    (directory / "00002.tar").write_bytes(b"")  # an empty file
    write_tar(directory / "00003.tar", [])  # an empty tar
    (directory / "00004.tar").write_bytes(b"<html>not a tar</html>" * 100)
    full = write_tar(directory / "full.tmp", [(f"t{i}.jpg", image_bytes(32, 24, "jpg", i)) for i in range(4)])
    import tarfile

    with tarfile.open(full) as tar:
        cut = next(m.offset_data for m in tar.getmembers() if m.name == "t2.jpg") + 50
    data = full.read_bytes()
    full.unlink()
    (directory / "00005.tar").write_bytes(data[:cut])  # cut inside the third image
    return {
        "00000": expect,
        "00001": {"ok": ("kept", None)},
        "00005": {"t0": ("dropped", "no_text"), "t1": ("dropped", "no_text"), "t2": ("error", "cut off")},
    }


def expected_faults() -> dict[str, str | None]:
    return {
        "00000": None,
        "00001": None,
        "00002": "unreadable tar",
        "00003": None,
        "00004": "unreadable tar",
        "00005": "unreadable tar",
    }


def dump(obj: object) -> str:
    return json.dumps(obj, indent=1, default=str)
