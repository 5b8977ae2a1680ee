"""A run's fingerprint: what decides whether an output directory may be resumed into."""

from __future__ import annotations

from pathlib import Path

import pytest

from curate.config import load_pipeline
from curate.pipeline import config_fingerprint

DEMO = Path(__file__).resolve().parents[2] / "pipelines" / "demo.yaml"


@pytest.mark.parametrize(
    "override",
    [
        "captioner.concurrency=4",
        "captioner.num_threads=2",
        "filter.batch_size=8",
        "decode.concurrency=3",
        "decode.memory_mb=1024",
        "read.concurrency=2",
        "read.in_flight_mb=512",
    ],
)
def test_where_and_how_fast_a_stage_runs_keeps_the_fingerprint(override):
    assert config_fingerprint(load_pipeline(DEMO, [override])) == config_fingerprint(load_pipeline(DEMO))


@pytest.mark.parametrize(
    "override", ["captioner.top_p=0.5", "policy.itm_threshold=0.3", "decode.max_side=512"]
)
def test_what_a_stage_writes_changes_the_fingerprint(override):
    assert config_fingerprint(load_pipeline(DEMO, [override])) != config_fingerprint(load_pipeline(DEMO))
