"""The image encoder: original bytes kept when they fit, downscaled otherwise, unusable images counted."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import pytest
from PIL import Image

from curate.data.encode import (
    encode_item,
    encode_raster,
    no_pillow_bomb_check,
    require_rasterizer,
)
from curate.data.items import FetchError, Item, Skip


def _save(path: Path, im: Image.Image, fmt: str, **kw) -> bytes:
    im.save(path, format=fmt, **kw)
    return path.read_bytes()


def test_fitting_png_and_jpeg_keep_their_bytes(tmp_path: Path) -> None:
    png = _save(tmp_path / "a.png", Image.new("RGBA", (40, 30), (1, 2, 3, 4)), "PNG")
    jpg = _save(tmp_path / "b.jpg", Image.new("RGB", (40, 30), (200, 100, 0)), "JPEG")
    with no_pillow_bomb_check():
        a = encode_raster(tmp_path / "a.png", max_side=64, max_pixels=10_000)
        b = encode_raster(tmp_path / "b.jpg", max_side=0, max_pixels=10_000)  # 0: never downscale
    assert (a.data, a.ext, a.width, a.height, a.resized) == (png, "png", 40, 30, False)
    assert (b.data, b.ext, b.original_width, b.resized) == (jpg, "jpg", 40, False)


def test_large_images_are_downscaled_in_their_own_format(tmp_path: Path) -> None:
    _save(tmp_path / "a.png", Image.new("RGBA", (300, 100), (1, 2, 3, 128)), "PNG")
    _save(tmp_path / "b.jpg", Image.new("RGB", (100, 300), (200, 100, 0)), "JPEG")
    _save(tmp_path / "c.gif", Image.new("P", (30, 20)), "GIF")  # neither PNG nor JPEG: re-encoded
    with no_pillow_bomb_check():
        a = encode_raster(tmp_path / "a.png", max_side=60, max_pixels=10**6)
        b = encode_raster(tmp_path / "b.jpg", max_side=60, max_pixels=10**6)
        c = encode_raster(tmp_path / "c.gif", max_side=60, max_pixels=10**6)
    assert (a.ext, a.width, a.height, a.original_width, a.resized) == ("png", 60, 20, 300, True)
    with Image.open(io.BytesIO(a.data)) as im:
        assert im.size == (60, 20) and im.mode == "RGBA"
    assert (b.ext, b.width, b.height, b.resized) == ("jpg", 20, 60, True)
    with Image.open(io.BytesIO(b.data)) as im:
        assert im.format == "JPEG" and im.size == (20, 60)
    assert (c.ext, c.width, c.height, c.resized) == ("png", 30, 20, False)
    with Image.open(io.BytesIO(c.data)) as im:
        assert im.format == "PNG"


def test_unusable_images_raise_a_skip_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    whole = _save(tmp_path / "whole.png", Image.effect_noise((64, 64), 50).convert("RGB"), "PNG")
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])  # header fine, data truncated
    _save(tmp_path / "big.png", Image.new("L", (200, 100)), "PNG")
    with no_pillow_bomb_check():
        for name, reason in (
            ("broken.png", "unreadable_image"),
            ("cut.png", "unreadable_image"),
            ("missing.png", "unreadable_image"),
            ("big.png", "too_large"),
        ):
            with pytest.raises(Skip) as info:
                encode_raster(tmp_path / name, max_side=1024, max_pixels=19_999)
            assert info.value.reason == reason, name
            assert name in info.value.detail


def test_encode_item_returns_skips_in_place_of_raising(tmp_path: Path) -> None:
    _save(tmp_path / "a.png", Image.new("RGB", (8, 8)), "PNG")
    (tmp_path / "bad.png").write_bytes(b"nope")
    ok = encode_item(Item("a", tmp_path / "a.png", "cap"), max_side=64, max_pixels=100, rasterize_svg=False)
    assert not isinstance(ok, Skip) and ok.width == 8
    bad = encode_item(
        Item("b", tmp_path / "bad.png", "cap"), max_side=64, max_pixels=100, rasterize_svg=False
    )
    assert isinstance(bad, Skip) and bad.reason == "unreadable_image"
    marked = Item("c", tmp_path / "c.svg", "cap", skip="svg_only", detail="c.svg")
    skip = encode_item(marked, max_side=64, max_pixels=100, rasterize_svg=False)
    assert isinstance(skip, Skip) and (skip.reason, skip.detail) == ("svg_only", "c.svg")


def test_pillow_limit_is_lifted_only_inside_the_block(monkeypatch) -> None:
    # set a limit here: importing curate.stages.decode (as other tests do) lifts it process-wide
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 12_345)
    with no_pillow_bomb_check():
        assert Image.MAX_IMAGE_PIXELS is None
    assert Image.MAX_IMAGE_PIXELS == 12_345


@pytest.mark.skipif(importlib.util.find_spec("cairosvg") is not None, reason="cairosvg is installed")
def test_rasterizing_without_cairosvg_says_what_to_install() -> None:
    with pytest.raises(FetchError, match="pip install cairosvg"):
        require_rasterizer()
