"""Does curation help? Train the same downstream model on raw and on curated web data, and compare.

One command runs the whole comparison on the openclipart web set (``curate data fetch
openclipart``) and evaluates on held-out human-captioned data (``curate data fetch
tuxpaint``, test split):

    python -m train.experiment            # or: make experiment

1. ``--per-shard`` samples spread over every web shard (``train.lib.websubset``) are the web
   set; all arms start from exactly these images.
2. Two curation runs over them (``curate run``; resumable, a finished run is reused):
   CapFilt (``pipelines/capfilt_cpu.yaml``: a synthetic caption, the ITM filter drops
   unmatched texts and samples) and BLIP-2 ranking (``pipelines/blip2_cpu.yaml``: five
   synthetic captions ranked with the alt-text by ITC, the top two kept). GPU machines
   pass ``--capfilt pipelines/capfilt.yaml --blip2 pipelines/blip2.yaml``. ``--filter DIR
   --captioner DIR`` curate with other bridge models than the pipeline files name, e.g. a
   ``train.bootstrap`` round's (``WORK/roundR/filter``, ``WORK/roundR/captioner``).
3. Arms: ``raw`` (the web shards, alt-text as is), ``capfilt`` and ``blip2`` (the runs'
   ``OUT/shards``, one kept caption drawn per step). Each arm trains the downstream
   CLIP-style model (``python -m train.train_clip``, Ray Train) for the same number of
   steps of the same batch size (the same samples seen) with each of ``--seeds``.
4. Every model is evaluated on the tuxpaint test split: recall@1/5/10 both ways and
   zero-shot accuracy over its top-level categories. ``WORK/results.md`` (Markdown table,
   mean +- standard deviation over seeds), ``WORK/results.json`` and ``WORK/results.png``.
5. With ``--captioner-epochs N`` (default 3), the bootstrap loop closes: the bridge
   captioner family is retrained on the human seed data plus the ``--captioner-arm``
   curated output and scored (CIDEr-D) on the same test split next to the committed
   seed-only captioner. ``0`` skips it.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("train.experiment")

ARMS = ("raw", "capfilt", "blip2")
METRICS = (
    ("i2t_r1", "I→T R@1"),
    ("i2t_r5", "I→T R@5"),
    ("i2t_r10", "I→T R@10"),
    ("t2i_r1", "T→I R@1"),
    ("t2i_r5", "T→I R@5"),
    ("t2i_r10", "T→I R@10"),
    ("zeroshot_acc", "zero-shot acc"),
)


def curate(pipeline: str, inputs: Sequence[Path], output: Path, extra: Sequence[str] = ()) -> Path:
    """``curate run PIPELINE`` over ``inputs`` into ``output`` (resumes; a finished run returns at once)."""
    cmd = [sys.executable, "-m", "curate", "run", pipeline, "--output", str(output), "--quiet"]
    for path in inputs:
        cmd += ["--input", str(path)]
    cmd += list(extra)
    log.info("curating: %s", " ".join(cmd))
    subprocess.run(cmd, check=True)
    return output


def arm_stats(shards: Sequence[str]) -> dict:
    """Samples, captions per sample, distinct captions and mean words of an arm's training data."""
    from train.lib.data import iter_pairs, sample_captions

    samples, captions, distinct, words = 0, 0, set(), 0
    for pair in iter_pairs(shards, on_error="ignore", max_side=64):
        caps = sample_captions(pair.meta, pair.caption)
        samples += 1
        captions += len(caps)
        distinct.update(" ".join(c.lower().split()) for c in caps)
        words += sum(len(c.split()) for c in caps)
    return {
        "samples": samples,
        "captions_per_sample": round(captions / max(samples, 1), 2),
        "distinct_captions": len(distinct),
        "mean_words": round(words / max(captions, 1), 2),
    }


def summarise(results: dict[str, list[dict]]) -> dict[str, dict[str, tuple[float, float]]]:
    """Per arm and metric: (mean, sample standard deviation) over seeds."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for arm, runs in results.items():
        out[arm] = {}
        for key, _ in METRICS:
            values = [r[key] for r in runs if key in r]
            if values:
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                out[arm][key] = (statistics.fmean(values), spread)
    return out


def markdown(summary: dict, stats: dict, seeds: Sequence[int], budget: dict, captioner: dict | None) -> str:
    """The results table (mean +- std over seeds, best mean per column in bold) and data stats."""
    lines = [
        f"Downstream model: frozen EfficientNet-Lite0 + MiniLM towers, trained heads (InfoNCE); "
        f"{budget['steps']} steps x batch {budget['batch_size']} = {budget['steps'] * budget['batch_size']} "
        f"samples seen per run; seeds {list(seeds)}; evaluated on {budget['eval']} "
        f"({budget['eval_n']} images, {budget['zeroshot_classes']} zero-shot classes).",
        "",
        "| arm | " + " | ".join(name for _, name in METRICS) + " |",
        "|---|" + "---|" * len(METRICS),
    ]
    best = {k: max((summary[a][k][0] for a in summary if k in summary[a]), default=None) for k, _ in METRICS}
    for arm in summary:
        cells = []
        for key, _ in METRICS:
            if key not in summary[arm]:
                cells.append("-")
                continue
            mean, spread = summary[arm][key]
            cell = f"{mean:.3f} ± {spread:.3f}"
            cells.append(f"**{cell}**" if best[key] is not None and mean == best[key] else cell)
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| arm | samples | captions/sample | distinct captions | mean words |",
        "|---|---|---|---|---|",
    ]
    for arm, s in stats.items():
        lines.append(
            f"| {arm} | {s['samples']} | {s['captions_per_sample']} "
            f"| {s['distinct_captions']} | {s['mean_words']} |"
        )
    if captioner:
        lines += ["", "| captioner (bridge family) | training data | test CIDEr-D |", "|---|---|---|"]
        for row in captioner["rows"]:
            lines.append(f"| {row['name']} | {row['data']} | {row['cider']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> Path:
    """Grouped bars (mean, std error bars) per metric and arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(summary)
    width = 0.8 / max(1, len(arms))
    fig, ax = plt.subplots(figsize=(10, 4))
    for i, arm in enumerate(arms):
        xs = [j + i * width for j in range(len(METRICS))]
        means = [summary[arm].get(k, (0.0, 0.0))[0] for k, _ in METRICS]
        spreads = [summary[arm].get(k, (0.0, 0.0))[1] for k, _ in METRICS]
        ax.bar(xs, means, width, yerr=spreads, capsize=3, label=arm)
    ax.set_xticks([j + width * (len(arms) - 1) / 2 for j in range(len(METRICS))])
    ax.set_xticklabels([name for _, name in METRICS])
    ax.set_ylabel("tuxpaint test (mean ± std over seeds)")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("Downstream contrastive model trained on raw vs curated openclipart")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def train_clip(
    args: argparse.Namespace, shards: list[str], eval_shards: list[str], arm: str, seed: int, work: Path
):
    """``python -m train.train_clip`` on one arm with one seed; its ``result.json``."""
    run_dir = work / "runs" / f"clip-{arm}-seed{seed}"
    cmd = [sys.executable, "-m", "train.train_clip", *(a for s in shards for a in ("--train", s))]
    cmd += [a for s in eval_shards for a in ("--eval", s)]
    cmd += [
        "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--seed", str(seed),
        "--workers", str(args.workers), "--device", args.device, "--log-every", str(max(1, args.steps // 4)),
        "--run-dir", str(run_dir), "--output", str(work / "models" / f"clip-{arm}-seed{seed}"),
    ]  # fmt: skip
    log.info("training: %s", " ".join(cmd))
    subprocess.run(cmd, check=True)
    return json.loads((run_dir / "result.json").read_text())


def run_captioner(args: argparse.Namespace, arm_shards: list[str], work: Path) -> dict:
    """Retrain the bridge captioner on seed + curated data; CIDEr-D next to the seed-only model."""
    from train.lib.data import list_shards
    from train.lib.evaluation import evaluate_captioner

    seed_train = list_shards(str(Path(args.tuxpaint) / "train"))
    output = work / f"captioner-{args.captioner_arm}"
    cmd = [
        sys.executable, "-m", "train.train_captioner", "--device", "cpu", "--workers", "1",
        "--threads", "1", "--epochs", str(args.captioner_epochs),
        "--data-root", str(args.tuxpaint), "--train-shards", *seed_train, *arm_shards,
        "--output", str(output), "--run-dir", str(work / "runs" / "captioner"),
    ]  # fmt: skip
    log.info("training the captioner: %s", " ".join(cmd))
    subprocess.run(cmd, check=True)
    test = list_shards(str(Path(args.tuxpaint) / "test"))
    rows = []
    for name, model, data in (
        ("seed (committed)", args.seed_captioner, "tuxpaint train (human)"),
        (
            f"bootstrapped ({args.captioner_arm})",
            str(output),
            f"tuxpaint train + {args.captioner_arm} curated web",
        ),
    ):
        score = evaluate_captioner(model, test, None, "cpu", 0)
        rows.append({"name": name, "model": model, "data": data, "cider": score["cider"]})
    return {"rows": rows, "epochs": args.captioner_epochs}


def model_overrides(args: argparse.Namespace, arm: str) -> list[str]:
    """``--set`` options that point an arm's curation run at ``--filter`` / ``--captioner`` (a
    bootstrap round's models); the pipeline files' own models when neither is given."""
    out = ["--set", f"captioner.model={Path(args.captioner).resolve()}"] if args.captioner else []
    if args.filter:
        section = "filter" if arm == "capfilt" else "ranker"  # blip2 ranks with the filter's ITC head
        out += ["--set", f"{section}.model={Path(args.filter).resolve()}"]
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m train.experiment", description=__doc__.split("\n\n")[0])
    ap.add_argument("--web", default="data/openclipart", help="raw web shards (dir, glob)")
    ap.add_argument("--per-shard", type=int, default=120, help="web samples per shard (0: all)")
    ap.add_argument("--tuxpaint", default="data/tuxpaint", help="human-captioned root with train/ val/ test/")
    ap.add_argument("--work", default="out/experiment", help="subset, curation runs, models, results")
    ap.add_argument("--capfilt", default="pipelines/capfilt_cpu.yaml", help="CapFilt pipeline")
    ap.add_argument("--blip2", default="pipelines/blip2_cpu.yaml", help="BLIP-2 ranking pipeline")
    ap.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=400, help="training steps per run (every arm)")
    ap.add_argument("--batch-size", type=int, default=128, help="global batch (every arm)")
    ap.add_argument("--workers", type=int, default=1, help="Ray Train workers per run (0: no Ray)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--captioner-epochs", type=int, default=3, help="0: skip the captioner retraining")
    ap.add_argument("--captioner-arm", choices=ARMS[1:], default="blip2")
    ap.add_argument("--seed-captioner", default="pipelines/models/bridge-captioner")
    ap.add_argument(
        "--filter", default=None, help="bridge filter for both curation runs (default: the pipelines' own)"
    )
    ap.add_argument(
        "--captioner", default=None, help="bridge captioner for both curation runs (e.g. a bootstrap round's)"
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    from train.lib.data import list_shards
    from train.lib.launch import setup_logging
    from train.lib.websubset import write_subset

    setup_logging()
    args = build_parser().parse_args(argv)
    work = Path(args.work)
    started = time.perf_counter()
    web = write_subset(list_shards(args.web), args.per_shard, work / "web")
    eval_shards = list_shards(str(Path(args.tuxpaint) / "test"))
    shards: dict[str, list[str]] = {}
    for arm in args.arms:
        if arm == "raw":
            shards[arm] = [str(p) for p in web]
        else:
            pipeline = args.capfilt if arm == "capfilt" else args.blip2
            out = curate(pipeline, web, work / arm, model_overrides(args, arm))
            shards[arm] = list_shards(str(out / "shards"))
    stats = {arm: arm_stats(s) for arm, s in shards.items()}
    log.info("arms: %s", json.dumps(stats))
    results: dict[str, list[dict]] = {}
    for arm in args.arms:
        for seed in args.seeds:
            run = train_clip(args, shards[arm], eval_shards, arm, seed, work)
            log.info("%s seed %d: %s", arm, seed, json.dumps(run["eval"]))
            results.setdefault(arm, []).append(run["eval"])
    captioner = None
    if args.captioner_epochs > 0 and args.captioner_arm in shards:
        captioner = run_captioner(args, shards[args.captioner_arm], work)
    summary = summarise(results)
    first = results[args.arms[0]][0]
    budget = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "eval": f"{args.tuxpaint}/test",
        "eval_n": first["n"],
        "zeroshot_classes": first.get("zeroshot_classes", 0),
    }
    table = markdown(summary, stats, args.seeds, budget, captioner)
    (work / "results.md").write_text(table)
    plot(summary, work / "results.png")
    record = {
        "budget": budget,
        "seeds": args.seeds,
        "stats": stats,
        "runs": results,
        "summary": {a: {k: list(v) for k, v in m.items()} for a, m in summary.items()},
        "captioner": captioner,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (work / "results.json").write_text(json.dumps(record, indent=1) + "\n")
    print(table)
    print(f"results: {work / 'results.md'}, {work / 'results.json'}, {work / 'results.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
