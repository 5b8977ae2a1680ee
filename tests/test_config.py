from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from curate.config import (
    CaptionerConfig,
    ConfigError,
    DecodeResources,
    EngineResources,
    IngestResources,
    PipelineConfig,
    ReadResources,
    RewriterResources,
    ScorerResources,
    apply_overrides,
    load_pipeline,
    parse_override,
    pipeline_from_dict,
)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "pipelines").glob("*.yaml"))

CAPTIONER = {"model": "Salesforce/blip-image-captioning-large", "num_captions": 5}
FILTER = {"model": "Salesforce/blip-itm-large-coco"}
RANKER = {"model": "openai/clip-vit-large-patch14"}


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def build(**sections) -> PipelineConfig:
    return pipeline_from_dict(sections)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_pipelines_load(path):
    cfg = load_pipeline(path)
    assert isinstance(cfg, PipelineConfig)
    assert cfg.name
    for name, model in cfg.models().items():
        assert model.model, f"{path.name}: {name}.model"


def test_full_pipeline_builds_typed_sections():
    cfg = build(
        name="capfilt+blip2",
        captioner=CAPTIONER,
        filter=FILTER,
        ranker=RANKER,
        policy={"itm_threshold": 0.5, "top_k": 3},
        decode={"min_side": 32},
    )
    assert isinstance(cfg.captioner, CaptionerConfig)
    assert cfg.captioner.num_captions == 5
    assert cfg.captioner.top_p == 0.9  # default kept
    assert cfg.policy.itm_threshold == 0.5 and cfg.policy.top_k == 3
    assert cfg.decode.min_side == 32
    assert list(cfg.models()) == ["captioner", "filter", "ranker"]
    assert cfg.to_dict()["captioner"]["model"] == CAPTIONER["model"]


def test_alt_text_only_pipeline_is_valid():
    cfg = build()
    assert cfg.models() == {}


# -- errors name the field ---------------------------------------------------------------------


def test_unknown_field_names_it():
    with pytest.raises(ConfigError, match=r"captioner\.num_captionz: unknown field"):
        build(captioner={**CAPTIONER, "num_captionz": 5})
    with pytest.raises(ConfigError, match=r"^policiy: unknown field"):
        build(policiy={})


@pytest.mark.parametrize(
    ("section", "value", "message"),
    [
        ({"num_captions": "ten"}, None, r"captioner\.num_captions: expected an integer"),
        ({"num_captions": True}, None, r"captioner\.num_captions: expected an integer"),
        ({"num_captions": 2.5}, None, r"captioner\.num_captions: expected an integer"),
        ({"top_p": "high"}, None, r"captioner\.top_p: expected a number"),
        ({"dedupe": "yes please"}, None, r"captioner\.dedupe: expected true/false"),
        ({"prompt": 5}, None, r"captioner\.prompt: expected a string"),
        ({"decoding": "greedy"}, None, r"captioner\.decoding: must be one of \['nucleus', 'beam'\]"),
        ({"dtype": "fp8"}, None, r"captioner\.dtype: must be one of"),
    ],
)
def test_wrong_types_name_the_field(section, value, message):
    with pytest.raises(ConfigError, match=message):
        build(captioner={**CAPTIONER, **section})


def test_ints_are_accepted_for_floats():
    cfg = build(captioner={**CAPTIONER, "top_p": 1, "temperature": 2})
    assert cfg.captioner.top_p == 1.0 and isinstance(cfg.captioner.top_p, float)


def test_section_must_be_a_mapping():
    with pytest.raises(ConfigError, match=r"captioner: expected a mapping"):
        build(captioner="blip")


@pytest.mark.parametrize("top_p", [0, 0.0, -0.1, 1.5])
def test_top_p_out_of_range(top_p):
    with pytest.raises(ConfigError, match=r"captioner\.top_p: must be in \(0, 1\]"):
        build(captioner={**CAPTIONER, "top_p": top_p})


def test_top_p_of_one_is_allowed():
    assert build(captioner={**CAPTIONER, "top_p": 1.0}).captioner.top_p == 1.0


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"captioner": {**CAPTIONER, "num_captions": 0}}, r"captioner\.num_captions: must be > 0"),
        ({"captioner": {**CAPTIONER, "temperature": 0}}, r"captioner\.temperature"),
        ({"captioner": {"num_captions": 3}}, r"captioner\.model: .*required"),
        (
            {"filter": {**FILTER, "resources": {"batch_size": 0}}},
            r"filter\.resources\.batch_size: must be > 0",
        ),
        ({"ranker": {**RANKER, "resources": {"num_gpus": -1}}}, r"ranker\.resources\.num_gpus: must be >= 0"),
        ({"decode": {"min_side": 0}}, r"decode\.min_side: must be > 0"),
        ({"decode": {"resources": {"memory_mb": 0}}}, r"decode\.resources\.memory_mb: must be > 0"),
        ({"read": {"resources": {"in_flight_mb": 0}}}, r"read\.resources\.in_flight_mb: must be > 0"),
        ({"filter": FILTER, "policy": {"itm_threshold": 1.5}}, r"policy\.itm_threshold: must be in \[0, 1\]"),
        ({"ranker": RANKER, "policy": {"top_k": 0}}, r"policy\.top_k: must be > 0"),
    ],
)
def test_out_of_range_values_name_the_field(sections, message):
    with pytest.raises(ConfigError, match=message):
        build(**sections)


def test_itm_threshold_needs_a_filter_section():
    with pytest.raises(ConfigError, match=r"policy\.itm_threshold: needs a 'filter' section"):
        build(captioner=CAPTIONER, policy={"itm_threshold": 0.5})
    assert build(captioner=CAPTIONER, filter=FILTER, policy={"itm_threshold": 0.5}).filter is not None


def test_ranking_needs_a_ranker_section():
    # the message names the field that was set, not another one of the policy's
    with pytest.raises(ConfigError, match=r"^policy\.top_k: needs a 'ranker' section"):
        build(captioner=CAPTIONER, policy={"top_k": 2})
    with pytest.raises(ConfigError, match=r"^policy\.min_clip_score: needs a 'ranker' section"):
        build(captioner=CAPTIONER, policy={"min_clip_score": 0.2})


def test_dropping_the_alt_text_needs_a_captioner():
    with pytest.raises(ConfigError, match=r"policy\.keep_alt_text"):
        build(policy={"keep_alt_text": False})


def test_beam_with_more_captions_than_beams():
    with pytest.raises(ConfigError, match=r"captioner\.num_beams: .*num_beams=3 < num_captions=5"):
        build(captioner={**CAPTIONER, "decoding": "beam", "num_beams": 3, "num_captions": 5})
    cfg = build(captioner={**CAPTIONER, "decoding": "beam", "num_beams": 5, "num_captions": 5})
    assert cfg.captioner.decoding == "beam"


def test_cuda_device_needs_gpus():
    with pytest.raises(
        ConfigError, match=r"ranker\.resources\.device: 'cuda' needs ranker\.resources\.num_gpus > 0"
    ):
        build(ranker={**RANKER, "resources": {"device": "cuda", "num_gpus": 0}}, policy={"top_k": 1})
    cfg = build(ranker={**RANKER, "resources": {"device": "cuda", "num_gpus": 0.5}}, policy={"top_k": 1})
    assert cfg.ranker.resources.num_gpus == 0.5


# -- execution settings apart from what is written -------------------------------------------------

# every field of every section's resources, as a flat field of the section
FLAT_RESOURCES = [
    (section, name)
    for section, sub in [
        ("captioner", EngineResources),
        ("filter", ScorerResources),
        ("ranker", ScorerResources),
        ("rewriter", RewriterResources),
        ("read", ReadResources),
        ("decode", DecodeResources),
        ("ingest", IngestResources),
    ]
    for name in (f.name for f in dataclasses.fields(sub))
]


@pytest.mark.parametrize(("section", "name"), FLAT_RESOURCES, ids=[f"{s}.{n}" for s, n in FLAT_RESOURCES])
def test_an_old_flat_execution_field_names_its_new_place(section, name, tmp_path):
    value = {"device": "cpu", "distributor": "ray"}.get(name, 1)
    sections = {section: {name: value}}
    if section in ("captioner", "filter", "ranker", "rewriter"):
        sections[section]["model"] = "some/model"
    path = write_yaml(tmp_path / "p.yaml", sections)
    with pytest.raises(ConfigError, match=rf"{section}\.{name}: .*write {section}\.resources\.{name}\b"):
        load_pipeline(path)
    # on the command line too, before any work starts
    with pytest.raises(ConfigError, match=rf"{section}\.resources\.{name}\b"):
        load_pipeline(write_yaml(tmp_path / "q.yaml", {}), [f"{section}.{name}={value}"])


def test_resources_have_each_sections_own_defaults():
    cfg = build(captioner=CAPTIONER, filter=FILTER, ranker=RANKER, rewriter={"model": "some/llm"})
    assert cfg.captioner.resources.batch_size == 8
    assert cfg.filter.resources.batch_size == cfg.ranker.resources.batch_size == 32
    assert cfg.rewriter.resources.batch_size == 16 and cfg.rewriter.resources.max_num_seqs == 256
    # a partial resources section keeps the other defaults of its own section
    cfg = build(filter={**FILTER, "resources": {"num_cpus": 2}})
    assert cfg.filter.resources.batch_size == 32 and cfg.filter.resources.num_cpus == 2.0
    assert cfg.read.resources.batch_size == 64 and cfg.decode.resources.memory_mb == 256


# -- files and overrides -------------------------------------------------------------------------


def test_load_pipeline_prefixes_the_file(tmp_path):
    path = write_yaml(tmp_path / "p.yaml", {"captioner": {**CAPTIONER, "num_captionz": 1}})
    with pytest.raises(ConfigError) as info:
        load_pipeline(path)
    assert str(path) in str(info.value)
    assert "captioner.num_captionz" in str(info.value)


def test_load_pipeline_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="pipeline file not found"):
        load_pipeline(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_pipeline(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("captioner: {model: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_pipeline(tmp_path / "broken.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert load_pipeline(tmp_path / "empty.yaml").models() == {}


def test_overrides_nested_and_yaml_typed(tmp_path):
    path = write_yaml(tmp_path / "p.yaml", {"name": "base", "captioner": CAPTIONER})
    cfg = load_pipeline(
        path,
        [
            "captioner.num_captions=3",
            "captioner.top_p=0.5",
            "captioner.dedupe=false",
            "captioner.prompt=a picture of",
            "name=overridden",
            "decode.max_side=512",
        ],
    )
    assert cfg.name == "overridden"
    assert cfg.captioner.num_captions == 3
    assert cfg.captioner.top_p == 0.5
    assert cfg.captioner.dedupe is False
    assert cfg.captioner.prompt == "a picture of"
    assert cfg.captioner.model == CAPTIONER["model"]  # untouched siblings survive
    assert cfg.decode.max_side == 512


def test_override_creates_a_section(tmp_path):
    path = write_yaml(tmp_path / "p.yaml", {"captioner": CAPTIONER})
    cfg = load_pipeline(
        path, [f"ranker.model={RANKER['model']}", "policy.top_k=2", "filter.model=/models/itm"]
    )
    assert cfg.ranker is not None and cfg.ranker.model == RANKER["model"]
    assert cfg.filter is not None and cfg.filter.model == "/models/itm"
    assert cfg.policy.top_k == 2


def test_override_can_disable_a_section(tmp_path):
    path = write_yaml(tmp_path / "p.yaml", {"captioner": CAPTIONER, "ranker": RANKER})
    assert load_pipeline(path, ["ranker=null"]).ranker is None


def test_overridden_values_are_validated(tmp_path):
    path = write_yaml(tmp_path / "p.yaml", {"captioner": CAPTIONER})
    with pytest.raises(ConfigError, match=r"captioner\.num_captions: expected an integer"):
        load_pipeline(path, ["captioner.num_captions=many"])
    with pytest.raises(ConfigError, match=r"captioner\.top_p"):
        load_pipeline(path, ["captioner.top_p=2"])
    with pytest.raises(ConfigError, match=r"captioner\.num_captionz"):
        load_pipeline(path, ["captioner.num_captionz=2"])


def test_parse_override():
    assert parse_override("captioner.num_captions=5") == (["captioner", "num_captions"], 5)
    assert parse_override("policy.itm_threshold=0.25") == (["policy", "itm_threshold"], 0.25)
    assert parse_override("captioner.prompt=a=b") == (["captioner", "prompt"], "a=b")
    assert parse_override("captioner.prompt=") == (["captioner", "prompt"], "")
    assert parse_override("x=[1, 2]") == (["x"], [1, 2])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("captioner.num_captions", "expected KEY=VALUE"),
        ("=5", "empty key"),
        ("captioner.prompt=[unclosed", "not valid YAML"),
        ("name.inner=1", r"--set name: is not a section"),
    ],
)
def test_malformed_overrides(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides({"name": "x"}, [override])


# -- CLI: fails before any Ray start -------------------------------------------------------------


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "curate", "run", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    proc.elapsed = time.monotonic() - started  # type: ignore[attr-defined]
    return proc


def test_cli_bad_pipeline_exits_2_naming_the_field(tmp_path):
    path = write_yaml(tmp_path / "bad.yaml", {"captioner": {**CAPTIONER, "num_captionz": 3}})
    shard = tmp_path / "x.tar"
    shard.write_bytes(b"")
    proc = run_cli(str(path), "--input", str(shard), "--output", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "captioner.num_captionz" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
    assert proc.elapsed < 30


def test_cli_missing_input_exits_2_naming_the_path(tmp_path):
    path = write_yaml(tmp_path / "ok.yaml", {"name": "alt-only"})
    missing = tmp_path / "shards" / "{00000..00001}.tar"
    proc = run_cli(str(path), "--input", str(missing), "--output", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert str(tmp_path / "shards" / "00000.tar") in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
    assert proc.elapsed < 30


def test_cli_override_error_exits_2(tmp_path):
    path = write_yaml(tmp_path / "ok.yaml", {"captioner": CAPTIONER})
    proc = run_cli(
        str(path), "--input", "x.tar", "--output", "out", "--set", "captioner.top_p=7", cwd=tmp_path
    )
    assert proc.returncode == 2, proc.stderr
    assert "captioner.top_p" in proc.stderr
