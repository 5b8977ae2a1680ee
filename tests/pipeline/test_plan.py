"""The physical plan Ray Data builds for the demo pipeline (planned, not executed)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from curate.config import load_pipeline
from curate.io.reader import ShardRef
from curate.pipeline import build_dataset
from tests.helpers import start_local_ray

REPO = Path(__file__).resolve().parents[2]


def planned(cfg):
    """The lazy dataset of ``cfg`` over one shard that is never read."""
    start_local_ray()
    return build_dataset(cfg, [ShardRef(url="unused.tar", name="unused")], "unused-output")


def plan(cfg) -> str:
    ds = planned(cfg)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        ds.explain()
    return out.getvalue()


@pytest.mark.parametrize("layout", ["demo", "default concurrency"])
def test_decode_stays_in_cpu_tasks_and_one_actor_scores_with_the_bridge_filter(layout):
    cfg = load_pipeline(REPO / "pipelines" / "demo.yaml")
    cfg.filter.model = cfg.ranker.model = str(REPO / "pipelines" / "models" / "bridge-filter")
    if layout == "default concurrency":  # task and actor pool sizes alone no longer tell them apart
        cfg.decode.resources.concurrency, cfg.captioner.resources.concurrency = None, 1
    text = plan(cfg)
    assert "TaskPoolMapOperator[MapBatches(decode_batch)]" in text
    assert "decode_batch)->MapBatches(CaptionStage)" not in text  # not fused into the actor
    assert "MapBatches(ScoreStage)" in text
    assert "FilterStage" not in text and "RankStage" not in text


def test_a_filter_and_ranker_of_different_models_stay_two_stages():
    cfg = load_pipeline(REPO / "pipelines" / "demo.yaml")
    cfg.filter.model = str(REPO / "pipelines" / "models" / "bridge-filter")
    cfg.ranker.model = str(REPO / "pipelines" / "models" / "bridge-captioner")  # any other directory
    text = plan(cfg)
    assert "MapBatches(FilterStage)" in text and "MapBatches(RankStage)" in text
    assert "ScoreStage" not in text


def test_gpu_stages_plan_with_whole_blocks():
    # Ray Data's public map_batches refuses batch_size=None for a stage that asks for
    # GPUs; the plan is only built here (no GPU needed), which is where it raised
    cfg = load_pipeline(REPO / "bench" / "gpu.yaml")
    for stage in cfg.models().values():
        stage.model = str(REPO / "pipelines" / "models" / "bridge-filter")  # never loaded
    cfg.filter.model = str(REPO / "pipelines" / "models" / "bridge-captioner")  # two scoring stages
    ds = planned(cfg)
    ops = {}
    op = ds._logical_plan.dag
    while op is not None:
        ops[op.name] = op
        op = op.input_dependencies[0] if op.input_dependencies else None
    for name in ("MapBatches(CaptionStage)", "MapBatches(FilterStage)", "MapBatches(RankStage)"):
        assert ops[name].ray_remote_args["num_gpus"] > 0
        assert ops[name].batch_size is None  # whole blocks, as on CPU


def test_in_flight_budget_bounds_this_datasets_object_store_use_only():
    import ray.data

    cfg = load_pipeline(REPO / "pipelines" / "demo.yaml", ["read.resources.in_flight_mb=300"])
    ds = planned(cfg)
    assert ds.context.execution_options.resource_limits.object_store_memory == 300 * 2**20
    default = ray.data.DataContext.get_current().execution_options.resource_limits
    assert default.object_store_memory != 300 * 2**20  # the driver's other datasets keep Ray's default
