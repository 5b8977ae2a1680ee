"""Captioner: an image-to-text model writes N captions per image.

BLIP CapFilt samples with nucleus sampling (top-p 0.9) because diverse captions help;
beam search is available for deterministic single captions. Three implementations share
one call, ``captioner(images, seeds=...) -> one list of captions per image``, where each
image's seed alone fixes its captions (whatever else is in the batch):
:class:`HFCaptioner` (BLIP and BLIP-2 with OPT through ``curate.models.fast_caption``;
beam search and any other transformers image-text-to-text model through ``generate``),
:class:`BridgeCaptioner` (the bootstrapped bridge, ``curate.models.bridge.captioner``)
and, with ``backend: vllm``,
``curate.models.vllm_caption.VLLMCaptioner`` (any vLLM-supported image-text model).
:func:`load_captioner` picks one from the backend and the model directory's ``model_type``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from PIL import Image

from curate.config import CaptionerConfig
from curate.models import BRIDGE_CAPTIONER_TYPE
from curate.models.base import (
    LoadOptions,
    load_error,
    model_revision,
    model_type,
    move,
    resolve_device,
    resolve_dtype,
)
from curate.models.preprocess import pixel_values
from curate.models.sampling import seeded_sampling, seeded_uniforms


@dataclass(frozen=True)
class GenerationSettings:
    """How a captioner writes: a pipeline's ``captioner`` section without what it loads or where.

    The defaults are ``CaptionerConfig``'s (a dataclass's class attributes are its fields'
    defaults), so the library and a pipeline file cannot drift apart."""

    num_captions: int = CaptionerConfig.num_captions
    decoding: str = CaptionerConfig.decoding  # nucleus | beam
    top_p: float = CaptionerConfig.top_p
    temperature: float = CaptionerConfig.temperature
    max_new_tokens: int = CaptionerConfig.max_new_tokens
    min_new_tokens: int = CaptionerConfig.min_new_tokens
    num_beams: int = CaptionerConfig.num_beams
    repetition_penalty: float = CaptionerConfig.repetition_penalty
    prompt: str | None = CaptionerConfig.prompt
    dedupe: bool = CaptionerConfig.dedupe
    fast_decoding: bool = CaptionerConfig.fast_decoding


class Captioner(ABC):
    """Loaded once, then ``captioner(images, seeds=...)`` -> one list of captions per image,
    whitespace-normalised, without the prompt and (with ``dedupe``) without repeats.

    ``seeds`` (one per image) make sampling repeatable per image: an image's captions
    depend on its seed only, not on the batch it came in; without them sampling draws from
    torch's global generator. Beam search needs no seed."""

    settings: GenerationSettings
    revision: str | None
    # the stage hands a whole block in one call (a vLLM engine batches it continuously)
    whole_block: bool = False

    @torch.inference_mode()
    def __call__(self, images: list[Image.Image], seeds: Sequence[int] | None = None) -> list[list[str]]:
        if not images:
            return []
        if seeds is not None and len(seeds) != len(images):
            raise ValueError(f"{len(seeds)} seeds for {len(images)} images")
        return [
            self._clean(texts) for texts in self._generate(images, None if seeds is None else list(seeds))
        ]

    @abstractmethod
    def _generate(self, images: list[Image.Image], seeds: list[int] | None) -> list[list[str]]:
        """``num_captions`` raw texts per image."""

    def _clean(self, texts: list[str]) -> list[str]:
        prompt = (self.settings.prompt or "").strip().lower()
        out: list[str] = []
        seen: set[str] = set()
        for text in texts:
            text = " ".join(text.split())
            if prompt and text.lower().startswith(prompt):
                text = text[len(prompt) :].strip()
            if not text:
                continue
            norm = text.lower()
            if self.settings.dedupe and norm in seen:
                continue
            seen.add(norm)
            out.append(text)
        return out


class TorchCaptioner(Captioner):
    """A captioner whose torch model this process loads (transformers, or the bridge)."""

    def __init__(
        self,
        load: LoadOptions,
        settings: GenerationSettings | None = None,
        device: str = "auto",
        dtype: str = "fp32",
    ) -> None:
        self.settings = settings or GenerationSettings()
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        model_class = self._model_class(load)
        try:
            model = self._from_pretrained(model_class, load)
        except Exception as exc:
            raise load_error("captioner", load, exc) from exc
        self.model = move(model, self.device, self.dtype)
        self.revision = model_revision(self.model)

    @abstractmethod
    def _model_class(self, load: LoadOptions) -> Any:
        """The class that loads ``load.model`` (its own errors name what failed already)."""

    @abstractmethod
    def _from_pretrained(self, model_class: Any, load: LoadOptions) -> torch.nn.Module:
        """The model as loaded, before ``move``; also keeps what it writes with (tokenizer, processor)."""


def _hf_model_class(kind: str):
    import transformers

    if kind == "blip":
        return transformers.BlipForConditionalGeneration
    if kind == "blip-2":
        return transformers.Blip2ForConditionalGeneration
    return transformers.AutoModelForImageTextToText


class HFCaptioner(TorchCaptioner):
    """A transformers captioner: its processor prepares the images, ``generate`` writes.

    BLIP's and BLIP-2's (OPT) nucleus sampling goes through ``curate.models.fast_caption``
    instead (the same draws; ``fast_decoding: false`` keeps ``generate``)."""

    def _model_class(self, load: LoadOptions) -> Any:
        self.kind = model_type(load, "captioner")
        return _hf_model_class(self.kind)

    @property
    def fast(self) -> bool:
        """Whether captions are written by the prefill-once loop rather than ``generate``."""
        s = self.settings
        if s.decoding != "nucleus" or not s.fast_decoding:
            return False
        if self.kind == "blip-2":
            from curate.models.fast_caption import blip2_is_decoder_only

            return blip2_is_decoder_only(self.model)
        return self.kind == "blip"

    def _from_pretrained(self, model_class: Any, load: LoadOptions) -> torch.nn.Module:
        import transformers

        model = model_class.from_pretrained(load.model, **load.model_kwargs())
        self.processor = transformers.AutoProcessor.from_pretrained(load.model, **load.kwargs())
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        return model

    def _inputs(self, images: list[Image.Image]) -> dict:
        prompt = self.settings.prompt
        if prompt:
            inputs = self.processor(images=images, text=[prompt] * len(images), return_tensors="pt")
        else:
            inputs = self.processor(images=images, return_tensors="pt")
        out = {}
        for k, v in inputs.items():
            if isinstance(v, torch.Tensor):
                v = v.to(self.device)
                if v.is_floating_point():
                    v = v.to(self.dtype)
            out[k] = v
        return out

    def _generate_kwargs(self, seeds: list[int] | None = None, batch: int = 0) -> dict:
        """``generate``'s arguments; nucleus sampling draws each caption at its image's seeds."""
        s = self.settings
        kw = {
            "max_new_tokens": s.max_new_tokens,
            "min_new_tokens": s.min_new_tokens,
            "num_return_sequences": s.num_captions,
            "repetition_penalty": s.repetition_penalty,
        }
        if s.decoding == "beam":
            kw.update(do_sample=False, num_beams=max(s.num_beams, s.num_captions))
        else:
            # pure nucleus sampling: no top-k cut on top of top-p
            uniforms = seeded_uniforms(seeds, s.num_captions, s.max_new_tokens, rows=batch * s.num_captions)
            kw.update(seeded_sampling(s.temperature, s.top_p, uniforms), num_beams=1)
        return kw

    def _generate(self, images: list[Image.Image], seeds: list[int] | None) -> list[list[str]]:
        if self.fast:
            ids = self._fast_generate(images, seeds)
        else:
            ids = self.model.generate(**self._inputs(images), **self._generate_kwargs(seeds, len(images)))
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        n = self.settings.num_captions
        return [texts[i * n : (i + 1) * n] for i in range(len(images))]

    def _fast_generate(self, images: list[Image.Image], seeds: list[int] | None) -> list[list[int]]:
        from curate.models.fast_caption import blip2_sample, blip_prompt_ids, blip_sample

        s = self.settings
        sampling = {
            "top_p": s.top_p,
            "temperature": s.temperature,
            "min_new_tokens": s.min_new_tokens,
            "repetition_penalty": s.repetition_penalty,
        }
        n = s.num_captions
        pixels = pixel_values(self.processor.image_processor, images, self.device, self.dtype)
        if self.kind == "blip-2":
            prompt = self._blip2_input_ids(len(images))
            tokens = blip2_sample(self.model, pixels, prompt, n, s.max_new_tokens, seeds, **sampling)
            prompts = prompt.tolist()
        else:
            ids = blip_prompt_ids(self.model, self.tokenizer, s.prompt)
            tokens = blip_sample(self.model, pixels, ids, n, s.max_new_tokens, seeds, **sampling)
            prompts = [ids.tolist()] * len(images)
        # the prompt in front, as generate returns it, so both paths decode and clean alike
        return [prompts[i // n] + row for i, row in enumerate(tokens)]

    def _blip2_input_ids(self, batch: int) -> torch.Tensor:
        """BLIP-2's language-model input ids as ``generate`` gets them: the processor's image
        tokens and prompt, or (no prompt) the image tokens and BOS that ``generate`` makes."""
        cfg = self.model.config
        queries = torch.tensor([[cfg.image_token_index] * cfg.num_query_tokens])
        if self.settings.prompt:  # as Blip2Processor: the image tokens before the tokenised prompt
            text = self.tokenizer([self.settings.prompt], return_tensors="pt")["input_ids"]
        else:
            text = torch.tensor([[cfg.text_config.bos_token_id]])
        return torch.cat([queries, text], dim=1).expand(batch, -1)


class BridgeCaptioner(TorchCaptioner):
    """The bootstrapped bridge captioner; it brings its frozen LM's tokenizer and samples
    with ``curate.models.sampling`` (prefix prefilled once per image)."""

    def _model_class(self, load: LoadOptions) -> Any:
        from curate.models.bridge.captioner import BridgeCaptionerModel

        return BridgeCaptionerModel

    def _from_pretrained(self, model_class: Any, load: LoadOptions) -> torch.nn.Module:
        model = model_class.from_pretrained(load.model, **load.model_kwargs())
        self.tokenizer = model.language_model()[1]  # loads the frozen LM now, in the actor
        return model

    def _generate(self, images: list[Image.Image], seeds: list[int] | None) -> list[list[str]]:
        s = self.settings
        return self.model.generate_captions(
            images,
            num_captions=s.num_captions,
            do_sample=s.decoding != "beam",
            top_p=s.top_p,
            temperature=s.temperature,
            max_new_tokens=s.max_new_tokens,
            num_beams=s.num_beams,
            seeds=seeds,
            min_new_tokens=s.min_new_tokens,
            repetition_penalty=s.repetition_penalty,
            prompt=s.prompt,
        )


def generation_settings(cfg: CaptionerConfig) -> GenerationSettings:
    """The section's settings of how to write: every ``GenerationSettings`` field, by name."""
    return GenerationSettings(**{f.name: getattr(cfg, f.name) for f in fields(GenerationSettings)})


def open_captioner(
    load: LoadOptions, settings: GenerationSettings | None = None, device: str = "auto", dtype: str = "fp32"
) -> Captioner:
    """The captioner implementation for ``load.model``: the bridge for a bridge captioner
    directory, transformers for anything else."""
    cls = BridgeCaptioner if model_type(load, "captioner") == BRIDGE_CAPTIONER_TYPE else HFCaptioner
    return cls(load, settings, device=device, dtype=dtype)


def load_captioner(cfg: CaptionerConfig, seed: int = 0) -> Captioner:
    """The captioner a pipeline's ``captioner`` section describes (``seed``: the vLLM engine's
    own; each image's captions are drawn at the seed the stage gives it)."""
    settings = generation_settings(cfg)
    if cfg.backend == "vllm":
        from curate.models.vllm_caption import VLLMCaptioner
        from curate.models.vllm_engine import VLLMEngineSettings

        engine = VLLMEngineSettings.of(cfg.resources, cfg.max_model_len)
        return VLLMCaptioner(LoadOptions.of(cfg), settings, engine, dtype=cfg.dtype, seed=seed)
    return open_captioner(LoadOptions.of(cfg), settings, device=cfg.resources.device, dtype=cfg.dtype)
