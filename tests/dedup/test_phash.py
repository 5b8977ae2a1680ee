"""The DCT perceptual hash: its construction, its stability under resizing and re-encoding of
real drawings, and that the run keeps it in every decoded row."""

from __future__ import annotations

import io
from itertools import combinations

import numpy as np
import pytest
from PIL import Image

from curate.config import DecodeConfig
from curate.dedup.phash import _DCT, _SIZE, hamming, phash, phash_hex
from curate.schema import ROW_SAMPLE, STATUS_PENDING, empty_row
from curate.stages.decode import decode_image, decode_rows
from curate.stages.rows import get_candidates
from tests.dedup.images import NATIVE, TRANSFORMS, originals, reencode
from tests.helpers import image_bytes


def test_the_dct_rows_are_the_dct_ii_basis():
    x = np.random.default_rng(0).normal(size=_SIZE)
    n = np.arange(_SIZE)
    direct = [sum(x[i] * np.cos(np.pi / _SIZE * (i + 0.5) * k) for i in n) for k in range(8)]
    assert np.allclose(_DCT @ x, direct)


def _hashes() -> dict[str, int]:
    cfg = DecodeConfig()
    return {key: phash(decode_image(png, cfg)[0]) for key, png, _, _ in originals()}


def test_hash_format_and_bit_layout():
    cfg = DecodeConfig()
    _, png, _, _ = originals()[0]
    pixels = decode_image(png, cfg)[0]
    text = phash_hex(pixels)
    assert len(text) == 16 and int(text, 16) == phash(pixels) == phash(pixels.copy())
    assert phash(np.asarray(Image.fromarray(pixels).convert("L"))) == phash(pixels)  # grey in, same hash
    # bit 63 is the DC coefficient: above the block's median for any image that is not black
    assert all(h >> 63 for h in _hashes().values())
    with pytest.raises(ValueError, match="expected an"):
        phash(np.zeros((4, 4, 4, 4), np.uint8))
    assert hamming("ff00000000000000", "0f00000000000001") == 5


def test_copies_hash_alike_and_drawings_apart():
    """Resized and re-encoded copies of the 100 drawings stay within a few bits of their
    original; unrelated drawings are far apart except the set's own near-duplicates."""
    cfg = DecodeConfig()
    hashes = _hashes()
    near = {frozenset(p) for p in NATIVE}
    copy_bits = []
    for key, png, _, _ in originals():
        for scale, fmt, quality in TRANSFORMS:
            copy = phash(decode_image(reencode(png, scale, fmt, quality), cfg)[0])
            copy_bits.append(hamming(copy, hashes[key]))
    copy_bits = np.array(copy_bits)
    unrelated = np.array(
        [hamming(hashes[a], hashes[b]) for a, b in combinations(hashes, 2) if frozenset((a, b)) not in near]
    )
    print(
        f"\ncopies within 4 bits: {np.mean(copy_bits <= 4):.3f} of {len(copy_bits)}; "
        f"unrelated pairs within 4 bits: {int(np.sum(unrelated <= 4))} of {len(unrelated)}; "
        f"median unrelated distance {np.median(unrelated):.0f}"
    )
    assert np.mean(copy_bits <= 4) >= 0.9
    assert np.mean(unrelated <= 4) <= 0.001
    assert np.median(unrelated) >= 20


def test_decode_keeps_the_hash_in_every_decoded_row():
    cfg = DecodeConfig(min_side=20)
    rows = []
    for key, data in (("ok", image_bytes(40, 30)), ("small", image_bytes(10, 8)), ("bad", b"not an image")):
        row = empty_row()
        row.update(row_type=ROW_SAMPLE, key=key, image=data, alt_text="a", status=STATUS_PENDING)
        rows.append(row)
    ok, small, bad = decode_rows(rows, cfg, keep_pixels=False)
    expected = phash_hex(decode_image(image_bytes(40, 30), cfg)[0])
    assert ok["image_phash"] == expected and get_candidates(ok)
    assert small["status"] == "dropped" and small["reason"] == "image_too_small"
    assert len(small["image_phash"]) == 16  # dropped samples with an image are compared too
    assert bad["status"] == "error" and bad["image_phash"] is None


def test_phash_is_cheap_next_to_decoding():
    """Once per sample in the decode task: a 1024 px image costs about a millisecond."""
    import time

    pixels = np.asarray(Image.open(io.BytesIO(originals()[3][1])).convert("RGB").resize((1024, 768)))
    start = time.process_time()
    for _ in range(20):
        phash(pixels)
    per_image = (time.process_time() - start) / 20
    assert per_image < 0.02, per_image
