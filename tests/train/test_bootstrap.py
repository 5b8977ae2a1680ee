"""The bootstrap loop's own parts: the bootstrapped set's shards, the round table, step skipping."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from curate.io.files import tar_bytes, write_atomic
from curate.io.writer import tar_members
from train import bootstrap
from train.lib.bootstrap import markdown_table, paired_bootstrap, write_pairs
from train.lib.data import iter_pairs


def png_bytes(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 20), colour).save(buf, format="PNG")
    return buf.getvalue()


def curated_row(key: str, colour: tuple[int, int, int], kept: list[tuple[str, str]], dropped=()) -> dict:
    """A kept sample as the policy hands it to the writer: every candidate, the kept ones in order."""
    candidates = [
        {"text": t, "source": s, "itm_score": 0.9, "clip_score": None, "kept": True} for t, s in kept
    ]
    candidates += [
        {"text": t, "source": s, "itm_score": 0.1, "clip_score": None, "kept": False} for t, s in dropped
    ]
    return {
        "key": key, "shard": "00000", "caption": kept[0][0], "captions": [t for t, _ in kept],
        "candidates": candidates, "alt_text": "alt " + key, "url": None, "width": 24, "height": 20,
        "image_sha256": None, "image_ext": "png", "image": png_bytes(colour),
    }  # fmt: skip


def write_curated(path: Path) -> Path:
    rows = [
        curated_row("a1", (200, 0, 0), [("A red circle.", "synthetic"), ("red circle", "alt")]),
        curated_row("a2", (0, 200, 0), [("green", "alt")], dropped=[("a cat.", "synthetic")]),
        curated_row("a3", (0, 0, 200), [("A blue box.", "synthetic")], dropped=[("IMG_0001", "alt")]),
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, tar_bytes([m for r in rows for m in tar_members(r)]))
    return path


def test_write_pairs_makes_one_sample_per_kept_text_of_a_source(tmp_path: Path) -> None:
    curated = write_curated(tmp_path / "capfilt" / "shards" / "00000.tar")
    out = tmp_path / "train"
    alt = write_pairs([str(curated)], "alt", out, "alt")
    syn = write_pairs([str(curated)], "synthetic", out, "synthetic")
    assert alt == {"samples": 2, "shards": 1, "images": 2}
    assert syn == {"samples": 2, "shards": 1, "images": 2}
    pairs = {p.key: p for p in iter_pairs(sorted(str(p) for p in out.glob("*.tar")), on_error="raise")}
    assert {k: p.caption for k, p in pairs.items()} == {
        "a1_alt": "red circle",
        "a2_alt": "green",
        "a1_synthetic": "A red circle.",
        "a3_synthetic": "A blue box.",
    }  # the dropped texts ("a cat.", "IMG_0001") are in no pair
    assert pairs["a1_alt"].meta == {
        "key": "a1_alt", "image_key": "a1", "source": "alt", "caption": "red circle", "shard": "00000",
    }  # fmt: skip
    assert np.asarray(pairs["a1_alt"].image).tolist() == np.asarray(pairs["a1_synthetic"].image).tolist()
    before = (out / "alt-00000.tar").read_bytes()
    write_pairs([str(curated)], "alt", out, "alt")  # same input: byte-identical, not rewritten
    assert (out / "alt-00000.tar").read_bytes() == before
    with tarfile.open(out / "alt-00000.tar") as tar:
        assert tar.getnames() == [f"a1_alt.{e}" for e in ("png", "txt", "json")] + [
            f"a2_alt.{e}" for e in ("png", "txt", "json")
        ]
    with pytest.raises(ValueError, match="source must be one of"):
        write_pairs([str(curated)], "kale", out, "kale")


def test_pairs_step_links_the_human_split_counts_and_is_skipped_once_done(tmp_path: Path) -> None:
    human = write_curated(tmp_path / "tux" / "train" / "00000.tar")  # any shards with KEY.txt do
    curated = tmp_path / "round1" / "capfilt"
    write_curated(curated / "shards" / "00000.tar")
    args = bootstrap.build_parser().parse_args(["--tuxpaint", str(tmp_path / "tux"), "--keep-fraction", "1"])
    train_dir = tmp_path / "round1" / "train"
    stats = bootstrap.pairs(args, curated, train_dir)
    assert stats == {"human": 3, "alt": 2, "synthetic": 2, "web_images": 3}
    assert (train_dir / "human-00000.tar").resolve() == human.resolve()
    assert [Path(p).name for p in bootstrap.train_shards(train_dir, ["synthetic"])] == [
        "human-00000.tar",
        "synthetic-00000.tar",
    ]
    assert len(bootstrap.train_shards(train_dir, ["alt", "synthetic"])) == 3
    (train_dir / "alt-00000.tar").unlink()
    assert bootstrap.pairs(args, curated, train_dir) == stats  # done: the recorded figures, nothing redone
    assert not (train_dir / "alt-00000.tar").exists()


def test_paired_bootstrap_is_the_mean_difference_with_its_spread() -> None:
    a = [0.1, 0.2, 0.3, 0.4]
    same = paired_bootstrap(a, a)
    assert same == {"diff": 0.0, "std": 0.0, "p_le_0": 1.0}
    rng = np.random.default_rng(1)
    base = rng.random(400)
    better = paired_bootstrap(base, base + 0.05 + rng.normal(0, 0.2, 400))
    assert better["diff"] == pytest.approx(0.05, abs=0.03)
    assert better["std"] == pytest.approx(0.2 / np.sqrt(400), rel=0.2)  # the standard error of the mean
    assert better["p_le_0"] < 0.05
    with pytest.raises(ValueError):
        paired_bootstrap([], [])


def test_markdown_table_has_a_line_per_round_and_dashes_for_missing_figures() -> None:
    rows = [
        {"round": 0, "filter": "f0", "captioner": "c0", "tux_itm_auc": 0.96, "cider": 0.113},
        {"round": 1, "filter": "f1", "captioner": "c1", "train_alt": 310, "heldout_itm_auc": 0.8123,
         "cider": float("nan"), "cider_diff": {"diff": 0.0125, "std": 0.004, "p_le_0": 0.0}},
    ]  # fmt: skip
    lines = markdown_table(rows).splitlines()
    assert len(lines) == 4 and lines[0].startswith("| round | filter | captioner |")
    cells = [c.strip() for c in lines[3].strip("|").split("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    row = dict(zip(header, cells))
    assert row["web pairs kept"] == "310" and row["ITM AUC held-out"] == "0.812"
    assert row["CIDEr-D tuxpaint test"] == "-" and row["CIDEr-D vs round 0 (± s.e.)"] == "+0.013 ± 0.004"
    assert dict(zip(header, [c.strip() for c in lines[2].strip("|").split("|")]))["ITM AUC held-out"] == "-"


def test_a_finished_capfilt_step_is_not_rerun(tmp_path: Path) -> None:
    out = tmp_path / "capfilt"
    out.mkdir()
    (out / "_bootstrap_done.json").write_text(json.dumps({"status": {"kept": 5}, "seconds": 1.0}))
    args = bootstrap.build_parser().parse_args(["--pipeline", str(tmp_path / "no-such-pipeline.yaml")])
    # a rerun would fail on the missing pipeline file; the recorded counts come back instead
    assert bootstrap.capfilt(args, [], out, tmp_path / "f", tmp_path / "c") == {
        "status": {"kept": 5},
        "seconds": 1.0,
    }


def test_the_filter_step_pre_trains_on_the_bootstrapped_set_then_fine_tunes_on_human_pairs(
    tmp_path: Path, monkeypatch
) -> None:
    write_curated(tmp_path / "tux" / "train" / "00000.tar")
    curated = tmp_path / "round1" / "capfilt"
    write_curated(curated / "shards" / "00000.tar")
    args = bootstrap.build_parser().parse_args(["--tuxpaint", str(tmp_path / "tux"), "--keep-fraction", "1"])
    train_dir = tmp_path / "round1" / "train"
    bootstrap.pairs(args, curated, train_dir)
    commands: list[list[str]] = []

    def fake_run(cmd: list[str]) -> None:  # records the command and leaves the model it would save
        commands.append(cmd)
        out = Path(cmd[cmd.index("--output") + 1])
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(b"")

    monkeypatch.setattr(bootstrap, "run", fake_run)
    out, runs = tmp_path / "round1" / "filter", tmp_path / "round1" / "runs" / "filter"
    bootstrap.train_filter(args, train_dir, out, runs)
    pre, fine = commands

    def opt(cmd: list[str], name: str) -> str:
        return cmd[cmd.index(name) + 1]

    # stage 1: every pair of the bootstrapped set, no fusion layers, not calibrated
    assert sorted(p.name for p in Path(opt(pre, "--train")).iterdir()) == [
        "alt-00000.tar", "human-00000.tar", "synthetic-00000.tar",
    ]  # fmt: skip
    assert opt(pre, "--output") == str(out.parent / "filter-pre") and "--no-calibrate" in pre
    assert opt(pre, "--num-layers") == "0"
    # stage 2: from stage 1, on the human pairs alone, the hubness banks from the whole set
    assert [p.name for p in Path(opt(fine, "--train")).iterdir()] == ["human-00000.tar"]
    assert opt(fine, "--init-from") == str(out.parent / "filter-pre") and opt(fine, "--output") == str(out)
    assert opt(fine, "--epochs") == "4" and opt(fine, "--weight-decay") == "0"
    assert opt(fine, "--hub-k") == "10" and opt(fine, "--hub-shards") == opt(pre, "--train")
    bootstrap.train_filter(args, train_dir, out, runs)
    assert len(commands) == 2  # done: nothing reruns

    # --filter-finetune-epochs 0: one stage on the bootstrapped set, the banks from it too
    commands.clear()
    one = bootstrap.build_parser().parse_args(
        ["--tuxpaint", str(tmp_path / "tux"), "--filter-finetune-epochs", "0"]
    )
    bootstrap.train_filter(one, train_dir, tmp_path / "one" / "filter", runs)
    [cmd] = commands
    assert opt(cmd, "--output") == str(tmp_path / "one" / "filter") and "--init-from" not in cmd
    assert opt(cmd, "--hub-shards") == opt(pre, "--train")


def test_keep_fraction_takes_the_best_scored_web_texts_of_every_candidate(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from train.lib.bootstrap import score_threshold

    write_curated(tmp_path / "tux" / "train" / "00000.tar")
    curated = tmp_path / "round2" / "capfilt"
    rows = [  # what CapFilt kept at its threshold (0.2), with the scores it gave
        curated_row("a1", (200, 0, 0), [("A red circle.", "synthetic"), ("red circle", "alt")]),
        curated_row("a2", (0, 200, 0), [("green", "alt")], dropped=[("a cat.", "synthetic")]),
        curated_row("a3", (0, 0, 200), [("A blue box.", "synthetic")], dropped=[("IMG_0001", "alt")]),
    ]
    scores = {"A red circle.": 0.9, "red circle": 0.6, "green": 0.3, "A blue box.": 0.8}
    for row in rows:
        for c in row["candidates"]:
            c["itm_score"] = scores.get(c["text"], 0.1)
    (curated / "shards").mkdir(parents=True)
    write_atomic(curated / "shards" / "00000.tar", tar_bytes([m for r in rows for m in tar_members(r)]))
    (curated / "samples").mkdir()
    pq.write_table(
        pa.table({"candidates": [r["candidates"] for r in rows]}), curated / "samples" / "00000.parquet"
    )
    # six texts scored 0.9 0.8 0.6 0.3 0.1 0.1: the best half reach 0.6
    assert score_threshold(curated / "samples", 0.5) == pytest.approx(0.6)
    assert score_threshold(curated / "samples", 1.0) == pytest.approx(0.1)
    with pytest.raises(ValueError, match=r"kept fraction is in \(0, 1\]"):
        score_threshold(curated / "samples", 0)
    with pytest.raises(FileNotFoundError, match=r"no samples/.*nowhere"):
        score_threshold(tmp_path / "nowhere", 0.5)

    def run(fraction: str, name: str) -> dict:
        argv = ["--tuxpaint", str(tmp_path / "tux"), "--keep-fraction", fraction]
        return bootstrap.pairs(bootstrap.build_parser().parse_args(argv), curated, tmp_path / name)

    half = run("0.5", "half")
    assert half == {"human": 3, "min_itm_score": 0.6, "alt": 1, "synthetic": 2, "web_images": 2}
    got = iter_pairs(sorted(str(p) for p in (tmp_path / "half").glob("[as]*.tar")), on_error="raise")
    assert {p.key: p.caption for p in got} == {
        "a1_alt": "red circle",
        "a1_synthetic": "A red circle.",
        "a3_synthetic": "A blue box.",
    }  # "green" (0.3) was kept by CapFilt but is not among the best half
    # a fraction whose threshold falls below CapFilt's keeps what CapFilt kept
    assert run("0.9", "most") == {"human": 3, "min_itm_score": 0.2, "alt": 2, "synthetic": 2, "web_images": 3}
