"""The example cluster definitions in deploy/ parse and agree with the CLI and the pipeline files.

No cluster is started: the KubeRay RayJob's entrypoint is parsed with `curate run`'s own
argument parser and its overrides are applied to the pipeline file it names; the cluster
launcher config is checked against the schema Ray ships.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

import pytest
import yaml

from curate.commands import run as run_command
from curate.config import load_pipeline

REPO = Path(__file__).resolve().parents[1]
RAYJOB = REPO / "deploy" / "kuberay-rayjob.yaml"
AWS = REPO / "deploy" / "ray-cluster-aws.yaml"


def _load_all(path: Path) -> list:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} is empty"
    return docs


@pytest.fixture(scope="module")
def rayjob() -> dict:
    jobs = [d for d in _load_all(RAYJOB) if d.get("kind") == "RayJob"]
    assert len(jobs) == 1
    return jobs[0]


@pytest.fixture(scope="module")
def entrypoint_args(rayjob: dict) -> argparse.Namespace:
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:2] == ["curate", "run"], argv
    parser = argparse.ArgumentParser(prog="curate")
    run_command.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv[1:])


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def _gpu_request(group: dict) -> int:
    total = 0
    for c in _containers(group):
        res = c.get("resources", {})
        total += int(res.get("limits", {}).get("nvidia.com/gpu", 0))
    return total


def test_rayjob_shape(rayjob: dict) -> None:
    assert rayjob["apiVersion"] == "ray.io/v1"
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec.get("submissionMode", "K8sJobMode") in ("K8sJobMode", "HTTPMode")
    yaml.safe_load(spec["runtimeEnvYAML"])  # the runtime env is itself YAML
    cluster = spec["rayClusterSpec"]
    assert {"headGroupSpec", "workerGroupSpecs"} <= set(cluster)
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        for c in _containers(group):
            assert c["image"]
            assert any(e["name"] == "HF_HOME" for e in c.get("env", [])), c["name"]
            mounts = {m["name"] for m in c.get("volumeMounts", [])}
            volumes = {v["name"] for v in group["template"]["spec"].get("volumes", [])}
            assert mounts <= volumes, (c["name"], mounts - volumes)


def test_rayjob_head_has_no_gpu_and_gpu_group_has_gpus(rayjob: dict) -> None:
    cluster = rayjob["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert str(head["rayStartParams"]["num-gpus"]) == "0"
    assert _gpu_request(head) == 0

    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    gpu_groups = [g for g in groups.values() if _gpu_request(g) > 0]
    cpu_groups = [g for g in groups.values() if _gpu_request(g) == 0]
    assert gpu_groups and cpu_groups
    for g in gpu_groups:
        # Ray is told the same GPU count as Kubernetes allocates to the pod
        assert int(g["rayStartParams"]["num-gpus"]) == _gpu_request(g)
    for g in groups.values():
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]


def test_rayjob_entrypoint_pipeline_and_overrides_are_valid(entrypoint_args: argparse.Namespace) -> None:
    args = entrypoint_args
    pipeline = REPO / args.pipeline
    assert not Path(args.pipeline).is_absolute()
    assert pipeline.parent == REPO / "pipelines", args.pipeline
    assert pipeline.is_file(), f"{args.pipeline} does not exist"
    assert args.overrides, "the example should show GPU placement overrides"
    cfg = load_pipeline(pipeline, args.overrides)  # raises ConfigError on a bad --set
    # the example puts every model stage on GPUs
    for name, model in cfg.models().items():
        assert model.resources.num_gpus > 0, name
    assert "://" in args.output, "a job's output should be a URL, not a path inside its working dir"


def test_rayjob_gpu_group_fits_the_declared_actors(rayjob: dict, entrypoint_args: argparse.Namespace) -> None:
    cfg = load_pipeline(REPO / entrypoint_args.pipeline, entrypoint_args.overrides)
    needed = sum(m.resources.num_gpus * m.resources.concurrency for m in cfg.models().values())
    groups = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    available = sum(g["maxReplicas"] * _gpu_request(g) for g in groups)
    assert available >= needed, (available, needed)


def test_aws_cluster_config() -> None:
    (config,) = _load_all(AWS)
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert types["cpu_workers"]["resources"]["CPU"] > 0
    assert types["cpu_workers"]["resources"].get("GPU", 0) == 0
    assert types["gpu_workers"]["resources"]["GPU"] > 0
    for name in ("cpu_workers", "gpu_workers"):
        t = types[name]
        assert 0 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"], name
    assert any("pip install" in cmd and "curate" in cmd for cmd in config["setup_commands"])


def test_aws_cluster_config_example_command_is_valid() -> None:
    """The `ray job submit ... -- curate run ...` in the file's header comment parses and validates."""
    header = []
    for line in AWS.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("#").strip())
    command = " ".join(header).replace("\\ ", " ")
    start = command.index("ray job submit")
    argv = shlex.split(command[start:].split(" ray down", 1)[0])
    argv = argv[argv.index("--") + 1 :]
    assert argv[:2] == ["curate", "run"], argv
    parser = argparse.ArgumentParser(prog="curate")
    run_command.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv[1:])
    load_pipeline(REPO / args.pipeline, args.overrides)


def test_aws_cluster_config_matches_ray_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    ray = pytest.importorskip("ray")
    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    if not schema_path.is_file():
        pytest.skip("this Ray has no autoscaler/ray-schema.json")
    (config,) = _load_all(AWS)
    jsonschema.validate(config, json.loads(schema_path.read_text()))
