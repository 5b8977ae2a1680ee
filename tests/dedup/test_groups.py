"""The pure parts of dedup against brute force: labels, bands, pairs, components, k-means."""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from curate.dedup import groups as G
from curate.dedup import kmeans as K

# ------------------------------------------------------------------ labels


@given(st.floats(allow_nan=False, width=32), st.floats(allow_nan=False, width=32))
def test_score_digits_sort_by_descending_score(a, b):
    if a > b:
        assert G.score_digits(a) < G.score_digits(b)
    elif a == b:
        assert G.score_digits(a) == G.score_digits(b)
    assert G.score_digits(a) < G.score_digits(None)


def test_the_smallest_label_is_the_representative():
    labels = [
        G.node_label("00001", "z", kept=False, score=None),
        G.node_label("00000", "b", kept=True, score=0.2),
        G.node_label("00000", "a", kept=True, score=0.2),
        G.node_label("00000", "c", kept=True, score=0.35),
        G.node_label("00000", "d", kept=True, score=None),
        G.node_label("00000", "0", kept=False, score=None),
    ]
    order = [G.label_id(x) for x in sorted(labels)]
    # kept first, best score first, ties and unscored by shard/key; not kept last, by shard/key
    assert order == ["00000/c", "00000/a", "00000/b", "00000/d", "00000/0", "00001/z"]
    assert G.split_id("00000/dir/key") == ("00000", "dir/key")


def test_labels_of_samples_use_the_best_captions_score():
    cand = lambda text, clip, itm, kept: {"text": text, "clip_score": clip, "itm_score": itm, "kept": kept}  # noqa: E731
    table = pa.Table.from_pylist(
        [
            {
                "shard": "s",
                "key": "clip",
                "status": "kept",
                "caption": "b",
                "candidates": [cand("a", 0.9, 0.1, False), cand("b", 0.3, 0.9, True)],
            },
            {
                "shard": "s",
                "key": "itm",
                "status": "kept",
                "caption": "a",
                "candidates": [cand("a", None, 0.5, True)],
            },
            {
                "shard": "s",
                "key": "drop",
                "status": "dropped",
                "caption": None,
                "candidates": [cand("a", 0.99, 0.9, False)],
            },
        ]
    )
    labels = G.labels_of(table).to_pylist()
    assert [G.label_id(x) for x in sorted(labels)] == ["s/itm", "s/clip", "s/drop"]  # 0.5 ITM > 0.3 CLIP
    assert labels[0] == G.node_label("s", "clip", True, 0.3)


# ------------------------------------------------------------------ bands and pairs


@given(st.integers(0, 16), st.integers(0, 2**64 - 1), st.data())
def test_hashes_within_the_threshold_share_a_band(threshold, a, data):
    layout = G.band_layout(threshold)
    assert sum(w for _, w in layout) == 64 and len(layout) == threshold + 1
    flips = data.draw(st.sets(st.integers(0, 63), max_size=threshold))
    b = a
    for bit in flips:
        b ^= 1 << bit
    bands_a = G.band_values(np.array([a], np.uint64), threshold)
    bands_b = G.band_values(np.array([b], np.uint64), threshold)
    assert any(x[0] == y[0] for x, y in zip(bands_a, bands_b))


def _brute_hamming(hashes: np.ndarray, threshold: int) -> set[tuple[int, int]]:
    return {
        (i, j)
        for i, j in combinations(range(len(hashes)), 2)
        if bin(int(hashes[i]) ^ int(hashes[j])).count("1") <= threshold
    }


@pytest.mark.parametrize("threshold", [0, 3, 8])
def test_hamming_pairs_equal_brute_force(threshold):
    rng = np.random.default_rng(threshold)
    base = rng.integers(0, 2**63, 40, dtype=np.int64).astype(np.uint64) * np.uint64(2)
    # copies with a few flipped bits, and exact repeats
    near = base[:15] ^ (np.uint64(1) << rng.integers(0, 64, 15).astype(np.uint64))
    hashes = np.concatenate([base, near, base[:5], base[:5]])
    i, j = G.hamming_pairs(hashes, threshold)
    found = set(zip(i.tolist(), j.tolist()))
    brute = _brute_hamming(hashes, threshold)
    # equal hashes are chained to their first copy, not paired all with all: same components
    assert found <= brute
    assert _components(len(hashes), found) == _components(len(hashes), brute)


def test_cosine_pairs_equal_brute_force():
    rng = np.random.default_rng(1)
    x = K.normalize(rng.normal(size=(2500, 8)))  # more rows than one comparison block
    i, j = G.cosine_pairs(x, 0.97)
    sims = x @ x.T
    brute = {(a, b) for a, b in zip(*np.nonzero(sims >= 0.97)) if a < b}
    assert set(zip(i.tolist(), j.tolist())) == brute and brute


# ------------------------------------------------------------------ components


def _components(n: int, pairs) -> set[frozenset[int]]:
    parent = list(range(n))

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    for a, b in pairs:
        parent[find(a)] = find(b)
    groups: dict[int, set[int]] = {}
    for x in range(n):
        groups.setdefault(find(x), set()).add(x)
    return {frozenset(g) for g in groups.values() if len(g) > 1}


def _random_graph(seed: int, n: int = 60, edges: int = 45) -> tuple[list[str], list[tuple[int, int]]]:
    rng = np.random.default_rng(seed)
    labels = [f"1{'f' * 16}s/{k:03d}" for k in rng.permutation(n)]
    pairs = [tuple(sorted(p)) for p in rng.integers(0, n, (edges, 2)).tolist() if p[0] != p[1]]
    return labels, pairs


@pytest.mark.parametrize("seed", range(5))
def test_components_table_names_each_component_by_its_smallest_label(seed):
    labels, pairs = _random_graph(seed)
    table = G.components_table(labels, np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs]))
    expected = {frozenset(labels[i] for i in c) for c in _components(len(labels), pairs)}
    got: dict[str, set[str]] = {}
    for row in table.to_pylist():
        got.setdefault(row["root"], set()).add(row["member"])
        assert row["size"] == len(next(c for c in expected if row["member"] in c))
    assert {frozenset(m) for m in got.values()} == expected
    assert all(root == min(members) for root, members in got.items())


def _hash_to_min(edges: pa.Table, parts: int) -> tuple[pa.Table, int]:
    """The rounds as the cluster runs them: messages split by node into partitions, each reduced
    on its own."""
    messages, rounds = G.edge_messages(edges), 0
    while True:
        node_part = G.string_partition(messages["node"], parts)
        states, changed = [], 0
        for p in range(parts):
            state, c = G.reduce_messages(messages.filter(pa.array(node_part == p)))
            states.append(state)
            changed += c
        state = pa.concat_tables(states)
        rounds += 1
        if rounds > 1 and changed == 0:
            return state, rounds
        messages = G.state_messages(state)


@pytest.mark.parametrize(("seed", "parts"), [(0, 1), (1, 3), (2, 7), (3, 2)])
def test_hash_to_min_finds_the_connected_components(seed, parts):
    labels, pairs = _random_graph(seed, n=80, edges=70)
    edges = pa.table({"a": [labels[a] for a, _ in pairs], "b": [labels[b] for _, b in pairs]})
    state, rounds = _hash_to_min(edges, parts)
    comps = G.state_components(state)
    got: dict[str, set[str]] = {}
    for row in comps.to_pylist():
        got.setdefault(row["root"], set()).add(row["member"])
    expected = {frozenset(labels[i] for i in c) for c in _components(len(labels), pairs)}
    assert {frozenset(m) for m in got.values()} == expected
    assert all(root == min(m) for root, m in got.items())
    assert rounds <= 12


def test_hash_to_min_on_a_long_chain_takes_few_rounds():
    labels = [f"1{'f' * 16}s/{k:04d}" for k in range(200)]
    order = np.random.default_rng(4).permutation(200)  # a path visiting the labels in random order
    edges = pa.table({"a": [labels[a] for a in order[:-1]], "b": [labels[b] for b in order[1:]]})
    state, rounds = _hash_to_min(edges, 4)
    comps = G.state_components(state)
    assert comps.num_rows == 200 and set(comps["root"].to_pylist()) == {labels[0]}
    assert rounds <= 20  # logarithmic in the path's length, not linear


def test_exact_components_group_equal_keys():
    table = G.exact_components(pa.array(["h1", "h2", "h1", "h3", "h1"]), pa.array(["e", "d", "c", "b", "a"]))
    assert sorted(table.to_pylist(), key=lambda r: r["member"]) == [
        {"root": "a", "member": "a", "size": 3},
        {"root": "a", "member": "c", "size": 3},
        {"root": "a", "member": "e", "size": 3},
    ]


# ------------------------------------------------------------------ k-means


def test_kmeans_in_pieces_equals_one_piece_and_finds_the_clusters():
    rng = np.random.default_rng(0)
    centres = K.normalize(rng.normal(size=(4, 16)))
    points = K.normalize(np.repeat(centres, 50, axis=0) + 0.05 * rng.normal(size=(200, 16)))
    start = points[[0, 50, 100, 150]] + 0.2
    start = K.normalize(start)
    whole = K.partial_sums(points, start)
    blocks = [K.partial_sums(points[i : i + 37], start) for i in range(0, 200, 37)]
    assert np.array_equal(whole[0], sum(b[0] for b in blocks))
    assert np.allclose(whole[1], sum(b[1] for b in blocks))
    centroids, shift = K.update(start, *whole)
    for _ in range(10):
        centroids, shift = K.update(centroids, *K.partial_sums(points, centroids))
    assert shift < 1e-6
    labels = K.assign(points, centroids)
    assert all(len(set(labels[i : i + 50])) == 1 for i in range(0, 200, 50))
    assert len(set(labels)) == 4


def test_embedding_matrix_reads_float16_lists_and_checks_lengths():
    col = pa.array([[1.0, 2.0], [3.0, 4.0]], pa.list_(pa.float16()))
    assert K.embedding_matrix(col).tolist() == [[1.0, 2.0], [3.0, 4.0]]
    with pytest.raises(ValueError, match="different lengths"):
        K.embedding_matrix(pa.array([[1.0, 2.0], [3.0]], pa.list_(pa.float32())))
    assert np.array_equal(K.normalize(np.zeros((1, 3))), np.zeros((1, 3)))


@settings(max_examples=30)
@given(st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=30, unique=True))
def test_partitions_are_the_same_in_every_process(values):
    a = G.string_partition(pa.array(values), 7)
    assert a.min() >= 0 and a.max() < 7
    assert np.array_equal(a, G.string_partition(pa.array(values), 7))
    ints = np.arange(len(values), dtype=np.uint64)
    assert np.array_equal(G.int_partition(ints, 5), G.int_partition(ints.copy(), 5))
