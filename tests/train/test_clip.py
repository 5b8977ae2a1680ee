"""The downstream contrastive model: curated shards -> feature shards -> batches -> InfoNCE -> Ray Train.

The frozen towers are the real registry packages (EfficientNet-Lite0, all-MiniLM-L6-v2);
the curated tars are written by the pipeline's own writer (``curate.io.writer.tar_members``),
so the test reads exactly the layout ``curate run`` produces.
"""

from __future__ import annotations

import json
import tarfile

import pytest
import torch
from PIL import Image

from curate.io.writer import tar_members
from tests.helpers import encode_image, image_bytes, make_shard, write_tar
from train.lib.evaluation import category_label, evaluate_contrastive
from train.lib.feature_shards import (
    EmptyShardError,
    FeatureShard,
    encode_shard,
    encode_shards,
    iter_batches,
    load_feature_shard,
    shard_cache_path,
)
from train.lib.losses import ITCLoss, positive_mask
from train.lib.models import ContrastiveHeads

COLOURS = [(220, 30, 30), (30, 200, 40), (20, 40, 220), (240, 220, 20), (250, 250, 250), (10, 10, 10)]


def _curated_row(i: int, captions: list[tuple[str, str, bool]]) -> dict:
    """A kept row as the pipeline hands it to the writer: typed candidates with kept flags."""
    kept = [t for t, _, k in captions if k]
    return {
        "key": f"web{i:03d}",
        "shard": "00000.tar",
        "caption": kept[0],
        "captions": kept,
        "candidates": [
            {"text": t, "source": s, "itm_score": 0.9 if k else 0.1, "clip_score": 0.3, "kept": k}
            for t, s, k in captions
        ],
        "alt_text": captions[0][0],
        "image": encode_image(Image.new("RGB", (40, 30), COLOURS[i % len(COLOURS)]), "png"),
        "image_ext": "png",
        "width": 40,
        "height": 30,
    }


@pytest.fixture(scope="module")
def curated_shard(tmp_path_factory):
    rows = [
        _curated_row(
            i,
            [
                (f"IMG_{i:04d}.jpg", "alt_text", False),  # dropped by the filter: never trained on
                (f"a red shape number {i}", "captioner", True),
                (f"a drawing of shape {i}", "captioner", True),
            ],
        )
        for i in range(6)
    ]
    path = tmp_path_factory.mktemp("curated") / "00000.tar"
    return write_tar(path, [m for row in rows for m in tar_members(row)])


@pytest.fixture(scope="module")
def raw_shard(tmp_path_factory):
    cats = ["animals/birds", "food/fruit", "animals/cats", "food"]
    samples = [
        {
            "key": f"{i:09d}",
            "image": image_bytes(32, 32, "png", seed=100 + i),
            "format": "png",
            "txt": ["A bird.", "An apple.", "A cat.", "A bird."][i],
            "json": {"category": cats[i]},
        }
        for i in range(4)
    ]
    return make_shard(tmp_path_factory.mktemp("raw") / "00000.tar", samples)


def test_curated_shard_to_feature_shard_keeps_only_kept_captions(curated_shard, tmp_path):
    path = encode_shard(str(curated_shard), cache_dir=tmp_path, batch_size=4)
    shard = load_feature_shard(path)
    assert len(shard) == 6 and shard.image.shape == (6, 1280) and shard.text.shape == (12, 384)
    assert shard.captions[2] == ["a red shape number 2", "a drawing of shape 2"]
    assert not any("IMG_" in c for caps in shard.captions for c in caps)
    assert shard.offsets.tolist() == [0, 2, 4, 6, 8, 10, 12]
    assert torch.isfinite(shard.image.float()).all() and shard.image.float().abs().sum() > 0
    # cached: a second call finds the file; the name depends on the tar's bytes
    mtime = path.stat().st_mtime_ns
    assert encode_shard(str(curated_shard), cache_dir=tmp_path) == path and path.stat().st_mtime_ns == mtime
    assert shard_cache_path(str(curated_shard), tmp_path, "crop", 512) != path


def test_raw_shard_uses_its_txt_and_records_categories(raw_shard, tmp_path):
    shard = load_feature_shard(encode_shard(str(raw_shard), cache_dir=tmp_path))
    assert shard.captions == [["A bird."], ["An apple."], ["A cat."], ["A bird."]]
    assert shard.categories == ["animals/birds", "food/fruit", "animals/cats", "food"]
    assert [category_label(c) for c in shard.categories] == ["animals", "food", "animals", "food"]
    assert category_label("naturalforces/wind") == "natural forces" and category_label(None) is None


def test_encode_shard_names_a_tar_without_samples(raw_shard, tmp_path):
    empty = write_tar(tmp_path / "empty.tar", [("a.txt", b"text but no image")])
    with pytest.raises(EmptyShardError, match=r"empty\.tar: no usable"):
        encode_shard(str(empty), cache_dir=tmp_path)
    # a curated shard that kept nothing is skipped among others, and fatal only alone
    assert encode_shards([str(empty), str(raw_shard)], cache_dir=tmp_path) == [
        encode_shard(str(raw_shard), cache_dir=tmp_path)
    ]
    with pytest.raises(EmptyShardError, match="none of the 1 shards"):
        encode_shards([str(empty)], cache_dir=tmp_path)


def test_batches_split_rows_across_ranks_and_sample_kept_captions(curated_shard, tmp_path):
    path = encode_shard(str(curated_shard), cache_dir=tmp_path)
    shard = load_feature_shard(path)
    seen: dict[int, set[str]] = {0: set(), 1: set()}
    for rank in (0, 1):
        stream = iter_batches([path], batch_size=3, seed=0, rank=rank, world_size=2, shuffle_buffer=2)
        for _ in range(20):
            batch = next(stream)
            assert batch["image"].shape == (3, 1280) and batch["text"].shape == (3, 384)
            assert batch["image"].dtype == torch.float32
            for img, txt, cap in zip(batch["image"], batch["text"], batch["captions"]):
                row = next(i for i in range(6) if torch.equal(shard.image[i].float(), img))
                assert cap in shard.captions[row]  # the caption drawn belongs to this image
                j = shard.offsets[row] + shard.captions[row].index(cap)
                assert torch.equal(shard.text[j].float(), txt)
                seen[rank].add(cap)
    rows = {r: {int(c.split()[-1]) for c in seen[r]} for r in seen}
    assert rows == {0: {0, 2, 4}, 1: {1, 3, 5}}  # disjoint halves, every row reached
    assert len(seen[0]) == 6  # both kept captions of each row get drawn
    a = [next(iter_batches([path], 4, seed=3))["captions"] for _ in range(1)]
    b = [next(iter_batches([path], 4, seed=3))["captions"] for _ in range(1)]
    assert a == b


def test_itc_loss_rewards_alignment_and_ignores_duplicate_captions():
    torch.manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    scale = torch.tensor(2.0)
    loss = ITCLoss()
    aligned = loss(feats, feats, scale)
    shuffled = loss(feats, feats[torch.randperm(8)], scale)
    assert aligned < shuffled
    # rows 0 and 1 share a caption: with the mask, their cross pair is a positive, not a negative
    caps = ["a cat", "A  cat", "a dog", "a fox", "a hen", "a cow", "a pig", "an owl"]
    mask = positive_mask(caps)
    assert mask[0, 1] and mask[1, 0] and not mask[0, 2] and mask.sum() == 10
    swapped = feats[[1, 0, 2, 3, 4, 5, 6, 7]]  # image 0 paired with row 1's text: the same caption
    assert loss(feats, swapped, scale) > loss(feats, feats, scale) + 0.1
    torch.testing.assert_close(loss(feats, swapped, scale, mask), loss(feats, feats, scale, mask))


def test_heads_learn_and_round_trip(curated_shard, tmp_path):
    path = encode_shard(str(curated_shard), cache_dir=tmp_path)
    torch.manual_seed(0)
    model = ContrastiveHeads(hidden=32, dim=16, dropout=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = next(iter_batches([path], 6, seed=0))
    losses = []
    for _ in range(30):
        img, txt = model(batch["image"], batch["text"])
        loss = ITCLoss()(img, txt, model.scale(), positive_mask(batch["captions"]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
    model.save_pretrained(tmp_path / "heads")
    assert (tmp_path / "heads" / "model.safetensors").exists()
    back = ContrastiveHeads.from_pretrained(tmp_path / "heads")
    torch.testing.assert_close(back.encode_image(batch["image"]), model.eval().encode_image(batch["image"]))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        ContrastiveHeads.from_pretrained(tmp_path / "nothing")


def test_evaluate_recall_counts_the_rank_of_the_right_caption():
    """Recall@K over 30 held-out pairs, against ranks counted one pair at a time here: with more
    candidates than K, R@1 < R@5 < R@10 < 1 for random heads, so a wrong rank shows."""
    n = 30
    gen = torch.Generator().manual_seed(0)
    captions = [[f"caption {i}"] for i in range(n)]
    captions[7] = ["caption 3"]  # a duplicate caption: retrieving either image is a hit
    shard = FeatureShard(
        keys=[str(i) for i in range(n)],
        captions=captions,
        categories=[None] * n,
        image=torch.randn(n, 1280, generator=gen).half(),
        text=torch.randn(n, 384, generator=gen).half(),
        offsets=torch.arange(n + 1),
    )
    torch.manual_seed(0)
    model = ContrastiveHeads(hidden=32, dim=16)
    scores = evaluate_contrastive(model, [shard])
    img = model.encode_image(shard.image.float()).detach()
    txt = model.encode_text(shard.text.float()).detach()
    sim = (img @ txt.t()).tolist()
    same = [[captions[i] == captions[j] for j in range(n)] for i in range(n)]

    def recall(k: int, by_text: bool) -> float:
        hits = 0
        for q in range(n):
            row = [sim[c][q] if by_text else sim[q][c] for c in range(n)]
            best = max(row[c] for c in range(n) if same[q][c])  # the best-scored right answer
            hits += sum(score > best for score in row) < k
        return hits / n

    for k in (1, 5, 10):
        assert scores[f"i2t_r{k}"] == pytest.approx(recall(k, by_text=False))
        assert scores[f"t2i_r{k}"] == pytest.approx(recall(k, by_text=True))
    assert 0 < scores["i2t_r1"] < scores["i2t_r5"] < scores["i2t_r10"] < 1
    assert scores["n"] == n and "zeroshot_acc" not in scores  # no categories: no zero-shot


def test_evaluate_reports_zero_shot_over_categories(raw_shard, tmp_path):
    shard = load_feature_shard(encode_shard(str(raw_shard), cache_dir=tmp_path))
    scores = evaluate_contrastive(ContrastiveHeads(hidden=32, dim=16), [shard])
    assert scores["n"] == 4 and scores["zeroshot_classes"] == 2
    assert 0.0 <= scores["zeroshot_acc"] <= 1.0 and 0.0 <= scores["zeroshot_balanced_acc"] <= 1.0


@pytest.mark.slow
def test_two_worker_ray_train_run(curated_shard, raw_shard, tmp_path, ray_train_local):
    from train.train_clip import main

    args = ["--train", str(curated_shard), "--eval", str(raw_shard), "--run-dir", str(tmp_path / "run")]
    args += ["--output", str(tmp_path / "heads"), "--workers", "2", "--cache-dir", str(tmp_path / "cache")]
    args += ["--hidden", "32", "--dim", "16", "--steps", "6", "--batch-size", "4", "--warmup-steps", "2"]
    assert main([*args, "--shuffle-buffer", "4", "--log-every", "3"]) == 0
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["steps"] == 6 and result["samples_seen"] == 24
    assert set(result["eval"]) >= {"i2t_r1", "t2i_r10", "zeroshot_acc"}
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(x["epoch"], x["split"]) for x in lines] == [(3, "train"), (6, "train"), (6, "eval")]
    assert all(torch.isfinite(torch.tensor(x["loss"])) for x in lines if x["split"] == "train")
    assert ContrastiveHeads.from_pretrained(tmp_path / "heads").config["hidden"] == 32


def test_web_subset_is_spread_and_reproducible(tmp_path):
    from train.lib.websubset import write_subset

    samples = [
        {"key": f"{i:04d}", "image": image_bytes(8, 8, "png", i), "format": "png", "txt": f"t{i}"}
        for i in range(10)
    ]
    src = make_shard(tmp_path / "src" / "00000.tar", samples)
    paths = write_subset([str(src)], 3, tmp_path / "sub")
    with tarfile.open(paths[0]) as tar:
        names = [m.name for m in tar]
    assert names == ["0000.png", "0000.txt", "0004.png", "0004.txt", "0008.png", "0008.txt"]
    first = paths[0].read_bytes()
    assert write_subset([str(src)], 3, tmp_path / "sub")[0].read_bytes() == first
    with tarfile.open(write_subset([str(src)], 0, tmp_path / "all")[0]) as tar:
        assert len(tar.getnames()) == 20


def test_experiment_entry_point_on_raw_web_shards(raw_shard, tmp_path, monkeypatch):
    """The one-command comparison end to end for the arm that needs no curation run
    (the curated arms' `curate run` is covered by the pipeline tests)."""
    from train import experiment

    monkeypatch.setenv("CURATE_CACHE", str(tmp_path / "cache"))
    tux = tmp_path / "tux"
    (tux / "test").mkdir(parents=True)
    (tux / "test" / "00000.tar").write_bytes(raw_shard.read_bytes())
    argv = ["--web", str(raw_shard.parent), "--per-shard", "3", "--tuxpaint", str(tux)]
    argv += ["--work", str(tmp_path / "work"), "--arms", "raw", "--seeds", "0", "1", "--steps", "3"]
    assert experiment.main([*argv, "--batch-size", "2", "--workers", "0", "--captioner-epochs", "0"]) == 0
    record = json.loads((tmp_path / "work" / "results.json").read_text())
    assert record["stats"]["raw"]["samples"] == 2  # every 2nd of 4 samples, at most 3
    assert len(record["runs"]["raw"]) == 2 and record["budget"]["steps"] == 3
    mean, spread = record["summary"]["raw"]["i2t_r1"]
    values = [r["i2t_r1"] for r in record["runs"]["raw"]]
    assert mean == pytest.approx(sum(values) / 2) and spread >= 0
    table = (tmp_path / "work" / "results.md").read_text()
    assert "| raw | " in table and "zero-shot acc" in table and "± " in table
    assert (tmp_path / "work" / "results.png").read_bytes()[:4] == b"\x89PNG"
