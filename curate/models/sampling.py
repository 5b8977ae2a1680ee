"""Sampled decoding for a causal LM fed input embeddings: prefill once, sample N per prompt.

Why not ``generate()`` for nucleus sampling: with ``num_return_sequences=N`` it copies
each prompt N times before the prefill, keeps computing finished rows until the
longest one stops, and its top-p warper sorts the whole vocabulary (49k tokens for
SmolLM2) for every row at every step, then draws with ``multinomial`` over the whole
vocabulary too. On a CPU the sort and the draw cost about as much as the model's own
forward pass. Here the prompt is prefilled once and its cache repeated N times,
finished rows leave the batch, and the nucleus is found among the top ``k`` tokens
(all of the vocabulary only for a row whose top ``k`` hold less than ``top_p``).

The distribution is the same as ``generate(do_sample=True, top_p=..., top_k=0)``:
temperature, then the smallest set of most likely tokens whose mass reaches ``top_p``,
renormalised; ``repetition_penalty`` (CTRL's, on the tokens generated so far) and
``min_new_tokens`` act as transformers' processors do.

Each draw inverts the row's cumulative distribution at a uniform number: one uniform per
row and step, taken from that row's own stream (:func:`seeded_uniforms`, one generator per
sample), so what a sample draws does not depend on the other rows of its batch, how many
there are, or when they finish. :class:`SeededSampler` does the same inside transformers'
``generate``, over the vocabulary in token-id order; ``vocab_order=True`` inverts the same
order here, so a loop that computes the same logits draws the very tokens ``generate`` would
(the fast transformers captioners rely on it), while the bridge keeps its most-likely-first
order.

:func:`sample_rows` is the loop; what it drives is a :class:`StepModel` (prefill the prompts,
repeat each prompt's state N times, drop finished rows, feed one token per row), so a causal
LM fed embeddings (:func:`sample_from_embeds`) and BLIP's cross-attending decoder
(``curate.models.fast_caption``) share one sampler.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Protocol

import torch

# candidates looked at before falling back to a whole-vocabulary sort: a captioner's
# next-token distribution is peaked, so 0.9 of its mass sits in far fewer tokens
NUCLEUS_CANDIDATES = 128


def seeded_uniforms(
    seeds: list[int] | None, per_seed: int, steps: int, rows: int | None = None
) -> torch.Tensor:
    """(len(seeds) * per_seed, steps) uniforms in [0, 1): the ``per_seed`` rows of each seed
    (a sample's captions) from that seed's own CPU generator, the same on any device and in
    any batch. Without seeds, ``rows`` rows from torch's global generator."""
    if seeds is None:
        return torch.rand((rows or 0, steps))
    return torch.cat(
        [torch.rand((per_seed, steps), generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    )


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """(B, K) probabilities (unnormalised, zeros allowed) and (B,) uniforms -> (B,) column
    indices: the first column whose cumulative mass passes ``u`` times the row's total."""
    cum = probs.cumsum(-1)
    target = (uniforms.to(cum.device, cum.dtype) * cum[:, -1]).unsqueeze(-1)
    idx = torch.searchsorted(cum, target, right=True).squeeze(-1)
    # rounding can put the target at the total: take the last column that has mass
    last = probs.shape[-1] - 1 - (probs.flip(-1) > 0).to(torch.int8).argmax(-1)
    return torch.minimum(idx, last)


def nucleus_sample(
    logits: torch.Tensor,
    top_p: float = 0.9,
    temperature: float = 1.0,
    candidates: int = NUCLEUS_CANDIDATES,
    uniforms: torch.Tensor | None = None,
    vocab_order: bool = False,
) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids drawn from each row's top-p nucleus, at the row's
    uniform in ``uniforms`` (B,) (default: torch's global generator). ``vocab_order``: invert
    the nucleus's cumulative distribution in token-id order, as :class:`SeededSampler` does
    after transformers' warpers, instead of most likely first (the same distribution)."""
    if uniforms is None:
        uniforms = torch.rand(logits.shape[0])
    uniforms = uniforms.to(logits.device)
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    if vocab_order and (top_p >= 1.0 or candidates >= logits.shape[-1]):
        return _vocab_order_nucleus(logits, top_p, uniforms)
    k = min(candidates, logits.shape[-1]) if top_p < 1.0 else logits.shape[-1]
    values, ids = logits.topk(k, dim=-1)  # sorted, most likely first
    probs = (values - torch.logsumexp(logits, dim=-1, keepdim=True)).exp()
    before = probs.cumsum(-1) - probs  # mass of the more likely tokens
    short = before[:, -1] + probs[:, -1] < top_p  # the nucleus reaches past the candidates
    if k < logits.shape[-1] and bool(short.any()):
        rows = short.nonzero().squeeze(1)
        out = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
        keep = ~short
        out[keep] = _draw(probs[keep], before[keep], ids[keep], top_p, uniforms[keep], vocab_order)
        out[rows] = nucleus_sample(logits[rows], top_p, 1.0, logits.shape[-1], uniforms[rows], vocab_order)
        return out
    return _draw(probs, before, ids, top_p, uniforms, vocab_order)


def _vocab_order_nucleus(logits: torch.Tensor, top_p: float, uniforms: torch.Tensor) -> torch.Tensor:
    """A wide nucleus over the whole vocabulary, computed as transformers' ``TopPLogitsWarper``
    and :class:`SeededSampler` compute it (one ascending sort, then the softmax inverted in
    token-id order), so equal logits give the very token ``generate`` draws."""
    if top_p < 1.0:
        ascending, order = logits.sort(dim=-1)
        drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        drop[:, -1] = False  # the most likely token always stays
        logits = logits.masked_fill(drop.scatter(1, order, drop), -float("inf"))
    return inverse_cdf(torch.softmax(logits, dim=-1), uniforms)


def _draw(
    probs: torch.Tensor,
    before: torch.Tensor,
    ids: torch.Tensor,
    top_p: float,
    uniforms: torch.Tensor,
    vocab_order: bool = False,
) -> torch.Tensor:
    # a token is in the nucleus when the tokens more likely than it hold less than top_p;
    # the most likely one always is
    probs = probs.masked_fill(before >= top_p, 0.0)
    probs[:, 0] = probs[:, 0].clamp_min(torch.finfo(probs.dtype).tiny)
    if vocab_order:  # the candidates by token id: the cumulative mass transformers inverts
        ids, perm = ids.sort(dim=-1)
        probs = probs.gather(-1, perm)
    choice = inverse_cdf(probs, uniforms)
    return ids.gather(-1, choice.unsqueeze(-1)).squeeze(-1)


def _penalise(logits: torch.Tensor, generated: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty on the tokens each row has seen (as transformers applies it)."""
    score = logits.gather(1, generated)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(1, generated, score)


def _cache_keyword(lm: torch.nn.Module) -> str:
    """transformers 5 names the cache argument ``cache``; 4.x calls it ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"


class StepModel(Protocol):
    """What :func:`sample_rows` drives: B prompts prefilled at once, then one token per row.

    Rows are prompt-major after :meth:`repeat` (prompt i's samples are rows i*n .. i*n+n-1);
    :meth:`select` keeps the given rows, in that order, when others finish."""

    def prefill(self) -> torch.Tensor:
        """(B, V) next-token logits of each prompt."""
        ...

    def repeat(self, n: int) -> None: ...

    def select(self, rows: torch.Tensor) -> None: ...

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """(R,) tokens, one per live row -> (R, V) next-token logits."""
        ...


@torch.inference_mode()
def sample_rows(
    model: StepModel,
    num_return_sequences: int,
    max_new_tokens: int,
    eos_token_id: int | Iterable[int],
    top_p: float = 0.9,
    temperature: float = 1.0,
    min_new_tokens: int = 0,
    repetition_penalty: float = 1.0,
    uniforms: torch.Tensor | None = None,
    history: torch.Tensor | None = None,
    vocab_order: bool = False,
) -> list[list[int]]:
    """Token ids of ``num_return_sequences`` samples per prompt, prompt-major, without the end
    token: each prompt prefilled once, its state repeated, finished rows dropped.

    ``uniforms`` (B * num_return_sequences, max_new_tokens): each output row's draws, step by
    step (:func:`seeded_uniforms`); without them, torch's global generator. ``history``
    (B, H): prompt tokens the repetition penalty also counts (transformers penalises the whole
    ``input_ids`` it was given). ``vocab_order``: see :func:`nucleus_sample`."""
    n = num_return_sequences
    logits = model.prefill().float()
    device = logits.device
    eos = torch.tensor(sorted({eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)))
    eos = eos.to(device)
    if history is None:
        history = torch.empty((logits.shape[0], 0), dtype=torch.long)
    history = history.to(device)
    if n > 1:
        model.repeat(n)
        logits = logits.repeat_interleave(n, dim=0)
        history = history.repeat_interleave(n, dim=0)
    total = logits.shape[0]
    if uniforms is None:
        uniforms = seeded_uniforms(None, 1, max_new_tokens, rows=total)
    if tuple(uniforms.shape) != (total, max_new_tokens):
        raise ValueError(f"uniforms must be ({total}, {max_new_tokens}), got {tuple(uniforms.shape)}")
    uniforms = uniforms.to(device)
    tokens: list[list[int]] = [[] for _ in range(total)]
    alive = torch.arange(total, device=device)  # which output row each batch row is
    for step in range(max_new_tokens):
        if repetition_penalty != 1.0 and history.shape[1]:
            logits = _penalise(logits, history, repetition_penalty)
        if step < min_new_tokens:
            logits[:, eos] = -float("inf")
        nxt = nucleus_sample(
            logits, top_p, temperature, uniforms=uniforms[alive, step], vocab_order=vocab_order
        )
        done = torch.isin(nxt, eos)
        for row, tok, end in zip(alive.tolist(), nxt.tolist(), done.tolist()):
            if not end:
                tokens[row].append(tok)
        keep = ~done
        if step == max_new_tokens - 1 or not bool(keep.any()):
            break
        if not bool(keep.all()):  # finished rows leave the batch and the model's state
            idx = keep.nonzero().squeeze(1)
            model.select(idx)
            alive, nxt, history = alive[idx], nxt[idx], history[idx]
        history = torch.cat([history, nxt[:, None]], dim=1)
        logits = model.step(nxt).float()
    return tokens


class _CausalLMSteps:
    """A causal LM fed equal-length prompt embeddings, with transformers' own cache."""

    def __init__(self, lm: torch.nn.Module, embeds: torch.Tensor) -> None:
        from transformers import DynamicCache

        self.lm, self.embeds = lm, embeds
        self.cache = DynamicCache()  # filled in place by each forward
        self.cache_kw = _cache_keyword(lm)

    def prefill(self) -> torch.Tensor:
        out = self.lm(
            inputs_embeds=self.embeds, use_cache=True, logits_to_keep=1, **{self.cache_kw: self.cache}
        )
        return out.logits[:, -1]

    def repeat(self, n: int) -> None:
        self.cache.batch_repeat_interleave(n)

    def select(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self.lm(input_ids=tokens[:, None], use_cache=True, **{self.cache_kw: self.cache})
        return out.logits[:, -1]


@torch.inference_mode()
def sample_from_embeds(
    lm: torch.nn.Module,
    embeds: torch.Tensor,
    num_return_sequences: int,
    max_new_tokens: int,
    eos_token_id: int | Iterable[int],
    top_p: float = 0.9,
    temperature: float = 1.0,
    min_new_tokens: int = 0,
    repetition_penalty: float = 1.0,
    uniforms: torch.Tensor | None = None,
    history: torch.Tensor | None = None,
    vocab_order: bool = False,
) -> list[list[int]]:
    """Token ids of ``num_return_sequences`` samples per prompt, prompt-major, without the EOS.

    ``embeds`` (B, P, H) are unpadded prompts of equal length (the bridge's prefix), so
    no attention mask is needed. ``uniforms`` (B * num_return_sequences, max_new_tokens)
    are each output row's draws, step by step (:func:`seeded_uniforms`); without them the
    draws use torch's global generator (seed it first). ``history`` and ``vocab_order``:
    see :func:`sample_rows`.
    """
    return sample_rows(
        _CausalLMSteps(lm, embeds),
        num_return_sequences,
        max_new_tokens,
        eos_token_id,
        top_p=top_p,
        temperature=temperature,
        min_new_tokens=min_new_tokens,
        repetition_penalty=repetition_penalty,
        uniforms=uniforms,
        history=history,
        vocab_order=vocab_order,
    )


class SeededSampler:
    """The last logits processor of a transformers ``generate``: draws each row's next token
    from the processed distribution at the row's own uniform for this step, and leaves that
    token alone, so ``generate``'s own draw has one choice. ``uniforms`` (rows, steps) are in
    ``generate``'s row order (with ``num_return_sequences``, each input's rows together)."""

    def __init__(self, uniforms: torch.Tensor) -> None:
        self.uniforms = uniforms
        self.step = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[0] != self.uniforms.shape[0] or self.step >= self.uniforms.shape[1]:
            raise ValueError(
                f"seeded sampling was given uniforms for {tuple(self.uniforms.shape)} (rows, steps), "
                f"asked for row count {scores.shape[0]} at step {self.step}"
            )
        u = self.uniforms[:, self.step]
        self.step += 1
        token = inverse_cdf(torch.softmax(scores.float(), dim=-1), u)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, token.unsqueeze(-1), 0.0)


def seeded_sampling(temperature: float, top_p: float, uniforms: torch.Tensor) -> dict:
    """``generate`` keyword arguments for nucleus sampling drawn by :class:`SeededSampler`:
    transformers' own temperature and top-p warpers, in the order ``do_sample`` applies them,
    then the sampler; ``generate``'s built-in warpers are turned off so they do not repeat."""
    from transformers import LogitsProcessorList
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    processors = []
    if temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    processors.append(SeededSampler(uniforms))
    return {
        "do_sample": True,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "logits_processor": LogitsProcessorList(processors),
    }
