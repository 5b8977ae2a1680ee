"""CLIP ranker: cosine similarity of image and text embeddings (BLIP-2's ranking signal).

Any transformers dual encoder (``get_image_features``/``get_text_features``). A
bootstrapped bridge filter ranks with its ITC embeddings through
:class:`curate.models.scorer.BridgeScorer`.
"""

from __future__ import annotations

import torch
from PIL import Image

from curate.models import CLIP_SCORE
from curate.models.base import LoadOptions, load_error, model_revision, move, resolve_device, resolve_dtype
from curate.models.preprocess import pixel_values
from curate.models.scorer import Embeddings, Scorer, Scores, split, split_rows


def _features(out) -> torch.Tensor:
    # transformers 5 returns an output object with the projected pooler_output
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def load_image_processor(load: LoadOptions):
    """The checkpoint's image processor, falling back to its PIL class by name.

    Some transformers 5 releases (5.17) resolve every ``AutoImageProcessor`` to the
    torchvision class and raise ImportError where torchvision is missing, even for
    processors with a PIL twin (``CLIPImageProcessorPil``); later releases fall back by
    themselves. A missing torchvision is thus no reason to fail a CPU-only install.
    """
    import transformers

    try:
        return transformers.AutoImageProcessor.from_pretrained(load.model, **load.kwargs())
    except ImportError:
        config, _ = transformers.ImageProcessingMixin.get_image_processor_dict(load.model, **load.kwargs())
        name = str(config.get("image_processor_type") or "").removesuffix("Fast")
        pil = getattr(transformers, f"{name}Pil", None) if name else None
        if pil is None:
            raise
        return pil.from_pretrained(load.model, **load.kwargs())


class ClipRanker(Scorer):
    """``ranker(images, texts_per_image)`` -> ``{"clip_score": cosine similarities}``; each image
    embedded once."""

    fields = (CLIP_SCORE,)

    def __init__(
        self,
        load: LoadOptions,
        device: str = "auto",
        dtype: str = "fp32",
        batch_size: int = 32,
    ) -> None:
        import transformers

        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.batch_size = batch_size
        try:
            model = transformers.AutoModel.from_pretrained(load.model, **load.model_kwargs())
            if not hasattr(model, "get_image_features") or not hasattr(model, "get_text_features"):
                raise ValueError(f"{type(model).__name__} is not a dual encoder (no get_image_features)")
            self.image_processor = load_image_processor(load)
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(load.model, **load.kwargs())
        except Exception as exc:
            raise load_error("CLIP ranker", load, exc) from exc
        self.model = move(model, self.device, self.dtype)
        self.embedding_dim = getattr(self.model.config, "projection_dim", None)
        self.revision = model_revision(self.model)
        cfg = getattr(self.model.config, "text_config", self.model.config)
        self.max_text_tokens = int(getattr(cfg, "max_position_embeddings", 77))

    @torch.inference_mode()
    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = pixel_values(self.image_processor, images, self.device, self.dtype)
        feats = _features(self.model.get_image_features(pixel_values=pixels))
        return torch.nn.functional.normalize(feats.float(), dim=-1)

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            tok = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_text_tokens,
                return_tensors="pt",
            ).to(self.device)
            feats = _features(self.model.get_text_features(**tok))
            chunks.append(torch.nn.functional.normalize(feats.float(), dim=-1))
        return torch.cat(chunks) if chunks else torch.empty(0)

    def _score(self, images: list[Image.Image], texts: list[list[str]]) -> Scores:
        return self.scores_and_embeddings(images, texts)[0]

    def scores_and_embeddings(
        self, images: list[Image.Image], texts: list[list[str]]
    ) -> tuple[Scores, Embeddings]:
        """Cosines and the unit image and text embeddings they came from (each image embedded once)."""
        image_feats = self.embed_images(images)
        flat = [t for ts in texts for t in ts]
        if not flat:
            empty = Embeddings(image_feats.cpu().numpy(), split_rows(image_feats[:0], texts))
            return {CLIP_SCORE: [[] for _ in texts]}, empty
        text_feats = self.embed_texts(flat)
        owner = torch.tensor([i for i, ts in enumerate(texts) for _ in ts])
        sims = (image_feats[owner] * text_feats).sum(-1).tolist()
        embeddings = Embeddings(image_feats.cpu().numpy(), split_rows(text_feats, texts))
        return {CLIP_SCORE: split(sims, texts)}, embeddings
