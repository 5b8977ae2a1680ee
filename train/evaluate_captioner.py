"""CIDEr-D of a bridge captioner on held-out human captions.

One caption per image, written deterministically (greedy, or beam search with
``num_beams > 1``), scored against the image's human caption(s) with CIDEr-D
(``train.lib.evaluation.evaluate_captioner``, ``train.lib.cider``).
Images go through the frozen-feature cache, so a second evaluation of the same split
(another checkpoint, the untrained baseline) skips the image encoder.

    python -m train.evaluate_captioner --model pipelines/models/bridge-captioner \
        --shards 'data/tuxpaint/test/*.tar' --device cpu
"""

from __future__ import annotations

import argparse
import json

from train.lib.evaluation import evaluate_captioner


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
