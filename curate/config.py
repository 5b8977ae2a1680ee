"""Pipeline files: typed, validated before any work starts.

A pipeline file is YAML with the sections of :class:`PipelineConfig`. Unknown fields,
wrong types and out-of-range values raise :class:`ConfigError` naming the field
(``captioner.num_captions``), so a typo never silently runs with a default.

What a stage writes and where and how fast it runs are apart: each stage's execution
settings (device, batch size, GPUs, CPUs, actors or tasks at once, threads, memory) live
in its ``resources`` sub-section (``captioner.resources.num_gpus``). A run may resume
with other resources; anything else is another pipeline (``curate.pipeline``'s
fingerprint is the configuration without them).
"""

from __future__ import annotations

import dataclasses
import string
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

Device = Literal["auto", "cpu", "cuda"]
DType = Literal["fp32", "fp16", "bf16"]
PACKAGED_PREFIX = "packaged:"  # models shipped in registry packages, e.g. packaged:smollm2


class ConfigError(ValueError):
    """A pipeline file or override is invalid; the message names the field."""


@dataclass
class ModelResources:
    """Where and how fast a model stage runs: its actor pool, declared here, never read
    off the driver's hardware. Not part of what the stage writes."""

    device: Device = "auto"
    batch_size: int = 8  # images per model call
    # resources of each actor in the pool
    num_gpus: float = 0.0
    num_cpus: float = 0.5
    concurrency: int = 1  # actors
    # torch CPU threads in each actor; null: Ray's OMP_NUM_THREADS, i.e. num_cpus rounded
    # down, at least 1. The stage that bounds a CPU run (the captioner) wants the cores.
    num_threads: int | None = None

    def _validate(self, prefix: str) -> None:
        _positive(self.batch_size, f"{prefix}.batch_size")
        _positive(self.concurrency, f"{prefix}.concurrency")
        if self.num_threads is not None:
            _positive(self.num_threads, f"{prefix}.num_threads")
        if self.num_gpus < 0:
            raise ConfigError(f"{prefix}.num_gpus: must be >= 0, got {self.num_gpus}")
        if self.num_cpus < 0:
            raise ConfigError(f"{prefix}.num_cpus: must be >= 0, got {self.num_cpus}")
        if self.device == "cuda" and self.num_gpus == 0:
            raise ConfigError(
                f"{prefix}.device: 'cuda' needs {prefix}.num_gpus > 0 so Ray places the actor on a GPU"
            )


@dataclass
class ScorerResources(ModelResources):
    batch_size: int = 32


@dataclass
class EngineResources(ModelResources):
    """A section that can run on vLLM (``backend: vllm``): the engine's sizing besides the actor's."""

    # vLLM engine sizing (backend: vllm): one engine per actor, continuous batching within it
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    enforce_eager: bool = False  # skip torch.compile and CUDA graphs: slower, starts in seconds

    def _validate(self, prefix: str) -> None:
        super()._validate(prefix)
        _positive(self.tensor_parallel_size, f"{prefix}.tensor_parallel_size")
        _positive(self.max_num_seqs, f"{prefix}.max_num_seqs")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(
                f"{prefix}.gpu_memory_utilization: must be in (0, 1], got {self.gpu_memory_utilization}"
            )

    def _validate_engine(self, prefix: str, backend: str) -> None:
        """``prefix``: the section's; each actor holds a whole tensor-parallel engine."""
        if backend == "vllm" and 0 < self.num_gpus < self.tensor_parallel_size:
            raise ConfigError(
                f"{prefix}.resources.num_gpus: tensor_parallel_size={self.tensor_parallel_size} needs "
                f"num_gpus >= {self.tensor_parallel_size} per actor, got {self.num_gpus}"
            )


@dataclass
class RewriterResources(EngineResources):
    batch_size: int = 16  # prompts per generate call (transformers backend)


@dataclass
class ModelConfig:
    """Settings shared by every model stage: what to load, and (``resources``) where it runs."""

    model: str = ""
    revision: str | None = None
    dtype: DType = "fp32"
    trust_remote_code: bool = False
    allow_pickle_weights: bool = False
    resources: ModelResources = field(default_factory=ModelResources)

    def _validate(self, prefix: str) -> None:
        if not self.model:
            raise ConfigError(f"{prefix}.model: a Hugging Face id or a local directory is required")
        self.resources._validate(f"{prefix}.resources")


@dataclass
class CaptionerConfig(ModelConfig):
    """Synthetic captions: BLIP CapFilt samples with nucleus sampling (top-p 0.9)."""

    num_captions: int = 10
    decoding: Literal["nucleus", "beam"] = "nucleus"
    top_p: float = 0.9
    temperature: float = 1.0
    max_new_tokens: int = 30
    min_new_tokens: int = 0
    num_beams: int = 3
    repetition_penalty: float = 1.0
    prompt: str | None = None
    dedupe: bool = True
    # BLIP / BLIP-2 (OPT) nucleus sampling without transformers' generate() (fast_caption):
    # the same draws for the same seeds, each image encoded and its prompt prefilled once
    fast_decoding: bool = True
    # vllm: any vLLM-supported image-text model, N captions per image in one request, each
    # block in one call (continuous batching); the prompt goes into the model's chat template
    backend: Literal["transformers", "vllm"] = "transformers"
    max_model_len: int | None = None  # vLLM: prompt + image tokens + caption; null: the model's
    resources: EngineResources = field(default_factory=EngineResources)

    def _validate(self, prefix: str) -> None:
        super()._validate(prefix)
        _positive(self.num_captions, f"{prefix}.num_captions")
        _positive(self.max_new_tokens, f"{prefix}.max_new_tokens")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"{prefix}.top_p: must be in (0, 1], got {self.top_p}")
        if self.temperature <= 0:
            raise ConfigError(f"{prefix}.temperature: must be > 0, got {self.temperature}")
        if self.backend == "vllm" and self.decoding == "beam":
            raise ConfigError(f"{prefix}.decoding: beam search runs on backend transformers only")
        self.resources._validate_engine(prefix, self.backend)
        if self.decoding == "beam" and self.num_captions > self.num_beams:
            raise ConfigError(
                f"{prefix}.num_beams: beam search returns at most num_beams captions; "
                f"num_beams={self.num_beams} < num_captions={self.num_captions}"
            )


# KALE stage 1 (BLIP3-KALE): an instruction-tuned LLM merges the dense caption with the
# alt-text. ``{dense_caption}`` and ``{alt_text}`` are filled in; nothing else may be braced.
# Short on purpose: SmolLM2-135M echoes long instructions back instead of following them.
DEFAULT_REWRITE_SYSTEM_PROMPT = (
    "You write one-sentence image captions. Keep names and facts from the alt-text only when they "
    "are consistent with the image description. Leave out file names and boilerplate such as "
    "'clipart' or 'stock photo'."
)
DEFAULT_REWRITE_TEMPLATE = (
    "Image description: {dense_caption}\n"
    "Alt-text: {alt_text}\n\n"
    "Write one caption that combines the image description and the alt-text."
)
REWRITE_FIELDS = frozenset({"dense_caption", "alt_text"})


@dataclass
class RewriteExample:
    """One worked example shown to the LLM before each sample (a user turn filled from the
    template, then ``caption`` as the assistant's answer)."""

    dense_caption: str = ""
    alt_text: str = ""
    caption: str = ""

    def _validate(self, prefix: str) -> None:
        for name in ("dense_caption", "caption"):
            if not getattr(self, name).strip():
                raise ConfigError(f"{prefix}.{name}: must not be empty")


# Few-shot examples: a 135M model given only the instruction often answers with one input
# copied, a loop, or talk about the task; two or three worked answers fix the format and
# show what to keep from the alt-text (names, years, species) and what to drop (file names).
DEFAULT_REWRITE_EXAMPLES = (
    RewriteExample("a dog.", "Golden Retriever puppy sitting clipart", "A golden retriever puppy sitting."),
    RewriteExample("a red car.", "1967 Ford Mustang vector", "A red 1967 Ford Mustang."),
    RewriteExample(
        "a bird on a branch.", "European robin (Erithacus rubecula)", "A European robin perched on a branch."
    ),
    RewriteExample("a building.", "img_2041.jpg", "A building."),
)


@dataclass
class RewriterConfig(ModelConfig):
    """KALE rewrite: an LLM merges the dense caption and the alt-text; guard rails reject bad rewrites."""

    backend: Literal["transformers", "vllm"] = "transformers"
    system_prompt: str | None = DEFAULT_REWRITE_SYSTEM_PROMPT
    prompt_template: str = DEFAULT_REWRITE_TEMPLATE
    examples: list[RewriteExample] = field(default_factory=lambda: list(DEFAULT_REWRITE_EXAMPLES))
    use_chat_template: bool = True
    max_input_chars: int = 1000  # each input is cut to this before prompting (alt-texts can be huge)
    max_new_tokens: int = 96
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    # guard rails: a rewrite failing one is rejected with a reason; the sample keeps its other captions
    max_chars: int = 1000
    max_length_ratio: float | None = 3.0  # vs. len(dense caption) + len(alt-text)
    repeat_ngram: int = 3
    max_repeat_ratio: float = 0.25  # share of word n-grams that repeat an earlier one
    reject_truncated: bool = True  # stopped by max_new_tokens, not by the model
    reject_prompt_echo: bool = True  # repeats the template's labels ('Alt-text') or talks about them
    # vLLM (backend: vllm): the longest prompt + rewrite the engine accepts; null: the model's
    max_model_len: int | None = None
    resources: RewriterResources = field(default_factory=RewriterResources)

    def _validate(self, prefix: str) -> None:
        super()._validate(prefix)
        for name in ("max_input_chars", "max_new_tokens", "max_chars", "repeat_ngram"):
            _positive(getattr(self, name), f"{prefix}.{name}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"{prefix}.top_p: must be in (0, 1], got {self.top_p}")
        if self.temperature <= 0:
            raise ConfigError(f"{prefix}.temperature: must be > 0, got {self.temperature}")
        if not 0.0 < self.max_repeat_ratio <= 1.0:
            raise ConfigError(f"{prefix}.max_repeat_ratio: must be in (0, 1], got {self.max_repeat_ratio}")
        if self.max_length_ratio is not None:
            _positive(self.max_length_ratio, f"{prefix}.max_length_ratio")
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(self.prompt_template) if f is not None}
        except ValueError as exc:
            raise ConfigError(
                f"{prefix}.prompt_template: {exc} (write literal braces doubled: {{{{ }}}})"
            ) from None
        if fields != REWRITE_FIELDS:
            raise ConfigError(
                f"{prefix}.prompt_template: must use exactly {{dense_caption}} and {{alt_text}}, "
                f"got {sorted(fields)}"
            )
        for i, example in enumerate(self.examples):
            example._validate(f"{prefix}.examples[{i}]")
        self.resources._validate_engine(prefix, self.backend)


@dataclass
class FilterConfig(ModelConfig):
    """The ITM filter: BLIP image-text matching head."""

    resources: ScorerResources = field(default_factory=ScorerResources)


@dataclass
class RankerConfig(ModelConfig):
    """The CLIP ranker: image-text cosine similarity."""

    resources: ScorerResources = field(default_factory=ScorerResources)


@dataclass
class ReadResources:
    """How the shards are read: block size, readers at once, the blocks' memory budget.

    The reader's blocks are the unit every later stage processes (model stages split them
    into their own ``batch_size``); each sample is seeded by its own key, so no block or
    batch size changes what is written."""

    batch_size: int = 64
    # shards read at once; null: as many as free CPU slots allow. Each reader is a worker
    # process holding its shard's blocks, so this bounds memory on a big input.
    concurrency: int | None = None
    # object-store memory (MB) the run's blocks may hold between stages (read, decoded,
    # captioned, scored) before Ray Data stops starting read and decode tasks; null: Ray
    # Data's default, half the object store, which on a big node lets gigabytes of decoded
    # pixels queue ahead of a slower captioner. A few blocks of decoded images per stage
    # is enough to keep the models busy.
    in_flight_mb: int | None = None

    def _validate(self, prefix: str) -> None:
        _positive(self.batch_size, f"{prefix}.batch_size")
        if self.concurrency is not None:
            _positive(self.concurrency, f"{prefix}.concurrency")
        if self.in_flight_mb is not None:
            _positive(self.in_flight_mb, f"{prefix}.in_flight_mb")


@dataclass
class ReadConfig:
    """Reading the input shards: only execution settings (``resources``)."""

    resources: ReadResources = field(default_factory=ReadResources)

    def _validate(self, prefix: str) -> None:
        self.resources._validate(f"{prefix}.resources")


@dataclass
class DecodeResources:
    """The decode CPU tasks' resources."""

    num_cpus: float = 0.5
    concurrency: int | None = None  # decode tasks at once; null: as many as free CPU slots allow
    # memory each decode task reserves in Ray's scheduler (a block's decoded pixels). A
    # resource the model actors do not ask for, it also keeps Ray Data from fusing decode
    # into the captioner, where it would run in series with the model.
    memory_mb: int = 256

    def _validate(self, prefix: str) -> None:
        if self.num_cpus < 0:
            raise ConfigError(f"{prefix}.num_cpus: must be >= 0, got {self.num_cpus}")
        if self.concurrency is not None:
            _positive(self.concurrency, f"{prefix}.concurrency")
        _positive(self.memory_mb, f"{prefix}.memory_mb")


@dataclass
class DecodeConfig:
    """Decoding in CPU tasks: guards against bombs and tiny images."""

    min_side: int = 1
    max_pixels: int = 89_478_485  # PIL's own bomb limit
    max_side: int = 1024  # decoded images are downscaled to this long side for the models
    max_text_bytes: int = 65_536
    resources: DecodeResources = field(default_factory=DecodeResources)

    def _validate(self, prefix: str) -> None:
        self.resources._validate(f"{prefix}.resources")
        _positive(self.min_side, f"{prefix}.min_side")
        _positive(self.max_pixels, f"{prefix}.max_pixels")
        _positive(self.max_side, f"{prefix}.max_side")
        _positive(self.max_text_bytes, f"{prefix}.max_text_bytes")


@dataclass
class PolicyConfig:
    """Which texts survive.

    CapFilt: drop texts whose ITM match probability is below ``itm_threshold``.
    BLIP-2: rank the survivors by CLIP score and keep ``top_k``.
    Both apply when both are set; null disables a step.
    """

    itm_threshold: float | None = None
    top_k: int | None = None
    min_clip_score: float | None = None
    keep_alt_text: bool = True  # the alt-text competes as a candidate
    # KALE: the best candidate of this source becomes the caption when its score (CLIP,
    # else ITM) is at least the best other candidate's minus ``prefer_margin``
    prefer_source: Literal["alt", "synthetic", "kale"] | None = None
    prefer_margin: float = 0.0

    def _validate(self, prefix: str) -> None:
        if self.itm_threshold is not None and not 0.0 <= self.itm_threshold <= 1.0:
            raise ConfigError(f"{prefix}.itm_threshold: must be in [0, 1], got {self.itm_threshold}")
        if self.top_k is not None:
            _positive(self.top_k, f"{prefix}.top_k")
        if self.prefer_margin < 0:
            raise ConfigError(f"{prefix}.prefer_margin: must be >= 0, got {self.prefer_margin}")


# ``rules.alt_text.min_language_score`` when ``languages`` is set: on the 100 hand-labelled titles of
# the demo shards (tests/fixtures/openclipart_titles_lang.tsv) 0.8 is the lowest round minimum at which
# no title in another language passes ``languages: [en]``; it also holds on all 200 labelled titles.
# The price is recall on one- and two-word titles (docs/rules.md): null turns the minimum off
# (DataComp's rule), 0.2-0.3 keeps most English titles.
DEFAULT_MIN_LANGUAGE_SCORE = 0.8


def _rule_error(prefix: str, exc: Exception) -> ConfigError:
    field_name = getattr(exc, "field", None)
    problem = getattr(exc, "problem", str(exc))
    return ConfigError(f"{prefix}.{field_name}: {problem}" if field_name else f"{prefix}: {problem}")


@dataclass
class AltTextRulesConfig:
    """Which alt-texts may stay candidate captions (``curate.rules.AltTextRules``); null turns a rule off.

    An alt-text that fails one is still scored, so the output shows what the rule cost, but it is
    never kept; when nothing else is left, the sample's drop reason names the rule."""

    min_words: int | None = None
    min_chars: int | None = None
    languages: list[str] | None = None  # ISO 639-1 codes, e.g. [en]
    min_language_score: float | None = DEFAULT_MIN_LANGUAGE_SCORE  # only read when languages is set
    reject_boilerplate: bool = False  # file names, generated descriptions, stock-photo ids, bare links

    def rules(self) -> Any:
        """The ``curate.rules.AltTextRules`` these settings describe."""
        from curate.rules import AltTextRules

        return AltTextRules(
            min_words=self.min_words,
            min_chars=self.min_chars,
            languages=tuple(self.languages) if self.languages is not None else None,
            min_language_score=self.min_language_score if self.languages is not None else None,
            reject_boilerplate=self.reject_boilerplate,
        )

    def _validate(self, prefix: str) -> None:
        from curate.rules import RuleError, language_detector

        try:
            rules = self.rules()
            if rules.languages is not None:  # the model ships in its package: loads in under a second
                language_detector().check_languages(rules.languages)
        except RuleError as exc:
            raise _rule_error(prefix, exc) from None
        except ImportError as exc:
            raise ConfigError(f"{prefix}.languages: {exc}") from None


@dataclass
class RulesConfig:
    """Cheap rules checked in the decode task, before any model (``curate.rules``, docs/rules.md).

    A sample whose image fails one is dropped with the rule's reason (``image_too_small``,
    ``aspect_ratio``, ``too_few_pixels``) and never reaches a model. DataComp's basic filter is
    ``min_side: 200, max_aspect_ratio: 3`` with ``alt_text: {languages: [en], min_words: 3,
    min_chars: 6, min_language_score: null}``."""

    min_side: int | None = None  # the shorter side of the original image, in pixels
    max_aspect_ratio: float | None = None  # long side / short side
    min_pixels: int | None = None  # width * height
    alt_text: AltTextRulesConfig = field(default_factory=AltTextRulesConfig)

    def image_rules(self) -> Any:
        """The ``curate.rules.ImageRules`` these settings describe."""
        from curate.rules import ImageRules

        return ImageRules(
            min_side=self.min_side, max_aspect_ratio=self.max_aspect_ratio, min_pixels=self.min_pixels
        )

    def _validate(self, prefix: str) -> None:
        from curate.rules import RuleError

        try:
            self.image_rules()
        except RuleError as exc:
            raise _rule_error(prefix, exc) from None
        self.alt_text._validate(f"{prefix}.alt_text")


@dataclass
class AestheticConfig:
    """An aesthetic score from a head on the ranker's unit image embeddings (LAION's predictor:
    linear layers over CLIP ViT-L/14, ``sac+logos+ava1-l14-linearMSE``, as safetensors in
    ``ttj/sac-logos-ava1-l14-linearMSE``, the copy NeMo Curator loads; docs/rules.md). It runs inside the
    ranker's actor, so no image is encoded twice; ``aesthetic_score`` is written for every sample
    the ranker scores and a sample below ``min_score`` is dropped (``aesthetic_below_threshold``)."""

    model: str = ""  # Hugging Face id, a local directory, or a local .safetensors file
    revision: str | None = None
    filename: str = "model.safetensors"  # the weights file inside the repository or directory
    # between the linear layers; LAION's linearMSE heads have none, their reluMSE ones ReLU
    activation: Literal["none", "relu"] = "none"
    allow_pickle_weights: bool = False  # LAION's original .pth files; safetensors conversions need not
    min_score: float | None = None  # LAION-Aesthetics subsets use 5, 6 and 6.5 (a 1-10 scale)

    def _validate(self, prefix: str) -> None:
        if not self.model:
            raise ConfigError(f"{prefix}.model: a Hugging Face id, a local directory or a .safetensors file")
        if not self.filename:
            raise ConfigError(f"{prefix}.filename: must name the weights file")
        if self.activation not in ("none", "relu"):
            raise ConfigError(f"{prefix}.activation: 'none' or 'relu', got {self.activation!r}")


@dataclass
class ImageClassifierConfig(ModelConfig):
    """A transformers image classifier (``AutoModelForImageClassification``, e.g. a ViT) in its own
    actor pool, run right after decode so a sample it drops skips the captioner and the scorers.
    The score is the probability of ``label`` (a name in the model's ``id2label``, or its index); a
    sample scoring above ``max_score`` is dropped with the section's reason."""

    label: int | str = ""
    max_score: float | None = None  # drop a sample whose score is above this; null: score only
    resources: ScorerResources = field(default_factory=ScorerResources)

    def _validate(self, prefix: str) -> None:
        super()._validate(prefix)
        if isinstance(self.label, str) and not self.label:
            raise ConfigError(f"{prefix}.label: name the class to score (a label of the model, or its index)")
        if isinstance(self.label, int) and self.label < 0:
            raise ConfigError(f"{prefix}.label: a class index must be >= 0, got {self.label}")
        if self.max_score is not None and not 0.0 <= self.max_score <= 1.0:
            raise ConfigError(f"{prefix}.max_score: must be in [0, 1], got {self.max_score}")
        config = Path(self.model) / "config.json"
        if config.is_file():  # a local model: its classes are known before any work starts
            import json

            from curate.models import resolve_label

            try:
                resolve_label(json.loads(config.read_text()).get("id2label") or {}, self.label)
            except (ValueError, OSError) as exc:
                raise ConfigError(f"{prefix}.label: {exc}") from None


@dataclass
class NsfwConfig(ImageClassifierConfig):
    """NSFW probability (``nsfw_score``), e.g. ``Falconsai/nsfw_image_detection`` (labels normal, nsfw);
    above ``max_score`` the sample is dropped with reason ``nsfw_above_threshold``."""

    label: int | str = "nsfw"


@dataclass
class WatermarkConfig(ImageClassifierConfig):
    """Watermark probability (``watermark_score``), e.g. ``amrul-hzz/watermark_detector`` with
    ``label: 1`` (the class data-juicer's watermark filter reads); above ``max_score`` the sample is
    dropped with reason ``watermark_above_threshold``."""

    label: int | str = "watermark"


# what img2dataset reads
UrlListFormat = Literal[
    "parquet", "csv", "tsv", "jsonl", "json", "txt", "csv.gz", "tsv.gz", "jsonl.gz", "json.gz", "txt.gz"
]
URL_LIST_FORMATS: tuple[str, ...] = typing.get_args(UrlListFormat)


@dataclass
class IngestResources:
    """How img2dataset downloads: processes, threads, local or on the Ray cluster."""

    processes: int | None = None  # null: one per CPU (at most 16)
    threads: int = 32  # download threads per process
    distributor: Literal["auto", "multiprocessing", "ray"] = "auto"  # auto: ray inside a Ray job

    def _validate(self, prefix: str) -> None:
        _positive(self.threads, f"{prefix}.threads")
        if self.processes is not None:
            _positive(self.processes, f"{prefix}.processes")


@dataclass
class IngestConfig:
    """Download a URL + alt-text list with img2dataset (``curate ingest``, or ``curate run``
    given a URL list). Defaults suit curation: WebDataset shards, images shrunk to
    ``image_size`` only when bigger, retries, and the noai/noindex X-Robots-Tag opt-outs
    honoured (img2dataset's list)."""

    urls: str | None = None  # URL list file or directory; `curate run` uses it when given no --input
    input_format: UrlListFormat | None = None  # null: from the file name
    url_col: str = "url"  # LAION: URL
    caption_col: str | None = "caption"  # LAION: TEXT; null: no alt-text
    image_size: int = 512
    resize_mode: Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"] = "keep_ratio"
    resize_only_if_bigger: bool = True
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = 95
    min_image_size: int = 0
    timeout: float = 10.0  # seconds per request
    retries: int = 2
    samples_per_shard: int = 10_000
    incremental_mode: Literal["incremental", "overwrite", "extend"] = "incremental"
    user_agent_token: str = "curate"
    respect_opt_out_headers: bool = True
    resources: IngestResources = field(default_factory=IngestResources)

    def _validate(self, prefix: str) -> None:
        for name in ("image_size", "timeout", "samples_per_shard", "encode_quality"):
            _positive(getattr(self, name), f"{prefix}.{name}")
        self.resources._validate(f"{prefix}.resources")
        if self.retries < 0:
            raise ConfigError(f"{prefix}.retries: must be >= 0, got {self.retries}")
        if self.min_image_size < 0:
            raise ConfigError(f"{prefix}.min_image_size: must be >= 0, got {self.min_image_size}")
        if self.encode_quality > 100:
            raise ConfigError(f"{prefix}.encode_quality: must be in 1..100, got {self.encode_quality}")
        if not self.url_col:
            raise ConfigError(f"{prefix}.url_col: must name the URL column")


@dataclass
class OutputConfig:
    write_shards: bool = True
    # samples per output Parquet row group, bounds writer memory
    row_group_size: int = 1024
    # OUT/embeddings/NAME.parquet: each sample's ranker image embedding and its best caption's text
    # embedding (for dedup, retrieval indexes and analysis); needs a ranker
    write_embeddings: bool = False
    embedding_dtype: Literal["float16", "float32"] = "float16"


@dataclass
class PipelineConfig:
    """A whole pipeline: read -> decode (+ rules) -> [nsfw, watermark] -> caption -> [rewrite] -> filter
    -> rank (+ aesthetic head) -> policy -> write."""

    name: str = "pipeline"
    seed: int = 0
    error_policy: Literal["capture", "raise"] = "capture"
    read: ReadConfig = field(default_factory=ReadConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    captioner: CaptionerConfig | None = None
    rewriter: RewriterConfig | None = None
    filter: FilterConfig | None = None
    ranker: RankerConfig | None = None
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    ingest: IngestConfig | None = None  # how URL-list inputs are downloaded first
    rules: RulesConfig | None = None  # cheap checks in the decode task, before any model
    nsfw: NsfwConfig | None = None  # image classifiers, right after decode
    watermark: WatermarkConfig | None = None
    aesthetic: AestheticConfig | None = None  # a head on the ranker's image embeddings

    def validate(self) -> PipelineConfig:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value) and hasattr(value, "_validate"):
                value._validate(f.name)
        p = self.policy
        if p.itm_threshold is not None and self.filter is None:
            raise ConfigError("policy.itm_threshold: needs a 'filter' section (the ITM model)")
        for name in ("top_k", "min_clip_score"):
            if getattr(p, name) is not None and self.ranker is None:
                raise ConfigError(f"policy.{name}: needs a 'ranker' section (the CLIP model, for clip_score)")
        if self.captioner is None and not p.keep_alt_text:
            raise ConfigError("policy.keep_alt_text: without a captioner there is nothing else to keep")
        if self.rewriter is not None and self.captioner is None:
            raise ConfigError("rewriter: needs a 'captioner' section (the dense captions it rewrites)")
        if p.prefer_source == "kale" and self.rewriter is None:
            raise ConfigError("policy.prefer_source: 'kale' needs a 'rewriter' section")
        if p.prefer_source is not None and self.filter is None and self.ranker is None:
            raise ConfigError("policy.prefer_source: comparing scores needs a 'filter' or 'ranker' section")
        if self.aesthetic is not None and self.ranker is None:
            raise ConfigError("aesthetic: needs a 'ranker' section (the head reads its image embedding)")
        if self.output.write_embeddings and self.ranker is None:
            raise ConfigError("output.write_embeddings: needs a 'ranker' section (whose encoders give them)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def models(self) -> dict[str, ModelConfig]:
        return {
            name: cfg
            for name, cfg in (
                ("captioner", self.captioner),
                ("rewriter", self.rewriter),
                ("filter", self.filter),
                ("ranker", self.ranker),
                ("nsfw", self.nsfw),
                ("watermark", self.watermark),
            )
            if cfg is not None
        }

    def heads(self) -> dict[str, AestheticConfig]:
        """Weights that run inside another stage's actor (the aesthetic head, in the ranker's)."""
        return {"aesthetic": self.aesthetic} if self.aesthetic is not None else {}


def _positive(value: int | float, name: str) -> None:
    if value <= 0:
        raise ConfigError(f"{name}: must be > 0, got {value}")


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check ``value`` against a dataclass field type; build nested dataclasses."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, name)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{name}: invalid value {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{name}: must be one of {list(choices)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, name)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{name}: unsupported type {tp}")  # pragma: no cover - schema bug


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        resources = hints.get("resources")
        if dataclasses.is_dataclass(resources) and unknown[0] in {
            f.name for f in dataclasses.fields(resources)
        }:
            raise ConfigError(
                f"{where}: execution settings moved to their own sub-section: write "
                f"{prefix}.resources.{unknown[0]} (resources: {{{unknown[0]}: ...}} under {prefix})"
            )
        raise ConfigError(f"{where}: unknown field (known: {', '.join(sorted(known))})")
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else key
        kwargs[key] = _coerce(value, hints[key], name)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``captioner.num_captions=5`` -> (['captioner', 'num_captions'], 5); values are YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected KEY=VALUE, e.g. captioner.num_captions=5")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"--set {text}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value is not valid YAML: {exc}") from exc
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {'.'.join(path[: i + 1])}: is not a section")
            node = child
        node[path[-1]] = value
    return data


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read, override and validate a pipeline file. Raises ConfigError naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"pipeline file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    data = apply_overrides(data, overrides or [])
    try:
        return pipeline_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def pipeline_from_dict(data: dict[str, Any]) -> PipelineConfig:
    cfg: PipelineConfig = _build(PipelineConfig, data, "")
    return cfg.validate()
