"""Nucleus sampling without a vocabulary sort, and the prefill-once decoding loop.

The reference is transformers itself: its ``TopPLogitsWarper`` gives the exact nucleus
distribution, and ``generate(do_sample=False)`` the greedy continuation of a real (tiny,
random) LlamaForCausalLM.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM
from transformers.generation.logits_process import TopPLogitsWarper

from curate.models.sampling import inverse_cdf, nucleus_sample, sample_from_embeds, seeded_uniforms
from tests.helpers import tiny_llama


def _nucleus_probs(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    warped = TopPLogitsWarper(top_p)(torch.empty((logits.shape[0], 0), dtype=torch.long), logits.clone())
    return warped.softmax(-1)


def _empirical(logits: torch.Tensor, top_p: float, draws: int, **kw) -> torch.Tensor:
    rows = logits.repeat(draws, 1)
    ids = nucleus_sample(rows, top_p, **kw).view(draws, logits.shape[0])
    counts = torch.zeros_like(logits)
    for r in range(logits.shape[0]):
        counts[r] = torch.bincount(ids[:, r], minlength=logits.shape[1]).float()
    return counts / draws


@pytest.mark.parametrize("candidates", [16, 4])  # 16: peaked rows sample among the candidates; 4: none
def test_nucleus_matches_transformers_top_p(candidates):
    torch.manual_seed(0)
    peaked = torch.randn(3, 60) * 4  # a few tokens hold most of the mass
    flat = torch.randn(2, 60) * 0.3  # the nucleus spans most of the vocabulary: the sort fallback
    logits = torch.cat([peaked, flat])
    want = _nucleus_probs(logits, 0.9)
    sizes = (want > 0).sum(-1)
    assert (sizes[:3] < 16).all() and (sizes[3:] > 16).all()  # with 4 candidates, rows of both kinds
    got = _empirical(logits, 0.9, 20000, candidates=candidates)
    assert (got[want == 0] == 0).all()  # nothing outside the nucleus is ever drawn
    tv = 0.5 * (got - want).abs().sum(-1)
    assert (tv < 0.04).all(), tv  # total variation of 20k draws from the exact distribution


def test_nucleus_temperature_and_edge_cases():
    torch.manual_seed(1)
    logits = torch.randn(2, 60) * 3
    want = _nucleus_probs(logits / 0.7, 0.8)
    got = _empirical(logits, 0.8, 20000, temperature=0.7)
    assert (0.5 * (got - want).abs().sum(-1) < 0.05).all()
    # a tiny top_p leaves the most likely token only; top_p 1 the whole distribution
    assert torch.equal(nucleus_sample(logits, top_p=1e-6), logits.argmax(-1))
    full = _empirical(logits[:1], 1.0, 20000)
    assert 0.5 * (full - logits[:1].softmax(-1)).abs().sum() < 0.06


@pytest.fixture(scope="module")
def tiny_lm() -> LlamaForCausalLM:
    return tiny_llama(40).eval()


def _hf_greedy(lm, embeds, eos, max_new_tokens, **kw) -> list[list[int]]:
    out = lm.generate(
        inputs_embeds=embeds,
        attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=eos,
        **kw,
    )
    rows = []
    for seq in out.tolist():
        row = []
        for t in seq:
            if t == eos:
                break
            row.append(t)
        rows.append(row)
    return rows


@pytest.mark.parametrize("kw", [{}, {"repetition_penalty": 1.5, "min_new_tokens": 3}])
def test_prefill_once_loop_follows_generate(tiny_lm, kw):
    """With a nucleus of one token the loop is greedy decoding: it must write what generate()
    writes, including rows that stop early and leave the batch (the cache is cut, not padded)."""
    torch.manual_seed(2)
    embeds = torch.randn(4, 5, 32)
    free = _hf_greedy(tiny_lm, embeds, eos=-1, max_new_tokens=10, **kw)
    eos = free[0][4]  # a token row 0 writes at step 5: it stops there, others elsewhere or never
    want = _hf_greedy(tiny_lm, embeds, eos=eos, max_new_tokens=10, **kw)
    assert len({len(r) for r in want}) > 1  # rows do finish at different steps
    got = sample_from_embeds(tiny_lm, embeds, 2, 10, eos, top_p=1e-6, **kw)
    assert got == [row for row in want for _ in range(2)]  # prompt-major, 2 samples each


def test_samples_repeat_with_a_seed_and_differ_between_samples(tiny_lm):
    embeds = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(7)
    a = sample_from_embeds(tiny_lm, embeds, 4, 8, eos_token_id=0, top_p=0.95)
    torch.manual_seed(7)
    b = sample_from_embeds(tiny_lm, embeds, 4, 8, eos_token_id=0, top_p=0.95)
    assert a == b and len(a) == 8
    assert len({tuple(r) for r in a[:4]}) > 1  # one prefill, yet the samples are independent
    assert all(len(r) <= 8 and 0 not in r for r in a)


def test_seeded_uniforms_give_each_seed_its_own_rows():
    both = seeded_uniforms([5, 9], per_seed=3, steps=4)
    assert both.shape == (6, 4)
    assert torch.equal(both[:3], seeded_uniforms([5], 3, 4))  # the same alone as in a batch
    assert torch.equal(both[3:], seeded_uniforms([9], 3, 4))
    assert not torch.equal(both[:3], both[3:])
    assert ((both >= 0) & (both < 1)).all()


def test_inverse_cdf_picks_the_column_whose_mass_holds_the_uniform():
    probs = torch.tensor([[0.5, 0.0, 0.25, 0.25], [0.0, 0.0, 2.0, 0.0]])
    pick = lambda u: inverse_cdf(probs, torch.tensor(u)).tolist()  # noqa: E731
    assert pick([0.0, 0.0]) == [0, 2]
    assert pick([0.49, 0.99]) == [0, 2]
    assert pick([0.5, 0.5]) == [2, 2]  # a column without mass is never picked
    assert pick([0.76, 0.3]) == [3, 2]
    assert pick([1.0, 1.0]) == [3, 2]  # rounding up to the total: the last column with mass


def test_a_prompts_samples_depend_on_its_own_uniforms_only(tiny_lm):
    """Rows that finish early leave the batch; a prompt sampled alone or beside others, at the
    same rows of uniforms, writes the same tokens."""
    embeds = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(4))
    uniforms = seeded_uniforms([1, 2, 3], per_seed=2, steps=8)
    together = sample_from_embeds(tiny_lm, embeds, 2, 8, eos_token_id=0, top_p=0.95, uniforms=uniforms)
    for i in range(3):
        alone = sample_from_embeds(
            tiny_lm, embeds[i : i + 1], 2, 8, eos_token_id=0, top_p=0.95, uniforms=uniforms[2 * i : 2 * i + 2]
        )
        assert alone == together[2 * i : 2 * i + 2]
    assert len({tuple(r) for r in together}) > 1
    with pytest.raises(ValueError, match="uniforms must be"):
        sample_from_embeds(tiny_lm, embeds, 2, 8, eos_token_id=0, uniforms=uniforms[:4])
