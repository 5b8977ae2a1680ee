"""Preprocessing on the model's device against the image processors it stands in for.

The references are transformers' own BLIP and CLIP PIL image processors. The tensor path
runs on this machine's CPU here, the same ops it runs on a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BlipImageProcessorPil, CLIPImageProcessorPil

from curate.models.preprocess import device_preprocessor, pixel_values
from tests.helpers import noise_image

GREY_LEVEL = 1 / 255 / 0.27  # one 8-bit step after normalising by the processors' std


def _drawing(width: int, height: int) -> Image.Image:
    """Flat colours, hard edges and a gradient: what clip art looks like."""
    y, x = np.mgrid[0:height, 0:width]
    arr = np.zeros((height, width, 3), np.uint8)
    arr[..., 0] = (255 * x / max(1, width - 1)).astype(np.uint8)
    arr[(x - width / 2) ** 2 + (y - height / 2) ** 2 < (min(width, height) / 3) ** 2] = (20, 200, 90)
    arr[: height // 5, :, 2] = 250
    return Image.fromarray(arr, "RGB")


IMAGES = [
    _drawing(1024, 724),  # shrunk
    _drawing(273, 118),  # enlarged along one side, shrunk along the other
    _drawing(30, 20),  # enlarged
    noise_image(500, 300, seed=1),  # the worst case for any resampling difference
    noise_image(64, 64, seed=2).convert("L"),  # greyscale: converted to RGB as the processor does
]
PROCESSORS = {
    "blip": BlipImageProcessorPil(size={"height": 96, "width": 96}),
    "clip": CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}),
}


@pytest.mark.parametrize("name", sorted(PROCESSORS))
@pytest.mark.parametrize("index", range(len(IMAGES)))
def test_tensor_ops_give_the_processors_pixel_values(name, index):
    processor = PROCESSORS[name]
    pre = device_preprocessor(processor)
    assert pre is not None
    image = IMAGES[index]
    want = processor(images=[image], return_tensors="pt")["pixel_values"]
    got = pre([image], torch.device("cpu"), torch.float32)
    assert got.shape == want.shape and got.dtype == torch.float32
    diff = (got - want).abs()
    # rounding only: PIL and torch's antialiased filters differ by a grey level here and there,
    # a few more at hard edges of an enlarged image
    assert diff.mean() < 0.3 * GREY_LEVEL
    assert diff.max() < 30 * GREY_LEVEL


def test_a_batch_is_its_images_one_by_one_in_the_asked_dtype():
    pre = device_preprocessor(PROCESSORS["clip"])
    batch = pre(IMAGES, torch.device("cpu"), torch.bfloat16)
    assert batch.dtype == torch.bfloat16 and batch.shape == (len(IMAGES), 3, 64, 64)
    for i, image in enumerate(IMAGES):
        assert torch.equal(batch[i : i + 1], pre([image], torch.device("cpu"), torch.bfloat16))


@pytest.mark.parametrize(
    "processor",
    [
        BlipImageProcessorPil(size={"height": 96, "width": 96}, resample=Image.Resampling.NEAREST),
        BlipImageProcessorPil(size={"longest_edge": 96}),
        CLIPImageProcessorPil(size={"shortest_edge": 64}, do_pad=True),
        object(),
    ],
    ids=["nearest-filter", "longest-edge", "padding", "not-an-image-processor"],
)
def test_steps_it_cannot_follow_keep_the_processor(processor):
    assert device_preprocessor(processor) is None


def test_on_a_cpu_the_processor_prepares_the_pixels_unless_asked():
    processor, image = PROCESSORS["blip"], IMAGES[1]
    want = processor(images=[image], return_tensors="pt")["pixel_values"]
    cpu = torch.device("cpu")
    assert torch.equal(pixel_values(processor, [image], cpu, torch.float32), want)
    forced = pixel_values(processor, [image], cpu, torch.float32, on_device=True)
    assert not torch.equal(forced, want) and (forced - want).abs().mean() < 0.3 * GREY_LEVEL
    assert torch.equal(pixel_values(processor, [image], cpu, torch.float32, on_device=False), want)
