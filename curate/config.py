"""Pipeline files: typed, validated before any work starts.

A pipeline file is YAML with the sections of :class:`PipelineConfig`. Unknown fields,
wrong types and out-of-range values raise :class:`ConfigError` naming the field
(``captioner.num_captions``), so a typo never silently runs with a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

Device = Literal["auto", "cpu", "cuda"]
DType = Literal["fp32", "fp16", "bf16"]


class ConfigError(ValueError):
    """A pipeline file or override is invalid; the message names the field."""


@dataclass
class ModelConfig:
    """Settings shared by every model stage: what to load and where it runs."""

    model: str = ""
    revision: str | None = None
    device: Device = "auto"
    dtype: DType = "fp32"
    batch_size: int = 8
    # resources of each actor in the pool, declared here, never read off the driver
    num_gpus: float = 0.0
    num_cpus: float = 0.5
    concurrency: int = 1
    trust_remote_code: bool = False
    allow_pickle_weights: bool = False

    def _validate(self, prefix: str) -> None:
        if not self.model:
            raise ConfigError(f"{prefix}.model: a Hugging Face id or a local directory is required")
        _positive(self.batch_size, f"{prefix}.batch_size")
        _positive(self.concurrency, f"{prefix}.concurrency")
        if self.num_gpus < 0:
            raise ConfigError(f"{prefix}.num_gpus: must be >= 0, got {self.num_gpus}")
        if self.num_cpus < 0:
            raise ConfigError(f"{prefix}.num_cpus: must be >= 0, got {self.num_cpus}")
        if self.device == "cuda" and self.num_gpus == 0:
            raise ConfigError(
                f"{prefix}.device: 'cuda' needs {prefix}.num_gpus > 0 so Ray places the actor on a GPU"
            )


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

    def _validate(self, prefix: str) -> None:
        super()._validate(prefix)
        _positive(self.num_captions, f"{prefix}.num_captions")
        _positive(self.max_new_tokens, f"{prefix}.max_new_tokens")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"{prefix}.top_p: must be in (0, 1], got {self.top_p}")
        if self.temperature <= 0:
            raise ConfigError(f"{prefix}.temperature: must be > 0, got {self.temperature}")
        if self.decoding == "beam" and self.num_captions > self.num_beams:
            raise ConfigError(
                f"{prefix}.num_beams: beam search returns at most num_beams captions; "
                f"num_beams={self.num_beams} < num_captions={self.num_captions}"
            )


@dataclass
class FilterConfig(ModelConfig):
    """The ITM filter: BLIP image-text matching head."""

    batch_size: int = 32


@dataclass
class RankerConfig(ModelConfig):
    """The CLIP ranker: image-text cosine similarity."""

    batch_size: int = 32


@dataclass
class ReadConfig:
    """The reader's blocks are the unit every later stage processes (model stages split
    them into their own ``batch_size``). Fixed per shard, so reruns repeat captions."""

    batch_size: int = 64

    def _validate(self, prefix: str) -> None:
        _positive(self.batch_size, f"{prefix}.batch_size")


@dataclass
class DecodeConfig:
    """Decoding in CPU tasks: guards against bombs and tiny images."""

    min_side: int = 1
    max_pixels: int = 89_478_485  # PIL's own bomb limit
    max_side: int = 1024  # decoded images are downscaled to this long side for the models
    max_text_bytes: int = 65_536
    num_cpus: float = 0.5

    def _validate(self, prefix: str) -> None:
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

    def _validate(self, prefix: str) -> None:
        if self.itm_threshold is not None and not 0.0 <= self.itm_threshold <= 1.0:
            raise ConfigError(f"{prefix}.itm_threshold: must be in [0, 1], got {self.itm_threshold}")
        if self.top_k is not None:
            _positive(self.top_k, f"{prefix}.top_k")


@dataclass
class OutputConfig:
    write_shards: bool = True
    # samples per output Parquet row group, bounds writer memory
    row_group_size: int = 1024


@dataclass
class PipelineConfig:
    """A whole pipeline: read -> decode -> caption -> filter -> rank -> policy -> write."""

    name: str = "pipeline"
    seed: int = 0
    error_policy: Literal["capture", "raise"] = "capture"
    read: ReadConfig = field(default_factory=ReadConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    captioner: CaptionerConfig | None = None
    filter: FilterConfig | None = None
    ranker: RankerConfig | None = None
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def validate(self) -> PipelineConfig:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value) and hasattr(value, "_validate"):
                value._validate(f.name)
        p = self.policy
        if p.itm_threshold is not None and self.filter is None:
            raise ConfigError("policy.itm_threshold: needs a 'filter' section (the ITM model)")
        if (p.top_k is not None or p.min_clip_score is not None) and self.ranker is None:
            raise ConfigError("policy.top_k: ranking needs a 'ranker' section (the CLIP model)")
        if self.captioner is None and not p.keep_alt_text:
            raise ConfigError("policy.keep_alt_text: without a captioner there is nothing else to keep")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def models(self) -> dict[str, ModelConfig]:
        return {
            name: cfg
            for name, cfg in (("captioner", self.captioner), ("filter", self.filter), ("ranker", self.ranker))
            if cfg is not None
        }


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
