"""Image preprocessing as tensor ops on the model's device, in place of the PIL image processor.

A Hugging Face image processor resizes each image with PIL, then rescales and normalises it
in NumPy float32, all on the actor's CPU; with a GPU model that CPU work, not the GPU,
bounds a captioner or scorer actor. :class:`DevicePreprocessor` reads the processor's own
settings (``size``, ``shortest_edge`` + ``crop_size``, ``resample``, ``rescale_factor``,
``image_mean`` / ``image_std``) and does the same on the device: each image's uint8 pixels
go up once, are resized there (bicubic or bilinear with antialiasing, as PIL filters when
it shrinks, rounded back to 0..255 as PIL's uint8 result is), center-cropped, rescaled and
normalised as one batch. The result differs from PIL's by rounding (about one grey level
at a few pixels).

:func:`device_preprocessor` gives one for the processors it can follow (BLIP's and CLIP's,
and any with the same settings) and ``None`` for anything else, which keeps the processor.
The model wrappers use it on a CUDA device and keep the processor on a CPU, where the PIL
path is as fast and its values are the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

# PIL resampling filters -> torch interpolation modes (both with antialiasing)
_MODES = {Image.Resampling.BICUBIC: "bicubic", Image.Resampling.BILINEAR: "bilinear"}


def _get(size: Any, key: str) -> int | None:
    if size is None:
        return None
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return None if value is None else int(value)


@dataclass(frozen=True)
class DevicePreprocessor:
    """``pre(images, device, dtype)`` -> (B, 3, H, W) pixel values, as the image processor gives them."""

    mode: str
    height: int | None  # an exact (height, width) resize, BLIP's
    width: int | None
    shortest_edge: int | None  # or the short side to this, keeping the aspect ratio, CLIP's
    crop: tuple[int, int] | None
    rescale: float | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None

    def _resized(self, pixels: torch.Tensor) -> torch.Tensor:
        """(1, 3, h, w) float in 0..255 -> resized, rounded and clipped as PIL's uint8 result."""
        h, w = pixels.shape[-2:]
        if self.shortest_edge is not None:
            short, long = (h, w) if h <= w else (w, h)
            new_long = int(self.shortest_edge * long / short)
            size = (self.shortest_edge, new_long) if h <= w else (new_long, self.shortest_edge)
        elif self.height is not None and self.width is not None:
            size = (self.height, self.width)
        else:
            return pixels
        if tuple(size) == (h, w):
            return pixels
        out = torch.nn.functional.interpolate(pixels, size=size, mode=self.mode, antialias=True)
        return out.round_().clamp_(0, 255)

    def _cropped(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.crop is None:
            return pixels
        ch, cw = self.crop
        h, w = pixels.shape[-2:]
        if h < ch or w < cw:  # the processor pads a too-small image with zeros around it
            pad_h, pad_w = max(ch - h, 0), max(cw - w, 0)
            pad = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
            pixels = torch.nn.functional.pad(pixels, pad)
            h, w = pixels.shape[-2:]
        top, left = int((h - ch) / 2.0), int((w - cw) / 2.0)
        return pixels[..., top : top + ch, left : left + cw]

    def __call__(self, images: list[Image.Image], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        batch = []
        for image in images:
            arr = np.array(image.convert("RGB") if image.mode != "RGB" else image)
            pixels = torch.from_numpy(arr).to(device, non_blocking=True)  # uint8 goes up, not float
            pixels = pixels.permute(2, 0, 1).unsqueeze(0).float()
            batch.append(self._cropped(self._resized(pixels)))
        out = torch.cat(batch)
        if self.rescale is not None:
            out = out * self.rescale
        if self.mean is not None and self.std is not None:
            mean = torch.tensor(self.mean, device=device).view(1, -1, 1, 1)
            std = torch.tensor(self.std, device=device).view(1, -1, 1, 1)
            out = (out - mean) / std
        return out.to(dtype)


def device_preprocessor(image_processor: Any) -> DevicePreprocessor | None:
    """A :class:`DevicePreprocessor` following ``image_processor``, or ``None`` where its steps
    are not the resize / crop / rescale / normalise ones this reproduces (padding, tiling,
    other resampling filters, a processor of another kind)."""
    p = image_processor
    if getattr(p, "do_pad", None) or not hasattr(p, "image_mean"):
        return None
    mode = _MODES.get(getattr(p, "resample", None)) if getattr(p, "do_resize", False) else "bicubic"
    if mode is None:
        return None
    size = getattr(p, "size", None) if getattr(p, "do_resize", False) else None
    height, width, short = _get(size, "height"), _get(size, "width"), _get(size, "shortest_edge")
    if size is not None and short is None and (height is None or width is None):
        return None  # longest_edge, max_pixels and the like
    crop_size = getattr(p, "crop_size", None) if getattr(p, "do_center_crop", False) else None
    crop = None
    if crop_size is not None:
        ch, cw = _get(crop_size, "height"), _get(crop_size, "width")
        if ch is None or cw is None:
            return None
        crop = (ch, cw)
    normalize = bool(getattr(p, "do_normalize", False))
    return DevicePreprocessor(
        mode=mode,
        height=height,
        width=width,
        shortest_edge=short,
        crop=crop,
        rescale=float(p.rescale_factor) if getattr(p, "do_rescale", False) else None,
        mean=tuple(float(x) for x in p.image_mean) if normalize else None,
        std=tuple(float(x) for x in p.image_std) if normalize else None,
    )


def pixel_values(
    image_processor: Any,
    images: list[Image.Image],
    device: torch.device,
    dtype: torch.dtype,
    on_device: bool | None = None,
) -> torch.Tensor:
    """The model's pixel values for ``images`` on ``device`` in ``dtype``: prepared on the device
    (``on_device``; default: when the device is CUDA and the processor can be followed), else by
    the processor."""
    wanted = device.type == "cuda" if on_device is None else on_device
    pre = device_preprocessor(image_processor) if wanted else None
    if pre is not None:
        return pre(images, device, dtype)
    values = image_processor(images=images, return_tensors="pt")["pixel_values"]
    return values.to(device, dtype)
