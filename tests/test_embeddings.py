"""``output.write_embeddings``: the ranker's own embeddings, written per shard by the workers with
the shard's atomic commit, in the layout ``curate dedup --method semantic`` reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.config import ConfigError, PolicyConfig, pipeline_from_dict
from curate.dedup.run import run_dedup
from curate.io.reader import ShardRef, shard_refs
from curate.io.writer import EMBEDDINGS_DIR, RunWriter
from curate.pipeline import run_pipeline
from curate.schema import ROW_SAMPLE, ROW_SHARD_END, STATUS_PENDING, embeddings_schema, empty_row
from curate.stages.policy import apply_policy_rows
from tests.helpers import image_bytes, make_shard


def _config(models: dict[str, Path], dtype: str) -> dict:
    return {
        "name": "embeddings",
        "seed": 5,
        "captioner": {
            "model": str(models["captioner"]),
            "num_captions": 2,
            "max_new_tokens": 5,
            "resources": {"device": "cpu"},
        },
        "filter": {"model": str(models["itm"]), "resources": {"device": "cpu", "batch_size": 8}},
        "ranker": {"model": str(models["clip"]), "resources": {"device": "cpu", "batch_size": 8}},
        "policy": {"itm_threshold": 0.0, "top_k": 2},
        "read": {"resources": {"batch_size": 3}},
        "decode": {"min_side": 8},
        "output": {"write_embeddings": True, "embedding_dtype": dtype},
    }


@pytest.fixture
def inputs(tmp_path: Path) -> list[Path]:
    shards = []
    for s in range(2):
        samples = [
            {"key": f"{s}{i:03d}", "image": image_bytes(40, 30, seed=10 * s + i), "txt": f"alt text {s} {i}"}
            for i in range(5)
        ]
        samples.append({"key": f"{s}bad", "image": b"not an image", "txt": "undecodable"})
        shards.append(make_shard(tmp_path / "in" / f"{s:05d}.tar", samples))
    return shards


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_a_run_writes_one_embeddings_file_per_shard(ray_local, tiny_models, inputs, tmp_path, dtype):
    out = tmp_path / "out"
    run_pipeline(
        pipeline_from_dict(_config(tiny_models, dtype)), shard_refs([str(p) for p in inputs]), str(out)
    )
    files = sorted((out / EMBEDDINGS_DIR).glob("*.parquet"))
    assert [f.stem for f in files] == ["00000", "00001"]
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    for path in files:
        emb = pq.read_table(path)
        assert emb.schema.remove_metadata().equals(embeddings_schema(dtype))
        samples = {r["key"]: r for r in pq.read_table(out / "samples" / path.name).to_pylist()}
        # every sample the ranker scored, in the samples' order; the undecodable one never got there
        assert emb["key"].to_pylist() == [k for k in samples if samples[k]["status"] != "error"]
        assert set(emb["shard"].to_pylist()) == {path.stem}
        tol = 2e-3 if dtype == "float16" else 1e-5
        for row in emb.to_pylist():
            image = np.array(row["image_embedding"], np.float32)
            assert np.linalg.norm(image) == pytest.approx(1.0, abs=tol)
            sample = samples[row["key"]]
            # the embeddings are the very ones that scored the best caption
            text = np.array(row["text_embedding"], np.float32)
            best = next(c for c in sample["candidates"] if c["kept"] and c["text"] == sample["caption"])
            assert float(image @ text) == pytest.approx(best["clip_score"], abs=tol)

    # what the committed semantic dedup reads
    summary = run_dedup(str(out), "semantic")
    assert summary.samples == sum(pq.read_metadata(f).num_rows for f in files)


def _row(shard: str, seq: int, embedding: list[float] | None) -> dict:
    return {
        **empty_row(),
        "row_type": ROW_SAMPLE,
        "status": STATUS_PENDING,
        "shard": shard,
        "key": f"k{seq}",
        "seq": seq,
        "image_ext": "png",
        "image": image_bytes(seed=seq),
        "image_embedding": np.array(embedding, np.float32).tobytes() if embedding else None,
        "candidates": [
            {
                "text": f"caption {seq}",
                "source": "synthetic",
                "clip_score": 0.3,
                "text_embedding": np.array([0.0, 1.0], np.float32).tobytes(),
            }
        ],
    }


def test_embeddings_are_committed_with_the_shard(tmp_path):
    """Parts carry the embeddings; nothing is under a final name until the shard is complete, then
    the embeddings file is in place before the samples file (the done marker)."""
    out = tmp_path / "out"
    shard = ShardRef(url=str(tmp_path / "00000.tar"), name="00000")
    writer = RunWriter(str(out), [shard], embeddings="float32")
    policy = PolicyConfig()
    no_text = {**_row("00000", 3, [0.0, 1.0]), "candidates": []}  # dropped after the ranker saw it
    rows = apply_policy_rows([_row("00000", 2, [0.6, 0.8]), _row("00000", 0, None), no_text], policy)
    assert writer.add_rows(rows) == []
    assert not (out / EMBEDDINGS_DIR / "00000.parquet").exists()
    end = {**empty_row(), "row_type": ROW_SHARD_END, "shard": "00000", "key": "", "seq": -1}
    end.update(status=ROW_SHARD_END, shard_total=4)
    (meta,) = writer.add_rows([*apply_policy_rows([_row("00000", 1, [1.0, 0.0])], policy), end])
    assert meta["samples"] == 4
    emb = pq.read_table(out / EMBEDDINGS_DIR / "00000.parquet")
    assert emb["key"].to_pylist() == ["k1", "k2", "k3"]  # seq order, only the rows with an embedding
    assert emb["image_embedding"].to_pylist() == [[1.0, 0.0], pytest.approx([0.6, 0.8]), [0.0, 1.0]]
    assert emb["text_embedding"].to_pylist() == [[0.0, 1.0], [0.0, 1.0], None]  # k3 kept no caption
    assert emb.schema.field("image_embedding").type == pa.list_(pa.float32())
    assert not (out / "_parts" / "00000").exists()


def test_write_embeddings_needs_a_ranker():
    with pytest.raises(ConfigError, match=r"output\.write_embeddings"):
        pipeline_from_dict({"name": "p", "output": {"write_embeddings": True}})
    with pytest.raises(ConfigError, match="embedding_dtype"):
        pipeline_from_dict({"name": "p", "output": {"embedding_dtype": "int8"}})
