"""Reusable builders for test inputs: encoded images and img2dataset-layout tars."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from curate.io.files import write_tar as curate_write_tar

PIL_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "gif": "GIF", "bmp": "BMP"}


def encode_image(img: Image.Image, fmt: str = "png", **save_kwargs: Any) -> bytes:
    """Encode a PIL image; ``fmt`` is a file extension ('jpg', 'png', ...) or a PIL format name."""
    buf = io.BytesIO()
    img.save(buf, format=PIL_FORMATS.get(fmt.lower(), fmt), **save_kwargs)
    return buf.getvalue()


def noise_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A random RGB (or converted) image: distinct pixels so resizes and crops show."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
    return img if mode == "RGB" else img.convert(mode)


def image_bytes(width: int = 16, height: int = 12, fmt: str = "png", seed: int = 0) -> bytes:
    return encode_image(noise_image(width, height, seed), fmt)


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    return json.dumps(value).encode("utf-8")


def sample_members(sample: dict[str, Any]) -> list[tuple[str, bytes]]:
    """Tar members of one sample dict, in img2dataset order (image, txt, json, extras).

    Keys of ``sample``:
        key      the sample key (may contain '/' for a directory prefix)
        image    bytes, or a PIL image encoded with ``format`` (default 'jpg'); None: no image
        format   the image member's extension (default 'jpg')
        txt      str (UTF-8 encoded) or bytes; absent/None: no .txt member
        json     dict (dumped), str or bytes; absent/None: no .json member
        extra    {member suffix after the key's dot: bytes|str}, e.g. {"exif": b"..."}
    """
    key = sample["key"]
    fmt = sample.get("format", "jpg")
    members: list[tuple[str, bytes]] = []
    image = sample.get("image")
    if image is not None:
        data = encode_image(image, fmt) if isinstance(image, Image.Image) else image
        members.append((f"{key}.{fmt}", data))
    if sample.get("txt") is not None:
        members.append((f"{key}.txt", _as_bytes(sample["txt"])))
    if sample.get("json") is not None:
        members.append((f"{key}.json", _as_bytes(sample["json"])))
    for suffix, data in (sample.get("extra") or {}).items():
        members.append((f"{key}.{suffix}", _as_bytes(data)))
    return members


def write_tar(path: str | Path, members: Iterable[tuple[str, bytes]]) -> Path:
    """Write a plain tar of (name, bytes) members in the given order (the project's tar writer)."""
    return Path(curate_write_tar(path, members))


def make_shard(path: str | Path, samples: list[dict[str, Any]]) -> Path:
    """Write an img2dataset-layout WebDataset tar from sample dicts (see ``sample_members``)."""
    return write_tar(path, [m for s in samples for m in sample_members(s)])


def wait_for(predicate: Callable[[], bool], timeout: float, every: float = 0.05) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout`` seconds pass (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(every)
    return False


def start_local_ray():
    """A real in-process Ray, started on first use and shared by later tests.

    Tests that stop Ray (the cluster test shuts it down before `ray stop`) leave the
    next caller to start it again.
    """
    import tempfile

    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=4,
            include_dashboard=False,
            log_to_driver=False,
            _temp_dir=tempfile.mkdtemp(prefix="ray-"),
            configure_logging=False,
        )
    return ray


def tiny_llama(vocab_size: int, seed: int = 0, **config: Any):
    """A 2-layer LlamaForCausalLM (hidden 32, 4 heads over 2 KV heads) with random weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    shape = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
    }
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, **{**shape, **config}))
