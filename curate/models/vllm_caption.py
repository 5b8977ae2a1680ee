"""The vLLM captioner backend (``captioner.backend: vllm``): any vLLM-supported image-text model.

BLIP-2, LLaVA, Qwen2.5-VL and the like, one engine per actor. The stage hands it a whole
block in one call, so the engine's continuous batching keeps the accelerator full, and each
image is one request asking for ``num_captions`` samples (vLLM's ``n``: the prompt and the
image are encoded once for all of them). Each request draws at the image's own seed, so an
image's captions do not depend on its batch. The captions become the same rows and
candidates as the transformers backend's (``Captioner._clean``: whitespace, prompt,
repeats).

A model with a chat template (LLaVA, Qwen2.5-VL) gets one user turn: the image, then
``prompt`` (or :data:`DEFAULT_VLM_PROMPT`); one without (BLIP-2) gets ``prompt`` as plain
text after its image tokens, which vLLM inserts. Beam search is refused at config load.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from curate.models.base import LoadOptions
from curate.models.captioner import Captioner, GenerationSettings
from curate.models.vllm_engine import VLLMEngineSettings, import_vllm, open_llm

DEFAULT_VLM_PROMPT = "Describe this image in one sentence."


class VLLMCaptioner(Captioner):
    """``captioner(images, seeds=...)`` on a vLLM engine; see the module's docstring."""

    whole_block = True

    def __init__(
        self,
        load: LoadOptions,
        settings: GenerationSettings | None = None,
        engine: VLLMEngineSettings | None = None,
        dtype: str = "fp32",
        seed: int = 0,
    ) -> None:
        self.settings = settings or GenerationSettings()
        if self.settings.decoding != "nucleus":
            raise ValueError("captioner.decoding: beam search runs on backend transformers only")
        self.vllm = import_vllm("captioner")
        engine = engine or VLLMEngineSettings()
        self.llm = open_llm(
            self.vllm, load.model, load, engine, dtype, seed, "captioner", limit_mm_per_prompt={"image": 1}
        )
        self.revision = load.revision
        self.chat = bool(getattr(self.llm.get_tokenizer(), "chat_template", None))

    def _params(self, seed: int | None) -> Any:
        s = self.settings
        return self.vllm.SamplingParams(
            n=s.num_captions,
            temperature=s.temperature,
            top_p=s.top_p,
            max_tokens=s.max_new_tokens,
            min_tokens=s.min_new_tokens,
            repetition_penalty=s.repetition_penalty,
            seed=seed,
        )

    def requests(self, images: list[Image.Image]) -> list[Any]:
        """What goes to the engine per image: a one-turn conversation, or a prompt with the image."""
        prompt = self.settings.prompt
        if self.chat:
            return [
                [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_pil", "image_pil": image},
                            {"type": "text", "text": prompt or DEFAULT_VLM_PROMPT},
                        ],
                    }
                ]
                for image in images
            ]
        return [{"prompt": prompt or "", "multi_modal_data": {"image": image}} for image in images]

    def _generate(self, images: list[Image.Image], seeds: list[int] | None) -> list[list[str]]:
        # each request with its image's seed: vLLM draws it apart from the other requests
        per_image: list[int | None] = [None] * len(images) if seeds is None else [int(x) for x in seeds]
        params = [self._params(x) for x in per_image]
        requests = self.requests(images)
        if self.chat:
            outs = self.llm.chat(requests, params, use_tqdm=False)
        else:
            outs = self.llm.generate(requests, params, use_tqdm=False)
        return [[c.text for c in o.outputs] for o in outs]
