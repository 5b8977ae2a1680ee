"""Scorers: what the filter and the ranker stages call to score (image, text) pairs.

One interface, ``scorer(images, texts_per_image) -> {field: scores per image}``, for the
candidate fields it was loaded for: ``itm_score`` (an ITM head's P(match), CapFilt's
filter) and ``clip_score`` (image-text cosine similarity, BLIP-2's ranking signal; a bridge
filter with a hubness correction gives the cosine less its hubness terms).
Three implementations:

- :class:`~curate.models.itm.ITMFilter`: BLIP's retrieval model, ``itm_score``;
- :class:`~curate.models.clip.ClipRanker`: a transformers dual encoder, ``clip_score``;
- :class:`BridgeScorer`: the bootstrapped bridge filter, either score or both; asked for
  both, it encodes each image and text once for the ITM and the ITC head.

:func:`load_scorer` picks one from the model directory's ``model_type``. A ranker (CLIP or the
bridge's ITC) also hands out the unit embeddings its scores came from
(:meth:`Scorer.scores_and_embeddings`), for heads on the image embedding and for the
embeddings a run writes out, so no image or text is encoded twice.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from curate.models import BRIDGE_FILTER_TYPE, CLIP_SCORE, ITM_SCORE
from curate.models.base import (
    LoadOptions,
    load_error,
    model_revision,
    model_type,
    move,
    resolve_device,
    resolve_dtype,
)

if TYPE_CHECKING:
    from curate.config import ModelConfig

Scores = dict[str, list[list[float]]]


@dataclass
class Embeddings:
    """Unit embeddings (float32) from a ranker's encoders: ``images`` (I, D), and per image its
    texts' (n_i, D) in the order they were scored."""

    images: np.ndarray
    texts: list[np.ndarray]


def split_rows(flat: torch.Tensor, texts: list[list[str]]) -> list[np.ndarray]:
    """Rows of the flattened pairs' (N, D) tensor back into one (n_i, D) array per image."""
    flat = flat.detach().float().cpu().numpy()
    out, pos = [], 0
    for ts in texts:
        out.append(flat[pos : pos + len(ts)])
        pos += len(ts)
    return out


class Scorer(ABC):
    """Loaded once for ``fields``; ``scorer(images, texts_per_image)`` -> for each field, one
    list of scores per image, in the order of its texts."""

    fields: tuple[str, ...]
    revision: str | None
    embedding_dim: int | None = None  # of the unit embeddings a ranker gives, where known

    def __call__(self, images: list[Image.Image], texts: list[list[str]]) -> Scores:
        if not images:
            return {f: [] for f in self.fields}
        return self._score(images, texts)

    @abstractmethod
    def _score(self, images: list[Image.Image], texts: list[list[str]]) -> Scores:
        """The scores of a non-empty batch."""

    def scores_and_embeddings(
        self, images: list[Image.Image], texts: list[list[str]]
    ) -> tuple[Scores, Embeddings]:
        """The scores and the unit embeddings they were computed from (rankers only)."""
        raise TypeError(f"{type(self).__name__} gives no image and text embeddings (only a ranker does)")


def split(flat: list[float], texts: list[list[str]]) -> list[list[float]]:
    """Scores of the flattened pairs back into one list per image."""
    out, pos = [], 0
    for ts in texts:
        out.append(flat[pos : pos + len(ts)])
        pos += len(ts)
    return out


class BridgeScorer(Scorer):
    """The bridge filter (``curate.models.bridge.filter``): its ITM head gives ``itm_score``,
    its ITC embeddings ``clip_score``; with both fields one pass computes the two."""

    def __init__(
        self,
        load: LoadOptions,
        fields: tuple[str, ...],
        device: str = "auto",
        dtype: str = "fp32",
        batch_size: int = 32,
    ) -> None:
        from curate.models.bridge.filter import BridgeFilterModel

        unknown = set(fields) - {ITM_SCORE, CLIP_SCORE}
        if not fields or unknown:
            raise ValueError(f"a bridge filter gives {ITM_SCORE} and {CLIP_SCORE}, asked for {list(fields)}")
        self.fields = tuple(fields)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.batch_size = batch_size
        try:
            model = BridgeFilterModel.from_pretrained(load.model, **load.model_kwargs())
        except Exception as exc:
            raise load_error("bridge filter", load, exc) from exc
        self.model = move(model, self.device, self.dtype)
        self.embedding_dim = int(model.config.proj_dim)
        self.revision = model_revision(self.model)

    @torch.inference_mode()
    def _score(self, images: list[Image.Image], texts: list[list[str]]) -> Scores:
        if self.fields == (ITM_SCORE,):
            return {ITM_SCORE: self.model.itm_scores(images, texts, batch_size=self.batch_size)}
        if self.fields == (CLIP_SCORE,):
            return {CLIP_SCORE: self.model.itc_scores(images, texts, batch_size=self.batch_size)}
        return self.itm_itc(images, texts)

    @torch.inference_mode()
    def itm_itc(self, images: list[Image.Image], texts: list[list[str]]) -> Scores:
        """Both scores from one encoding of each image and each text (the fused filter+ranker)."""
        itm, itc = self.model.itm_itc_scores(images, texts, batch_size=self.batch_size)
        return {ITM_SCORE: itm, CLIP_SCORE: itc}

    @torch.inference_mode()
    def scores_and_embeddings(
        self, images: list[Image.Image], texts: list[list[str]]
    ) -> tuple[Scores, Embeddings]:
        """The scores asked for and the ITC embeddings (the bridge's ``clip_score`` space)."""
        if CLIP_SCORE not in self.fields:
            return super().scores_and_embeddings(images, texts)
        itm = ITM_SCORE in self.fields
        itm_s, itc_s, image_feat, text_feat = self.model.scores_and_features(
            images, texts, batch_size=self.batch_size, itm=itm
        )
        scores = {ITM_SCORE: itm_s, CLIP_SCORE: itc_s} if itm else {CLIP_SCORE: itc_s}
        return scores, Embeddings(image_feat.float().numpy(), split_rows(text_feat, texts))


def open_scorer(
    load: LoadOptions,
    fields: tuple[str, ...],
    device: str = "auto",
    dtype: str = "fp32",
    batch_size: int = 32,
) -> Scorer:
    """The scorer of ``load.model`` for ``fields``: the bridge for a bridge filter directory,
    else BLIP's ITM head for ``itm_score`` and a dual encoder for ``clip_score``."""
    fields = tuple(fields)
    kind = model_type(load, "scorer")
    if kind == BRIDGE_FILTER_TYPE:
        return BridgeScorer(load, fields, device=device, dtype=dtype, batch_size=batch_size)
    if fields == (ITM_SCORE,):
        from curate.models.itm import ITMFilter

        return ITMFilter(load, device=device, dtype=dtype, batch_size=batch_size)
    if fields == (CLIP_SCORE,):
        from curate.models.clip import ClipRanker

        return ClipRanker(load, device=device, dtype=dtype, batch_size=batch_size)
    raise ValueError(
        f"{load.model}: scoring {' and '.join(fields)} in one pass needs a bridge filter "
        f"({BRIDGE_FILTER_TYPE}), got model_type={kind!r}"
    )


def load_scorer(cfg: ModelConfig, fields: tuple[str, ...]) -> Scorer:
    """The scorer a pipeline's ``filter`` or ``ranker`` section describes, for ``fields``."""
    res = cfg.resources
    return open_scorer(
        LoadOptions.of(cfg), fields, device=res.device, dtype=cfg.dtype, batch_size=res.batch_size
    )
