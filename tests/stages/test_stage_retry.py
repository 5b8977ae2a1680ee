"""A model that raises on one batch: the stage retries sample by sample.

The failing model is a stand-in defined here because no real model fails on demand;
the retry logic under test is the production ``_ModelStage``.
"""

from __future__ import annotations

import pytest

from curate.schema import ROW_SAMPLE, STATUS_ERROR, STATUS_PENDING, empty_row
from curate.stages.models import _ModelStage
from curate.stages.rows import to_rows, to_table


class PoisonSensitive(_ModelStage):
    name = "poison-model"

    def __init__(self, error_policy: str = "capture") -> None:
        super().__init__(error_policy)
        self.calls: list[int] = []

    def process(self, rows: list[dict]) -> None:
        self.calls.append(len(rows))
        if any(r["alt_text"] == "poison" for r in rows):
            raise RuntimeError("CUDA error: device-side assert triggered")
        for r in rows:
            r["caption"] = "ok " + r["key"]


def _rows(texts: list[str]) -> list[dict]:
    out = []
    for i, t in enumerate(texts):
        r = empty_row()
        r.update(row_type=ROW_SAMPLE, key=f"k{i}", shard="s", seq=i, status=STATUS_PENDING, alt_text=t)
        out.append(r)
    return out


def test_poison_sample_does_not_take_its_neighbours_down():
    stage = PoisonSensitive()
    rows = to_rows(stage(to_table(_rows(["a", "poison", "b", "c"]))))
    assert stage.calls == [4, 1, 1, 1, 1]
    assert [r["status"] for r in rows] == [STATUS_PENDING, STATUS_ERROR, STATUS_PENDING, STATUS_PENDING]
    assert "poison-model: RuntimeError: CUDA error" in rows[1]["error"]
    assert [r["caption"] for r in rows if r["status"] == STATUS_PENDING] == ["ok k0", "ok k2", "ok k3"]


def test_error_policy_raise_reraises():
    with pytest.raises(RuntimeError, match="device-side"):
        PoisonSensitive(error_policy="raise")(to_table(_rows(["a", "poison"])))
