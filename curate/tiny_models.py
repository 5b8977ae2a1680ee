"""Random-weight models of the real architectures (BLIP captioner, BLIP ITM, CLIP).

They load through exactly the code path of the papers' checkpoints (``from_pretrained``
on a directory, safetensors). Their captions are random words: they exercise the
machinery, not the quality. Two sizes:

- ``tiny`` (default): a few hundred thousand parameters; the test fixtures.
- ``paper``: the shapes of the checkpoints the recipes name (BLIP-large: ViT-L/16 at
  384 px with a BERT-base text decoder / ITM head; CLIP ViT-L/14 at 224 px), with the
  real vocabulary sizes, for measuring speed and memory where the checkpoints cannot be
  downloaded (``bench/gpu.yaml``). Saved in bf16 (half the disk; the pipeline casts to
  its ``dtype``).

    python -m curate.tiny_models OUTDIR                # writes OUTDIR/{captioner,itm,clip}
    python -m curate.tiny_models OUTDIR --size paper
"""

from __future__ import annotations

import argparse
from pathlib import Path

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
WORDS = (
    "a an the of in on with and at to by for from is are photo picture image drawing "
    "clip art icon cartoon illustration of dog cat bird horse car tree house flower sun "
    "red blue green yellow black white small large man woman child people group standing "
    "sitting running on top near next behind field street water sky grass table room "
    "logo symbol sign map flag star heart person animal food fruit apple book computer "
    "phone music ball game face hand eye line shape circle square colorful vector"
).split()


# The published shapes. BLIP-large (Li et al., 2022): ViT-L/16 image encoder at 384 px,
# BERT-base text transformer cross-attending to it, bert-base-uncased vocabulary plus
# [DEC] and [ENC]. CLIP ViT-L/14 (Radford et al., 2021): 224 px, a 12-layer 768-wide
# text transformer, 49408 BPE tokens, 77 positions, 768-d joint space.
def _transformer(hidden: int, intermediate: int, layers: int, heads: int) -> dict:
    return {
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
    }


SIZES: dict[str, dict] = {
    "tiny": {
        "vision": _transformer(32, 64, 2, 2),
        "text": _transformer(32, 64, 2, 2),
        "blip_image": 32,
        "blip_patch": 8,
        "blip_vocab": None,  # the small word list below
        "blip_positions": 64,
        "blip_projection": 32,
        "clip_image": 32,
        "clip_patch": 8,
        "clip_vocab": None,
        "clip_positions": 64,
        "clip_projection": 32,
    },
    "paper": {
        "vision": _transformer(1024, 4096, 24, 16),  # ViT-L
        "text": _transformer(768, 3072, 12, 12),  # BERT-base / CLIP's text tower
        "blip_image": 384,
        "blip_patch": 16,
        "blip_vocab": 30524,
        "blip_positions": 512,
        "blip_projection": 256,
        "clip_image": 224,
        "clip_patch": 14,
        "clip_vocab": 49408,
        "clip_positions": 77,
        "clip_projection": 768,
    },
}


def write_vocab(directory: Path, size: int | None = None) -> Path:
    """A WordPiece vocab.txt: the word list, padded with [unusedN] to ``size`` entries."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = SPECIAL + sorted(set(WORDS)) + letters + [f"##{c}" for c in letters] + list("0123456789.,!?'-")
    seen: set[str] = set()
    vocab = [t for t in tokens if not (t in seen or seen.add(t))]
    if size is not None:
        vocab += [f"[unused{i}]" for i in range(size - len(vocab))]
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n")
    return path


def _tokenizer(directory: Path, size: int | None = None):
    from transformers import BertTokenizer

    write_vocab(directory, size)
    # [DEC] starts BLIP captions, as in the real BLIP tokenizer; special, so decoding drops it
    return BertTokenizer.from_pretrained(str(directory), do_lower_case=True, bos_token="[DEC]")


def _vision(size: str, image_size: int, patch_size: int) -> dict:
    return {
        **SIZES[size]["vision"],
        "image_size": image_size,
        "patch_size": patch_size,
        # BLIP's default vision init (1e-10) would make every image look alike
        "initializer_range": 0.02,
    }


def blip_config(tok, size: str = "tiny"):
    """The BLIP config (captioner and ITM share it) of ``size`` for tokenizer ``tok``."""
    from transformers import BlipConfig

    shape = SIZES[size]
    text = {
        **shape["text"],
        "vocab_size": len(tok),
        "max_position_embeddings": shape["blip_positions"],
        "encoder_hidden_size": shape["vision"]["hidden_size"],
        "bos_token_id": tok.convert_tokens_to_ids("[DEC]"),
        "sep_token_id": tok.sep_token_id,
        "eos_token_id": tok.sep_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    vision = _vision(size, shape["blip_image"], shape["blip_patch"])
    return BlipConfig(text_config=text, vision_config=vision, projection_dim=shape["blip_projection"])


def clip_config(tok, size: str = "tiny"):
    """The CLIP config of ``size`` for tokenizer ``tok`` (a WordPiece stand-in for CLIP's BPE)."""
    from transformers import CLIPConfig

    shape = SIZES[size]
    text = {
        **shape["text"],
        "vocab_size": len(tok),
        "max_position_embeddings": shape["clip_positions"],
        "bos_token_id": tok.cls_token_id,
        "eos_token_id": tok.sep_token_id,  # pooled at the first [SEP]
        "pad_token_id": tok.pad_token_id,
    }
    vision = _vision(size, shape["clip_image"], shape["clip_patch"])
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=shape["clip_projection"])


def _save(model, directory: Path, size: str) -> None:
    import torch

    if size != "tiny":
        model = model.to(torch.bfloat16)
    model.save_pretrained(directory, safe_serialization=True)


def _build_blip(model_class: str, directory: str | Path, seed: int, size: str) -> Path:
    import torch
    import transformers
    from transformers import BlipImageProcessorPil, BlipProcessor

    directory = Path(directory)
    torch.manual_seed(seed)
    tok = _tokenizer(directory, SIZES[size]["blip_vocab"])
    _save(getattr(transformers, model_class)(blip_config(tok, size)), directory, size)
    side = SIZES[size]["blip_image"]
    image_processor = BlipImageProcessorPil(size={"height": side, "width": side})
    BlipProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(directory)
    return directory


def build_blip_captioner(directory: str | Path, seed: int = 0, size: str = "tiny") -> Path:
    return _build_blip("BlipForConditionalGeneration", directory, seed, size)


def build_blip_itm(directory: str | Path, seed: int = 0, size: str = "tiny") -> Path:
    return _build_blip("BlipForImageTextRetrieval", directory, seed, size)


def build_clip(directory: str | Path, seed: int = 0, size: str = "tiny") -> Path:
    import torch
    from transformers import CLIPImageProcessorPil, CLIPModel

    directory = Path(directory)
    torch.manual_seed(seed)
    tok = _tokenizer(directory, SIZES[size]["clip_vocab"])
    _save(CLIPModel(clip_config(tok, size)), directory, size)
    tok.save_pretrained(directory)
    side = SIZES[size]["clip_image"]
    crop = {"height": side, "width": side}
    CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size=crop).save_pretrained(directory)
    return directory


def build_all(directory: str | Path, seed: int = 0, size: str = "tiny") -> dict[str, Path]:
    """Write captioner/, itm/ and clip/ of ``size`` under ``directory``; returns their paths."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(SIZES)}")
    directory = Path(directory)
    return {
        "captioner": build_blip_captioner(directory / "captioner", seed, size),
        "itm": build_blip_itm(directory / "itm", seed + 1, size),
        "clip": build_clip(directory / "clip", seed + 2, size),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="directory to write captioner/, itm/ and clip/ into")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny", help="tiny (tests) or paper (speed)")
    args = parser.parse_args(argv)
    for name, path in build_all(args.output, args.seed, args.size).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
