"""What a run would do, without doing it (``curate run --dry-run``).

Built from the checked pipeline, the resolved models and inputs and a read-only look at
the output: no Ray is started and nothing is written.
"""

from __future__ import annotations

import json
import sys
from typing import TextIO

from curate.config import ModelConfig, PipelineConfig
from curate.io.files import output_fs
from curate.io.reader import ShardRef
from curate.io.writer import PIPELINE_FILE, done_shards


def _actor(m: ModelConfig) -> str:
    r = m.resources
    threads = f", {r.num_threads} torch thread(s)" if r.num_threads else ""
    return (
        f"{r.concurrency} actor(s) x ({r.num_cpus:g} CPU, {r.num_gpus:g} GPU{threads}), "
        f"batch {r.batch_size}, device {r.device}, {m.dtype}"
    )


def stage_lines(cfg: PipelineConfig) -> list[tuple[str, str]]:
    """(stage, how it runs) in the order a block passes through them."""
    from curate.stages.models import fused_scoring

    read, decode, task = cfg.read.resources, cfg.decode, cfg.decode.resources
    at_once = lambda n: f"at most {n} at once" if n else "as many as free CPUs allow"  # noqa: E731
    if not cfg.models():
        return [
            (
                "read + decode + write",
                f"one CPU task per shard ({task.num_cpus:g} CPU, {task.memory_mb} MB), "
                f"{at_once(read.concurrency or task.concurrency)}; blocks of {read.batch_size} rows; "
                f"images checked (min_side {decode.min_side}, max_pixels {decode.max_pixels})",
            )
        ]
    lines = [
        ("read", f"CPU tasks (0.25 CPU), {at_once(read.concurrency)}; blocks of {read.batch_size} rows"),
        (
            "decode",
            f"CPU tasks ({task.num_cpus:g} CPU, {task.memory_mb} MB), {at_once(task.concurrency)}; "
            f"max_side {decode.max_side}" + ("; rules before any model" if cfg.rules is not None else ""),
        ),
    ]
    for name, section in (("nsfw", cfg.nsfw), ("watermark", cfg.watermark)):
        if section is not None:
            limit = f"drops above {section.max_score:g}" if section.max_score is not None else "score only"
            lines.append(
                (f"{name} (image classifier)", f"{_actor(section)}; label {section.label!r}, {limit}")
            )
    if cfg.captioner is not None:
        c = cfg.captioner
        lines.append(
            (
                "captioner",
                f"{_actor(c)}; {c.num_captions} {c.decoding} caption(s) of <= {c.max_new_tokens} tokens",
            )
        )
    if cfg.rewriter is not None:
        lines.append(("rewriter (KALE)", f"{_actor(cfg.rewriter)}; backend {cfg.rewriter.backend}"))
    if fused_scoring(cfg.filter, cfg.ranker):
        lines.append(("filter + ranker", f"{_actor(cfg.filter)}; one model, ITM and ITC from one encoding"))
    else:
        if cfg.filter is not None:
            lines.append(("filter (ITM)", _actor(cfg.filter)))
        if cfg.ranker is not None:
            lines.append(("ranker (CLIP)", _actor(cfg.ranker)))
    extras = [
        text
        for text, on in (
            ("the aesthetic head on its image embeddings", cfg.aesthetic is not None),
            (f"{cfg.output.embedding_dtype} embeddings out", cfg.output.write_embeddings),
        )
        if on
    ]
    if extras and lines[-1][0].startswith(("ranker", "filter + ranker")):
        stage, how = lines[-1]
        lines[-1] = (stage, f"{how}; with {' and '.join(extras)}")
    p = cfg.policy
    rules = {k: v for k, v in (("itm_threshold", p.itm_threshold), ("top_k", p.top_k)) if v is not None}
    if p.min_clip_score is not None:
        rules["min_clip_score"] = p.min_clip_score
    policy = ", ".join(f"{k} {v}" for k, v in rules.items()) or "keep every text"
    lines.append(("policy + write part", f"CPU tasks (0.25 CPU); {policy}"))
    lines.append(("commit", "one CPU task (0.25 CPU) per complete shard"))
    return lines


def print_plan(
    cfg: PipelineConfig,
    pipeline_path: str,
    shards: list[ShardRef],
    output: str,
    url_list: str | None = None,
    overwrite: bool = False,
    out: TextIO | None = None,
) -> int:
    """Print the plan; 0, or 2 when the output holds another pipeline's run (the run would refuse)."""
    from curate.pipeline import config_fingerprint, describe_models

    out = out or sys.stdout
    fingerprint = config_fingerprint(cfg)
    say = lambda text="": print(text, file=out)  # noqa: E731
    say(f"plan: pipeline {cfg.name!r} from {pipeline_path} (fingerprint {fingerprint}), seed {cfg.seed}")
    say("stages, in the order every block passes through them:")
    width = max(len(name) for name, _ in stage_lines(cfg))
    for name, how in stage_lines(cfg):
        say(f"  {name:<{width}}  {how}")
    models = describe_models(cfg)
    if models:
        say("models:")
        for name, info in models.items():
            where = "packaged" if info.get("packaged") else "Hugging Face id"
            where = "local" if info.get("path") else where
            revision = info.get("resolved_revision") or info.get("revision") or ""
            size = f", {info['weights_bytes'] / 2**20:.1f} MB safetensors" if "weights_bytes" in info else ""
            extra = f" (revision {revision})" if revision else ""
            note = f"; not resolvable here: {info['lookup_error']}" if info.get("lookup_error") else ""
            say(f"  {name}: {info['model']} [{where}{size}]{extra}{note}")
    fs, root = output_fs(output)
    refused = False
    if fs.exists(f"{root}/{PIPELINE_FILE}") and not overwrite:
        with fs.open(f"{root}/{PIPELINE_FILE}", "rb") as f:
            previous = json.loads(f.read())
        if previous.get("fingerprint") != fingerprint:
            refused = True
            say(
                f"output: {output} holds a run of another configuration ({previous.get('name')!r}, "
                f"fingerprint {previous.get('fingerprint')}): the run would refuse it without --overwrite"
            )
    if url_list is not None:
        say(f"inputs: the URL list {url_list}, downloaded into {output}/_ingest first (img2dataset)")
        return 2 if refused else 0
    done = set() if overwrite else done_shards(output)
    todo = [s for s in shards if s.name not in done]
    already = len(shards) - len(todo)
    say(f"inputs: {len(shards)} shard(s): {already} already done in {output}, {len(todo)} to do")
    for s in todo[:5]:
        say(f"  {s.name}  {s.url}")
    if len(todo) > 5:
        say(f"  ... and {len(todo) - 5} more")
    if not refused:
        say("output: " + (f"{output} (written by the run)" if todo else f"{output}: nothing to do"))
    say("dry run: no Ray started, nothing written")
    return 2 if refused else 0
