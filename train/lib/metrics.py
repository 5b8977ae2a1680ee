"""Retrieval and matching metrics without sklearn (ROC-AUC, recall@K both ways) and the metrics log."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from curate.progress import Progress


def roc_auc(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """Area under the ROC curve: P(score of a random positive > a random negative), ties count 1/2.

    Mann-Whitney U with average ranks, so it is exact for any number of ties.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC-AUC needs at least one positive and one negative")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1  # average 1-based rank of the tie group
        i = j + 1
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def recall_at_k(
    sim: torch.Tensor | np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    positive_mask: torch.Tensor | np.ndarray | None = None,
) -> dict[str, float]:
    """Recall@K for image->text (rows) and text->image (columns) of a square similarity matrix.

    Pair i is image i with text i; with ``positive_mask`` any True entry is also a hit
    (a duplicate caption retrieved for either image is right). Keys: ``i2t_r1``, ``t2i_r5``, ...
    """
    sim = torch.as_tensor(sim, dtype=torch.float64)
    n = sim.shape[0]
    if sim.shape != (n, n):
        raise ValueError(f"recall_at_k needs a square matrix, got {tuple(sim.shape)}")
    pos = torch.eye(n, dtype=torch.bool)
    if positive_mask is not None:
        pos = pos | torch.as_tensor(positive_mask, dtype=torch.bool)
    out: dict[str, float] = {}
    for name, m, p in (("i2t", sim, pos), ("t2i", sim.t(), pos.t())):
        # rank of the best-scored positive: how many entries score strictly higher than it
        best_pos = m.masked_fill(~p, float("-inf")).max(1).values
        rank = (m > best_pos[:, None]).sum(1)
        for k in ks:
            out[f"{name}_r{k}"] = float((rank < k).double().mean())
    return out


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class MetricsLogger:
    """One JSON line per (index, split), and the console through the project's progress
    display (curate.progress): a progress line of steps done, rate, the latest loss and ETA,
    redrawn on a terminal or printed every few seconds in a log, and a line of its own per
    epoch, evaluation or echoed step. Silent when not enabled (rank > 0).

    A JSON line is ``{unit: index, "split", "time", **metrics}``; ``unit`` is ``epoch`` for
    the epoch-based scripts and ``step`` for the step-based ones. ``steps`` is the loop's
    total of optimizer steps, for the ETA; epoch-based scripts call :meth:`step` per batch.
    """

    def __init__(
        self,
        path: str | Path | None,
        enabled: bool = True,
        unit: str = "epoch",
        steps: int | None = None,
        label: str = "train",
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.enabled = enabled
        self.unit = unit
        self.progress = Progress(label, total=steps, unit="steps", stream=sys.stdout, enabled=enabled)
        if self.enabled and self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def step(self, n: int = 1, **values: float) -> None:
        """``n`` optimizer steps done; ``values`` (a loss) are shown as the latest."""
        self.progress.counts.update({k: float(v) for k, v in values.items()})  # the latest, not a sum
        self.progress.update(n)

    def log(self, index: int, split: str, metrics: Mapping[str, Any], echo: bool = True) -> None:
        """Append the line; ``echo=False`` writes the JSON line without the console line."""
        if not self.enabled:
            return
        clean = {
            k: (float(v) if isinstance(v, torch.Tensor | np.floating) else v) for k, v in metrics.items()
        }
        if self.unit == "step" and split == "train":  # a step-based loop logs every step
            shown = {k: v for k, v in clean.items() if k in ("loss", "lr") and isinstance(v, float)}
            self.step(max(0, index - int(self.progress.done)), **shown)
        if echo:
            text = " ".join(f"{k} {_format(v)}" for k, v in clean.items())
            self.progress.note(f"{self.unit} {index} {split} | {text}")
        if self.path is not None:
            record = {self.unit: index, "split": split, "time": round(time.time(), 3), **clean}
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.progress.close()
