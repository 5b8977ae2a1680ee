from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.dedup.images import Sample, build_shards
from tests.helpers import start_local_ray

REPO = Path(__file__).resolve().parents[2]


@dataclass
class DedupRun:
    """A finished convert run over the dedup test set, deduplicated exact and by pHash."""

    out: Path
    inputs: list[Path]
    truth: list[Sample]
    exact: object  # DedupSummary
    phash: object


def convert_run(inputs: list[Path], out: Path) -> None:
    """The real pipeline with no models: read, decode (which keeps image_phash), write."""
    from curate.config import load_pipeline
    from curate.io.reader import shard_refs
    from curate.pipeline import run_pipeline

    cfg = load_pipeline(str(REPO / "pipelines" / "convert.yaml"))
    run_pipeline(cfg, shard_refs([str(p) for p in inputs]), str(out))


def copy_run(run: Path, to: Path) -> Path:
    """The run's own files (samples, curated tars, manifest) without its dedup results."""
    to.mkdir(parents=True)
    for name in ("samples", "shards", "_shards"):
        shutil.copytree(run / name, to / name)
    shutil.copy2(run / "manifest.json", to / "manifest.json")
    return to


@pytest.fixture(scope="session")
def dedup_run(tmp_path_factory: pytest.TempPathFactory) -> DedupRun:
    from curate.dedup.run import run_dedup

    start_local_ray()
    root = tmp_path_factory.mktemp("dedup")
    inputs, truth = build_shards(root / "inputs")
    out = root / "out"
    convert_run(inputs, out)
    exact = run_dedup(str(out), "exact")
    phash = run_dedup(str(out), "phash")
    return DedupRun(out=out, inputs=inputs, truth=truth, exact=exact, phash=phash)
