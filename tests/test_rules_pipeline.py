"""The ``rules`` section in whole runs on a real local Ray: the model pipeline and the no-model
convert path both apply it in decode, and its columns and reasons reach the samples Parquet."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from curate.config import load_pipeline, pipeline_from_dict
from curate.explore.stats import compute_stats
from curate.io.reader import shard_refs
from curate.pipeline import OutputConflictError, config_fingerprint, run_pipeline
from curate.schema import SAMPLES_SCHEMA
from tests.helpers import image_bytes, make_shard

REPO = Path(__file__).resolve().parents[1]

ENGLISH = "a red house with a big green garden and a tall tree"
ITALIAN = "una casa rossa con un grande giardino verde e un albero alto"

RULES = {
    "min_side": 16,
    "max_aspect_ratio": 3.0,
    "min_pixels": 900,
    "alt_text": {"languages": ["en"], "min_language_score": 0.5},
}


def _sample(key: str, width: int, height: int, text: str | None, seed: int) -> dict:
    return {
        "key": key,
        "image": image_bytes(width, height, fmt="png", seed=seed),
        "format": "png",
        "txt": text,
    }


@pytest.fixture
def shard(tmp_path: Path) -> Path:
    return make_shard(
        tmp_path / "in" / "00000.tar",
        [
            _sample("en", 40, 30, ENGLISH, 1),
            _sample("it", 40, 30, ITALIAN, 2),
            _sample("small", 12, 40, ENGLISH, 3),  # shorter side 12 < 16
            _sample("wide", 100, 20, ENGLISH, 4),  # 5:1 > 3
            _sample("few", 25, 25, ENGLISH, 5),  # 625 px < 900
            _sample("none", 40, 30, None, 6),  # no alt-text: no language, captions only
        ],
    )


def _models_config(models: dict[str, Path], rules: dict | None) -> dict:
    cfg = {
        "name": "rules",
        "seed": 3,
        "captioner": {
            "model": str(models["captioner"]),
            "num_captions": 2,
            "max_new_tokens": 5,
            "resources": {"device": "cpu"},
        },
        "ranker": {"model": str(models["clip"]), "resources": {"device": "cpu", "batch_size": 8}},
        "policy": {"top_k": 2},
        "read": {"resources": {"batch_size": 4}},
        "decode": {"min_side": 8},
    }
    if rules is not None:
        cfg["rules"] = rules
    return cfg


def _rows(out: Path) -> dict[str, dict]:
    table = pq.read_table(out / "samples")
    assert table.schema.remove_metadata().equals(SAMPLES_SCHEMA)
    return {r["key"]: r for r in table.to_pylist()}


def _image_rule_drops(rows: dict[str, dict]) -> None:
    assert (rows["small"]["status"], rows["small"]["reason"]) == ("dropped", "image_too_small")
    assert (rows["wide"]["status"], rows["wide"]["reason"]) == ("dropped", "aspect_ratio")
    assert (rows["few"]["status"], rows["few"]["reason"]) == ("dropped", "too_few_pixels")
    for key in ("small", "wide", "few"):  # the alt-text was still checked, before the image
        assert rows[key]["alt_text_language"] == "en"


def test_rules_in_a_model_run(ray_local, tiny_models, shard, tmp_path):
    cfg = pipeline_from_dict(_models_config(tiny_models, RULES))
    shards = shard_refs([str(shard)])
    out = tmp_path / "out"
    result = run_pipeline(cfg, shards, str(out))
    rows = _rows(out)
    assert result.counts["total"] == len(rows) == 6
    _image_rule_drops(rows)
    for key in ("small", "wide", "few"):  # dropped in decode: no model saw them
        assert rows[key]["candidates"] == []

    en, it = rows["en"], rows["it"]
    assert en["alt_text_language"] == "en" and en["alt_text_language_score"] > 0.5
    assert it["alt_text_language"] == "it" and 0 < it["alt_text_language_score"] <= 1
    en_alt = next(c for c in en["candidates"] if c["source"] == "alt")
    it_alt = next(c for c in it["candidates"] if c["source"] == "alt")
    assert en_alt["rule"] is None
    # the Italian alt-text was scored, so the output shows what the rule cost, but never kept
    assert it_alt["rule"] == "alt_text_language" and it_alt["clip_score"] is not None
    assert not it_alt["kept"]
    # the sample keeps its synthetic captions
    assert it["status"] == "kept" and ITALIAN not in it["captions"]
    assert it["captions"] and all(c["source"] == "synthetic" for c in it["candidates"] if c["kept"])
    assert rows["none"]["alt_text_language"] is None and rows["none"]["status"] == "kept"
    assert all(c["rule"] is None for c in rows["none"]["candidates"])

    quality = compute_stats(out)["quality"]
    assert quality["rules"] == {
        "image_too_small": {"kind": "image", "dropped": 1, "flagged": None},
        "aspect_ratio": {"kind": "image", "dropped": 1, "flagged": None},
        "too_few_pixels": {"kind": "image", "dropped": 1, "flagged": None},
        "alt_text_language": {"kind": "alt_text", "dropped": 0, "flagged": 1},
    }
    assert quality["languages"] == {"en": 4, "it": 1}
    assert quality["scores"]["alt_text_language_score"]["threshold"] == 0.5

    # the rules are part of what a run writes: resuming is a no-op, other rules are refused
    assert run_pipeline(cfg, shards, str(out)).nothing_to_do
    other = pipeline_from_dict(_models_config(tiny_models, {**RULES, "min_side": 20}))
    with pytest.raises(OutputConflictError, match="different pipeline"):
        run_pipeline(other, shards, str(out))


def test_rules_in_the_convert_path(ray_local, shard, tmp_path):
    """No models: the alt-text is the only candidate, so a ruled one drops its sample."""
    cfg = pipeline_from_dict(
        {"name": "convert", "policy": {"keep_alt_text": True}, "decode": {"min_side": 8}, "rules": RULES}
    )
    out = tmp_path / "out"
    run_pipeline(cfg, shard_refs([str(shard)]), str(out))
    rows = _rows(out)
    _image_rule_drops(rows)
    assert (rows["en"]["status"], rows["en"]["caption"]) == ("kept", ENGLISH)
    assert (rows["it"]["status"], rows["it"]["reason"]) == ("dropped", "alt_text_language")
    assert rows["it"]["candidates"][0]["rule"] == "alt_text_language"
    assert (rows["none"]["status"], rows["none"]["reason"]) == ("dropped", "no_text")


def test_outputs_from_before_the_rules_still_resume():
    """Fields added since (rules, the image classifiers, the aesthetic head, embeddings, the
    captioner's decoder and backend) are left out of the fingerprint at their defaults: the
    demo's is the one its earlier outputs carry."""
    demo = REPO / "pipelines" / "demo.yaml"
    assert config_fingerprint(load_pipeline(demo)) == "34cd88599e5a8e67"
    for override in (
        "rules.min_side=200",
        "rules.alt_text.languages=[en]",
        "output.write_embeddings=true",
        "captioner.backend=vllm",
        "captioner.fast_decoding=false",
    ):
        assert config_fingerprint(load_pipeline(demo, [override])) != "34cd88599e5a8e67", override
