"""ITM filter: BLIP's image-text matching head gives P(match) for each (image, text).

Each image goes through the vision tower once; its features are reused for the
alt-text and every synthetic caption. (A bootstrapped bridge filter is served by
:class:`curate.models.scorer.BridgeScorer`.)
"""

from __future__ import annotations

import torch
from PIL import Image

from curate.models import ITM_SCORE
from curate.models.base import (
    LoadOptions,
    load_error,
    model_revision,
    model_type,
    move,
    resolve_device,
    resolve_dtype,
)
from curate.models.preprocess import pixel_values
from curate.models.scorer import Scorer, Scores, split


class ITMFilter(Scorer):
    """``itm(images, texts_per_image)`` -> ``{"itm_score": match probabilities, one list per image}``."""

    fields = (ITM_SCORE,)

    def __init__(
        self,
        load: LoadOptions,
        device: str = "auto",
        dtype: str = "fp32",
        batch_size: int = 32,
        max_text_tokens: int = 64,
    ) -> None:
        import transformers

        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.batch_size = batch_size
        self.max_text_tokens = max_text_tokens
        kind = model_type(load, "ITM filter")
        if kind != "blip":
            raise load_error(
                "ITM filter",
                load,
                ValueError(
                    f"the ITM filter needs a BLIP retrieval model or a bridge filter, got model_type={kind!r}"
                ),
            )
        try:
            model = transformers.BlipForImageTextRetrieval.from_pretrained(load.model, **load.model_kwargs())
            self.processor = transformers.AutoProcessor.from_pretrained(load.model, **load.kwargs())
        except Exception as exc:
            raise load_error("ITM filter", load, exc) from exc
        self.model = move(model, self.device, self.dtype)
        self.revision = model_revision(self.model)

    @torch.inference_mode()
    def _score(self, images: list[Image.Image], texts: list[list[str]]) -> Scores:
        pixels = pixel_values(self.processor.image_processor, images, self.device, self.dtype)
        image_embeds = self.model.vision_model(pixel_values=pixels).last_hidden_state
        pairs = [(i, t) for i, ts in enumerate(texts) for t in ts]
        scores: list[float] = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start : start + self.batch_size]
            tok = self.processor.tokenizer(
                [t for _, t in chunk],
                padding=True,
                truncation=True,
                max_length=self.max_text_tokens,
                return_tensors="pt",
            ).to(self.device)
            idx = torch.tensor([i for i, _ in chunk], device=self.device)
            embeds = image_embeds.index_select(0, idx)
            atts = torch.ones(embeds.shape[:-1], dtype=torch.long, device=self.device)
            hidden = self.model.text_encoder(
                input_ids=tok["input_ids"],
                attention_mask=tok["attention_mask"],
                encoder_hidden_states=embeds,
                encoder_attention_mask=atts,
            ).last_hidden_state
            logits = self.model.itm_head(hidden[:, 0, :]).float()
            scores.extend(torch.softmax(logits, dim=-1)[:, 1].tolist())
        return {ITM_SCORE: split(scores, texts)}
