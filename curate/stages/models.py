"""Model stages: callable classes Ray Data runs as actor pools.

Each loads its wrapper once in ``__init__`` and transforms a batch in ``__call__``.
When the model raises on a batch, the batch is retried sample by sample so one
poison sample cannot take its neighbours down; what still fails becomes that row's
error (or is re-raised with ``error_policy: raise``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

from curate.config import AestheticConfig, CaptionerConfig, FilterConfig, ImageClassifierConfig, RankerConfig
from curate.models import (
    AESTHETIC_BELOW_THRESHOLD,
    BRIDGE_FILTER_TYPE,
    CLIP_SCORE,
    ITM_SCORE,
    NSFW_ABOVE_THRESHOLD,
    WATERMARK_ABOVE_THRESHOLD,
)
from curate.schema import SOURCE_SYNTHETIC, STATUS_DROPPED
from curate.stages.decode import row_image
from curate.stages.memory import release_free_memory
from curate.stages.rows import fail, get_candidates, is_pending, set_candidates, to_rows, to_table

log = logging.getLogger("curate.stages")


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - cosmetic only
        pass


def sample_seed(seed: int, stage: str, row: dict) -> int:
    """A sample's own sampling seed for ``stage``: the run seed and the sample's shard and
    key alone, so what it draws does not depend on its batch, block, actor, retry or the
    output it is written to, and a rerun or resume repeats it."""
    digest = hashlib.sha256(f"{seed}\n{stage}\n{row['shard']}/{row['key']}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # 63 bits: any generator takes it


class _ModelStage:
    name = "model"

    def __init__(self, error_policy: str = "capture", num_threads: int | None = None) -> None:
        from curate.models.base import set_cpu_threads  # torch: in the actor, not the driver

        self.error_policy = error_policy
        set_cpu_threads(num_threads)

    def process(self, rows: list[dict]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _run_with_retry(self, rows: list[dict], fn: Callable[[list[dict]], None]) -> None:
        try:
            fn(rows)
            return
        except Exception as exc:
            if self.error_policy == "raise" or len(rows) == 1:
                if self.error_policy == "raise":
                    raise
                fail(rows[0], f"{self.name}: {type(exc).__name__}: {exc}")
                return
            log.warning("%s failed on a batch of %d (%s); retrying one by one", self.name, len(rows), exc)
        for row in rows:
            try:
                fn([row])
            except Exception as exc:
                fail(row, f"{self.name}: {type(exc).__name__}: {exc}")

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = to_rows(batch)
        todo = [r for r in rows if is_pending(r)]
        if todo:
            self._run_with_retry(todo, self.process)
        out = to_table(rows)
        release_free_memory()
        return out


class CaptionStage(_ModelStage):
    """Adds ``num_captions`` synthetic candidates per image."""

    name = "captioner"

    def __init__(self, cfg: CaptionerConfig, seed: int = 0, error_policy: str = "capture") -> None:
        super().__init__(error_policy, cfg.resources.num_threads)
        from curate.models.captioner import load_captioner

        _quiet_transformers()
        self.seed = seed
        self.batch_size = cfg.resources.batch_size
        self.model = load_captioner(cfg, seed=seed)

    def process(self, rows: list[dict]) -> None:
        step = max(1, len(rows)) if self.model.whole_block else self.batch_size
        for start in range(0, len(rows), step):
            chunk = rows[start : start + step]
            seeds = [sample_seed(self.seed, self.name, r) for r in chunk]
            captions = self.model([row_image(r) for r in chunk], seeds=seeds)
            for row, texts in zip(chunk, captions):
                candidates = get_candidates(row)
                known = {c["text"].lower() for c in candidates}
                for text in texts:
                    if text.lower() in known:
                        continue  # a synthetic caption equal to the alt-text adds nothing
                    known.add(text.lower())
                    candidates.append(
                        {"text": text, "source": SOURCE_SYNTHETIC, "itm_score": None, "clip_score": None}
                    )
                set_candidates(row, candidates)


class _ScoreStage(_ModelStage):
    """Fills the candidate ``fields`` its scorer gives, for every candidate of a sample.

    A ranker's stage (``clip_score``) with ``write_embeddings`` also leaves the unit image
    embedding in the row and each candidate's text embedding in the candidate (float32 bytes),
    from the same encoding that scored them, for the writer; with ``aesthetic``, the head scores
    that image embedding (``aesthetic_score``) and drops a sample below its ``min_score``."""

    fields: tuple[str, ...] = ()

    def __init__(
        self,
        cfg: FilterConfig | RankerConfig,
        error_policy: str = "capture",
        write_embeddings: bool = False,
        aesthetic: AestheticConfig | None = None,
    ) -> None:
        super().__init__(error_policy, cfg.resources.num_threads)
        from curate.models.scorer import load_scorer

        _quiet_transformers()
        if (write_embeddings or aesthetic is not None) and CLIP_SCORE not in self.fields:
            raise ValueError(f"{self.name}: only a ranker's stage gives image embeddings")
        self.batch_size = cfg.resources.batch_size
        self.write_embeddings = write_embeddings
        self.model = load_scorer(cfg, self.fields)
        self.aesthetic = None
        if aesthetic is not None:
            from curate.models.aesthetic import AestheticHead

            self.aesthetic = AestheticHead(aesthetic, getattr(self.model, "device", "cpu"))
            self.min_aesthetic = aesthetic.min_score
            dim = self.model.embedding_dim
            if dim is not None and dim != self.aesthetic.input_dim:
                raise ValueError(
                    f"aesthetic: the head {aesthetic.model!r} takes {self.aesthetic.input_dim}-d image "
                    f"embeddings, the ranker {cfg.model!r} gives {dim}-d ones"
                )

    def process(self, rows: list[dict]) -> None:
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            cands = [get_candidates(r) for r in chunk]
            images = [row_image(r) for r in chunk]
            texts = [[c["text"] for c in cs] for cs in cands]
            if self.write_embeddings or self.aesthetic is not None:
                scores, embeddings = self.model.scores_and_embeddings(images, texts)
            else:
                scores, embeddings = self.model(images, texts), None
            for field, per_image in scores.items():
                for cs, ss in zip(cands, per_image):
                    for c, s in zip(cs, ss):
                        c[field] = float(s)
            if self.write_embeddings:
                self._keep_embeddings(chunk, cands, embeddings)
            if self.aesthetic is not None:
                self._aesthetic(chunk, embeddings)
            for row, cs in zip(chunk, cands):
                set_candidates(row, cs)

    def _aesthetic(self, rows: list[dict], embeddings) -> None:
        for row, score in zip(rows, self.aesthetic(embeddings.images)):
            row["aesthetic_score"] = float(score)
            if self.min_aesthetic is not None and score < self.min_aesthetic:
                row["status"] = STATUS_DROPPED
                row["reason"] = AESTHETIC_BELOW_THRESHOLD

    @staticmethod
    def _keep_embeddings(rows: list[dict], cands: list[list[dict]], embeddings) -> None:
        for i, (row, cs) in enumerate(zip(rows, cands)):
            row["image_embedding"] = np.ascontiguousarray(embeddings.images[i], np.float32).tobytes()
            for c, vector in zip(cs, embeddings.texts[i]):
                c["text_embedding"] = np.ascontiguousarray(vector, np.float32).tobytes()


class ClassifierStage(_ModelStage):
    """An image classifier's probability of one class in the row's ``field``, right after decode:
    a sample above ``max_score`` is dropped with ``reason`` before any other model sees it."""

    field = ""
    reason = ""

    def __init__(self, cfg: ImageClassifierConfig, error_policy: str = "capture") -> None:
        super().__init__(error_policy, cfg.resources.num_threads)
        from curate.models.base import LoadOptions
        from curate.models.classifier import ImageClassifier

        _quiet_transformers()
        res = cfg.resources
        self.max_score = cfg.max_score
        self.model = ImageClassifier(
            LoadOptions.of(cfg), cfg.label, device=res.device, dtype=cfg.dtype, batch_size=res.batch_size
        )

    def process(self, rows: list[dict]) -> None:
        for row, score in zip(rows, self.model([row_image(r) for r in rows])):
            row[self.field] = float(score)
            if self.max_score is not None and score > self.max_score:
                row["status"] = STATUS_DROPPED
                row["reason"] = self.reason
                row["pixels"] = None
                row["image"] = None


class NsfwStage(ClassifierStage):
    name = "nsfw"
    field = "nsfw_score"
    reason = NSFW_ABOVE_THRESHOLD


class WatermarkStage(ClassifierStage):
    name = "watermark"
    field = "watermark_score"
    reason = WATERMARK_ABOVE_THRESHOLD


class FilterStage(_ScoreStage):
    """Scores every candidate with the ITM head (P(match))."""

    name = "filter"
    fields = (ITM_SCORE,)


class RankStage(_ScoreStage):
    """Scores every candidate with CLIP cosine similarity."""

    name = "ranker"
    fields = (CLIP_SCORE,)


def fused_scoring(filter_cfg: FilterConfig | None, ranker_cfg: RankerConfig | None) -> bool:
    """Filter and ranker are the same bridge filter (ITM and ITC heads of one model), loaded
    the same way: one stage can compute both scores from one encoding of each image and text."""
    if filter_cfg is None or ranker_cfg is None:
        return False
    same = ("model", "revision", "dtype", "trust_remote_code", "allow_pickle_weights")
    if any(getattr(filter_cfg, k) != getattr(ranker_cfg, k) for k in same):
        return False
    if filter_cfg.resources.device != ranker_cfg.resources.device:
        return False
    config = Path(filter_cfg.model) / "config.json"
    try:
        return json.loads(config.read_text()).get("model_type") == BRIDGE_FILTER_TYPE
    except (OSError, ValueError):
        return False


class ScoreStage(_ScoreStage):
    """Filter and ranker in one actor for a bridge filter: ``itm_score`` and ``clip_score``
    from one pass (the filter section's resources apply)."""

    name = "filter+ranker"
    fields = (ITM_SCORE, CLIP_SCORE)
