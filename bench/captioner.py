"""The fast BLIP captioner against ``generate()``: the same captions, and how much faster.

Builds a small random-weight BLIP captioner (the real ``BlipForConditionalGeneration``,
BLIP-large's 577 image tokens at 384 px and the bert-base vocabulary of 30,524 tokens,
narrow and shallow towers) and writes N nucleus-sampled captions per image both ways with
the same per-image seeds: ``curate.models.fast_caption`` (``fast_decoding: true``, the
default) and transformers' ``generate`` (``fast_decoding: false``). It prints the time of
each, the speed-up, and how many captions came out identical.

A random decoder's next-token distribution is nearly flat over the whole vocabulary, which
a trained captioner's never is (its top-p 0.9 nucleus holds a handful of tokens), and it
rarely ends a caption early. ``--logit-scale`` multiplies the output layer's weights to give
the peaked distribution of a trained model; the figures of both settings are in
bench/RESULTS.md.

    python -m bench.captioner                      # ~1 min on 2 cores
    python -m bench.captioner --logit-scale 1      # the flat random distribution
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tests.random_models import Shapes, build_blip_captioner, transformer

SMALL = Shapes(
    vision=transformer(128, 512, 2, 4),
    text=transformer(128, 512, 2, 4),
    blip_image=384,
    blip_patch=16,
    blip_vocab=30524,
    blip_positions=64,
    blip_projection=128,
    clip_image=32,
    clip_patch=8,
    clip_vocab=None,
    clip_positions=64,
    clip_projection=32,
)


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (384, 384, 3), dtype=np.uint8)) for _ in range(n)]


def _timed(captioner, images: list[Image.Image], batch: int, repeats: int) -> tuple[float, list]:
    out: list = []
    best = float("inf")
    for _ in range(repeats):
        out = []
        start = time.perf_counter()
        for i in range(0, len(images), batch):
            chunk = images[i : i + batch]
            out += captioner(chunk, seeds=list(range(i, i + len(chunk))))
        best = min(best, time.perf_counter() - start)
    return best, out


def main(argv: list[str] | None = None) -> int:
    from curate.models.base import LoadOptions, set_cpu_threads
    from curate.models.captioner import GenerationSettings, open_captioner

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--num-captions", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=30)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--logit-scale", type=float, default=30.0, help="output-layer weight factor")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many timed passes")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (a CPU actor's: 1)")
    parser.add_argument("--model", help="an existing BLIP captioner directory instead of the random one")
    args = parser.parse_args(argv)
    set_cpu_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(build_blip_captioner(Path(tmp) / "blip", 0, SMALL))
        images = _images(args.images)
        times, captions = {}, {}
        for fast in (True, False):
            settings = GenerationSettings(
                num_captions=args.num_captions,
                max_new_tokens=args.max_new_tokens,
                top_p=args.top_p,
                dedupe=False,
                fast_decoding=fast,
            )
            captioner = open_captioner(LoadOptions(model), settings, device="cpu")
            if not args.model and args.logit_scale != 1.0:
                head = captioner.model.text_decoder.cls.predictions
                with torch.no_grad():  # untied from the input embeddings first, so only the output moves
                    head.decoder.weight = torch.nn.Parameter(head.decoder.weight * args.logit_scale)
            _timed(captioner, images[: args.batch], args.batch, 1)  # warm-up
            times[fast], captions[fast] = _timed(captioner, images, args.batch, args.repeats)
        pairs = [(a, b) for x, y in zip(captions[True], captions[False]) for a, b in zip(x, y)]
        words = [len(c.split()) for row in captions[True] for c in row]
    result = {
        "images": args.images,
        "num_captions": args.num_captions,
        "max_new_tokens": args.max_new_tokens,
        "logit_scale": args.logit_scale,
        "fast_s": round(times[True], 3),
        "generate_s": round(times[False], 3),
        "speedup": round(times[False] / times[True], 2),
        "fast_images_per_s": round(args.images / times[True], 2),
        "generate_images_per_s": round(args.images / times[False], 2),
        "identical_captions": f"{sum(a == b for a, b in pairs)}/{len(pairs)}",
        "mean_words": round(float(np.mean(words)), 2) if words else 0.0,
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
