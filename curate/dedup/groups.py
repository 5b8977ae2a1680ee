"""Pure functions of dedup: node labels, partitions, pair finding and connected components.

No Ray here: the run module (:mod:`curate.dedup.run`) composes these with Ray Data, and the
tests call them directly.

A sample is a node named by its *label*, a string that sorts the way representatives are
chosen, so "the representative of a group" is simply its smallest label, wherever and in
whatever order a group is assembled::

    label = KEPT + SCORE + "shard/key"
    KEPT  = "0" for a kept sample, "1" otherwise
    SCORE = 16 hex digits that sort by descending score (the best caption's score:
            CLIP, else ITM, :func:`curate.schema.candidate_score`); "f" * 16 when the
            sample is not kept or has no score

Kept samples come first, the best score first among them, then the smallest ``shard/key``;
a group with no kept sample is represented by its smallest ``shard/key``.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.schema import STATUS_KEPT, candidate_score

_NO_SCORE = "f" * 16
_PREFIX = 17  # KEPT + SCORE


def score_digits(score: float | None) -> str:
    """16 hex digits that sort ascending as ``score`` descends; no score sorts last."""
    if score is None or score != score:  # None or NaN
        return _NO_SCORE
    bits = struct.unpack(">Q", struct.pack(">d", float(score) + 0.0))[0]  # + 0.0: -0.0 ties with 0.0
    ascending = bits ^ 0xFFFFFFFFFFFFFFFF if bits >> 63 else bits | 1 << 63
    return f"{ascending ^ 0xFFFFFFFFFFFFFFFF:016x}"


def best_caption_score(caption: str | None, candidates: Sequence[dict[str, Any]] | None) -> float | None:
    """The score of the candidate that became the caption (kept, same text); None without one."""
    if caption is None:
        return None
    for cand in candidates or ():
        if cand.get("kept") and cand.get("text") == caption:
            return candidate_score(cand)
    return None


def node_label(shard: str, key: str, kept: bool, score: float | None) -> str:
    """A sample's label (see the module docstring)."""
    if not kept:
        return f"1{_NO_SCORE}{shard}/{key}"
    return f"0{score_digits(score)}{shard}/{key}"


def label_id(label: str) -> str:
    """``shard/key`` of a label."""
    return label[_PREFIX:]


def split_id(sample_id: str) -> tuple[str, str]:
    """``shard/key`` -> (shard, key); shard names never hold a ``/`` (keys may)."""
    shard, _, key = sample_id.partition("/")
    return shard, key


def labels_of(table: pa.Table) -> pa.Array:
    """The label of every row of a samples table (``shard``, ``key``, ``status``, ``caption``,
    ``candidates``)."""
    shards = table.column("shard").to_pylist()
    keys = table.column("key").to_pylist()
    statuses = table.column("status").to_pylist()
    captions = table.column("caption").to_pylist()
    candidates = table.column("candidates").to_pylist()
    return pa.array(
        [
            node_label(s, k, st == STATUS_KEPT, best_caption_score(c, cands) if st == STATUS_KEPT else None)
            for s, k, st, c, cands in zip(shards, keys, statuses, captions, candidates)
        ],
        pa.string(),
    )


def string_partition(values: pa.Array | pa.ChunkedArray, parts: int) -> np.ndarray:
    """A partition in [0, parts) per string, the same in every process (CRC-32, not ``hash``)."""
    return np.fromiter(
        (zlib.crc32(v.encode("utf-8")) % parts for v in values.to_pylist()), dtype=np.int64, count=len(values)
    )


def int_partition(values: np.ndarray, parts: int) -> np.ndarray:
    """A partition in [0, parts) per uint64 (splitmix64's finaliser: neighbouring values spread)."""
    x = values.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x % np.uint64(parts)).astype(np.int64)


# ------------------------------------------------------------------ bands (pHash candidates)


def band_layout(threshold: int, bits: int = 64) -> list[tuple[int, int]]:
    """(shift, width) of ``threshold + 1`` bands that cover the hash's bits.

    Two hashes within ``threshold`` differing bits differ in at most ``threshold`` bands, so
    they agree exactly on at least one: grouping by each band's value finds every such pair
    without comparing all pairs (pigeonhole; multi-index hashing).
    """
    count = threshold + 1
    widths = [bits // count + (1 if i < bits % count else 0) for i in range(count)]
    layout, shift = [], bits
    for width in widths:
        shift -= width
        layout.append((shift, width))
    return layout


def band_values(hashes: np.ndarray, threshold: int) -> list[np.ndarray]:
    """Per band of :func:`band_layout`, each hash's value in that band (uint64)."""
    out = []
    for shift, width in band_layout(threshold):
        mask = np.uint64((1 << width) - 1) if width < 64 else np.uint64(0xFFFFFFFFFFFFFFFF)
        out.append((hashes >> np.uint64(shift)) & mask)
    return out


def parse_hex_hashes(values: Sequence[str]) -> np.ndarray:
    """16-hex-digit hashes -> uint64."""
    return np.array([int(v, 16) for v in values], dtype=np.uint64)


# ------------------------------------------------------------------ pairs within a group

_CHUNK = 1024  # rows compared at once: a (1024, n) distance block, not (n, n)


def hamming_pairs(hashes: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i < j) of hashes at most ``threshold`` bits apart.

    Equal hashes are collapsed first (a blank image repeated a thousand times is one value),
    then distinct values are compared a block of rows at a time.
    """
    values, inverse = np.unique(hashes.astype(np.uint64), return_inverse=True)
    inverse = inverse.ravel()
    left: list[np.ndarray] = []
    right: list[np.ndarray] = []
    # equal hashes: chain every copy to the first index holding that value
    order = np.argsort(inverse, kind="stable")
    sorted_inv = inverse[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_inv)) + 1]
    first = np.repeat(order[starts], np.diff(np.r_[starts, len(order)]))
    same = first != order
    left.append(first[same])
    right.append(order[same])
    # distinct values within the threshold
    if threshold > 0 and len(values) > 1:
        representative = order[starts]  # an index per distinct value
        for lo in range(0, len(values), _CHUNK):
            block = values[lo : lo + _CHUNK]
            dist = np.bitwise_count(block[:, None] ^ values[None, :])
            a, b = np.nonzero(dist <= threshold)
            a += lo
            keep = a < b
            left.append(representative[a[keep]])
            right.append(representative[b[keep]])
    i = np.concatenate(left) if left else np.empty(0, np.int64)
    j = np.concatenate(right) if right else np.empty(0, np.int64)
    return np.minimum(i, j).astype(np.int64), np.maximum(i, j).astype(np.int64)


def cosine_pairs(embeddings: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i < j) of unit vectors whose cosine similarity is at least ``threshold``."""
    n = len(embeddings)
    left, right = [], []
    for lo in range(0, n, _CHUNK):
        sims = embeddings[lo : lo + _CHUNK] @ embeddings.T
        a, b = np.nonzero(sims >= threshold)
        a += lo
        keep = a < b
        left.append(a[keep])
        right.append(b[keep])
    if not left:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.concatenate(left).astype(np.int64), np.concatenate(right).astype(np.int64)


def component_roots(n: int, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Union-find over ``n`` items and the given pairs: each item's component, named by its
    smallest index."""
    parent = np.arange(n)

    def find(x: int) -> int:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    for a, b in zip(left.tolist(), right.tolist()):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(i) for i in range(n)], dtype=np.int64)


COMPONENT_SCHEMA = pa.schema(
    [
        pa.field("root", pa.string()),  # the component's smallest label: its representative
        pa.field("member", pa.string()),  # one label of the component (the root included)
        pa.field("size", pa.int64()),
    ]
)
EDGE_SCHEMA = pa.schema([pa.field("a", pa.string()), pa.field("b", pa.string())])


def components_table(labels: Sequence[str], left: np.ndarray, right: np.ndarray) -> pa.Table:
    """The components (two or more members) that the pairs make of ``labels``, one row per
    member, each named by its smallest label."""
    if len(left) == 0:
        return COMPONENT_SCHEMA.empty_table()
    order = np.argsort(np.asarray(labels, dtype=object), kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))  # index -> position in label order
    roots_by_rank = component_roots(len(labels), rank[left], rank[right])
    sizes = np.bincount(roots_by_rank, minlength=len(labels))
    members = np.flatnonzero(sizes[roots_by_rank] > 1)  # ranks in a real component
    if len(members) == 0:
        return COMPONENT_SCHEMA.empty_table()
    sorted_labels = np.asarray(labels, dtype=object)[order]
    return pa.table(
        {
            "root": pa.array(sorted_labels[roots_by_rank[members]].tolist(), pa.string()),
            "member": pa.array(sorted_labels[members].tolist(), pa.string()),
            "size": pa.array(sizes[roots_by_rank[members]], pa.int64()),
        },
        schema=COMPONENT_SCHEMA,
    )


def star_edges(components: pa.Table) -> pa.Table:
    """Each component as edges root -> member (the root itself left out)."""
    rest = components.filter(pc.not_equal(components["root"], components["member"]))
    return pa.table({"a": rest["root"], "b": rest["member"]}, schema=EDGE_SCHEMA)


def exact_components(keys: pa.Array | pa.ChunkedArray, labels: pa.Array | pa.ChunkedArray) -> pa.Table:
    """Samples with equal keys (``image_sha256``) as components: a group per repeated key."""
    table = pa.table({"k": keys, "member": labels})
    grouped = table.group_by("k").aggregate([("member", "min"), ("member", "count")])
    grouped = grouped.filter(pc.greater(grouped["member_count"], 1))
    if grouped.num_rows == 0:
        return COMPONENT_SCHEMA.empty_table()
    joined = table.join(grouped, "k", join_type="inner")
    return pa.table(
        {
            "root": joined["member_min"],
            "member": joined["member"],
            "size": pc.cast(joined["member_count"], pa.int64()),
        },
        schema=COMPONENT_SCHEMA,
    )


# ------------------------------------------------------------------ connected components across groups
#
# Hash-to-Min (Rastogi et al., "Finding connected components in map-reduce in logarithmic
# rounds", ICDE 2013). Each node v holds a set C_v, at first itself and its neighbours. In a
# round, v sends C_v to m = min(C_v) and {m} to every node of C_v; each node's new set is the
# union of what it received. At the fixed point the smallest node of each component holds the
# whole component and every other node holds just that root. A round is one shuffle by node:
# the state is rows (node, member), and a node's rows are all in one partition.

STATE_SCHEMA = pa.schema(
    [
        pa.field("node", pa.string()),
        pa.field("member", pa.string()),
        pa.field("node_min", pa.string()),  # min(C_node)
        pa.field("node_size", pa.int64()),  # |C_node|
    ]
)
MESSAGE_SCHEMA = pa.schema(
    [pa.field("node", pa.string()), pa.field("member", pa.string()), pa.field("prev", pa.bool_())]
)


def edge_messages(edges: pa.Table) -> pa.Table:
    """The first round's input: C_v = {v} and its neighbours, from edges (a, b)."""
    a, b = edges["a"], edges["b"]
    node = pa.chunked_array([*a.chunks, *a.chunks, *b.chunks, *b.chunks], pa.string())
    member = pa.chunked_array([*a.chunks, *b.chunks, *a.chunks, *b.chunks], pa.string())
    prev = pa.array(np.zeros(len(node), dtype=bool))
    return pa.table({"node": node, "member": member, "prev": prev}, schema=MESSAGE_SCHEMA)


def state_messages(state: pa.Table) -> pa.Table:
    """One round's messages from state rows: C_v to min(C_v), {min} to each member, and the
    row itself marked ``prev`` so the reducer can tell whether the node's set changed."""
    m, u, v = state["node_min"], state["member"], state["node"]
    n = state.num_rows
    node = pa.chunked_array([*m.chunks, *u.chunks, *v.chunks], pa.string())
    member = pa.chunked_array([*u.chunks, *m.chunks, *u.chunks], pa.string())
    prev = pa.array(np.r_[np.zeros(2 * n, dtype=bool), np.ones(n, dtype=bool)])
    return pa.table({"node": node, "member": member, "prev": prev}, schema=MESSAGE_SCHEMA)


def reduce_messages(messages: pa.Table) -> tuple[pa.Table, int]:
    """The new state of the nodes in ``messages`` (all of their messages), and how many
    (node, member) rows differ from the previous state."""
    is_prev = messages["prev"]
    pairs = ["node", "member"]
    new = messages.filter(pc.invert(is_prev)).select(pairs).group_by(pairs).aggregate([])
    old = messages.filter(is_prev).select(pairs).group_by(pairs).aggregate([])
    changed = (
        new.join(old, pairs, join_type="left anti").num_rows
        + old.join(new, pairs, join_type="left anti").num_rows
    )
    stats = new.group_by("node").aggregate([("member", "min"), ("member", "count")])
    state = new.join(stats, "node", join_type="inner")
    state = pa.table(
        {
            "node": state["node"],
            "member": state["member"],
            "node_min": state["member_min"],
            "node_size": pc.cast(state["member_count"], pa.int64()),
        },
        schema=STATE_SCHEMA,
    )
    return state, changed


def state_components(state: pa.Table) -> pa.Table:
    """At the fixed point: the rows of the roots (node = min of its set) are the components."""
    roots = state.filter(pc.equal(state["node"], state["node_min"]))
    return pa.table(
        {"root": roots["node"], "member": roots["member"], "size": roots["node_size"]},
        schema=COMPONENT_SCHEMA,
    )
