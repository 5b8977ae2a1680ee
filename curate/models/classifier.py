"""An image classifier's probability of one class: the NSFW and watermark filters.

Any ``AutoModelForImageClassification`` checkpoint (a ViT, a ConvNeXt, ...) loaded by Hugging Face
id or local directory, safetensors only unless pickled weights are allowed, no remote code unless
asked for. The score is the softmax probability of ``label``, a name in the model's ``id2label``
(case ignored) or a class index.
"""

from __future__ import annotations

import torch
from PIL import Image

from curate.models import resolve_label
from curate.models.base import LoadOptions, load_error, model_revision, move, resolve_device, resolve_dtype
from curate.models.clip import load_image_processor


class ImageClassifier:
    """``classifier(images)`` -> the probability of ``label`` for each image."""

    def __init__(
        self,
        load: LoadOptions,
        label: int | str,
        device: str = "auto",
        dtype: str = "fp32",
        batch_size: int = 32,
    ) -> None:
        import transformers

        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.batch_size = batch_size
        try:
            model = transformers.AutoModelForImageClassification.from_pretrained(
                load.model, **load.model_kwargs()
            )
            self.processor = load_image_processor(load)
        except Exception as exc:
            raise load_error("image classifier", load, exc) from exc
        try:
            self.label = resolve_label(model.config.id2label, label)
        except ValueError as exc:
            raise ValueError(f"{load.model}: {exc}") from None
        self.label_name = str(model.config.id2label[self.label])
        self.model = move(model, self.device, self.dtype)
        self.revision = model_revision(self.model)

    @torch.inference_mode()
    def __call__(self, images: list[Image.Image]) -> list[float]:
        out: list[float] = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.processor(images=images[start : start + self.batch_size], return_tensors="pt")
            logits = self.model(pixel_values=pixels["pixel_values"].to(self.device, self.dtype)).logits
            out.extend(logits.float().softmax(-1)[:, self.label].tolist())
        return out
