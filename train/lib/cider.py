"""CIDEr-D in pure Python: the captioning metric of COCO and the BLIP papers, without Java.

Follows ``pycocoevalcap/cider/cider_scorer.py`` (Vedantam et al. 2015, the "-D"
variant): n-grams n = 1..4 weighted by TF-IDF, where the document frequency of an
n-gram is the number of images whose reference set contains it (so the score of a
caption depends on the whole evaluated set, and a single image scores 0: every n-gram
then has idf log(1/1) = 0); the candidate's TF-IDF weights are clipped at the
reference's; a Gaussian length penalty with sigma = 6; the cosine per n averaged over
n and over references; times 10. As in the reference code, "length" counts bigrams.

Tokenisation replaces COCO's Java PTB tokeniser: lowercase, apostrophes dropped
("don't" -> "dont"), every other punctuation mark a separator.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence

MAX_N = 4
SIGMA = 6.0

_APOSTROPHES = re.compile(r"['’`]")
_PUNCT = re.compile(r"[^\w\s]|_")


def tokenize(text: str) -> list[str]:
    """Lowercase words without punctuation: "A Frog, (green)!" -> ["a", "frog", "green"]."""
    return _PUNCT.sub(" ", _APOSTROPHES.sub("", text.lower())).split()


def ngram_counts(words: Sequence[str], max_n: int = MAX_N) -> Counter[tuple[str, ...]]:
    counts: Counter[tuple[str, ...]] = Counter()
    for n in range(1, max_n + 1):
        for i in range(len(words) - n + 1):
            counts[tuple(words[i : i + n])] += 1
    return counts


def _vector(counts: Counter, df: Mapping[tuple[str, ...], float], log_n_images: float):
    """TF-IDF vector per n, its norms, and the bigram count (the length used by the penalty)."""
    vec: list[dict[tuple[str, ...], float]] = [{} for _ in range(MAX_N)]
    norm = [0.0] * MAX_N
    length = 0
    for gram, tf in counts.items():
        n = len(gram) - 1
        weight = float(tf) * (log_n_images - math.log(max(1.0, df.get(gram, 0.0))))
        vec[n][gram] = weight
        norm[n] += weight * weight
        if n == 1:
            length += tf
    return vec, [math.sqrt(x) for x in norm], length


def _sim(cand, ref, sigma: float) -> list[float]:
    (vc, nc, lc), (vr, nr, lr) = cand, ref
    delta = float(lc - lr)
    out = [0.0] * MAX_N
    for n in range(MAX_N):
        for gram, weight in vc[n].items():
            if gram in vr[n]:
                out[n] += min(weight, vr[n][gram]) * vr[n][gram]
        if nc[n] != 0 and nr[n] != 0:
            out[n] /= nc[n] * nr[n]
        out[n] *= math.exp(-(delta**2) / (2 * sigma**2))
    return out


def cider_d_per_image(
    candidates: Sequence[str], references: Sequence[Sequence[str]], sigma: float = SIGMA
) -> list[float]:
    """CIDEr-D of ``candidates[i]`` against ``references[i]`` (one or more captions) for each i."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference sets")
    if any(len(refs) == 0 for refs in references):
        raise ValueError("every candidate needs at least one reference caption")
    cand_counts = [ngram_counts(tokenize(c)) for c in candidates]
    ref_counts = [[ngram_counts(tokenize(r)) for r in refs] for refs in references]
    df: Counter[tuple[str, ...]] = Counter()
    for refs in ref_counts:
        df.update({gram for counts in refs for gram in counts})
    log_n = math.log(float(len(candidates))) if candidates else 0.0
    scores = []
    for cand, refs in zip(cand_counts, ref_counts):
        vc = _vector(cand, df, log_n)
        total = [0.0] * MAX_N
        for ref in refs:
            for n, s in enumerate(_sim(vc, _vector(ref, df, log_n), sigma)):
                total[n] += s
        scores.append(10.0 * (sum(total) / MAX_N) / len(refs))
    return scores


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]], sigma: float = SIGMA) -> float:
    """Corpus CIDEr-D: the mean of the per-image scores (0 for an empty set)."""
    scores = cider_d_per_image(candidates, references, sigma)
    return sum(scores) / len(scores) if scores else 0.0
