"""Evaluate the bootstrapped filter (and optionally the captioner) on a held-out split.

    python -m train.evaluate --model pipelines/models/bridge-filter --untrained \\
        --data data/tuxpaint/test --output out/eval/filter.json
    python -m train.evaluate --model pipelines/models/bridge-filter \\
        --captioner pipelines/models/bridge-captioner --data data/tuxpaint/test

Filter metrics (``train.lib.evaluation.filter_metrics``, on the frozen-feature cache of
the split, same numbers as the raw path up to fp16 rounding of the cached features):
- ``itm_auc``: ROC-AUC of P(match) for each image's own caption against a mismatched
  one (a caption of another image, drawn with ``--seed``, never an identical string);
  ``itm_acc`` at threshold 0.5; ``itc_auc`` the same AUC with ITC cosine (the ranker).
- ``i2t_r1/5/10``, ``t2i_r1/5/10``: retrieval over the whole split by ITC cosine; a
  duplicate caption of the right image counts as a hit.
``--untrained`` adds a column for a freshly initialised bridge (same config, ``--seed``),
the baseline a trained filter is compared with. ``--captioner DIR`` adds the captioner's
CIDEr (``train.lib.evaluation.evaluate_captioner``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from train.lib.evaluation import evaluate_captioner, filter_metrics


def _table(columns: dict[str, dict[str, Any]]) -> str:
    names = list(columns)
    metrics = [m for m in dict.fromkeys(k for col in columns.values() for k in col)]
    width = max([len(m) for m in metrics] + [6])
    lines = [f"{'metric':<{width}}  " + "  ".join(f"{n:>12}" for n in names)]
    for m in metrics:
        cells = []
        for n in names:
            v = columns[n].get(m)
            cells.append(f"{v:>12.4f}" if isinstance(v, float) else f"{'' if v is None else v!s:>12}")
        lines.append(f"{m:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="trained bridge filter directory (save_pretrained output)")
    parser.add_argument(
        "--untrained", action="store_true", help="also evaluate a freshly initialised bridge (baseline)"
    )
    parser.add_argument("--captioner", help="bridge captioner directory: adds its CIDEr on the same split")
    parser.add_argument(
        "--data", default="data/tuxpaint/test", help="held-out shards: dir, glob or brace range"
    )
    parser.add_argument("--max-samples", type=int, default=None, help="evaluate the first N samples only")
    parser.add_argument("--seed", type=int, default=0, help="mismatched-caption draw and untrained init")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"], help="where models run")
    parser.add_argument("--cache-dir", default=None, help="feature cache (default $CURATE_CACHE/features)")
    parser.add_argument("--output", default=None, help="write the metrics as JSON here")
    args = parser.parse_args(argv)
    if not args.model and not args.untrained and not args.captioner:
        parser.error("give --model, --untrained or --captioner")

    from curate.models.base import resolve_device
    from curate.models.bridge import BridgeFilterConfig, BridgeFilterModel
    from train.lib.data import list_shards
    from train.lib.features import cached_features
    from train.lib.launch import seed_everything, setup_logging

    setup_logging()
    device = resolve_device(args.device)
    shards = list_shards(args.data)
    columns: dict[str, dict[str, Any]] = {}
    start = time.perf_counter()
    if args.model or args.untrained:
        config = BridgeFilterConfig.from_pretrained(args.model) if args.model else BridgeFilterConfig()
        features, _ = cached_features(
            shards,
            args.cache_dir,
            max_samples=args.max_samples,
            image_size=config.image_size,
            max_text_tokens=config.max_text_tokens,
            resize=config.image_resize,
        )
        if args.model:
            model = BridgeFilterModel.from_pretrained(args.model, use_safetensors=True, dtype=torch.float32)
            columns["trained"] = filter_metrics(model.to(device), features, args.seed, device)
        if args.untrained:
            seed_everything(args.seed)
            model = BridgeFilterModel(config)
            columns["untrained"] = filter_metrics(model.to(device), features, args.seed, device)
        for col in columns.values():
            col["samples"] = len(features)
    if args.captioner:
        cap = evaluate_captioner(args.captioner, shards, args.max_samples, str(device), args.seed)
        columns.setdefault("trained", {}).update({f"captioner_{k}": v for k, v in cap.items()})
    print(_table(columns))
    result = {
        "data": shards,
        "model": args.model,
        "captioner": args.captioner,
        "seed": args.seed,
        "seconds": round(time.perf_counter() - start, 2),
        "metrics": columns,
    }
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
