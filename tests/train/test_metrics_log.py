"""The training scripts' console: one progress display over the optimizer steps (rate, the
latest loss, ETA) and a line per epoch or evaluation, plus one JSON line per record."""

from __future__ import annotations

import json

from train.lib.metrics import MetricsLogger


def test_steps_show_as_one_progress_display_and_records_as_json(tmp_path, capsys, monkeypatch):
    clock = iter(range(1000, 2000))  # one second per clock read: every update is due
    monkeypatch.setattr("curate.progress.time.monotonic", lambda: float(next(clock)))
    logger = MetricsLogger(tmp_path / "metrics.jsonl", steps=4)
    logger.progress.every_s = 0  # a log, not a terminal: a line at each update here
    for loss in (2.0, 1.5):
        logger.step(loss=loss)
    logger.log(1, "train", {"train_loss": 1.75, "lr": 0.001})
    logger.log(1, "val", {"loss": 1.9})
    logger.close()
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("train: 1 of 4 steps | ") and "loss 2 |" in out[0] and "ETA" in out[0]
    assert any(line.startswith("train: 2 of 4 steps | ") and "loss 1.5 |" in line for line in out)
    assert "epoch 1 train | train_loss 1.75 lr 0.001" in out
    assert "epoch 1 val | loss 1.9" in out
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["split"]) for r in records] == [(1, "train"), (1, "val")]


def test_a_step_based_loop_moves_the_display_by_its_step_index(tmp_path, capsys):
    logger = MetricsLogger(tmp_path / "m.jsonl", unit="step", steps=10)
    logger.log(5, "train", {"loss": 0.5}, echo=False)
    assert logger.progress.done == 5 and logger.progress.counts == {"loss": 0.5}
    logger.log(6, "train", {"loss": 0.25, "lr": 0.1})
    assert logger.progress.done == 6
    assert "step 6 train | loss 0.25 lr 0.1" in capsys.readouterr().out


def test_other_ranks_print_and_write_nothing(tmp_path, capsys):
    logger = MetricsLogger(tmp_path / "m.jsonl", enabled=False, steps=3)
    logger.step(loss=1.0)
    logger.log(1, "train", {"loss": 1.0})
    logger.close()
    assert capsys.readouterr().out == "" and not (tmp_path / "m.jsonl").exists()
