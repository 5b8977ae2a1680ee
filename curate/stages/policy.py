"""Keep policies: which candidate texts survive and which caption is best.

CapFilt drops every text (alt-text and synthetic alike) whose ITM match probability
is below the threshold and drops the sample when nothing survives. BLIP-2 ranks the
alt-text together with the synthetic captions by CLIP score and keeps the top k.
Combined, the ITM filter runs first and CLIP ranks what survives. KALE prefers its
rewrite (``prefer_source``) when it scores within ``prefer_margin`` of the best other text.
An alt-text that failed a rule (its ``rule`` is set, ``curate.rules``) is never kept; when it
was the only text, the drop reason is that rule.
"""

from __future__ import annotations

import pyarrow as pa

from curate.config import PolicyConfig
from curate.schema import SOURCE_ALT, STATUS_DROPPED, STATUS_KEPT, candidate_score
from curate.stages.rows import get_candidates, is_pending, set_candidates, to_rows, to_table


def _sort_key(c: dict) -> tuple:
    # best first: CLIP score, then ITM score; alt-text wins exact ties (it is real data)
    clip = c.get("clip_score")
    itm = c.get("itm_score")
    return (
        -(clip if clip is not None else float("-inf")),
        -(itm if itm is not None else float("-inf")),
        0 if c["source"] == SOURCE_ALT else 1,
    )


def _score(c: dict) -> float:
    score = candidate_score(c)
    return score if score is not None else float("-inf")


def _prefer(pool: list[dict], source: str, margin: float) -> list[dict]:
    """Move the best ``source`` candidate first when it is within ``margin`` of the best other one."""
    preferred = next((c for c in pool if c["source"] == source), None)
    others = [c for c in pool if c is not preferred]
    if preferred is None or not others or _score(preferred) < _score(others[0]) - margin:
        return pool
    return [preferred, *others]


def decide(candidates: list[dict], policy: PolicyConfig) -> tuple[list[dict], str | None]:
    """Mark ``kept`` on each candidate; return (kept best-first, drop reason or None)."""
    for c in candidates:
        c["kept"] = False
    pool = [c for c in candidates if policy.keep_alt_text or c["source"] != SOURCE_ALT]
    ruled = [c["rule"] for c in pool if c.get("rule")]
    pool = [c for c in pool if not c.get("rule")]
    if not pool:
        return [], ruled[0] if ruled else "no_text"
    if policy.itm_threshold is not None:
        pool = [c for c in pool if c.get("itm_score") is not None and c["itm_score"] >= policy.itm_threshold]
        if not pool:
            return [], "itm_below_threshold"
    if policy.min_clip_score is not None:
        pool = [
            c for c in pool if c.get("clip_score") is not None and c["clip_score"] >= policy.min_clip_score
        ]
        if not pool:
            return [], "clip_below_threshold"
    pool.sort(key=_sort_key)
    if policy.prefer_source is not None:
        pool = _prefer(pool, policy.prefer_source, policy.prefer_margin)
    if policy.top_k is not None:
        pool = pool[: policy.top_k]
    for c in pool:
        c["kept"] = True
    return pool, None


def apply_policy_rows(rows: list[dict], policy: PolicyConfig, keep_images: bool = True) -> list[dict]:
    for row in rows:
        row["pixels"] = None  # decoded pixels are not needed past the models
        if not is_pending(row):
            row["image"] = None
            continue
        candidates = get_candidates(row)
        kept, reason = decide(candidates, policy)
        set_candidates(row, candidates)
        if reason is None:
            row["status"] = STATUS_KEPT
            row["caption"] = kept[0]["text"]
            row["captions"] = [c["text"] for c in kept]
            if not keep_images:
                row["image"] = None
        else:
            row["status"] = STATUS_DROPPED
            row["reason"] = reason
            row["image"] = None
    return rows


def apply_policy(batch: pa.Table, policy: PolicyConfig, keep_images: bool = True) -> pa.Table:
    """Ray Data entry point: sets status, reason, caption and captions."""
    return to_table(apply_policy_rows(to_rows(batch), policy, keep_images))
