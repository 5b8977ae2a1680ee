"""Captioner: any transformers image-to-text model writes N captions per image.

BLIP CapFilt samples with nucleus sampling (top-p 0.9) because diverse captions help;
beam search is available for deterministic single captions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from curate.models import BRIDGE_CAPTIONER_TYPE
from curate.models.base import LoadOptions, load_error, model_revision, move, resolve_device, resolve_dtype


@dataclass(frozen=True)
class GenerationSettings:
    num_captions: int = 10
    decoding: str = "nucleus"  # nucleus | beam
    top_p: float = 0.9
    temperature: float = 1.0
    max_new_tokens: int = 30
    min_new_tokens: int = 0
    num_beams: int = 3
    repetition_penalty: float = 1.0
    prompt: str | None = None
    dedupe: bool = True


BRIDGE_MODEL_TYPE = BRIDGE_CAPTIONER_TYPE


def _model_class(model_type: str):
    import transformers

    if model_type == "blip":
        return transformers.BlipForConditionalGeneration
    if model_type == "blip-2":
        return transformers.Blip2ForConditionalGeneration
    if model_type == BRIDGE_MODEL_TYPE:
        from curate.models.bridge.captioner import BridgeCaptionerModel

        return BridgeCaptionerModel
    return transformers.AutoModelForImageTextToText


class Captioner:
    """Loads once, then ``captioner(images, seed=...)`` -> one list of captions per image."""

    def __init__(
        self,
        load: LoadOptions,
        settings: GenerationSettings | None = None,
        device: str = "auto",
        dtype: str = "fp32",
    ) -> None:
        import transformers

        import curate.models.bridge  # noqa: F401  (registers the bridge captioner's model type)

        self.settings = settings or GenerationSettings()
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        try:
            config = transformers.AutoConfig.from_pretrained(load.model, **load.kwargs())
            # the bridge captioner (trained bridge, frozen LM from its package) brings its own tokenizer
            self.bridge = config.model_type == BRIDGE_MODEL_TYPE
            cls = _model_class(config.model_type)
            model = cls.from_pretrained(load.model, **load.model_kwargs())
            if self.bridge:
                self.processor = model.language_model()[1]  # loads the frozen LM now, in the actor
            else:
                self.processor = transformers.AutoProcessor.from_pretrained(load.model, **load.kwargs())
        except Exception as exc:
            raise load_error("captioner", load, exc) from exc
        self.model = move(model, self.device, self.dtype)
        self.revision = model_revision(self.model)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)

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

    def _generate_kwargs(self) -> dict:
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
            kw.update(do_sample=True, top_p=s.top_p, top_k=0, temperature=s.temperature, num_beams=1)
        return kw

    @torch.inference_mode()
    def __call__(self, images: list[Image.Image], seed: int | None = None) -> list[list[str]]:
        if not images:
            return []
        if seed is not None:
            torch.manual_seed(seed)
        if self.bridge:
            return [self._clean(texts) for texts in self._bridge_generate(images, seed)]
        inputs = self._inputs(images)
        ids = self.model.generate(**inputs, **self._generate_kwargs())
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        n = self.settings.num_captions
        return [self._clean(texts[i * n : (i + 1) * n]) for i in range(len(images))]

    def _bridge_generate(self, images: list[Image.Image], seed: int | None) -> list[list[str]]:
        s = self.settings
        return self.model.generate_captions(
            images,
            num_captions=s.num_captions,
            do_sample=s.decoding != "beam",
            top_p=s.top_p,
            temperature=s.temperature,
            max_new_tokens=s.max_new_tokens,
            num_beams=s.num_beams,
            seed=seed,
            min_new_tokens=s.min_new_tokens,
            repetition_penalty=s.repetition_penalty,
            prompt=s.prompt,
        )

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
