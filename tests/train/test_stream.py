"""Reading shards for training: curate's reader (``iter_samples``) and the streaming loader.

Shards are real tars in img2dataset's layout, the tokenizer a real Hugging Face one (ByT5's
byte-level tokenizer needs no vocabulary file), the loader a real torch DataLoader with
worker processes.
"""

from __future__ import annotations

import random

import pytest
import torch

from curate.io.reader import IMAGE_EXTS, iter_samples
from tests.helpers import encode_image, make_shard, noise_image
from train.lib.data import caption_id, iter_pairs, iter_records, sample_captions
from train.lib.models import load_tokenizer
from train.lib.stream import (
    ImageTextStream,
    ImageTransform,
    StreamCursor,
    TextTokenizer,
    eval_batches,
    make_loader,
)


def kept(*texts: str) -> dict:
    return {"captions": [{"text": t, "source": "synthetic", "itm_score": 0.9} for t in texts]}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    """Four curated-looking shards of three samples, each with two kept captions."""
    root = tmp_path_factory.mktemp("stream")
    paths = []
    for s in range(4):
        samples = [
            {
                "key": f"{s}{i:02d}",
                "image": noise_image(24 + i, 20, seed=10 * s + i),
                "format": "png",
                "txt": f"alt {s}{i:02d}",
                "json": kept(f"one {s}{i:02d}", f"two {s}{i:02d}"),
            }
            for i in range(3)
        ]
        paths.append(str(make_shard(root / f"{s:05d}.tar", samples)))
    return paths


@pytest.fixture(scope="module")
def tokenize() -> TextTokenizer:
    return TextTokenizer(load_tokenizer("bytes"), max_length=16)


TRANSFORM = ImageTransform(size=8)


def test_training_reads_every_image_extension_curate_reads(tmp_path):
    """One IMAGE_EXTS: a .tif sample, which curation keeps, is a training sample too."""
    assert "tif" in IMAGE_EXTS and "tiff" in IMAGE_EXTS
    shard = make_shard(
        tmp_path / "00000.tar",
        [
            {
                "key": "a",
                "image": encode_image(noise_image(16, 12, seed=1), "TIFF"),
                "format": "tif",
                "txt": "a tif",
            },
            {"key": "b", "image": noise_image(16, 12, seed=2), "format": "png", "txt": "a png"},
            {"key": "c", "txt": "no image"},
        ],
    )
    rows = list(iter_samples(str(shard)))
    assert [(r["key"], r["image_ext"], r["status"]) for r in rows] == [
        ("a", "tif", "pending"),
        ("b", "png", "pending"),
        ("c", None, "error"),
    ]
    assert rows[0]["alt_text"] == "a tif" and rows[0]["shard"] == "00000"
    assert [p.key for p in iter_pairs([str(shard)], on_error="ignore")] == ["a", "b"]
    assert [r.key for r in iter_records(str(shard))] == ["a", "b"]


def test_sample_captions_prefer_kept_ones_and_caption_ids_ignore_case():
    assert sample_captions(kept("x", "y"), "alt") == ["x", "y"]
    assert sample_captions({}, "  an  alt\ntext ") == ["an alt text"]
    assert sample_captions({}, None) == [] and sample_captions(kept("x"), "alt", source="kale") == []
    assert caption_id("A  Cat") == caption_id("a cat") != caption_id("a dog")


def _all(stream: ImageTextStream, n: int, workers: int = 0) -> list[dict]:
    loader = iter(make_loader(stream))
    return [next(loader) for _ in range(n)]


def test_workers_split_the_shards_and_draw_one_kept_caption_each(shards, tokenize):
    seen: dict[int, list[str]] = {}
    for rank in (0, 1):
        stream = ImageTextStream(
            shards, TRANSFORM, tokenize, 3, rank=rank, world_size=2, shuffle_buffer=2, mix=2
        )
        batches = _all(stream, 2)  # one pass: 2 shards of 3 samples per worker
        seen[rank] = [k for b in batches for k in b["keys"]]
        for b in batches:
            assert b["pixel_values"].shape == (3, 3, 8, 8) and b["input_ids"].shape[0] == 3
            for key, caption in zip(b["keys"], b["captions"]):
                assert caption in (f"one {key}", f"two {key}")  # a kept caption, never the alt-text
            assert b["caption_ids"].tolist() == [caption_id(c) for c in b["captions"]]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(f"{s}{i:02d}" for s in range(4) for i in range(3))
    # over several passes both captions of a sample get drawn
    stream = ImageTextStream(shards[:1], TRANSFORM, tokenize, 3, shuffle_buffer=0)
    drawn = {c for b in _all(stream, 12) for c in b["captions"] if c.endswith("000")}
    assert drawn == {"one 000", "two 000"}


def test_fewer_shards_than_workers_split_the_samples(shards, tokenize):
    keys = []
    for rank in range(3):
        stream = ImageTextStream(
            shards[:1], TRANSFORM, tokenize, 1, rank=rank, world_size=3, shuffle_buffer=0
        )
        keys.append(_all(stream, 1)[0]["keys"][0])
    assert sorted(keys) == ["000", "001", "002"]


def test_a_resumed_stream_continues_where_the_consumed_batches_ended(shards, tokenize):
    """Two DataLoader worker processes, resumed after an odd number of batches (so the
    round-robin over workers must be rotated) and in the middle of a shuffle group."""

    def stream(cursor=None) -> ImageTextStream:
        return ImageTextStream(
            shards, TRANSFORM, tokenize, 2, seed=3, loader_workers=2, shuffle_buffer=2, mix=2, cursor=cursor
        )

    straight = _all(stream(), 9)
    cursor = StreamCursor()
    for batch in straight[:5]:
        cursor.advance(batch)
    resumed = _all(stream(cursor.state()), 4)
    assert [b["keys"] for b in resumed] == [b["keys"] for b in straight[5:]]
    assert [b["captions"] for b in resumed] == [b["captions"] for b in straight[5:]]
    for a, b in zip(resumed, straight[5:]):
        torch.testing.assert_close(a["pixel_values"], b["pixel_values"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="same shards, --workers and --loader-workers"):
        ImageTextStream(shards, TRANSFORM, tokenize, 2, loader_workers=1, cursor=cursor.state())
    # a checkpoint holds one state per Ray Train worker: another worker count cannot resume it
    assert StreamCursor.of_worker([{"a": 0}, {"b": 1}], 1, 2) == {"b": 1}
    with pytest.raises(
        ValueError, match="written by 2 Ray Train workers, this run has 3: resume with --workers 2"
    ):
        StreamCursor.of_worker([{}, {}], 0, 3)


def test_eval_batches_take_each_sample_once_in_order(shards, tokenize):
    batches = list(eval_batches(shards, TRANSFORM, tokenize, batch_size=5, max_samples=7))
    assert [len(b["keys"]) for b in batches] == [5, 2]
    assert [k for b in batches for k in b["keys"]] == ["000", "001", "002", "100", "101", "102", "200"]
    assert batches[0]["captions"][0] == "one 000"  # the best kept caption


def test_transforms_match_the_image_processors_and_crops_repeat():
    from transformers import BlipImageProcessorPil, CLIPImageProcessorPil

    image = noise_image(50, 30, seed=4)
    clip = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    blip = BlipImageProcessorPil(size={"height": 16, "width": 16})
    for processor in (clip, blip):
        transform = ImageTransform.from_processor(processor)
        ours = transform.eval(image)
        assert ours.dtype == torch.uint8  # normalised on the device, by the training loop
        ours = transform.normalize(ours[None])[0]
        theirs = processor(images=[image], return_tensors="pt")["pixel_values"][0]
        assert ours.shape == theirs.shape == (3, 16, 16)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)  # the same resize, crop, normalisation
    transform = ImageTransform.from_processor(clip, scale=(0.5, 1.0))
    a = transform.train(image, random.Random(1))
    assert torch.equal(a, transform.train(image, random.Random(1)))
    assert not torch.equal(a, transform.train(image, random.Random(2)))
