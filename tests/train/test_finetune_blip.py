"""``python -m train.finetune_blip``: the Hugging Face BLIP captioner and ITM filter fine-tuned on human
pairs plus a curated run's shards, then used by ``curate run`` as they are.

Models: the test suite's tiny random BLIPs (``tiny_models``: configs, ``save_pretrained``);
data: a human-captioned tar and a real curation run's ``OUT/shards`` (``curated_run``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import make_shard
from train.lib.losses import lm_targets


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def human(colour_samples, tmp_path_factory) -> Path:
    """Human-captioned pairs (``KEY.txt`` only, no ``KEY.json``), as tuxpaint's stamps."""
    return make_shard(tmp_path_factory.mktemp("human") / "00000.tar", colour_samples(7))


def _finetune(task: str, tiny_models, human: Path, curated_run: Path, out: Path, *extra: str) -> dict:
    from train.finetune_blip import main

    init = tiny_models["captioner" if task == "captioner" else "itm"]
    args = [
        "--task",
        task,
        "--init-from",
        str(init),
        "--train",
        str(human),
        "--train",
        str(curated_run / "shards"),
    ]
    args += ["--val", str(human), "--batch-size", "8", "--lr", "3e-3", "--warmup-steps", "2"]
    args += ["--loader-workers", "0", "--run-dir", str(out / "run"), "--log-every", "100", "--threads", "1"]
    return main([*args, *extra])


def _lines(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_lm_targets_start_with_bos_and_skip_prompt_and_padding():
    ids = torch.tensor([[101, 7, 8, 9, 102, 0], [101, 7, 8, 102, 0, 0]])
    mask = (ids != 0).long()
    decoder_ids, labels = lm_targets(ids, mask, bos_token_id=5, prompt_length=2)
    assert decoder_ids[:, 0].tolist() == [5, 5] and torch.equal(decoder_ids[:, 1:], ids[:, 1:])
    assert labels.tolist() == [[-100, -100, 8, 9, 102, -100], [-100, -100, 8, 102, -100, -100]]
    assert ids[0, 0] == 101  # the caller's ids are left alone


def test_filter_resume_ends_on_the_weights_of_an_uninterrupted_run(tiny_models, human, curated_run, tmp_path):
    """Hard negatives are sampled: each step reseeds, so the resumed steps draw the same ones."""
    common = ("--steps", "5", "--workers", "0", "--checkpoint-every", "2", "--keep-checkpoints", "5")
    _finetune(
        "filter",
        tiny_models,
        human,
        curated_run,
        tmp_path / "a",
        *common,
        "--output",
        str(tmp_path / "a" / "m"),
    )
    b = tmp_path / "b" / "run" / "checkpoints"
    b.mkdir(parents=True)
    (b / "step-00000002.pt").write_bytes(
        (tmp_path / "a" / "run" / "checkpoints" / "step-00000002.pt").read_bytes()
    )
    out_b = str(tmp_path / "b" / "m")
    _finetune(
        "filter", tiny_models, human, curated_run, tmp_path / "b", *common, "--output", out_b, "--resume"
    )
    a_w, b_w = (
        load_file(str(tmp_path / "a" / "m" / "model.safetensors")),
        load_file(out_b + "/model.safetensors"),
    )
    assert a_w.keys() == b_w.keys() and all(torch.equal(a_w[k], b_w[k]) for k in a_w)
    a_lines = [x for x in _lines(tmp_path / "a" / "run") if x["split"] == "train"]
    b_lines = [x for x in _lines(tmp_path / "b" / "run") if x["split"] == "train"]
    assert [(x["step"], x["itm"]) for x in b_lines] == [(x["step"], x["itm"]) for x in a_lines[2:]]


@pytest.mark.slow
def test_finetuned_captioner_and_filter_run_in_curate_unchanged(
    tiny_models, human, curated_run, tmp_path, ray_train_local
):
    from curate.cli import main as curate

    cap = _finetune(
        "captioner", tiny_models, human, curated_run, tmp_path / "cap", "--steps", "12", "--workers", "0",
        "--eval-every", "6", "--output", str(tmp_path / "cap" / "model"),
    )  # fmt: skip
    train = [x for x in _lines(tmp_path / "cap" / "run") if x["split"] == "train"]
    assert sum(x["loss"] for x in train[-3:]) / 3 < 0.9 * train[0]["loss"], [x["loss"] for x in train]
    assert {"loss", "cider"} <= set(cap["val"])
    # the filter on two Ray Train workers: DDP over ITC negatives gathered from both, ITM per worker
    itm = _finetune(
        "filter", tiny_models, human, curated_run, tmp_path / "itm", "--steps", "4", "--workers", "2",
        "--output", str(tmp_path / "itm" / "model"),
    )  # fmt: skip
    assert {"itm_auc", "itm_acc", "i2t_r1"} <= set(itm["val"]) and {"itc", "itm"} <= set(itm["train"])
    before = load_file(str(tiny_models["itm"] / "model.safetensors"))
    after = load_file(str(tmp_path / "itm" / "model" / "model.safetensors"))
    assert after.keys() == before.keys() and any(not torch.equal(before[k], after[k]) for k in before)

    pipeline = tmp_path / "capfilt.yaml"
    pipeline.write_text(
        "name: capfilt_finetuned\n"
        f"captioner: {{model: {tiny_models['captioner']}, num_captions: 2, max_new_tokens: 5, "
        "resources: {device: cpu}}\n"
        f"filter: {{model: {tiny_models['itm']}, resources: {{device: cpu}}}}\n"
        "policy: {itm_threshold: 0.0}\n"
        "decode: {min_side: 8}\n"
    )
    out = tmp_path / "curated"
    args = ["run", str(pipeline), "--input", str(human), "--output", str(out)]
    args += [
        "--set",
        f"captioner.model={tmp_path / 'cap' / 'model'}",
        "--set",
        f"filter.model={tmp_path / 'itm' / 'model'}",
    ]
    assert curate(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["models"]["captioner"]["model"] == str(tmp_path / "cap" / "model")
    assert manifest["models"]["filter"]["model"] == str(tmp_path / "itm" / "model")
    rows = pq.read_table(out / "samples").to_pylist()
    assert len(rows) == 8 and all(r["status"] == "kept" for r in rows)
    assert all(any(c["source"] == "synthetic" for c in r["candidates"]) for r in rows)
    assert all(0.0 <= c["itm_score"] <= 1.0 for r in rows for c in r["candidates"])
