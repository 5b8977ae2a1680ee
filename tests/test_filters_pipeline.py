"""The model filters in a whole run on a real local Ray: NSFW and watermark classifiers right after
decode, the aesthetic head inside the ranker's actor on the ranker's own image embedding.

Tiny random models stand in for the real checkpoints, which cannot be downloaded here; the
thresholds are set between the scores those models give, so each filter drops some samples."""

from __future__ import annotations

import io
import json
from collections import Counter

import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate.config import AestheticConfig, pipeline_from_dict
from curate.explore.stats import compute_stats
from curate.io.reader import shard_refs
from curate.models.aesthetic import AestheticHead
from curate.models.base import LoadOptions
from curate.models.classifier import ImageClassifier
from curate.models.clip import ClipRanker
from curate.pipeline import run_pipeline
from curate.schema import SAMPLES_SCHEMA
from tests.helpers import image_bytes, make_shard
from tests.random_models import build_aesthetic_head, build_image_classifier

N = 12


def _between(scores: list[float], drop: int, high: bool) -> float:
    """A threshold that drops the ``drop`` highest (``high``) or lowest scores."""
    ordered = sorted(scores, reverse=high)
    return (ordered[drop - 1] + ordered[drop]) / 2


def test_classifiers_and_aesthetic_drop_by_their_thresholds(ray_local, tiny_models, tmp_path):
    images = [image_bytes(40, 30, fmt="png", seed=i) for i in range(N)]
    shard = make_shard(
        tmp_path / "in" / "00000.tar",
        [
            {"key": f"{i:03d}", "image": b, "format": "png", "txt": f"alt text {i}"}
            for i, b in enumerate(images)
        ],
    )
    nsfw = build_image_classifier(tmp_path / "nsfw", ["normal", "nsfw"], seed=1)
    watermark = build_image_classifier(tmp_path / "watermark", ["clear", "watermarked"], seed=2)
    head = build_aesthetic_head(tmp_path / "aesthetic" / "model.safetensors", dim=32, seed=3)

    # each model's scores, computed here outside the pipeline
    pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
    nsfw_s = ImageClassifier(LoadOptions(str(nsfw)), "nsfw", device="cpu")(pil)
    mark_s = ImageClassifier(LoadOptions(str(watermark)), 1, device="cpu")(pil)
    ranker = ClipRanker(LoadOptions(str(tiny_models["clip"])), device="cpu")
    assert ranker.embedding_dim == 32  # the head must fit the ranker
    aes_s = AestheticHead(AestheticConfig(model=str(head.parent)))(ranker.embed_images(pil).numpy())

    # two samples above the NSFW maximum; of the rest, two above the watermark one, then two
    # below the aesthetic minimum
    max_nsfw = _between(nsfw_s, 2, high=True)
    rest = [i for i in range(N) if nsfw_s[i] < max_nsfw]
    max_mark = _between([mark_s[i] for i in rest], 2, high=True)
    rest = [i for i in rest if mark_s[i] < max_mark]
    min_aes = _between([aes_s[i] for i in rest], 2, high=False)

    cfg = pipeline_from_dict(
        {
            "name": "filters",
            "nsfw": {"model": str(nsfw), "max_score": max_nsfw, "resources": {"device": "cpu"}},
            "watermark": {"model": str(watermark), "label": 1, "max_score": max_mark},
            "ranker": {"model": str(tiny_models["clip"]), "resources": {"device": "cpu"}},
            "aesthetic": {"model": str(head.parent), "min_score": min_aes},
            "policy": {"top_k": 1},
            "read": {"resources": {"batch_size": 5}},
            "decode": {"min_side": 8},
        }
    )
    out = tmp_path / "out"
    run_pipeline(cfg, shard_refs([str(shard)]), str(out))
    table = pq.read_table(out / "samples")
    assert table.schema.remove_metadata().equals(SAMPLES_SCHEMA)
    rows = {int(r["key"]): r for r in table.to_pylist()}

    reasons = {i: rows[i]["reason"] for i in range(N)}
    for i in range(N):
        r = rows[i]
        assert r["nsfw_score"] == pytest.approx(nsfw_s[i], abs=1e-5)
        if nsfw_s[i] > max_nsfw:  # dropped first: no later model saw it
            assert reasons[i] == "nsfw_above_threshold"
            assert r["watermark_score"] is None and r["aesthetic_score"] is None
            assert all(c["clip_score"] is None for c in r["candidates"])
            continue
        assert r["watermark_score"] == pytest.approx(mark_s[i], abs=1e-5)
        if mark_s[i] > max_mark:
            assert reasons[i] == "watermark_above_threshold" and r["aesthetic_score"] is None
            continue
        assert r["aesthetic_score"] == pytest.approx(aes_s[i], abs=1e-4)
        if aes_s[i] < min_aes:
            assert reasons[i] == "aesthetic_below_threshold"
        else:
            assert r["status"] == "kept" and r["caption"] == f"alt text {i}"
    assert sorted(Counter(reasons.values()).values()) == [2, 2, 2, N - 6]

    # curate stats: each filter's drops and its scores' histogram, over the samples it scored
    scores = compute_stats(out)["quality"]["scores"]
    for column, reason, threshold, scored in (
        ("nsfw_score", "nsfw_above_threshold", max_nsfw, N),
        ("watermark_score", "watermark_above_threshold", max_mark, N - 2),
        ("aesthetic_score", "aesthetic_below_threshold", min_aes, N - 4),
    ):
        info = scores[column]
        assert (info["reason"], info["dropped"], info["count"]) == (reason, 2, scored)
        assert info["threshold"] == pytest.approx(threshold) and sum(info["histogram"]["counts"]) == scored

    models = json.loads((out / "manifest.json").read_text())["models"]
    assert set(models) == {"nsfw", "watermark", "ranker", "aesthetic"}
    assert models["aesthetic"]["path"] == str(head.parent)


def test_an_aesthetic_head_that_does_not_fit_the_ranker_fails_at_load(tiny_models, tmp_path):
    from curate.config import RankerConfig
    from curate.stages.models import RankStage

    head = build_aesthetic_head(tmp_path / "head.safetensors", dim=768)  # CLIP ViT-L/14's
    ranker = RankerConfig(model=str(tiny_models["clip"]))
    ranker.resources.device = "cpu"
    with pytest.raises(ValueError, match=r"takes 768-d image embeddings, the ranker .* gives 32-d"):
        RankStage(ranker, aesthetic=AestheticConfig(model=str(head)))
