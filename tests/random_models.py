"""Random-weight models of the real architectures (BLIP captioner, BLIP ITM, CLIP), built from configs.

They load through exactly the code path of the papers' checkpoints (``from_pretrained`` on a
directory, safetensors); their captions are random words: they exercise the machinery, not the
quality. :data:`TINY` (a few hundred thousand parameters) is the ``tiny_models`` test fixture;
``bench/paper_models.py`` builds the same classes at the papers' shapes for the GPU benchmark,
where the checkpoints cannot be downloaded.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
WORDS = (
    "a an the of in on with and at to by for from is are photo picture image drawing "
    "clip art icon cartoon illustration of dog cat bird horse car tree house flower sun "
    "red blue green yellow black white small large man woman child people group standing "
    "sitting running on top near next behind field street water sky grass table room "
    "logo symbol sign map flag star heart person animal food fruit apple book computer "
    "phone music ball game face hand eye line shape circle square colorful vector"
).split()


def transformer(hidden: int, intermediate: int, layers: int, heads: int) -> dict[str, int]:
    """The sizes of one transformer tower, as Hugging Face config fields."""
    return {
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
    }


@dataclass(frozen=True)
class Shapes:
    """The sizes of the three models. A ``None`` vocabulary is the small word list above."""

    vision: dict[str, int]
    text: dict[str, int]
    blip_image: int
    blip_patch: int
    blip_vocab: int | None
    blip_positions: int
    blip_projection: int
    clip_image: int
    clip_patch: int
    clip_vocab: int | None
    clip_positions: int
    clip_projection: int
    bf16: bool = False  # saved in bf16: half the disk; the pipeline casts to its ``dtype``


TINY = Shapes(
    vision=transformer(32, 64, 2, 2),
    text=transformer(32, 64, 2, 2),
    blip_image=32,
    blip_patch=8,
    blip_vocab=None,
    blip_positions=64,
    blip_projection=32,
    clip_image=32,
    clip_patch=8,
    clip_vocab=None,
    clip_positions=64,
    clip_projection=32,
)


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


def tokenizer(directory: Path, size: int | None = None) -> Any:
    """A BERT tokenizer over :func:`write_vocab`'s vocabulary, saved in ``directory``."""
    from transformers import BertTokenizer

    write_vocab(directory, size)
    # [DEC] starts BLIP captions, as in the real BLIP tokenizer; special, so decoding drops it
    return BertTokenizer.from_pretrained(str(directory), do_lower_case=True, bos_token="[DEC]")


def _vision(shapes: Shapes, image_size: int, patch_size: int) -> dict[str, Any]:
    return {
        **shapes.vision,
        "image_size": image_size,
        "patch_size": patch_size,
        # BLIP's default vision init (1e-10) would make every image look alike
        "initializer_range": 0.02,
    }


def blip_config(tok: Any, shapes: Shapes = TINY) -> Any:
    """The BLIP config (captioner and ITM share it) of ``shapes`` for tokenizer ``tok``."""
    from transformers import BlipConfig

    text = {
        **shapes.text,
        "vocab_size": len(tok),
        "max_position_embeddings": shapes.blip_positions,
        "encoder_hidden_size": shapes.vision["hidden_size"],
        "bos_token_id": tok.convert_tokens_to_ids("[DEC]"),
        "sep_token_id": tok.sep_token_id,
        "eos_token_id": tok.sep_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    vision = _vision(shapes, shapes.blip_image, shapes.blip_patch)
    return BlipConfig(text_config=text, vision_config=vision, projection_dim=shapes.blip_projection)


def clip_config(tok: Any, shapes: Shapes = TINY) -> Any:
    """The CLIP config of ``shapes`` for tokenizer ``tok`` (a WordPiece stand-in for CLIP's BPE)."""
    from transformers import CLIPConfig

    text = {
        **shapes.text,
        "vocab_size": len(tok),
        "max_position_embeddings": shapes.clip_positions,
        "bos_token_id": tok.cls_token_id,
        "eos_token_id": tok.sep_token_id,  # pooled at the first [SEP]
        "pad_token_id": tok.pad_token_id,
    }
    vision = _vision(shapes, shapes.clip_image, shapes.clip_patch)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=shapes.clip_projection)


def _save(model: Any, directory: Path, shapes: Shapes) -> None:
    import torch

    if shapes.bf16:
        model = model.to(torch.bfloat16)
    model.save_pretrained(directory, safe_serialization=True)


def _build_blip(model_class: str, directory: str | Path, seed: int, shapes: Shapes) -> Path:
    import torch
    import transformers
    from transformers import BlipImageProcessorPil, BlipProcessor

    directory = Path(directory)
    torch.manual_seed(seed)
    tok = tokenizer(directory, shapes.blip_vocab)
    _save(getattr(transformers, model_class)(blip_config(tok, shapes)), directory, shapes)
    side = shapes.blip_image
    image_processor = BlipImageProcessorPil(size={"height": side, "width": side})
    BlipProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(directory)
    return directory


def build_blip_captioner(directory: str | Path, seed: int = 0, shapes: Shapes = TINY) -> Path:
    return _build_blip("BlipForConditionalGeneration", directory, seed, shapes)


def build_blip_itm(directory: str | Path, seed: int = 0, shapes: Shapes = TINY) -> Path:
    return _build_blip("BlipForImageTextRetrieval", directory, seed, shapes)


def build_clip(directory: str | Path, seed: int = 0, shapes: Shapes = TINY) -> Path:
    import torch
    from transformers import CLIPImageProcessorPil, CLIPModel

    directory = Path(directory)
    torch.manual_seed(seed)
    tok = tokenizer(directory, shapes.clip_vocab)
    _save(CLIPModel(clip_config(tok, shapes)), directory, shapes)
    tok.save_pretrained(directory)
    side = shapes.clip_image
    crop = {"height": side, "width": side}
    CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size=crop).save_pretrained(directory)
    return directory


def build_all(directory: str | Path, seed: int = 0, shapes: Shapes = TINY) -> dict[str, Path]:
    """Write captioner/, itm/ and clip/ of ``shapes`` under ``directory``; returns their paths."""
    directory = Path(directory)
    return {
        "captioner": build_blip_captioner(directory / "captioner", seed, shapes),
        "itm": build_blip_itm(directory / "itm", seed + 1, shapes),
        "clip": build_clip(directory / "clip", seed + 2, shapes),
    }


def build_image_classifier(
    directory: str | Path, labels: list[str], seed: int = 0, image_size: int = 32
) -> Path:
    """A tiny random ViT image classifier (``AutoModelForImageClassification``) with ``labels``, the
    kind the nsfw and watermark stages load (the real ones, a ViT-base, cannot be downloaded here)."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    directory = Path(directory)
    torch.manual_seed(seed)
    config = ViTConfig(
        **transformer(32, 64, 2, 2),
        image_size=image_size,
        patch_size=8,
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    ViTForImageClassification(config).save_pretrained(directory, safe_serialization=True)
    size = {"height": image_size, "width": image_size}
    ViTImageProcessorPil(size=size).save_pretrained(directory)
    return directory


def build_aesthetic_head(
    path: str | Path, dim: int, hidden: tuple[int, ...] = (16, 8), seed: int = 0
) -> Path:
    """Random weights in the layout of LAION's improved aesthetic predictor (``layers.N`` linear
    layers, Dropouts between them), ``dim`` -> ``hidden`` -> 1, as a safetensors file."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    sizes = [dim, *hidden, 1]
    state, index = {}, 0
    for n_in, n_out in itertools.pairwise(sizes):
        layer = torch.nn.Linear(n_in, n_out)
        state[f"layers.{index}.weight"] = layer.weight.detach().contiguous()
        state[f"layers.{index}.bias"] = layer.bias.detach().contiguous()
        index += 2  # a Dropout between each pair, as in LAION's nn.Sequential
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path


# BLIP-2 with an OPT language model (the architecture of Salesforce/blip2-opt-2.7b), tiny.
VLM_WORDS = (
    "<pad> <unk> <s> </s> <image> a an the of on with and in picture photo drawing cat dog bird "
    "tree house flower red blue green small large sitting standing next to"
).split()


def build_tiny_blip2(directory: str | Path, seed: int = 0, head_dim: int = 64, query_tokens: int = 8) -> Path:
    """A random tiny ``Blip2ForConditionalGeneration`` (ViT at 32 px in 8 px patches, a 2-layer
    Q-Former with ``query_tokens`` queries, a 2-layer OPT with ``head_dim``) and its processor:
    the kind of model both captioner backends serve, vLLM's included (``head_dim`` 64 suits
    every vLLM attention backend)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessorPil,
        OPTConfig,
        PreTrainedTokenizerFast,
    )

    directory = Path(directory)
    vocab = {t: i for i, t in enumerate(VLM_WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    text = OPTConfig(
        vocab_size=len(vocab),
        hidden_size=2 * head_dim,
        ffn_dim=4 * head_dim,
        num_hidden_layers=2,
        num_attention_heads=2,
        word_embed_proj_dim=2 * head_dim,
        max_position_embeddings=256,
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
        pad_token_id=vocab["<pad>"],
    )
    vision = {
        **transformer(64, 128, 2, 2),
        "image_size": 32,
        "patch_size": 8,
        "initializer_range": 0.02,
    }
    qformer = {**transformer(64, 128, 2, 2), "encoder_hidden_size": 64, "cross_attention_frequency": 1}
    config = Blip2Config(
        vision_config=vision,
        qformer_config=qformer,
        text_config=text.to_dict(),
        num_query_tokens=query_tokens,
        image_token_index=vocab["<image>"],
    )
    torch.manual_seed(seed)
    Blip2ForConditionalGeneration(config).save_pretrained(directory, safe_serialization=True)
    image_processor = BlipImageProcessorPil(size={"height": 32, "width": 32})
    Blip2Processor(
        image_processor=image_processor, tokenizer=tok, num_query_tokens=query_tokens
    ).save_pretrained(directory)
    return directory
