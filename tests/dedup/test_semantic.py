"""SemDeDup over image embeddings in the layout ``output.write_embeddings: true`` writes:
OUT/embeddings/NAME.parquet per shard with key, shard, image_embedding and text_embedding.

This test writes them itself, so that which images are copies is known, from the run's own input
images: each image in grey at 16 x 16, centred (a real, if plain, image feature under which
resized and re-encoded copies stay close and different drawings do not).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate.config import DecodeConfig
from curate.dedup.results import DedupError
from curate.dedup.run import run_dedup
from curate.explore import run_query
from curate.io.reader import iter_samples
from curate.stages.decode import decode_image
from tests.dedup.conftest import copy_run
from tests.dedup.images import found_pairs, precision_recall, true_pairs


def feature(image: bytes) -> np.ndarray:
    pixels, _, _ = decode_image(image, DecodeConfig())
    grey = np.asarray(Image.fromarray(pixels).convert("L").resize((16, 16), Image.Resampling.BOX), np.float32)
    return (grey - grey.mean()).ravel()


def write_embeddings(out, inputs, dtype=None) -> None:
    dtype = dtype or pa.float16()
    (out / "embeddings").mkdir()
    for shard in inputs:
        rows = list(iter_samples(str(shard)))
        vectors = [feature(r["image"]) for r in rows]
        table = pa.table(
            {
                "key": [r["key"] for r in rows],
                "shard": [shard.stem] * len(rows),
                "image_embedding": pa.array([v.tolist() for v in vectors], pa.list_(dtype)),
                "text_embedding": pa.array([np.zeros(4).tolist() for _ in rows], pa.list_(pa.float32())),
            }
        )
        pq.write_table(table, out / "embeddings" / f"{shard.stem}.parquet")


def test_semantic_dedup_groups_the_copies(dedup_run, tmp_path, capsys):
    out = copy_run(dedup_run.out, tmp_path / "run")
    write_embeddings(out, dedup_run.inputs)
    summary = run_dedup(str(out), "semantic")
    assert summary.samples == len(dedup_run.truth)
    assert summary.details["clusters"] == 13  # ceil(sqrt(150))
    rows = run_query(
        out, "SELECT shard, key, \"group\" FROM duplicates WHERE method = 'semantic'"
    ).to_pylist()
    groups: dict[str, list[str]] = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(f"{r['shard']}/{r['key']}")
    group_of = {m: g for g, ms in groups.items() for m in ms}
    by_key = {s.key: s for s in dedup_run.truth if s.kind == "original"}
    copies = [s for s in dedup_run.truth if s.kind != "original"]
    paired = [s for s in copies if group_of.get(s.id) and group_of[s.id] == group_of.get(by_key[s.origin].id)]
    precision, recall = precision_recall(found_pairs(groups), true_pairs(dedup_run.truth))
    with capsys.disabled():
        print(
            f"\nsemantic (cosine >= {summary.threshold}, {summary.details['clusters']} clusters) on "
            f"{summary.samples} samples: copies paired {len(paired)}/{len(copies)}; pair precision "
            f"{precision:.3f}, pair recall {recall:.3f}"
        )
    assert len(paired) / len(copies) >= 0.8
    assert precision >= 0.9
    # the same embeddings as float32 give the same groups
    (out / "embeddings").rename(tmp_path / "f16")
    write_embeddings(out, dedup_run.inputs, pa.float32())
    again = run_dedup(str(out), "semantic")
    assert not again.up_to_date  # the embeddings changed
    rows32 = run_query(
        out, "SELECT shard, key, \"group\" FROM duplicates WHERE method = 'semantic'"
    ).to_pylist()
    assert {(r["shard"], r["key"]) for r in rows32} == {(r["shard"], r["key"]) for r in rows}


def test_semantic_needs_an_embedding_file_per_shard(dedup_run, tmp_path):
    out = copy_run(dedup_run.out, tmp_path / "run")
    write_embeddings(out, dedup_run.inputs[:2])
    with pytest.raises(DedupError, match=r"1 shard\(s\) .* have samples but no embeddings \(first: 00002\)"):
        run_dedup(str(out), "semantic")
    with pytest.raises(DedupError, match="for --method semantic only"):
        run_dedup(str(out), "phash", clusters=3)
