"""``python -m train.pretrain_clip``: a Hugging Face CLIPModel pre-trained on a curated run's shards.

The model is the test suite's tiny random CLIP (``tiny_models``), built from a config and
saved with ``save_pretrained``; the data a real curation run's ``OUT/shards`` (``curated_run``);
the loss's gather is real torch.distributed over two Ray Train workers (gloo).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from train.lib.launch import launch, mean_over_workers, prepare_model, worker_info
from train.lib.losses import ClipLoss, ITCLoss
from train.lib.models import clip_config, load_tokenizer


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _features(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.arange(8)
    ids[6] = ids[1]  # a caption shared by a row of each worker: positives across workers
    return {"image": torch.randn(8, 6, generator=gen), "text": torch.randn(8, 5, generator=gen), "ids": ids}


class Towers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.image = torch.nn.Linear(6, 4)
        self.text = torch.nn.Linear(5, 4)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.normalize(self.image(image), dim=-1), F.normalize(self.text(text), dim=-1)


def _loss_and_grads(config: dict) -> dict:
    """This worker's rows of the global batch through DDP and ClipLoss: the global loss and the
    gradients DDP leaves (rank 0's return value comes back from Ray Train)."""
    info = worker_info("cpu")
    bare = Towers()
    model = prepare_model(bare, info)
    f = _features()
    n = 8 // info.world_size
    rows = slice(info.rank * n, (info.rank + 1) * n)
    image, text = model(f["image"][rows], f["text"][rows])
    loss = ClipLoss()(image, text, bare.logit_scale, f["ids"][rows])
    loss.backward()
    return {
        "loss": mean_over_workers({"loss": float(loss)}, info.device)["loss"],
        "grads": {k: p.grad.flatten().tolist() for k, p in bare.named_parameters()},
        "world_size": info.world_size,
    }


def test_clip_loss_on_one_worker_is_itc_with_the_caption_mask():
    f = _features()
    image, text = Towers()(f["image"], f["text"])
    scale = torch.tensor(math.log(10.0))
    mask = f["ids"][:, None] == f["ids"][None, :]
    torch.testing.assert_close(ClipLoss()(image, text, scale, f["ids"]), ITCLoss()(image, text, scale, mask))
    torch.testing.assert_close(ClipLoss()(image, text, scale), ITCLoss()(image, text, scale))
    # rows 1 and 6 share a caption: each is the other's positive, not its negative
    assert float(ClipLoss()(image, text, scale, f["ids"])) != pytest.approx(
        float(ClipLoss()(image, text, scale))
    )


def test_gathered_loss_and_gradients_equal_one_process_on_the_global_batch(tmp_path, ray_train_local):
    import sys

    import ray.cloudpickle

    # pytest imports this file as a top-level module the Ray workers cannot import: send it along
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    single = _loss_and_grads({})
    gathered = launch(_loss_and_grads, {}, workers=2, use_gpu=False, storage_path=tmp_path, name="gather")
    assert gathered["world_size"] == 2 and single["world_size"] == 1
    assert gathered["loss"] == pytest.approx(single["loss"], rel=1e-6)
    for name, grad in single["grads"].items():
        # DDP's average of the two workers' gradients: the gradient of the whole batch's loss
        assert gathered["grads"][name] == pytest.approx(grad, rel=1e-5, abs=1e-7), name
    # without the gather each worker would see only its own 4 negatives: a different loss
    f = _features()
    image, text = Towers()(f["image"][:4], f["text"][:4])
    assert float(ClipLoss()(image, text, torch.tensor(math.log(10.0)), f["ids"][:4])) != pytest.approx(
        single["loss"], rel=1e-3
    )


def _run(curated_run: Path, tiny_models, out: Path, *extra: str) -> dict:
    from train.pretrain_clip import main

    args = ["--init-from", str(tiny_models["clip"]), "--train", str(curated_run / "shards")]
    args += ["--batch-size", "8", "--lr", "1e-3", "--warmup-steps", "2", "--loader-workers", "0"]
    args += ["--run-dir", str(out / "run"), "--log-every", "100", "--threads", "1"]
    return main([*args, *extra])


def _lines(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_ends_on_the_weights_of_an_uninterrupted_run(curated_run, tiny_models, tmp_path):
    """Two DataLoader processes, checkpoints every 3 steps (so a resume starts mid-shuffle-group
    and mid round-robin); the run 'dies' after step 3 and is resumed to step 8."""
    common = ("--steps", "8", "--workers", "0", "--checkpoint-every", "3", "--keep-checkpoints", "5")
    common += ("--loader-workers", "2", "--shuffle-buffer", "3", "--mix-shards", "1")
    _run(curated_run, tiny_models, tmp_path / "a", *common, "--output", str(tmp_path / "a" / "model"))
    ckpts = tmp_path / "a" / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "step-00000003.pt",
        "step-00000006.pt",
        "step-00000008.pt",
    ]
    b = tmp_path / "b" / "run"
    (b / "checkpoints").mkdir(parents=True)
    (b / "checkpoints" / "step-00000003.pt").write_bytes((ckpts / "step-00000003.pt").read_bytes())
    _run(
        curated_run,
        tiny_models,
        tmp_path / "b",
        *common,
        "--output",
        str(tmp_path / "b" / "model"),
        "--resume",
    )
    a_w = load_file(str(tmp_path / "a" / "model" / "model.safetensors"))
    b_w = load_file(str(tmp_path / "b" / "model" / "model.safetensors"))
    assert a_w.keys() == b_w.keys() and all(torch.equal(a_w[k], b_w[k]) for k in a_w)
    assert [x["step"] for x in _lines(b)] == [4, 5, 6, 7, 8]
    assert [x["loss"] for x in _lines(b)] == [x["loss"] for x in _lines(tmp_path / "a" / "run")][3:]


def test_accumulated_micro_batches_train_like_one_batch(curated_run, tiny_models, tmp_path):
    """--accum-steps 2 (features cached, then recomputed per micro-batch against the rest) takes
    the same step as the whole batch at once: same samples, same negatives, same gradient."""
    out = {}
    for accum in (1, 2):
        d = tmp_path / f"accum{accum}"
        _run(curated_run, tiny_models, d, "--steps", "2", "--workers", "0", "--accum-steps", str(accum),
             "--output", str(d / "model"))  # fmt: skip
        out[accum] = (load_file(str(d / "model" / "model.safetensors")), _lines(d / "run"))
    (w1, l1), (w2, l2) = out[1], out[2]
    assert [x["loss"] for x in l1] == pytest.approx([x["loss"] for x in l2], rel=1e-5)
    # float32 sums in another order: AdamW's normalised step magnifies a 1e-7 gradient
    # difference on a near-zero entry to ~1e-6 (CI saw 1.5e-6); a wrong step is off by ~lr = 1e-3
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5)
    base = load_file(str(tiny_models["clip"] / "model.safetensors"))
    assert any(not torch.equal(base[k], w1[k]) for k in w1)  # the step did change the weights


@pytest.mark.slow
def test_two_ray_train_workers_lower_the_loss_and_save_a_loadable_clip(
    curated_run, tiny_models, tmp_path, ray_train_local
):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    result = _run(
        curated_run, tiny_models, tmp_path, "--steps", "24", "--workers", "2", "--checkpoint-every", "12",
        "--eval", str(curated_run / "shards"), "--eval-every", "12", "--output", str(tmp_path / "model"),
    )  # fmt: skip
    lines = _lines(tmp_path / "run")
    train = [x for x in lines if x["split"] == "train"]
    assert [x["step"] for x in train] == list(range(1, 25))  # one line per step, rank 0 alone
    first, last = sum(x["loss"] for x in train[:2]) / 2, sum(x["loss"] for x in train[-4:]) / 4
    assert last < 0.8 * first, [x["loss"] for x in train]
    evals = [x for x in lines if x["split"] == "eval"]
    assert [x["step"] for x in evals] == [12, 24] and evals[-1]["n"] == 16
    assert set(result["eval"]) >= {"i2t_r1", "i2t_r5", "t2i_r10", "n"}
    model = CLIPModel.from_pretrained(str(tmp_path / "model"), use_safetensors=True)
    assert (
        model.config.text_config.hidden_size
        == CLIPModel.from_pretrained(str(tiny_models["clip"])).config.text_config.hidden_size
    )
    AutoTokenizer.from_pretrained(str(tmp_path / "model"))
    AutoImageProcessor.from_pretrained(str(tmp_path / "model"))


def test_bench_mode_reports_rates_flops_and_mfu(curated_run, tiny_models, tmp_path):
    from train.pretrain_clip import main

    args = [
        "--bench",
        "--arch",
        str(tiny_models["clip"] / "config.json"),
        "--tokenizer",
        str(tiny_models["clip"]),
    ]
    args += ["--train", str(curated_run / "shards"), "--workers", "0", "--batch-size", "4", "--steps", "4"]
    args += ["--loader-workers", "1", "--bench-loader-batches", "3", "--peak-tflops", "0.1"]
    result = main([*args, "--run-dir", str(tmp_path / "run"), "--threads", "1"])["bench"]
    assert result["loader_samples_per_s"] > 0 and result["samples_per_s"] > 0 and result["timed_steps"] == 2
    assert result["flops_per_sample"] > 1e5  # two transformer towers forward and backward
    assert result["mfu"] == pytest.approx(result["achieved_tflops"] / 0.1, rel=1e-2)
    assert result["model_samples_per_s"] >= result["samples_per_s"] and result["model_mfu"] >= result["mfu"]
    assert json.loads((tmp_path / "run" / "bench.json").read_text())["bench"] == result
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_architectures_from_scratch_fit_their_tokenizer():
    tok = load_tokenizer("bytes")
    config = clip_config("vit-b-32", tok)
    assert (config.vision_config.patch_size, config.vision_config.hidden_size) == (32, 768)
    assert config.text_config.vocab_size == len(tok) and config.text_config.eos_token_id == tok.eos_token_id
    assert config.text_config.max_position_embeddings == 77 and config.projection_dim == 512
    with pytest.raises(FileNotFoundError, match="vit-b-99"):
        clip_config("vit-b-99", tok)
