"""Candidates travel between stages as typed Arrow structs, not as text to parse and re-dump."""

from __future__ import annotations

import pyarrow as pa

from curate.config import PolicyConfig
from curate.io.writer import output_row
from curate.schema import (
    CANDIDATE_TYPE,
    INTERNAL_CANDIDATE_TYPE,
    ROW_SAMPLE,
    SAMPLES_SCHEMA,
    SOURCE_ALT,
    SOURCE_SYNTHETIC,
    STATUS_DROPPED,
    STATUS_PENDING,
    empty_row,
)
from curate.stages.policy import apply_policy_rows
from curate.stages.rows import get_candidates, set_candidates, to_rows, to_table

# below 0.5, yet 0.5 once rounded to the output's float32
JUST_BELOW = 0.49999999999


def _row(candidates: list[dict]) -> dict:
    row = empty_row()
    row.update(row_type=ROW_SAMPLE, key="k", shard="s", seq=0, status=STATUS_PENDING)
    set_candidates(row, candidates)
    return row


def test_candidates_column_is_a_list_of_structs_and_round_trips():
    candidates = [
        {"text": "the alt", "source": SOURCE_ALT, "itm_score": JUST_BELOW, "clip_score": 0.1 + 0.2},
        {"text": "a caption", "source": SOURCE_SYNTHETIC, "itm_score": None, "clip_score": None},
    ]
    table = to_table([_row(candidates)])
    assert table.schema.field("candidates").type == pa.list_(INTERNAL_CANDIDATE_TYPE)
    (back,) = to_rows(table)
    # every field, scores to the last bit; kept is null until the policy decides, rule and
    # text_embedding unless a rule or a ranker writing embeddings set them
    unset = {"kept": None, "rule": None, "text_embedding": None}
    assert get_candidates(back) == [{**c, **unset} for c in candidates]


def test_policy_sees_the_scores_the_models_gave_not_the_outputs_float32():
    (row,) = to_rows(to_table([_row([{"text": "t", "source": SOURCE_ALT, "itm_score": JUST_BELOW}])]))
    (decided,) = apply_policy_rows([row], PolicyConfig(itm_threshold=0.5))
    assert decided["status"] == STATUS_DROPPED and decided["reason"] == "itm_below_threshold"
    # the output keeps its contract: float32 scores, kept false
    out = pa.Table.from_pylist([output_row(decided)], schema=SAMPLES_SCHEMA)
    assert out.schema.field("candidates").type == pa.list_(CANDIDATE_TYPE)
    (cand,) = out.column("candidates").to_pylist()[0]
    assert cand["kept"] is False and cand["itm_score"] == 0.5  # rounded only here
