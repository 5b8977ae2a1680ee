"""BLIP and BLIP-2 captioning without ``generate()``: each image encoded once, its prompt prefilled once.

``BlipForConditionalGeneration.generate`` with ``num_return_sequences=N`` repeats every
image's embeddings N times before the text decoder's first pass, so the cross-attention
keys and values of all image tokens (577 for BLIP-large at 384 px, in every decoder layer)
are computed N times; it keeps decoding rows that have finished until the longest one
stops, sorts the whole vocabulary for top-p in every row at every step, and runs its
logits-processor and stopping-criteria machinery around each step.

:class:`BlipSteps` drives the same transformers modules (``vision_model`` and
``text_decoder``, with transformers' own ``EncoderDecoderCache``) through
:func:`curate.models.sampling.sample_rows`: the vision tower and the prompt's pass (which
fills the cross-attention cache) run once per image, the cache is then repeated N times,
finished rows leave the batch and the cache, and the nucleus is found among the top
candidates. The draws invert the nucleus's distribution in token-id order at each row's
own uniforms (``vocab_order``), as :class:`curate.models.sampling.SeededSampler` does inside
``generate``, so for the same seeds this writes the captions ``generate`` writes (up to
float rounding at a draw's boundary, which a batch of a different size can move).

BLIP-2 with a decoder-only language model (OPT) goes the same way through
:func:`curate.models.sampling.sample_from_embeds`: :func:`blip2_sample` builds the language
model's input embeddings as ``Blip2ForConditionalGeneration.generate`` does (the Q-Former's
projected queries in place of the image tokens, then the prompt), once per image, and the
prompt's cache is repeated N times instead of the whole prompt being prefilled N times.
"""

from __future__ import annotations

from typing import Any

import torch

from curate.models.sampling import _cache_keyword, sample_from_embeds, sample_rows, seeded_uniforms


class BlipSteps:
    """A :class:`curate.models.sampling.StepModel` over BLIP's text decoder.

    ``pixel_values`` (B, 3, H, W) are B images; ``prompt_ids`` (P,) the decoder's prompt,
    starting with BLIP's [DEC] token, the same for every image (so no padding)."""

    def __init__(self, model: Any, pixel_values: torch.Tensor, prompt_ids: torch.Tensor) -> None:
        self.decoder = model.text_decoder
        self.cache_kw = _cache_keyword(self.decoder)
        self.image_embeds = model.vision_model(pixel_values=pixel_values)[0]
        self.prompt = prompt_ids.to(self.image_embeds.device).expand(pixel_values.shape[0], -1)
        self.cache: Any = None

    def _forward(self, input_ids: torch.Tensor, **kw: Any) -> torch.Tensor:
        # After the prefill the cross-attention layers read their keys and values from the
        # cache (transformers marks each layer updated); the image embeddings passed on
        # only tell the layers to attend, and their batch size is not read.
        out = self.decoder(
            input_ids=input_ids,
            encoder_hidden_states=self.image_embeds,
            use_cache=True,
            is_decoder=True,
            **{self.cache_kw: self.cache},
            **kw,
        )
        self.cache = out.cache if hasattr(out, "cache") else out.past_key_values
        return out.logits[:, -1]

    def prefill(self) -> torch.Tensor:
        return self._forward(self.prompt, logits_to_keep=1)

    def repeat(self, n: int) -> None:
        self.cache.batch_repeat_interleave(n)

    def select(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._forward(tokens[:, None])


def blip_prompt_ids(model: Any, tokenizer: Any, prompt: str | None) -> torch.Tensor:
    """The decoder's prompt as ``BlipForConditionalGeneration.generate`` builds it: the
    tokenised prompt with [CLS] replaced by the [DEC] token and the closing [SEP] dropped;
    [DEC] alone without a prompt."""
    bos = model.config.text_config.bos_token_id
    if not prompt:
        return torch.tensor([bos])
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"][0].clone()
    ids[0] = bos
    return ids[:-1]


@torch.inference_mode()
def blip_sample(
    model: Any,
    pixel_values: torch.Tensor,
    prompt_ids: torch.Tensor,
    num_captions: int,
    max_new_tokens: int,
    seeds: list[int] | None = None,
    **sampling: float,
) -> list[list[int]]:
    """Token ids (without the prompt and the end token) of ``num_captions`` nucleus samples
    per image, image-major, drawn at each image's ``seeds`` (:func:`seeded_uniforms`).
    ``sampling``: ``top_p``, ``temperature``, ``min_new_tokens``, ``repetition_penalty``, as
    :func:`curate.models.sampling.sample_rows` takes them."""
    batch = pixel_values.shape[0]
    steps = BlipSteps(model, pixel_values, prompt_ids)
    uniforms = seeded_uniforms(seeds, num_captions, max_new_tokens, rows=batch * num_captions)
    text = model.config.text_config
    return sample_rows(
        steps,
        num_captions,
        max_new_tokens,
        text.sep_token_id,
        uniforms=uniforms,
        # transformers penalises the whole decoder input, the prompt included
        history=steps.prompt.cpu(),
        vocab_order=True,
        **sampling,  # type: ignore[arg-type]
    )


def blip2_is_decoder_only(model: Any) -> bool:
    """Whether a BLIP-2's language model is a causal LM (OPT), which :func:`blip2_sample`
    serves; a T5 one (an encoder-decoder) keeps ``generate``."""
    return not getattr(model.language_model.config, "is_encoder_decoder", False)


@torch.inference_mode()
def blip2_sample(
    model: Any,
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    num_captions: int,
    max_new_tokens: int,
    seeds: list[int] | None = None,
    **sampling: float,
) -> list[list[int]]:
    """Token ids of ``num_captions`` nucleus samples per image, image-major, without the
    prompt and the end token. ``input_ids`` (B, P): the processor's, image tokens then the
    prompt, the same length in every row. ``seeds`` and ``sampling``: as :func:`blip_sample`."""
    image_embeds = model.vision_model(pixel_values=pixel_values).last_hidden_state
    queries = model.query_tokens.expand(image_embeds.shape[0], -1, -1)
    query_output = model.qformer(query_embeds=queries, encoder_hidden_states=image_embeds).last_hidden_state
    projected = model.language_projection(query_output.to(image_embeds.dtype))
    input_ids = input_ids.to(image_embeds.device)
    embeds = model.get_input_embeddings()(input_ids)
    image_slots = (input_ids == model.config.image_token_id).unsqueeze(-1)
    embeds = embeds.masked_scatter(image_slots, projected.to(embeds.dtype))
    lm = model.language_model
    eos = lm.generation_config.eos_token_id
    if eos is None:
        eos = model.config.text_config.eos_token_id
    batch = pixel_values.shape[0]
    return sample_from_embeds(
        lm,
        embeds,
        num_captions,
        max_new_tokens,
        eos,
        uniforms=seeded_uniforms(seeds, num_captions, max_new_tokens, rows=batch * num_captions),
        history=input_ids.cpu(),
        vocab_order=True,
        **sampling,  # type: ignore[arg-type]
    )
