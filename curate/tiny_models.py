"""Small random-weight models of the real architectures (BLIP captioner, BLIP ITM, CLIP).

They load through exactly the code path of the papers' checkpoints (``from_pretrained``
on a directory, safetensors), which makes them the test fixtures and, until trained
weights are available offline, the models of the offline demo. Their captions are
random words: they exercise the machinery, not the quality.

    python -m curate.tiny_models OUTDIR     # writes OUTDIR/{captioner,itm,clip}
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


def write_vocab(directory: Path) -> Path:
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = SPECIAL + sorted(set(WORDS)) + letters + [f"##{c}" for c in letters] + list("0123456789.,!?'-")
    seen: set[str] = set()
    vocab = [t for t in tokens if not (t in seen or seen.add(t))]
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n")
    return path


def _tokenizer(directory: Path):
    from transformers import BertTokenizer

    write_vocab(directory)
    # [DEC] starts BLIP captions, as in the real BLIP tokenizer; special, so decoding drops it
    return BertTokenizer.from_pretrained(str(directory), do_lower_case=True, bos_token="[DEC]")


def _vision(image_size: int) -> dict:
    return {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": 8,
        # BLIP's default vision init (1e-10) would make every image look alike
        "initializer_range": 0.02,
    }


def _blip_config(tok):
    from transformers import BlipConfig

    text = {
        "vocab_size": len(tok),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 64,
        "encoder_hidden_size": 32,
        "bos_token_id": tok.convert_tokens_to_ids("[DEC]"),
        "sep_token_id": tok.sep_token_id,
        "eos_token_id": tok.sep_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    return BlipConfig(text_config=text, vision_config=_vision(32), projection_dim=32)


def _build_blip(model_class: str, directory: str | Path, seed: int) -> Path:
    import torch
    import transformers
    from transformers import BlipImageProcessorPil, BlipProcessor

    directory = Path(directory)
    torch.manual_seed(seed)
    tok = _tokenizer(directory)
    model = getattr(transformers, model_class)(_blip_config(tok))
    model.save_pretrained(directory, safe_serialization=True)
    image_processor = BlipImageProcessorPil(size={"height": 32, "width": 32})
    BlipProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(directory)
    return directory


def build_blip_captioner(directory: str | Path, seed: int = 0) -> Path:
    return _build_blip("BlipForConditionalGeneration", directory, seed)


def build_blip_itm(directory: str | Path, seed: int = 0) -> Path:
    return _build_blip("BlipForImageTextRetrieval", directory, seed)


def build_clip(directory: str | Path, seed: int = 0) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    directory = Path(directory)
    torch.manual_seed(seed)
    tok = _tokenizer(directory)
    text = {
        "vocab_size": len(tok),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 64,
        "bos_token_id": tok.cls_token_id,
        "eos_token_id": tok.sep_token_id,  # pooled at the first [SEP]
        "pad_token_id": tok.pad_token_id,
    }
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=_vision(32), projection_dim=32))
    model.save_pretrained(directory, safe_serialization=True)
    tok.save_pretrained(directory)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        directory
    )
    return directory


def build_all(directory: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write captioner/, itm/ and clip/ under ``directory``; returns their paths."""
    directory = Path(directory)
    return {
        "captioner": build_blip_captioner(directory / "captioner", seed),
        "itm": build_blip_itm(directory / "itm", seed + 1),
        "clip": build_clip(directory / "clip", seed + 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="directory to write captioner/, itm/ and clip/ into")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    args = parser.parse_args(argv)
    for name, path in build_all(args.output, args.seed).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
