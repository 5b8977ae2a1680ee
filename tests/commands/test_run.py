"""`curate run` as a new user meets it: a pipeline file named from another directory,
a model path that does not exist, `--dry-run`, inputs that hold more than shards, and the
README's DuckDB and `ray job submit` lines. None of these start Ray."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from curate.commands.run import looks_like_path, overridden_sections, resolve_local_models
from curate.config import ConfigError, load_pipeline
from tests.helpers import image_bytes, make_shard

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "pipelines" / "demo.yaml"
MODELS = REPO / "pipelines" / "models"


def _curate(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    code = "import sys; from curate.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def shards(tmp_path) -> Path:
    d = tmp_path / "in"
    for s in range(2):
        make_shard(d / f"{s:05d}.tar", [{"key": f"{s}0", "image": image_bytes(16, 16), "txt": "a cat"}])
    (d / "00000.parquet").write_bytes(b"")  # stands for img2dataset's sidecars: not shards
    (d / "00000_stats.json").write_text("{}")
    return d


def test_model_paths_in_a_pipeline_file_resolve_against_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repository
    cfg = load_pipeline(DEMO)
    resolve_local_models(cfg, str(DEMO))
    assert cfg.captioner.model == str(MODELS / "bridge-captioner")
    assert cfg.filter.model == cfg.ranker.model == str(MODELS / "bridge-filter")


def test_a_pipeline_file_with_paths_relative_to_the_working_directory_still_works(tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    shutil.copytree(MODELS / "bridge-filter", tmp_path / "work" / "m" / "f")
    (tmp_path / "conf" / "p.yaml").write_text("name: p\nfilter: {model: m/f}\npolicy: {itm_threshold: 0.5}\n")
    monkeypatch.chdir(tmp_path / "work")
    cfg = load_pipeline(tmp_path / "conf" / "p.yaml")
    resolve_local_models(cfg, str(tmp_path / "conf" / "p.yaml"))
    assert cfg.filter.model == str(tmp_path / "work" / "m" / "f")


def test_an_aesthetic_head_path_resolves_like_the_models(tmp_path, monkeypatch):
    """The head's weights load inside the ranker's actor, which may run in another directory."""
    (tmp_path / "conf" / "heads").mkdir(parents=True)
    (tmp_path / "conf" / "heads" / "h.safetensors").write_bytes(b"")
    pipeline = "name: p\nranker: {model: gpt2}\naesthetic: {model: heads/h.safetensors}\n"
    (tmp_path / "conf" / "p.yaml").write_text(pipeline)
    monkeypatch.chdir(tmp_path)
    cfg = load_pipeline(tmp_path / "conf" / "p.yaml")
    resolve_local_models(cfg, str(tmp_path / "conf" / "p.yaml"))
    assert cfg.aesthetic.model == str(tmp_path / "conf" / "heads" / "h.safetensors")


def test_a_set_model_path_is_the_command_lines_own(tmp_path, monkeypatch):
    shutil.copytree(MODELS / "bridge-filter", tmp_path / "pipelines" / "models" / "bridge-filter")
    monkeypatch.chdir(tmp_path)  # holds a pipelines/models/bridge-filter of its own
    overrides = ["filter.model=pipelines/models/bridge-filter"]
    cfg = load_pipeline(DEMO, overrides)
    resolve_local_models(cfg, str(DEMO), overridden_sections(overrides))
    assert cfg.filter.model == str(tmp_path / "pipelines" / "models" / "bridge-filter")
    assert cfg.ranker.model == str(MODELS / "bridge-filter")  # still the file's


def test_a_missing_local_model_names_the_field_and_the_paths_tried(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_pipeline(DEMO, ["filter.model=models/no-such-model/x"])
    with pytest.raises(ConfigError) as info:
        resolve_local_models(cfg, str(DEMO), frozenset({"filter"}))
    message = str(info.value)
    assert message.startswith("filter.model: 'models/no-such-model/x' is a local path that does not exist")
    assert str(tmp_path / "models" / "no-such-model" / "x") in message
    assert str(REPO / "pipelines" / "models" / "no-such-model" / "x") in message


@pytest.mark.parametrize(
    ("value", "path"),
    [
        ("Salesforce/blip-itm-large-coco", False),
        ("gpt2", False),
        ("pipelines/models/bridge-filter", True),
        ("./m", True),
        ("../m", True),
        ("/abs/m", True),
        ("~/m", True),
    ],
)
def test_what_counts_as_a_path(value, path):
    assert looks_like_path(value) is path


def test_cli_from_another_directory_fails_before_ray_on_a_missing_model(shards, tmp_path):
    ray_tmp = tmp_path / "ray"
    ray_tmp.mkdir()
    done = _curate(
        "run",
        str(DEMO),
        "--input",
        str(shards),
        "--output",
        str(tmp_path / "out"),
        "--set",
        "captioner.model=models/bridge-captioner-missing/v1",
        cwd=tmp_path,
        env={"RAY_TMPDIR": str(ray_tmp)},
    )
    assert done.returncode == 2, done.stderr
    assert "captioner.model: 'models/bridge-captioner-missing/v1' is a local path" in done.stderr
    assert not (tmp_path / "out").exists()
    assert list(ray_tmp.iterdir()) == []  # no Ray was started


def test_dry_run_prints_the_plan_and_starts_and_writes_nothing(shards, tmp_path):
    ray_tmp = tmp_path / "ray"
    ray_tmp.mkdir()
    args = ("run", str(DEMO), "--input", str(shards), "--output", str(tmp_path / "out"), "--dry-run")
    done = _curate(*args, cwd=tmp_path, env={"RAY_TMPDIR": str(ray_tmp)})
    assert done.returncode == 0, done.stderr
    plan = done.stdout
    for stage in ("read", "decode", "captioner", "filter + ranker", "policy + write part", "commit"):
        assert re.search(rf"^  {re.escape(stage)} ", plan, re.M), plan
    assert "2 actor(s) x (0.5 CPU, 0 GPU, 1 torch thread(s)), batch 16" in plan  # demo's captioner
    assert f"captioner: {MODELS / 'bridge-captioner'} [local, " in plan
    assert "inputs: 2 shard(s): 0 already done" in plan and "2 to do" in plan
    assert "skipped 2 matched file(s) that are not shards (1 .parquet, 1 _stats.json)" in done.stderr
    assert not (tmp_path / "out").exists()
    assert list(ray_tmp.iterdir()) == []


def test_dry_run_counts_finished_shards_and_sees_another_pipelines_output(shards, tmp_path):
    out = tmp_path / "out"
    (out / "samples").mkdir(parents=True)
    (out / "samples" / "00001.parquet").write_bytes(b"")  # the done marker is all it reads
    args = ("run", str(DEMO), "--input", str(shards), "--output", str(out), "--dry-run")
    done = _curate(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "inputs: 2 shard(s): 1 already done" in done.stdout and "1 to do" in done.stdout
    (out / "_pipeline.json").write_text('{"name": "other", "fingerprint": "0000"}')
    refused = _curate(*args, cwd=tmp_path)
    assert refused.returncode == 2
    assert "holds a run of another configuration ('other'" in refused.stdout


def _readme_commands(prefix: str) -> list[str]:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    joined = "\n".join(b.replace("\\\n", " ") for b in blocks)
    return [line.strip() for line in joined.splitlines() if line.strip().startswith(prefix)]


def test_readme_ray_job_submit_inputs_are_absolute():
    """`--working-dir .` does not upload gitignored data/: a relative --input is not found."""
    commands = _readme_commands("ray job submit")
    assert commands
    for command in commands:
        argv = shlex.split(command.split("#")[0], posix=True)
        for flag in ("--input", "--output"):
            for i, arg in enumerate(argv):
                if arg == flag:
                    value = argv[i + 1]
                    assert value.startswith(("$PWD", "/", "s3://", "gs://")), (flag, value, command)


def test_the_readme_duckdb_lines_run_with_the_cli_setup_installs(tmp_path):
    duckdb = shutil.which("duckdb", path=str(Path(sys.executable).parent))
    assert duckdb, "the DuckDB CLI (PyPI duckdb-cli, the `cli` extra) is not in this environment"
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curate.schema import SAMPLES_SCHEMA

    out = tmp_path / "out" / "blip2" / "samples"
    out.mkdir(parents=True)
    row = {name: None for name in SAMPLES_SCHEMA.names}
    row.update(key="k", shard="s", status="kept", caption="a cat", captions=["a cat"], candidates=[])
    pq.write_table(pa.Table.from_pylist([row], schema=SAMPLES_SCHEMA), out / "s.parquet")
    lines = [c for c in _readme_commands("duckdb -c") if "out/blip2/" in c]
    assert lines
    for line in lines:
        argv = [duckdb, *shlex.split(line)[1:]]
        done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (line, done.stderr)
        assert "kept" in done.stdout or "a cat" in done.stdout


@pytest.mark.slow
def test_a_run_shows_one_progress_display_and_sends_rays_output_to_a_log(shards, tmp_path):
    """The console holds curate's lines only; Ray's dumps and warnings are in OUT/_logs."""
    out = tmp_path / "out"
    ray_tmp = tempfile.mkdtemp(prefix="rp-")  # short: Ray's socket paths have a length limit
    args = ("run", str(REPO / "pipelines" / "convert.yaml"), "--input", str(shards), "--output", str(out))
    done = _curate(*args, "--num-cpus", "4", cwd=tmp_path, env={"RAY_TMPDIR": ray_tmp})
    subprocess.run(["pkill", "-9", "-f", ray_tmp], check=False)  # this run's Ray only
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stderr
    console = done.stdout + done.stderr
    assert re.search(
        r"^curate run: 2 of 2 samples \| [\d.]+ samples/s \| kept 2 dropped 0 error 0", done.stderr, re.M
    )
    assert "  shard 00000: 1 samples, kept 1, dropped 0, error 0" in done.stderr
    for noise in ("streaming_executor", "Token authentication", "WARNING", "INFO"):
        assert noise not in console, (noise, console)
    (log,) = (out / "_logs").glob("run-*.log")
    assert f"Ray's own messages go to {log}" in done.stderr
    assert "streaming_executor" in log.read_text()
