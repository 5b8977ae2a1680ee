"""BLIP's bootstrap loop: models retrained on their own curated output, round after round.

Round 0 is ``--filter`` and ``--captioner``, by default the committed pair
(``pipelines/models/bridge-filter``, ``bridge-captioner``: themselves round 1 of this loop
from a seed pair trained on the human tuxpaint captions alone, docs/bootstrap.md). Round r >= 1:

1. ``capfilt``: ``curate run pipelines/capfilt_cpu.yaml`` over the openclipart web set (all
   of it, or ``--per-shard`` samples of each shard, ``train.lib.websubset``) with round r-1's
   captioner and filter: one nucleus-sampled synthetic caption per image, and the filter
   drops every text, alt-text and synthetic alike, whose P(match) is under
   ``--itm-threshold``;
2. ``pairs``: the bootstrapped set as BLIP builds it: human pairs (tuxpaint train) +
   filtered web pairs + filtered synthetic pairs, each kept (image, text) one sample
   (``train.lib.bootstrap.write_pairs``), in ``WORK/roundR/train/``; with ``--keep-fraction
   F`` only the web texts whose P(match) is among the best F of all scored (alt and
   synthetic pooled, ``train.lib.bootstrap.score_threshold``);
3. ``filter``: BLIP pre-trains on the bootstrapped set and fine-tunes on human pairs.
   ``python -m train.train_filter`` on the bootstrapped set (``filter-pre``), then
   ``--init-from`` it on the human pairs alone for ``--filter-finetune-epochs`` with the
   hubness correction's banks drawn from the bootstrapped set (``filter``; validated and
   calibrated on tuxpaint val);
4. ``captioner``: ``python -m train.train_captioner`` on the human pairs plus the kept texts
   of ``--captioner-sources``: by default (``--captioner-init itc``) a fresh bridge that holds
   this round's filter and reads its ITC image embedding (BLIP-2: the bridge learns matching
   before generation), or fine-tuned from round r-1's captioner (``previous``), or from
   scratch without the filter (``fresh``);
5. ``eval``: the filter's ITM/ITC AUC and retrieval on tuxpaint test and on every
   ``--heldout`` set (never trained on), the captioner's CIDEr-D on tuxpaint test with the
   paired-bootstrap standard error of its difference to round 0.

Only tuxpaint and openclipart (and their curated output) are trained on. Every step writes
into its round's directory and is skipped on a rerun once its output is there (delete
the step's directory to redo it; ``curate run`` also resumes a cut curation per shard).
``WORK/results.md`` and ``WORK/results.json`` hold one table: each round's models, data
sizes and scores.

CPU, this machine (about 75 minutes a round over all 6,842 openclipart images; ``--per-shard
80`` curates 560 of them for a quick round):

    python -m train.bootstrap --web data/openclipart-all --tuxpaint data/tuxpaint \\
        --heldout data/emoji --work out/bootstrap --rounds 1        # or: make bootstrap

GPU machines pass ``--device cuda`` and a GPU pipeline (``--pipeline``) with bridge-family
models; the training scripts' extra options go through ``--filter-args`` / ``--captioner-args``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger("train.bootstrap")

HUMAN_PREFIX = "human"


def run(cmd: list[str]) -> None:
    log.info("running: %s", shlex.join(cmd))
    subprocess.run(cmd, check=True)


def capfilt(
    args: argparse.Namespace, web: list[Path], out: Path, filter_dir: Path, captioner_dir: Path
) -> dict:
    """Step 1: CapFilt over the web subset with the previous round's models; its status counts."""
    import pyarrow.parquet as pq

    done = out / "_bootstrap_done.json"
    if not done.exists():
        cmd = [sys.executable, "-m", "curate", "run", args.pipeline, "--output", str(out), "--quiet"]
        cmd += [a for p in web for a in ("--input", str(p))]
        cmd += [
            "--set",
            f"captioner.model={captioner_dir.resolve()}",
            "--set",
            f"filter.model={filter_dir.resolve()}",
        ]
        cmd += ["--set", f"policy.itm_threshold={args.itm_threshold}"]
        cmd += [a for s in args.set for a in ("--set", s)]
        started = time.perf_counter()
        run(cmd)
        table = pq.read_table(sorted((out / "samples").glob("*.parquet")), columns=["status"])
        statuses = table.column("status").to_pylist()
        counts = {s: statuses.count(s) for s in sorted(set(statuses))}
        done.write_text(
            json.dumps({"status": counts, "seconds": round(time.perf_counter() - started, 1)}) + "\n"
        )
    return json.loads(done.read_text())


def pairs(args: argparse.Namespace, curated: Path, train_dir: Path) -> dict:
    """Step 2: human + filtered web + filtered synthetic pairs as shards in ``train_dir``."""
    from train.lib.bootstrap import score_threshold, write_pairs
    from train.lib.data import list_shards, split_shards

    done = train_dir / "_pairs.json"
    if not done.exists():
        train_dir.mkdir(parents=True, exist_ok=True)
        human = split_shards(args.tuxpaint, "train")
        for shard in human:  # the human pairs as they are, beside the curated ones
            link = train_dir / f"{HUMAN_PREFIX}-{Path(shard).name}"
            if not link.exists():
                link.symlink_to(Path(shard).resolve())
        from train.lib.data import iter_pairs

        stats = {"human": sum(1 for _ in iter_pairs(human, on_error="ignore", max_side=16))}
        curated_shards = list_shards(str(curated / "shards"))
        min_score = None
        if args.keep_fraction < 1:  # the best part of what the filter scored, above the threshold too
            min_score = max(score_threshold(curated / "samples", args.keep_fraction), args.itm_threshold)
            log.info("web texts kept at P(match) >= %.4f (--keep-fraction %s)", min_score, args.keep_fraction)
            stats["min_itm_score"] = round(min_score, 4)
        for source in ("alt", "synthetic"):
            got = write_pairs(curated_shards, source, train_dir, source, min_score=min_score)
            stats[source] = got["samples"]
        web_pairs = sorted(str(p) for s in ("alt", "synthetic") for p in train_dir.glob(f"{s}-*.tar"))
        image_keys = {p.meta.get("image_key") for p in iter_pairs(web_pairs, "ignore", max_side=16)}
        stats["web_images"] = len(image_keys)  # images with at least one web pair
        done.write_text(json.dumps(stats) + "\n")
    return json.loads(done.read_text())


def train_shards(train_dir: Path, sources: list[str]) -> list[str]:
    """The round's training tars of the human pairs and of ``sources`` (``alt``, ``synthetic``)."""
    prefixes = (HUMAN_PREFIX, *sources)
    return sorted(str(p) for p in train_dir.glob("*.tar") if p.name.split("-", 1)[0] in prefixes)


def _train_filter_cmd(args: argparse.Namespace, train: Path | str, out: Path, run_dir: Path) -> list[str]:
    cmd = [sys.executable, "-m", "train.train_filter", "--data", str(args.tuxpaint), "--train", str(train)]
    cmd += ["--workers", "0", "--device", args.device, "--save-dtype", "fp16"]
    return [*cmd, "--output", str(out), "--run-dir", str(run_dir)]


def train_filter(args: argparse.Namespace, train_dir: Path, out: Path, run_dir: Path) -> None:
    """Step 3: the round's filter: pre-trained on its bootstrapped set, fine-tuned on the human
    pairs (tuxpaint val for validation and calibration)."""
    if (out / "model.safetensors").exists():
        return
    shards = train_shards(train_dir, args.filter_sources)
    select = train_dir / "_filter"  # train_filter takes one spec: a directory of links to its tars
    select.mkdir(exist_ok=True)
    for old in select.glob("*.tar"):
        old.unlink()
    for shard in shards:
        (select / Path(shard).name).symlink_to(Path(shard).resolve())
    hub = ["--hub-k", str(args.hub_k), "--hub-shards", str(select)] if args.hub_k > 0 else []
    if args.filter_finetune_epochs <= 0:  # one stage: the bootstrapped set alone
        run([*_train_filter_cmd(args, select, out, run_dir), *hub, *shlex.split(args.filter_args)])
        return
    pre = out.parent / f"{out.name}-pre"
    if not (pre / "model.safetensors").exists():
        cmd = _train_filter_cmd(args, select, pre, run_dir.parent / f"{run_dir.name}-pre")
        run([*cmd, "--no-calibrate", *shlex.split(args.filter_args)])
    human = train_dir / "_human"  # the fine-tuning set: the human pairs alone
    human.mkdir(exist_ok=True)
    for shard in train_shards(train_dir, []):
        if not (human / Path(shard).name).exists():
            (human / Path(shard).name).symlink_to(Path(shard).resolve())
    cmd = _train_filter_cmd(args, human, out, run_dir)
    cmd += ["--init-from", str(pre), "--epochs", str(args.filter_finetune_epochs), *hub]
    run([*cmd, *shlex.split(args.filter_finetune_args)])


def train_captioner(
    args: argparse.Namespace, train_dir: Path, out: Path, run_dir: Path, previous: Path, filter_dir: Path
) -> None:
    """Step 4: the round's captioner on human pairs + the kept texts of ``--captioner-sources``
    (``--captioner-init itc``: holding this round's filter ``filter_dir``)."""
    if (out / "model.safetensors").exists():
        return
    cmd = [sys.executable, "-m", "train.train_captioner", "--data-root", str(args.tuxpaint)]
    cmd += ["--train-shards", *train_shards(train_dir, args.captioner_sources)]
    cmd += [
        "--device",
        args.device,
        "--workers",
        "0",
        "--threads",
        "1",
        "--epochs",
        str(args.captioner_epochs),
    ]
    if args.captioner_init == "previous":
        cmd += ["--init-from", str(previous)]
    elif args.captioner_init == "itc":
        cmd += ["--itc-from", str(filter_dir)]
    cmd += ["--output", str(out), "--run-dir", str(run_dir), *shlex.split(args.captioner_args)]
    run(cmd)


def evaluate(args: argparse.Namespace, filter_dir: Path, captioner_dir: Path, out: Path) -> dict:
    """Step 5: filter on tuxpaint test and each held-out set, captioner CIDEr-D on tuxpaint test."""
    if out.exists():
        return json.loads(out.read_text())
    import torch

    from curate.models.base import resolve_device
    from curate.models.bridge import BridgeFilterConfig, BridgeFilterModel
    from train.lib.cider import cider_d_per_image
    from train.lib.data import list_shards, split_shards
    from train.lib.evaluation import evaluate_captioner, filter_metrics
    from train.lib.features import cached_features

    device = resolve_device(args.device)
    config = BridgeFilterConfig.from_pretrained(str(filter_dir))
    model = BridgeFilterModel.from_pretrained(str(filter_dir), use_safetensors=True, dtype=torch.float32)
    model = model.to(device)
    sets = {"tux": split_shards(args.tuxpaint, "test")}
    sets.update({Path(h).name: list_shards(h) for h in args.heldout})
    result: dict = {"filter": str(filter_dir), "captioner": str(captioner_dir), "filter_metrics": {}}
    for name, shards in sets.items():
        feats, _ = cached_features(
            shards,
            image_size=config.image_size,
            max_text_tokens=config.max_text_tokens,
            resize=config.image_resize,
        )
        metrics = filter_metrics(model, feats, 0, device)
        result["filter_metrics"][name] = {**metrics, "samples": len(feats)}
        log.info("filter %s on %s: %s", filter_dir, name, json.dumps(metrics))
    cap = evaluate_captioner(str(captioner_dir), sets["tux"], None, str(device), 0, return_captions=True)
    rows = cap.pop("captions")
    result["captioner_metrics"] = cap
    result["cider_per_image"] = cider_d_per_image(
        [r["caption"] for r in rows], [[r["reference"]] for r in rows]
    )
    result["captions"] = rows
    log.info("captioner %s: %s", captioner_dir, json.dumps(cap))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def table_row(r: int, ev: dict, data: dict | None, base: dict, heldout: str | None) -> dict:
    """One line of the round table from a round's eval and data figures."""
    from train.lib.bootstrap import paired_bootstrap

    tux = ev["filter_metrics"]["tux"]
    row = {
        "round": r,
        "filter": ev["filter"],
        "captioner": ev["captioner"],
        "tux_itm_auc": tux["itm_auc"],
        "tux_itc_auc": tux["itc_auc"],
        "tux_i2t_r1": tux["i2t_r1"],
        "cider": ev["captioner_metrics"]["cider"],
    }
    if heldout is not None:
        row["heldout_itm_auc"] = ev["filter_metrics"][heldout]["itm_auc"]
        row["heldout_itc_auc"] = ev["filter_metrics"][heldout]["itc_auc"]
    if data is not None:
        row.update(
            train_human=data["human"], train_alt=data["alt"], train_synthetic=data["synthetic"],
            web_images=data["web_images"],
        )  # fmt: skip
    if r > 0:
        row["cider_diff"] = paired_bootstrap(base["cider_per_image"], ev["cider_per_image"])
    return row


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m train.bootstrap",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--web", default="data/openclipart-all", help="the web shards to curate (dir, glob)")
    ap.add_argument("--per-shard", type=int, default=0, help="web samples curated per web shard (0: all)")
    ap.add_argument("--tuxpaint", default="data/tuxpaint", help="human-captioned root with train/ val/ test/")
    ap.add_argument(
        "--heldout",
        nargs="*",
        default=["data/emoji"],
        help="held-out evaluation shard sets (never trained on)",
    )
    ap.add_argument("--work", default="out/bootstrap", help="one directory per round, and the table")
    ap.add_argument("--rounds", type=int, default=1, help="bootstrap rounds after round 0")
    ap.add_argument("--pipeline", default="pipelines/capfilt_cpu.yaml", help="the CapFilt pipeline file")
    ap.add_argument("--set", action="append", default=[], help="more curate run --set overrides")
    ap.add_argument(
        "--itm-threshold", type=float, default=0.2,
        help="CapFilt keeps a text whose P(match) reaches this (lenient: the set is for training)",
    )  # fmt: skip
    ap.add_argument(
        "--keep-fraction", type=float, default=0.45,
        help="the bootstrapped set takes at most this fraction of the web texts scored (alt and "
        "synthetic pooled, the best by P(match); 1: every kept text), so a lenient filter "
        "does not let the whole web set through (0.45: what the seed filter kept at 0.2)",
    )  # fmt: skip
    ap.add_argument("--filter", default="pipelines/models/bridge-filter", help="round 0 filter")
    ap.add_argument("--captioner", default="pipelines/models/bridge-captioner", help="round 0 captioner")
    ap.add_argument(
        "--filter-sources", nargs="*", default=["alt", "synthetic"], choices=["alt", "synthetic"],
        help="kept texts the filter trains on beside the human pairs",
    )  # fmt: skip
    ap.add_argument(
        "--captioner-sources", nargs="*", default=[], choices=["alt", "synthetic"],
        help="kept texts the captioner trains on beside the human pairs (default: none)",
    )  # fmt: skip
    ap.add_argument("--captioner-epochs", type=int, default=6, help="captioner epochs per round")
    ap.add_argument(
        "--captioner-init", choices=["itc", "previous", "fresh"], default="itc",
        help="a fresh bridge holding the round's filter (itc), the previous round's captioner "
        "fine-tuned, or a fresh bridge without the filter",
    )  # fmt: skip
    ap.add_argument(
        "--filter-args", default="--num-layers 0",
        help="extra train_filter options for the bootstrapped set (one string; fusion layers overfit "
        "noisy web pairs, so none by default)",
    )  # fmt: skip
    ap.add_argument(
        "--filter-finetune-epochs", type=int, default=4,
        help="epochs of the filter's fine-tuning on the human pairs (0: the bootstrapped set alone)",
    )  # fmt: skip
    ap.add_argument(
        "--filter-finetune-args", default="--lr 3e-4 --weight-decay 0",
        help="extra train_filter options of the fine-tuning (one string)",
    )  # fmt: skip
    ap.add_argument("--hub-k", type=int, default=10, help="the filter's hubness correction (0: plain cosine)")
    ap.add_argument("--captioner-args", default="", help="extra train_captioner options (one string)")
    ap.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu")
    return ap


def main(argv: list[str] | None = None) -> int:
    from train.lib.bootstrap import markdown_table
    from train.lib.data import list_shards
    from train.lib.launch import setup_logging
    from train.lib.websubset import write_subset

    setup_logging()
    args = build_parser().parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    heldout = Path(args.heldout[0]).name if args.heldout else None
    filter_dir, captioner_dir = Path(args.filter), Path(args.captioner)
    base = evaluate(args, filter_dir, captioner_dir, work / "round0" / "eval.json")
    rows = [table_row(0, base, None, base, heldout)]
    web: list = list_shards(args.web)  # all of it, or a spread subset (written once, byte-stable)
    if args.per_shard > 0 and args.rounds > 0:
        web = write_subset(web, args.per_shard, work / "web")
    for r in range(1, args.rounds + 1):
        rd = work / f"round{r}"
        status = capfilt(args, web, rd / "capfilt", filter_dir, captioner_dir)
        log.info("round %d CapFilt: %s", r, json.dumps(status))
        data = pairs(args, rd / "capfilt", rd / "train")
        log.info("round %d bootstrapped set: %s", r, json.dumps(data))
        train_filter(args, rd / "train", rd / "filter", rd / "runs" / "filter")
        train_captioner(
            args, rd / "train", rd / "captioner", rd / "runs" / "captioner", captioner_dir, rd / "filter"
        )
        filter_dir, captioner_dir = rd / "filter", rd / "captioner"
        ev = evaluate(args, filter_dir, captioner_dir, rd / "eval.json")
        rows.append({**table_row(r, ev, data, base, heldout), "capfilt": status})
    table = markdown_table(rows)
    (work / "results.md").write_text(table)
    (work / "results.json").write_text(json.dumps({"rounds": rows}, indent=1) + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
