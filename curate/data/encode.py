"""The image encoder: one item's source file -> the image bytes its shard holds.

A PNG or JPEG that fits within ``max_side`` keeps its original bytes; a larger one is
downscaled and re-encoded; an SVG is rendered with cairosvg when asked. Images are
decoded fully here, so a truncated file is counted as ``unreadable_image`` now rather
than failing a trainer later. The functions are safe to call from several threads:
the fetch loop runs them on a thread pool.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from curate.data.items import SKIP_SVG_ONLY, SKIP_TOO_LARGE, SKIP_UNREADABLE_IMAGE, FetchError, Item, Skip

DEFAULT_MAX_SIDE = 1024
# Above this many pixels an image is skipped (``too_large``) instead of decoded: the
# largest openclipart PNG (20990x29700, ~623 M px) needs ~2.5 GB as RGBA, ~5 GB while resampling.
DEFAULT_MAX_PIXELS = 1 << 30
HUGE_IMAGE_PIXELS = 64_000_000  # images above this are decoded one at a time (memory)
_HUGE_IMAGE_LOCK = threading.Lock()


@dataclass
class Encoded:
    """An image ready for a shard, with the sizes its metadata records."""

    data: bytes
    ext: str
    width: int
    height: int
    original_width: int
    original_height: int
    sha256: str  # of the source file's bytes
    resized: bool = False
    rasterized: bool = False


def encode_item(item: Item, max_side: int, max_pixels: int, rasterize_svg: bool) -> Encoded | Skip:
    """Encode an item's image, or say why it is skipped (a reader's mark or an unusable image).

    Returns the :class:`Skip` instead of raising it, so a thread pool's results stay in
    item order. Call inside :func:`no_pillow_bomb_check`: ``max_pixels`` is the limit.
    """
    try:
        if item.skip == SKIP_SVG_ONLY and rasterize_svg and item.image is not None:
            return encode_svg(item.image, max_side)
        if item.skip:
            return Skip(item.skip, item.detail)
        assert item.image is not None and item.caption
        return encode_raster(item.image, max_side, max_pixels)
    except Skip as skip:
        return skip


@contextlib.contextmanager
def no_pillow_bomb_check() -> Iterator[None]:
    """We enforce our own ``max_pixels``; Pillow's global limit would refuse real openclipart PNGs.

    Process-wide, since Pillow's limit is a module global: the fetch loop enters it once,
    around its whole thread pool, whose workers only read it. Two fetches running at once
    in one process would restore it under each other.
    """
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def encode_raster(path: Path, max_side: int, max_pixels: int) -> Encoded:
    """Keep an image's original bytes when they fit; otherwise downscale and re-encode.

    Raises :class:`Skip` for an unreadable or too large image. Call inside
    :func:`no_pillow_bomb_check`: ``max_pixels`` is the limit that applies.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise Skip(SKIP_UNREADABLE_IMAGE, f"{path.name}: {exc}") from exc
    sha = hashlib.sha256(raw).hexdigest()
    try:
        im = Image.open(io.BytesIO(raw))
        width, height = im.size
        fmt = im.format
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise Skip(SKIP_UNREADABLE_IMAGE, f"{path.name}: {type(exc).__name__}: {exc}") from exc
    if width * height > max_pixels:
        raise Skip(SKIP_TOO_LARGE, f"{path.name}: {width}x{height} > {max_pixels} pixels")
    # one huge image at a time: a 20990x29700 RGBA PNG alone takes 2.5 GB decoded
    lock = _HUGE_IMAGE_LOCK if width * height > HUGE_IMAGE_PIXELS else contextlib.nullcontext()
    with lock:
        try:
            im.load()  # decode fully: a truncated file is caught here, not by a trainer later
        except (OSError, SyntaxError, ValueError) as exc:
            raise Skip(SKIP_UNREADABLE_IMAGE, f"{path.name}: {type(exc).__name__}: {exc}") from exc
        needs_resize = max_side > 0 and max(width, height) > max_side
        if not needs_resize and fmt in ("PNG", "JPEG"):
            ext = "png" if fmt == "PNG" else "jpg"
            return Encoded(raw, ext, width, height, width, height, sha)
        data, ext, size = _reencode(im, fmt, max_side if needs_resize else 0)
    return Encoded(data, ext, size[0], size[1], width, height, sha, resized=needs_resize)


def _reencode(im: Image.Image, fmt: str | None, max_side: int) -> tuple[bytes, str, tuple[int, int]]:
    has_alpha = im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info
    if im.mode not in ("RGB", "RGBA", "L", "LA") or (has_alpha and im.mode in ("RGB", "L")):
        im = im.convert("RGBA" if has_alpha else "RGB")  # P/1/I;16/CMYK cannot be resampled well
    if max_side > 0:
        im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS, reducing_gap=3.0)
    out = io.BytesIO()
    if fmt == "JPEG" and im.mode in ("RGB", "L"):
        im.save(out, format="JPEG", quality=90)
        return out.getvalue(), "jpg", im.size
    im.save(out, format="PNG")  # keeps RGBA
    return out.getvalue(), "png", im.size


def encode_svg(path: Path, max_side: int) -> Encoded:
    """Render an SVG at its own size (capped at ``max_side``) with cairosvg."""
    import cairosvg  # optional: checked by require_rasterizer before any work

    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise Skip(SKIP_UNREADABLE_IMAGE, f"{path.name}: {exc}") from exc
    sha = hashlib.sha256(raw).hexdigest()
    try:
        png = cairosvg.svg2png(bytestring=raw)
        with Image.open(io.BytesIO(png)) as im:
            width, height = im.size
        out_w, out_h = width, height
        if max_side > 0 and max(width, height) > max_side:
            scale = max_side / max(width, height)
            out_w, out_h = max(1, round(width * scale)), max(1, round(height * scale))
            png = cairosvg.svg2png(bytestring=raw, output_width=out_w, output_height=out_h)
            with Image.open(io.BytesIO(png)) as im:
                out_w, out_h = im.size
    except Exception as exc:  # cairosvg raises many unrelated types for bad or unsafe SVGs
        raise Skip(SKIP_UNREADABLE_IMAGE, f"{path.name}: {type(exc).__name__}: {exc}") from exc
    return Encoded(
        png,
        "png",
        out_w,
        out_h,
        width,
        height,
        sha,
        resized=(out_w, out_h) != (width, height),
        rasterized=True,
    )


def require_rasterizer() -> None:
    """Fail before any work when ``rasterize_svg`` is asked for and cairosvg cannot run."""
    try:
        import cairosvg  # noqa: F401
    except (ImportError, OSError) as exc:  # OSError: the wheel is there but libcairo is not
        raise FetchError(
            "--rasterize-svg needs cairosvg and the system cairo library "
            f"(pip install cairosvg; apt-get install libcairo2): {exc}"
        ) from exc
