from __future__ import annotations

import pyarrow as pa

from curate.config import PolicyConfig
from curate.schema import (
    INTERNAL_SCHEMA,
    ROW_SAMPLE,
    ROW_SHARD_END,
    SOURCE_ALT,
    SOURCE_SYNTHETIC,
    STATUS_DROPPED,
    STATUS_ERROR,
    STATUS_KEPT,
    STATUS_PENDING,
    empty_row,
)
from curate.stages.policy import apply_policy, apply_policy_rows, decide
from curate.stages.rows import get_candidates, set_candidates


def cand(
    text: str, itm: float | None = None, clip: float | None = None, *, source: str = SOURCE_SYNTHETIC
) -> dict:
    return {"text": text, "source": source, "itm_score": itm, "clip_score": clip}


def alt(text: str = "alt", itm: float | None = None, clip: float | None = None) -> dict:
    return cand(text, itm, clip, source=SOURCE_ALT)


def texts(kept: list[dict]) -> list[str]:
    return [c["text"] for c in kept]


def kept_flags(candidates: list[dict]) -> dict[str, bool]:
    return {c["text"]: c["kept"] for c in candidates}


# -- CapFilt --------------------------------------------------------------------------------------


def test_capfilt_drops_texts_below_the_itm_threshold():
    candidates = [alt("a", itm=0.4), cand("s1", itm=0.6), cand("s2", itm=0.9), cand("s3", itm=0.5)]
    kept, reason = decide(candidates, PolicyConfig(itm_threshold=0.5))
    assert reason is None
    assert texts(kept) == ["s2", "s1", "s3"]  # best ITM first when there is no CLIP score
    assert kept_flags(candidates) == {"a": False, "s1": True, "s2": True, "s3": True}


def test_capfilt_all_below_threshold_drops_the_sample():
    candidates = [alt("a", itm=0.1), cand("s1", itm=0.49)]
    kept, reason = decide(candidates, PolicyConfig(itm_threshold=0.5))
    assert kept == []
    assert reason == "itm_below_threshold"
    assert not any(c["kept"] for c in candidates)


def test_capfilt_unscored_text_does_not_pass_the_threshold():
    kept, reason = decide([alt("a", itm=None), cand("s", itm=0.8)], PolicyConfig(itm_threshold=0.5))
    assert texts(kept) == ["s"] and reason is None


# -- BLIP-2 ranking -------------------------------------------------------------------------------


def test_blip2_keeps_top_k_by_clip_and_alt_text_competes():
    candidates = [alt("a", clip=0.31), cand("s1", clip=0.20), cand("s2", clip=0.35), cand("s3", clip=0.10)]
    kept, reason = decide(candidates, PolicyConfig(top_k=2))
    assert reason is None
    assert texts(kept) == ["s2", "a"]
    assert kept_flags(candidates) == {"a": True, "s1": False, "s2": True, "s3": False}


def test_blip2_alt_text_can_win():
    kept, _ = decide([cand("s1", clip=0.2), alt("a", clip=0.3)], PolicyConfig(top_k=1))
    assert texts(kept) == ["a"]


def test_top_k_larger_than_pool_keeps_everything_sorted():
    kept, reason = decide(
        [cand("s1", clip=0.1), cand("s2", clip=0.3), alt("a", clip=0.2)], PolicyConfig(top_k=10)
    )
    assert reason is None
    assert texts(kept) == ["s2", "a", "s1"]


def test_no_policy_keeps_every_text():
    kept, reason = decide([alt("a"), cand("s1"), cand("s2")], PolicyConfig())
    assert reason is None
    assert sorted(texts(kept)) == ["a", "s1", "s2"]
    assert texts(kept)[0] == "a"  # nothing scored: the alt-text first


# -- combined --------------------------------------------------------------------------------------


def test_combined_filters_by_itm_then_ranks_by_clip():
    candidates = [
        alt("a", itm=0.2, clip=0.9),  # best CLIP but fails ITM
        cand("s1", itm=0.7, clip=0.3),
        cand("s2", itm=0.95, clip=0.1),
        cand("s3", itm=0.6, clip=0.5),
    ]
    kept, reason = decide(candidates, PolicyConfig(itm_threshold=0.5, top_k=2))
    assert reason is None
    assert texts(kept) == ["s3", "s1"]
    assert kept_flags(candidates) == {"a": False, "s1": True, "s2": False, "s3": True}


def test_min_clip_score():
    candidates = [alt("a", clip=0.1), cand("s1", clip=0.25), cand("s2", clip=0.3)]
    kept, reason = decide(candidates, PolicyConfig(min_clip_score=0.25))
    assert reason is None and texts(kept) == ["s2", "s1"]
    kept, reason = decide(candidates, PolicyConfig(min_clip_score=0.5, top_k=3))
    assert kept == [] and reason == "clip_below_threshold"


# -- alt-text handling ---------------------------------------------------------------------------


def test_keep_alt_text_false_never_keeps_the_alt_text():
    candidates = [alt("a", itm=0.99, clip=0.9), cand("s1", itm=0.8, clip=0.2)]
    kept, reason = decide(candidates, PolicyConfig(itm_threshold=0.5, top_k=2, keep_alt_text=False))
    assert reason is None
    assert texts(kept) == ["s1"]
    assert kept_flags(candidates) == {"a": False, "s1": True}


def test_keep_alt_text_false_with_only_alt_text_is_no_text():
    kept, reason = decide([alt("a", clip=0.9)], PolicyConfig(keep_alt_text=False, top_k=1))
    assert kept == [] and reason == "no_text"


def test_exact_ties_prefer_the_alt_text():
    for order in (
        [cand("s", itm=0.5, clip=0.3), alt("a", itm=0.5, clip=0.3)],
        [alt("a", 0.5, 0.3), cand("s", 0.5, 0.3)],
    ):
        kept, _ = decide(order, PolicyConfig(top_k=1))
        assert texts(kept) == ["a"]


def test_clip_tie_broken_by_itm_before_source():
    kept, _ = decide([alt("a", itm=0.4, clip=0.3), cand("s", itm=0.6, clip=0.3)], PolicyConfig(top_k=1))
    assert texts(kept) == ["s"]


def test_no_text_at_all():
    assert decide([], PolicyConfig()) == ([], "no_text")
    assert decide([], PolicyConfig(itm_threshold=0.5, top_k=3)) == ([], "no_text")


# -- rows -------------------------------------------------------------------------------------------


def pending(key: str, candidates: list[dict], seq: int = 0) -> dict:
    row = empty_row()
    row.update(
        row_type=ROW_SAMPLE, key=key, shard="s", seq=seq, status=STATUS_PENDING, image=b"IMG", pixels=b"PX"
    )
    set_candidates(row, candidates)
    return row


def test_apply_policy_rows_sets_status_caption_and_captions():
    policy = PolicyConfig(itm_threshold=0.5, top_k=2)
    kept_row = pending("k", [alt("alt text", 0.9, 0.2), cand("syn one", 0.8, 0.4), cand("syn two", 0.7, 0.1)])
    dropped_row = pending("d", [alt("bad", 0.1, 0.5)])
    empty = pending("n", [])
    error_row = pending("e", [])
    error_row.update(status=STATUS_ERROR, error="undecodable image")
    end = empty_row()
    end.update(row_type=ROW_SHARD_END, shard="s", key="", seq=-1, status=ROW_SHARD_END, shard_total=4)

    out = apply_policy_rows([kept_row, dropped_row, empty, error_row, end], policy)
    k, d, n, e, s = out

    assert k["status"] == STATUS_KEPT and k["reason"] is None
    assert k["caption"] == "syn one"
    assert k["captions"] == ["syn one", "alt text"]
    assert kept_flags(get_candidates(k)) == {"alt text": True, "syn one": True, "syn two": False}
    assert k["image"] == b"IMG"  # kept rows keep their bytes for the curated tar
    assert k["pixels"] is None

    assert d["status"] == STATUS_DROPPED and d["reason"] == "itm_below_threshold"
    assert d["caption"] is None and d["captions"] is None
    assert get_candidates(d)[0]["kept"] is False  # scores stay on record
    assert n["status"] == STATUS_DROPPED and n["reason"] == "no_text"
    for row in (d, n):
        assert row["image"] is None and row["pixels"] is None

    assert e["status"] == STATUS_ERROR and e["error"] == "undecodable image"
    assert e["image"] is None and e["pixels"] is None
    assert s["row_type"] == ROW_SHARD_END and s["status"] == ROW_SHARD_END and s["shard_total"] == 4


def test_apply_policy_rows_without_images():
    (row,) = apply_policy_rows([pending("k", [alt("a", clip=0.3)])], PolicyConfig(top_k=1), keep_images=False)
    assert row["status"] == STATUS_KEPT and row["caption"] == "a"
    assert row["image"] is None


def test_apply_policy_on_arrow():
    table = pa.Table.from_pylist(
        [pending("a", [cand("x", clip=0.1), cand("y", clip=0.2)], seq=0), pending("b", [], seq=1)],
        schema=INTERNAL_SCHEMA,
    )
    out = apply_policy(table, PolicyConfig(top_k=1))
    assert out.schema == INTERNAL_SCHEMA
    assert out.column("status").to_pylist() == [STATUS_KEPT, STATUS_DROPPED]
    assert out.column("caption").to_pylist() == ["y", None]
    assert out.column("captions").to_pylist() == [["y"], None]
    assert out.column("reason").to_pylist() == [None, "no_text"]
