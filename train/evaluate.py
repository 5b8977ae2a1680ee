"""Evaluate the bootstrapped filter (and optionally the captioner) on a held-out split.

    python -m train.evaluate --model pipelines/models/bridge-filter --untrained \\
        --data data/tuxpaint/test --output out/eval/filter.json
    python -m train.evaluate --model pipelines/models/bridge-filter \\
        --captioner pipelines/models/bridge-captioner --data data/tuxpaint/test

Filter metrics (on the frozen-feature cache of the split, same numbers as the raw path
up to fp16 rounding of the cached features):
- ``itm_auc``: ROC-AUC of P(match) for each image's own caption against a mismatched
  one (a caption of another image, drawn with ``--seed``, never an identical string);
  ``itm_acc`` at threshold 0.5; ``itc_auc`` the same AUC with ITC cosine (the ranker).
- ``i2t_r1/5/10``, ``t2i_r1/5/10``: retrieval over the whole split by ITC cosine; a
  duplicate caption of the right image counts as a hit.
``--untrained`` adds a column for a freshly initialised bridge (same config, ``--seed``),
the baseline a trained filter is compared with. ``--captioner DIR`` adds the captioner's
CIDEr from ``train.evaluate_captioner``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from train.features import Features
from train.metrics import recall_at_k, roc_auc


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def mismatch_indices(captions: list[str], seed: int) -> list[int]:
    """For each row, another row with a different caption, drawn with a fixed seed."""
    rng = np.random.default_rng(seed)
    norm = [_norm(c) for c in captions]
    out = []
    for c in norm:
        choices = [j for j in range(len(norm)) if norm[j] != c]
        if not choices:
            raise ValueError("every caption in the split is the same: no mismatched pairs")
        out.append(int(choices[rng.integers(len(choices))]))
    return out


@torch.no_grad()
def itm_probabilities(
    model: torch.nn.Module,
    features: Features,
    image_idx: list[int],
    text_idx: list[int],
    batch_size: int = 128,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """P(match) of (image_idx[k], text_idx[k]) pairs from cached features."""
    out = []
    for start in range(0, len(image_idx), batch_size):
        img = features.batch(image_idx[start : start + batch_size], device)
        txt = features.batch(text_idx[start : start + batch_size], device)
        logits = model.itm_logits(img["image_tokens"], txt["text_states"], txt["text_mask"]).float()
        out.append(torch.softmax(logits, -1)[:, 1].cpu())
    return torch.cat(out).numpy()


@torch.no_grad()
def itc_similarity(
    model: torch.nn.Module, features: Features, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(N images, N texts) cosine similarity of the ITC embeddings."""
    all_rows = list(range(len(features)))
    img, txt = [], []
    for start in range(0, len(all_rows), 256):
        b = features.batch(all_rows[start : start + 256], device)
        img.append(model.image_itc(b["image_tokens"]).float().cpu())
        txt.append(model.text_itc(b["text_pooled"]).float().cpu())
    return torch.cat(img) @ torch.cat(txt).t()


@torch.no_grad()
def filter_metrics(
    model: torch.nn.Module, features: Features, seed: int = 0, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """ITM ROC-AUC / accuracy against mismatched captions, ITC AUC, and R@1/5/10 both ways."""
    was_training = model.training
    model.eval()
    n = len(features)
    rows = list(range(n))
    neg = mismatch_indices(features.captions, seed)
    p_pos = itm_probabilities(model, features, rows, rows, device=device)
    p_neg = itm_probabilities(model, features, rows, neg, device=device)
    labels = np.r_[np.ones(n), np.zeros(n)]
    sim = itc_similarity(model, features, device)
    itc_scores = np.r_[sim.diagonal().numpy(), sim[torch.arange(n), torch.tensor(neg)].numpy()]
    out = {
        "itm_auc": roc_auc(np.r_[p_pos, p_neg], labels),
        "itm_acc": float(((np.r_[p_pos, p_neg] >= 0.5) == labels).mean()),
        "itc_auc": roc_auc(itc_scores, labels),
    }
    out.update(recall_at_k(sim, (1, 5, 10), features.positive_mask(rows)))
    model.train(was_training)
    return out


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
    from train.common import seed_everything, setup_logging
    from train.data import list_shards
    from train.features import cached_features

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
        from train.evaluate_captioner import evaluate_captioner

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
