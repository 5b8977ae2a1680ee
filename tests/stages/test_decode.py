from __future__ import annotations

import functools
import io
import struct
import zlib

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from curate.config import DecodeConfig
from curate.schema import (
    INTERNAL_SCHEMA,
    ROW_SAMPLE,
    SOURCE_ALT,
    STATUS_DROPPED,
    STATUS_ERROR,
    STATUS_PENDING,
    empty_row,
)
from curate.stages.decode import DecodeError, decode_batch, decode_image, decode_rows, row_image
from curate.stages.rows import get_candidates
from tests.helpers import encode_image, noise_image

CFG = DecodeConfig()
WHITE = [255, 255, 255]


def pending_row(image: bytes | None, alt_text: str | None = "a photo", key: str = "k", seq: int = 0) -> dict:
    row = empty_row()
    row.update(row_type=ROW_SAMPLE, key=key, shard="s", seq=seq, status=STATUS_PENDING)
    row.update(image=image, alt_text=alt_text, image_ext="png")
    return row


def decode(data: bytes, cfg: DecodeConfig = CFG) -> np.ndarray:
    arr, width, height = decode_image(data, cfg)
    assert arr.dtype == np.uint8
    assert arr.ndim == 3 and arr.shape[2] == 3
    assert (width, height) == (arr.shape[1], arr.shape[0])  # no downscaling at these sizes
    return arr


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


@functools.cache
def huge_bilevel_png(width: int, height: int) -> bytes:
    """A valid, all-black 1-bit PNG of the given size: a few kB on disk, width*height pixels decoded."""
    row = b"\x00" + bytes((width + 7) // 8)  # filter type 0, then packed bits
    comp = zlib.compressobj(9)
    chunks = []
    rows_per_step = 1000
    for start in range(0, height, rows_per_step):
        chunks.append(comp.compress(row * min(rows_per_step, height - start)))
    chunks.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", b"".join(chunks))
        + png_chunk(b"IEND", b"")
    )


# -- modes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["png", "jpg", "webp", "bmp"])
def test_rgb_decodes_to_rgb_of_the_right_size(fmt):
    img = noise_image(40, 30, seed=1)
    arr = decode(encode_image(img, fmt))
    assert arr.shape == (30, 40, 3)
    if fmt in ("png", "bmp"):  # lossless
        assert np.array_equal(arr, np.asarray(img))


def test_grayscale_l():
    gray = Image.fromarray(np.tile(np.arange(0, 250, 10, dtype=np.uint8), (7, 1)), "L")
    arr = decode(encode_image(gray, "png"))
    assert arr.shape == (7, 25, 3)
    assert np.array_equal(arr[..., 0], np.asarray(gray))
    assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2])


def test_palette_with_transparency_is_composited_on_white():
    img = Image.new("P", (10, 6), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))
    img.paste(1, (0, 0, 5, 6))  # left half: red; right half: palette 0, transparent
    arr = decode(encode_image(img, "png", transparency=0))
    assert arr.shape == (6, 10, 3)
    assert arr[3, 2].tolist() == [255, 0, 0]
    assert arr[3, 7].tolist() == WHITE


def test_palette_without_transparency():
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 0, 0, 255] + [0] * (254 * 3))
    arr = decode(encode_image(img, "gif"))
    assert arr[0, 0].tolist() == [0, 0, 255]


def test_rgba_transparent_pixels_become_white():
    rgba = np.zeros((8, 12, 4), dtype=np.uint8)
    rgba[:, :6] = [0, 128, 0, 255]  # opaque green
    rgba[:, 6:9] = [0, 0, 0, 0]  # fully transparent black
    rgba[:, 9:] = [0, 0, 0, 128]  # half transparent black over white
    arr = decode(encode_image(Image.fromarray(rgba, "RGBA"), "png"))
    assert arr.shape == (8, 12, 3)
    assert arr[0, 0].tolist() == [0, 128, 0]
    assert arr[0, 7].tolist() == WHITE
    assert all(120 <= v <= 135 for v in arr[0, 10].tolist())


def test_la_transparent_pixels_become_white():
    la = np.zeros((5, 6, 2), dtype=np.uint8)
    la[:, :3] = [40, 255]
    la[:, 3:] = [0, 0]
    arr = decode(encode_image(Image.fromarray(la, "LA"), "png"))
    assert arr.shape == (5, 6, 3)
    assert arr[0, 0].tolist() == [40, 40, 40]
    assert arr[0, 5].tolist() == WHITE


def test_cmyk_jpeg():
    img = Image.new("CMYK", (20, 10), (0, 255, 255, 0))  # red in CMYK
    data = encode_image(img, "jpg")
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    arr = decode(data)
    assert arr.shape == (10, 20, 3)
    r, g, b = arr[5, 10].tolist()
    assert r > 200 and g < 60 and b < 60


def test_16_bit_png_is_rescaled_to_8_bit():
    values = np.linspace(0, 65535, 24 * 3).astype(np.uint16).reshape(3, 24)
    img = Image.fromarray(values)
    assert img.mode.startswith("I;16")
    arr = decode(encode_image(img, "png"))
    assert arr.shape == (3, 24, 3)
    assert arr[0, 0].tolist() == [0, 0, 0]
    assert arr[2, 23].tolist() == WHITE
    expected = (values.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert np.abs(arr[..., 0].astype(int) - expected).max() <= 1


def test_animated_gif_decodes_its_first_frame():
    frames = [Image.new("RGB", (16, 9), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    data = buf.getvalue()
    assert Image.open(io.BytesIO(data)).n_frames == 3
    arr = decode(data)
    assert arr.shape == (9, 16, 3)
    assert arr[4, 8].tolist() == [255, 0, 0]


# -- broken input ------------------------------------------------------------------------------


def test_zero_bytes():
    with pytest.raises(DecodeError, match="empty image file"):
        decode_image(b"", CFG)


def test_truncated_jpeg():
    data = encode_image(noise_image(64, 64), "jpg")
    with pytest.raises(DecodeError, match=r"undecodable image: OSError: .*[Tt]runcated"):
        decode_image(data[: len(data) // 2], CFG)


def test_garbage_bytes():
    with pytest.raises(DecodeError, match="undecodable image: UnidentifiedImageError") as info:
        decode_image(b"this is not an image at all" * 10, CFG)
    # the same bytes, the same message in every run: no object address from PIL's repr
    assert (
        str(info.value)
        == "undecodable image: UnidentifiedImageError: cannot identify image file <_io.BytesIO object>"
    )


def test_decompression_bomb_by_configured_limit():
    data = encode_image(noise_image(20, 20), "png")
    with pytest.raises(DecodeError, match=r"decompression bomb: 20x20 = 400 pixels > decode.max_pixels=399"):
        decode_image(data, DecodeConfig(max_pixels=399))
    decode_image(data, DecodeConfig(max_pixels=400))  # at the limit is fine


def test_decompression_bomb_real_huge_png_is_refused_before_decoding():
    data = huge_bilevel_png(20_000, 20_000)
    assert len(data) < 200_000  # tiny file, 400 M pixels
    with pytest.raises(DecodeError, match="decompression bomb: 20000x20000"):
        decode_image(data, CFG)


def test_broken_images_become_error_rows_and_others_survive():
    good = encode_image(noise_image(8, 8), "png")
    jpeg = encode_image(noise_image(64, 64), "jpg")
    rows = [
        pending_row(b"", key="zero"),
        pending_row(jpeg[: len(jpeg) // 2], key="cut"),
        pending_row(b"\x00garbage" * 20, key="junk"),
        pending_row(huge_bilevel_png(20_000, 20_000), key="bomb"),
        pending_row(good, key="good"),
    ]
    out = decode_rows(rows, CFG)
    by_key = {r["key"]: r for r in out}
    for key, message in [
        ("zero", "empty image file"),
        ("cut", "runcated"),
        ("junk", "undecodable image"),
        ("bomb", "decompression bomb"),
    ]:
        row = by_key[key]
        assert row["status"] == STATUS_ERROR, key
        assert message in row["error"], (key, row["error"])
        assert row["image"] is None and row["pixels"] is None
    assert by_key["good"]["status"] == STATUS_PENDING
    assert by_key["good"]["error"] is None


# -- size rules ----------------------------------------------------------------------------------


def test_too_small_images_are_dropped():
    cfg = DecodeConfig(min_side=10)
    rows = decode_rows(
        [
            pending_row(encode_image(noise_image(30, 9), "png"), key="thin"),
            pending_row(encode_image(noise_image(10, 10), "png"), key="ok"),
        ],
        cfg,
    )
    thin, ok = rows
    assert thin["status"] == STATUS_DROPPED
    assert thin["reason"] == "image_too_small"
    assert (thin["width"], thin["height"]) == (30, 9)
    assert thin["image"] is None and thin["pixels"] is None
    assert ok["status"] == STATUS_PENDING and ok["reason"] is None


@pytest.mark.parametrize(("fmt", "size"), [("png", (300, 100)), ("jpg", (2048, 1024)), ("png", (90, 301))])
def test_max_side_downscales_keeping_aspect_ratio(fmt, size):
    width, height = size
    img = noise_image(width, height, seed=3)
    (row,) = decode_rows([pending_row(encode_image(img, fmt))], DecodeConfig(max_side=64))
    assert row["status"] == STATUS_PENDING, row["error"]
    assert (row["width"], row["height"]) == (width, height)  # original size
    pw, ph = row["pixels_width"], row["pixels_height"]
    assert max(pw, ph) == 64
    assert abs(pw / ph - width / height) < 0.05 * (width / height)
    assert len(row["pixels"]) == pw * ph * 3
    assert row_image(row).size == (pw, ph)


def test_images_within_max_side_keep_their_pixels():
    img = noise_image(33, 17, seed=4)
    (row,) = decode_rows([pending_row(encode_image(img, "png"))], DecodeConfig(max_side=33))
    assert (row["pixels_width"], row["pixels_height"]) == (33, 17)
    assert np.array_equal(np.asarray(row_image(row)), np.asarray(img))


# -- alt text ----------------------------------------------------------------------------------


def test_alt_text_over_max_text_bytes_is_dropped():
    cfg = DecodeConfig(max_text_bytes=10)
    image = encode_image(noise_image(8, 8), "png")
    rows = decode_rows(
        [
            pending_row(image, alt_text="x" * 11, key="long"),
            pending_row(image, alt_text="\u00e9" * 6, key="multibyte"),  # 6 chars, 12 bytes
            pending_row(image, alt_text="x" * 10, key="at_limit"),
        ],
        cfg,
    )
    long, multibyte, at_limit = rows
    for row in (long, multibyte):
        assert row["status"] == STATUS_DROPPED, row["key"]
        assert row["reason"] == "alt_text_too_long"
        assert row["image"] is None and row["pixels"] is None
    assert len(long["alt_text"]) < 11
    assert at_limit["status"] == STATUS_PENDING
    assert at_limit["alt_text"] == "x" * 10


@pytest.mark.parametrize(("alt", "expected"), [("a red car", 1), ("", 0), (None, 0)])
def test_alt_candidate_only_for_non_empty_alt_text(alt, expected):
    (row,) = decode_rows([pending_row(encode_image(noise_image(8, 8), "png"), alt_text=alt)], CFG)
    assert row["status"] == STATUS_PENDING
    candidates = get_candidates(row)
    assert len(candidates) == expected
    if expected:
        assert candidates[0]["text"] == alt
        assert candidates[0]["source"] == SOURCE_ALT
        assert candidates[0]["itm_score"] is None and candidates[0]["clip_score"] is None
    # a decoded row's candidates are a list (empty without alt-text), never null
    assert isinstance(row["candidates"], list)


def test_rows_that_are_not_pending_are_left_alone():
    error = pending_row(None, key="e")
    error.update(status=STATUS_ERROR, error="no image member (found: txt)")
    end = empty_row()
    end.update(row_type="shard_end", shard="s", key="", seq=-1, status="shard_end", shard_total=1)
    before = [dict(error), dict(end)]
    assert decode_rows([error, end], CFG) == before


def test_decode_batch_round_trips_arrow():
    img = noise_image(12, 7, seed=9)
    table = pa.Table.from_pylist(
        [pending_row(encode_image(img, "png"), key="a"), pending_row(b"junk", key="b")],
        schema=INTERNAL_SCHEMA,
    )
    out = decode_batch(table, CFG)
    assert out.schema == INTERNAL_SCHEMA
    a, b = out.to_pylist()
    assert np.array_equal(np.asarray(row_image(a)), np.asarray(img))
    assert b["status"] == STATUS_ERROR
