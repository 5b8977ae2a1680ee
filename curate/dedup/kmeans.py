"""Spherical k-means in pieces a cluster can spread: per-block partial sums, then one update.

SemDeDup (Abbas et al., 2023) clusters the image embeddings with k-means so that the
pairwise comparison runs within clusters only. The embeddings are unit vectors and a point
joins the centroid of largest dot product (cosine), the centroid being the normalised mean of
its points. No Ray here: :mod:`curate.dedup.run` maps :func:`partial_sums` over the blocks and
runs :func:`update` as one task, so no process ever holds all the embeddings.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa


def normalize(embeddings: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32); a zero row stays zero and matches nothing."""
    x = np.asarray(embeddings, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def embedding_matrix(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A list or fixed-size-list column of equal-length vectors -> (n, d) float32."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    n = len(column)
    if n == 0:
        return np.zeros((0, 0), dtype=np.float32)
    if pa.types.is_fixed_size_list(column.type):
        d = column.type.list_size
    else:
        lengths = column.value_lengths().to_numpy(zero_copy_only=False)
        d = int(lengths[0])
        if (lengths != d).any():
            raise ValueError(f"embeddings of different lengths: {sorted(set(lengths.tolist()))[:5]}")
    values = column.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(values, dtype=np.float32).reshape(n, d)


def init_rank(labels: list[str], seed: int) -> np.ndarray:
    """A seeded, process-independent pseudo-random rank per label: the k smallest seed k-means
    (Forgy's initialisation, the same points whatever the blocks)."""
    return np.array(
        [
            int.from_bytes(hashlib.blake2b(f"{seed}:{s}".encode(), digest_size=8).digest(), "big")
            for s in labels
        ],
        dtype=np.uint64,
    )


def assign(embeddings: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Each row's nearest centroid by cosine (the first on ties)."""
    if len(embeddings) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.argmax(embeddings @ centroids.T, axis=1).astype(np.int64)


def partial_sums(embeddings: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(count per cluster, sum of its rows) for one block."""
    k = len(centroids)
    clusters = assign(embeddings, centroids)
    counts = np.bincount(clusters, minlength=k).astype(np.int64)
    sums = np.zeros((k, embeddings.shape[1] if embeddings.ndim == 2 else centroids.shape[1]), np.float64)
    np.add.at(sums, clusters, embeddings.astype(np.float64))
    return counts, sums


def update(centroids: np.ndarray, counts: np.ndarray, sums: np.ndarray) -> tuple[np.ndarray, float]:
    """New centroids from the summed partials, and the largest move (1 - cosine to the old
    centroid). A cluster that lost every point keeps its centroid."""
    new = centroids.astype(np.float32, copy=True)
    filled = counts > 0
    new[filled] = normalize(sums[filled])
    shift = float(np.max(1.0 - np.sum(new * centroids, axis=1))) if len(new) else 0.0
    return new, max(shift, 0.0)
