"""CIDEr-D of a bridge captioner on held-out human captions.

One caption per image, written deterministically (greedy, or beam search with
``num_beams > 1``), scored against the image's human caption(s) with ``train.cider``.
Images go through the frozen-feature cache, so a second evaluation of the same split
(another checkpoint, the untrained baseline) skips the image encoder.

    python -m train.evaluate_captioner --model pipelines/models/bridge-captioner \
        --shards 'data/tuxpaint/test/*.tar' --device cpu
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from train.cider import cider_d_per_image


def caption_features(
    model,
    image_tokens: torch.Tensor,
    batch_size: int = 32,
    num_beams: int = 1,
    max_new_tokens: int = 20,
) -> list[str]:
    """One deterministic caption per row of cached (N, 49, 1280) image tokens."""
    was_training = model.training
    model.eval()
    device = model.out_proj.weight.device
    out: list[str] = []
    try:
        for start in range(0, len(image_tokens), batch_size):
            feats = image_tokens[start : start + batch_size].to(device=device, dtype=torch.float32)
            caps = model.generate_captions(
                feats, num_captions=1, do_sample=False, num_beams=num_beams, max_new_tokens=max_new_tokens
            )
            out.extend(c[0] if c else "" for c in caps)
    finally:
        model.train(was_training)
    return out


def score_captions(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus CIDEr-D plus what helps reading it: count, mean caption length, exact matches."""
    scores = cider_d_per_image(candidates, references) if candidates else []
    n = len(scores)
    return {
        "cider": sum(scores) / n if n else 0.0,
        "n": n,
        "mean_words": sum(len(c.split()) for c in candidates) / n if n else 0.0,
        "exact": sum(
            any(" ".join(c.lower().split()) == " ".join(r.lower().split()) for r in refs)
            for c, refs in zip(candidates, references)
        )
        / n
        if n
        else 0.0,
    }


def load_captioner(captioner_dir: str | Path, device: str = "cpu"):
    """A saved bridge captioner in float32 on ``device`` (fp16 files are upcast)."""
    from curate.models.base import resolve_device
    from curate.models.bridge import BridgeCaptionerModel

    model = BridgeCaptionerModel.from_pretrained(str(captioner_dir), use_safetensors=True)
    model = model.to(device=resolve_device(device), dtype=torch.float32)
    model.eval()
    return model


def evaluate_captioner(
    captioner_dir: str,
    shards: list[str],
    max_samples: int | None,
    device: str,
    seed: int,
    *,
    num_beams: int = 1,
    max_new_tokens: int = 20,
    batch_size: int = 32,
    cache_dir: str | None = None,
    return_captions: bool = False,
) -> dict:
    """CIDEr-D of the captioner in ``captioner_dir`` on the first ``max_samples`` of ``shards``.

    Returns ``{"cider", "n", "mean_words", "exact"}`` (and ``"captions"``: a list of
    ``{"key", "caption", "reference"}`` when ``return_captions``). Greedy and beam search
    do not sample; ``seed`` seeds torch anyway, for a caller's stochastic extensions.
    """
    from train.data import list_shards
    from train.features import cached_features

    torch.manual_seed(seed)
    feats, _ = cached_features(list_shards(shards), cache_dir=cache_dir, max_samples=max_samples)
    model = load_captioner(captioner_dir, device)
    candidates = caption_features(model, feats.image_tokens, batch_size, num_beams, max_new_tokens)
    references = [[c] for c in feats.captions]
    result: dict = score_captions(candidates, references)
    if return_captions:
        result["captions"] = [
            {"key": k, "caption": c, "reference": r}
            for k, c, r in zip(feats.keys, candidates, feats.captions)
        ]
    return result


def main(argv: list[str] | None = None) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    add = parser.add_argument
    add("--model", required=True, help="bridge captioner directory (save_pretrained output)")
    add("--shards", nargs="+", required=True, help="tars, globs or directories to score on")
    add("--max-samples", type=int, default=None, help="first N samples only")
    add("--device", default="cpu", help="auto|cpu|cuda")
    add("--seed", type=int, default=0, help="torch seed")
    add("--num-beams", type=int, default=1, help="1: greedy; >1: beam search")
    add("--cache-dir", default=None, help="frozen-feature cache (default ~/.cache/curate)")
    add("--examples", type=int, default=0, help="print this many captions next to the human ones")
    args = parser.parse_args(argv)
    result = evaluate_captioner(
        args.model,
        args.shards,
        args.max_samples,
        args.device,
        args.seed,
        num_beams=args.num_beams,
        cache_dir=args.cache_dir,
        return_captions=args.examples > 0,
    )
    for row in result.pop("captions", [])[: args.examples]:
        print(f"{row['key']}: {row['caption']!r}  | human: {row['reference']!r}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
