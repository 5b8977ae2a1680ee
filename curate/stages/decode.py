"""Decode images to RGB in CPU tasks, with a row-level error for anything odd.

Runs before the model actors so that GPUs never wait on JPEG decoding and a bad
image costs one row, never a batch.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings

import numpy as np
import pyarrow as pa
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from curate.config import DecodeConfig, RulesConfig
from curate.dedup.phash import phash_hex
from curate.rules import check_alt_text, check_image
from curate.schema import SOURCE_ALT, STATUS_DROPPED
from curate.stages.memory import release_free_memory
from curate.stages.rows import fail, is_pending, set_candidates, to_rows, to_table

# We enforce our own pixel limit and treat truncation as an error, so PIL must not
# second-guess either.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False


class DecodeError(ValueError):
    pass


def _no_address(exc: Exception) -> str:
    """The message without object addresses (PIL names its file as ``<_io.BytesIO object at
    0x7f...>``): the same bytes give the same error row in every run."""
    return re.sub(r" at 0x[0-9a-fA-F]+>", ">", str(exc))


def decode_image(data: bytes, cfg: DecodeConfig) -> tuple[np.ndarray, int, int]:
    """Bytes -> (RGB uint8 array downscaled to cfg.max_side, original width, height)."""
    if not data:
        raise DecodeError("empty image file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > cfg.max_pixels:
                raise DecodeError(
                    f"decompression bomb: {width}x{height} = {width * height} pixels > "
                    f"decode.max_pixels={cfg.max_pixels}"
                )
            if getattr(img, "is_animated", False):
                img.seek(0)  # first frame of an animation
            if max(width, height) > cfg.max_side:
                # decode at reduced size where the format allows (JPEG draft mode)
                img.draft("RGB", (cfg.max_side, cfg.max_side))
            img.load()
    except DecodeError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DecodeError(f"undecodable image: {type(exc).__name__}: {_no_address(exc)}") from exc
    with contextlib.suppress(Exception):  # a broken EXIF block is not worth losing the image over
        img = ImageOps.exif_transpose(img)  # phones store rotation in EXIF
    img = to_rgb(img)
    if max(img.size) > cfg.max_side:
        img.thumbnail((cfg.max_side, cfg.max_side), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8), width, height


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited on white, 16-bit is rescaled."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() or 1.0
        img = Image.fromarray((arr * (255.0 / hi)).clip(0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        img = Image.fromarray(((arr - lo) * scale).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_rows(
    rows: list[dict], cfg: DecodeConfig, keep_pixels: bool = True, rules: RulesConfig | None = None
) -> list[dict]:
    """Decode and check each pending row's image; ``keep_pixels=False`` (no model stage
    will look at them) checks without carrying the decoded pixels on.

    ``rules`` run here, where the original size is known, before any model: an image that fails
    one is dropped with the rule's reason and its pixels never leave this task; an alt-text that
    fails one still becomes a candidate (it is scored) whose ``rule`` says why it cannot be kept."""
    image_rules = rules.image_rules() if rules is not None else None
    alt_rules = rules.alt_text.rules() if rules is not None else None
    for row in rows:
        if not is_pending(row):
            continue
        alt = row.get("alt_text")
        if alt is not None and len(alt.encode("utf-8")) > cfg.max_text_bytes:
            row["status"] = STATUS_DROPPED
            row["reason"] = "alt_text_too_long"
            row["error"] = None
            row["alt_text"] = alt[: cfg.max_text_bytes // 4] + "..."
            row["image"] = None
            continue
        try:
            pixels, width, height = decode_image(row["image"], cfg)
        except DecodeError as exc:
            fail(row, str(exc))
            continue
        except Exception as exc:  # any decoder bug costs this row only, never the batch
            fail(row, f"undecodable image: {type(exc).__name__}: {exc}")
            continue
        row["width"], row["height"] = width, height
        row["image_phash"] = phash_hex(pixels)  # once, here: dedup never decodes again
        if min(width, height) < cfg.min_side:
            row["status"] = STATUS_DROPPED
            row["reason"] = "image_too_small"
            row["image"] = None
            continue
        alt_rule = None
        if rules is not None:
            text = check_alt_text(alt, alt_rules)
            if alt_rules.languages is not None:
                row["alt_text_language"] = text.language
                row["alt_text_language_score"] = text.language_score
            alt_rule = text.reason
            image_reason = check_image(width, height, image_rules)
            if image_reason is not None:
                row["status"] = STATUS_DROPPED
                row["reason"] = image_reason
                row["image"] = None
                continue
        if keep_pixels:
            row["pixels"] = pixels.tobytes()
            row["pixels_height"], row["pixels_width"] = pixels.shape[:2]
        candidates = []
        if alt:
            candidates.append(
                {"text": alt, "source": SOURCE_ALT, "itm_score": None, "clip_score": None, "rule": alt_rule}
            )
        set_candidates(row, candidates)
    return rows


def decode_batch(
    batch: pa.Table, cfg: DecodeConfig, keep_pixels: bool = True, rules: RulesConfig | None = None
) -> pa.Table:
    """Ray Data entry point (a task, not an actor: decoding holds no state)."""
    out = to_table(decode_rows(to_rows(batch), cfg, keep_pixels, rules))
    release_free_memory()  # a huge image's decode buffers must not stay with the worker
    return out


def row_image(row: dict) -> Image.Image:
    """The decoded pixels of a row as a PIL image, without a copy."""
    arr = np.frombuffer(row["pixels"], dtype=np.uint8).reshape(row["pixels_height"], row["pixels_width"], 3)
    return Image.fromarray(arr, "RGB")
