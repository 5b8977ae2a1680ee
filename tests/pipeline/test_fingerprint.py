"""A run's fingerprint: what decides whether an output directory may be resumed into."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from curate.config import load_pipeline
from curate.pipeline import config_fingerprint

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "pipelines" / "demo.yaml"
KALE = REPO / "pipelines" / "kale.yaml"  # the one with a rewriter (vLLM sizing)


def _other(value):
    """A different valid value of a resources field."""
    if isinstance(value, bool):
        return not value
    if value in ("cpu", "auto", "cuda"):
        return "auto" if value != "auto" else "cpu"
    if value in ("multiprocessing", "ray"):
        return "auto"
    if isinstance(value, float):
        return value / 2 if 0 < value <= 1 else value + 1
    return (value or 1) + 1


def _resources(cfg):
    """(section name, its resources) for every section of ``cfg`` that has them."""
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if dataclasses.is_dataclass(section) and hasattr(section, "resources"):
            yield f.name, section.resources


SECTIONS = {"captioner", "filter", "ranker", "read", "decode", "ingest"}


@pytest.mark.parametrize(
    ("path", "sections"), [(DEMO, SECTIONS), (KALE, {*SECTIONS, "rewriter"})], ids=["demo", "kale"]
)
def test_no_resources_field_changes_the_fingerprint(path, sections):
    """By construction: every field of every section's resources, each changed alone."""
    base = config_fingerprint(load_pipeline(path, ["ingest.urls=urls.parquet"]))
    cfg = load_pipeline(path, ["ingest.urls=urls.parquet"])
    seen = set()
    for name, resources in _resources(cfg):
        for f in dataclasses.fields(resources):
            before = getattr(resources, f.name)
            assert _other(before) != before, f.name
            setattr(resources, f.name, _other(before))
            assert config_fingerprint(cfg) == base, f"{name}.resources.{f.name}"
            setattr(resources, f.name, before)
        seen.add(name)
    assert seen == sections  # every stage's resources were tried


@pytest.mark.parametrize(
    "override",
    [
        "captioner.resources.concurrency=4",
        "captioner.resources.num_threads=2",
        "filter.resources.batch_size=8",
        "decode.resources.concurrency=3",
        "decode.resources.memory_mb=1024",
        "read.resources.concurrency=2",
        "read.resources.batch_size=16",
        "read.resources.in_flight_mb=512",
    ],
)
def test_where_and_how_fast_a_stage_runs_keeps_the_fingerprint(override):
    assert config_fingerprint(load_pipeline(DEMO, [override])) == config_fingerprint(load_pipeline(DEMO))


@pytest.mark.parametrize(
    "override",
    ["captioner.top_p=0.5", "policy.itm_threshold=0.3", "decode.max_side=512", "filter.dtype=bf16"],
)
def test_what_a_stage_writes_changes_the_fingerprint(override):
    assert config_fingerprint(load_pipeline(DEMO, [override])) != config_fingerprint(load_pipeline(DEMO))
