"""Random-weight models at the papers' sizes, for the GPU benchmark (bench/gpu.yaml).

The shapes of the checkpoints the recipes name, with the real vocabulary sizes, for
measuring speed and memory where the checkpoints cannot be downloaded. BLIP-large
(Li et al., 2022): a ViT-L/16 image encoder at 384 px with a BERT-base text transformer
cross-attending to it (captioner and ITM head), the bert-base-uncased vocabulary plus [DEC]
and [ENC]. CLIP ViT-L/14 (Radford et al., 2021): 224 px, a 12-layer 768-wide text
transformer, 49408 BPE tokens, 77 positions, a 768-d joint space. Saved in bf16 (half the
disk; the pipeline casts to its ``dtype``). The builder is the one the tests' tiny models
use (tests/random_models.py), so both load through the same code path as real checkpoints.

    python -m bench.paper_models out/paper-models     # writes its captioner/, itm/, clip/ (~1 min)
"""

from __future__ import annotations

import argparse

from tests.random_models import Shapes, build_all, transformer

PAPER = Shapes(
    vision=transformer(1024, 4096, 24, 16),  # ViT-L
    text=transformer(768, 3072, 12, 12),  # BERT-base / CLIP's text tower
    blip_image=384,
    blip_patch=16,
    blip_vocab=30524,
    blip_positions=512,
    blip_projection=256,
    clip_image=224,
    clip_patch=14,
    clip_vocab=49408,
    clip_positions=77,
    clip_projection=768,
    bf16=True,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="directory to write captioner/, itm/ and clip/ into")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    args = parser.parse_args(argv)
    for name, path in build_all(args.output, args.seed, PAPER).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
