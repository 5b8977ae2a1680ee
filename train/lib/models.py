"""The models the training scripts build, load and save.

- ``ContrastiveHeads``: the downstream CLIP-style model of ``train.train_clip``: frozen
  packaged towers, trainable projection heads, a learnt temperature. Towers:
  EfficientNet-Lite0 (ImageNet weights, mean-pooled 1280-d) and all-MiniLM-L6-v2
  (mean-pooled 384-d), both frozen, as LiT ("locked-image tuning", Zhai et al., 2022)
  does with its image tower. Why not towers from scratch there: a few thousand web
  pairs on a 2-core CPU cannot train a vision or language tower; heads over frozen
  towers train in seconds from cached embeddings (``train.lib.feature_shards``), so
  several seeds per arm fit the budget, and what differs between arms is only the text
  the heads learn to align with, which is what curation changes.
- Hugging Face CLIP (``build_clip``: from a checkpoint directory, or from scratch from a
  config of ``CLIP_ARCHS`` / a ``config.json`` and a tokenizer) and BLIP (``load_blip``)
  with their processors, for ``train.pretrain_clip`` and ``train.finetune_blip``.
- ``save_pretrained(model, output, *processors, dtype)``: ``save_pretrained`` (safetensors)
  plus the processor files into a temporary directory renamed onto ``output``, so a
  pipeline file's ``model:`` never sees half a directory.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from curate.io.files import atomic_path
from curate.models.bridge import backbones

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _mlp(in_dim: int, hidden: int, out_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.LayerNorm(in_dim),
        nn.Linear(in_dim, hidden),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, out_dim),
    )


class ContrastiveHeads(nn.Module):
    """Image and text projection heads plus a learnt temperature over frozen-tower embeddings."""

    def __init__(
        self,
        image_dim: int = backbones.IMAGE_DIM,
        text_dim: int = backbones.TEXT_DIM,
        hidden: int = 512,
        dim: int = 256,
        dropout: float = 0.1,
        temperature: float = 0.07,
    ) -> None:
        super().__init__()
        self.config = {
            "image_dim": image_dim,
            "text_dim": text_dim,
            "hidden": hidden,
            "dim": dim,
            "dropout": dropout,
            "temperature": temperature,
            "image_encoder": "efficientnet-lite0 (mean-pooled)",
            "text_encoder": "sentence-transformers/all-MiniLM-L6-v2 (mean-pooled)",
        }
        self.image_head = _mlp(image_dim, hidden, dim, dropout)
        self.text_head = _mlp(text_dim, hidden, dim, dropout)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_head(image), dim=-1)

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_head(text), dim=-1)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(image), self.encode_text(text)

    def scale(self) -> torch.Tensor:
        """The logit scale, clamped at 100 as CLIP does."""
        return self.logit_scale.clamp(max=math.log(100.0))

    def save_pretrained(self, directory: str | Path) -> Path:
        """``config.json`` + ``model.safetensors`` (heads only; the towers come from their packages)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(self.config, indent=1) + "\n")
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> ContrastiveHeads:
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / WEIGHTS_NAME).exists():
            raise FileNotFoundError(f"{directory}: no {WEIGHTS_NAME} (heads are saved as safetensors)")
        config = json.loads((directory / CONFIG_NAME).read_text())
        model = cls(
            **{k: config[k] for k in ("image_dim", "text_dim", "hidden", "dim", "dropout", "temperature")}
        )
        model.load_state_dict(load_file(str(directory / WEIGHTS_NAME)))
        return model.eval()


# -- Hugging Face CLIP and BLIP --------------------------------------------------------------------


def _tower(hidden: int, intermediate: int, layers: int, heads: int, **extra: Any) -> dict[str, Any]:
    return {
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        **extra,
    }


# The published CLIP shapes (Radford et al., 2021): a 77-token, 12-layer text transformer
# (512 wide for ViT-B, 768 for ViT-L) and the vision transformer named.
CLIP_ARCHS: dict[str, dict[str, Any]] = {
    "vit-b-32": {
        "vision": _tower(768, 3072, 12, 12, image_size=224, patch_size=32),
        "text": _tower(512, 2048, 12, 8, max_position_embeddings=77),
        "projection_dim": 512,
    },
    "vit-b-16": {
        "vision": _tower(768, 3072, 12, 12, image_size=224, patch_size=16),
        "text": _tower(512, 2048, 12, 8, max_position_embeddings=77),
        "projection_dim": 512,
    },
    "vit-l-14": {
        "vision": _tower(1024, 4096, 24, 16, image_size=224, patch_size=14),
        "text": _tower(768, 3072, 12, 12, max_position_embeddings=77),
        "projection_dim": 768,
    },
}
BYTE_TOKENIZER = "bytes"


def load_tokenizer(spec: str):
    """A tokenizer directory (or hub id), or ``bytes``: ByT5's byte-level tokenizer, which
    needs no vocabulary file (256 bytes and a few specials), for towers trained from scratch."""
    import transformers

    if spec == BYTE_TOKENIZER:
        return transformers.ByT5Tokenizer()
    return transformers.AutoTokenizer.from_pretrained(spec)


def _special_ids(tok) -> dict[str, int]:
    eos = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
    if eos is None or tok.pad_token_id is None:
        raise ValueError(f"{type(tok).__name__}: CLIP's text tower needs an end token and a padding token")
    start = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
    # CLIP pools the text tower at the first end token
    return {
        "eos_token_id": eos,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": eos if start is None else start,
    }


def clip_config(arch: str, tokenizer):
    """A ``CLIPConfig`` for ``tokenizer``: a name of ``CLIP_ARCHS`` or a config.json (or its directory)."""
    from transformers import CLIPConfig

    if arch in CLIP_ARCHS:
        shape = CLIP_ARCHS[arch]
        text = {**shape["text"], "vocab_size": len(tokenizer), **_special_ids(tokenizer)}
        return CLIPConfig(
            text_config=text, vision_config=dict(shape["vision"]), projection_dim=shape["projection_dim"]
        )
    path = Path(arch)
    if not path.exists():
        raise FileNotFoundError(f"--arch {arch}: neither one of {sorted(CLIP_ARCHS)} nor a config.json")
    config = CLIPConfig.from_pretrained(str(path))
    if config.model_type != "clip":
        raise ValueError(f"--arch {arch}: model_type {config.model_type!r}, expected 'clip'")
    if config.text_config.vocab_size < len(tokenizer):
        raise ValueError(
            f"--arch {arch}: text vocab_size {config.text_config.vocab_size} is smaller than the "
            f"tokenizer's {len(tokenizer)} tokens"
        )
    return config


def build_clip(init_from: str | None = None, arch: str | None = None, tokenizer: str | None = None):
    """(CLIPModel, tokenizer, image processor) from a checkpoint, or freshly initialised from ``arch``.

    A checkpoint is a ``save_pretrained`` directory (or hub id) with safetensors weights,
    its tokenizer and image processor (``tokenizer`` overrides its tokenizer). From
    scratch (``arch``), ``tokenizer`` is required and the image processor is CLIP's
    (OpenAI mean and std, shortest side resized, centre crop); seed torch first.
    """
    import transformers

    from curate.models.base import LoadOptions
    from curate.models.clip import load_image_processor

    if init_from:
        # fp32 master weights whatever the checkpoint's dtype (autocast does the bf16)
        model = transformers.CLIPModel.from_pretrained(init_from, use_safetensors=True, dtype=torch.float32)
        tok = load_tokenizer(tokenizer or init_from)
        return model, tok, load_image_processor(LoadOptions(init_from))
    if not arch:
        raise ValueError("give a checkpoint to start from (--init-from) or an architecture (--arch)")
    if not tokenizer:
        raise ValueError(f"--arch {arch} from scratch needs --tokenizer (a tokenizer directory, or 'bytes')")
    tok = load_tokenizer(tokenizer)
    config = clip_config(arch, tok)
    side = config.vision_config.image_size
    processor = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}
    )
    return transformers.CLIPModel(config), tok, processor


BLIP_TASKS = {"captioner": "BlipForConditionalGeneration", "filter": "BlipForImageTextRetrieval"}


def load_blip(task: str, init_from: str):
    """(BLIP model of ``task``, its processor) from a ``save_pretrained`` directory or hub id."""
    import transformers

    if task not in BLIP_TASKS:
        raise ValueError(f"task must be one of {sorted(BLIP_TASKS)}, got {task!r}")
    config = transformers.AutoConfig.from_pretrained(init_from)
    if config.model_type != "blip":
        raise ValueError(f"--init-from {init_from}: model_type {config.model_type!r}, expected a BLIP model")
    model = getattr(transformers, BLIP_TASKS[task]).from_pretrained(
        init_from, use_safetensors=True, dtype=torch.float32
    )
    return model, transformers.AutoProcessor.from_pretrained(init_from)


def processor_parts(processor) -> tuple[Any, Any]:
    """(tokenizer, image processor) of a processor, or of a bare image processor (tokenizer None)."""
    return getattr(processor, "tokenizer", None), getattr(processor, "image_processor", processor)


def save_pretrained(model: nn.Module, output: str | Path, *processors: Any, dtype: str = "fp32") -> Path:
    """``save_pretrained`` (safetensors, floating tensors in ``dtype``) with ``processors`` into
    ``output``, through a temporary directory renamed when complete."""
    if dtype not in SAVE_DTYPES:
        raise ValueError(f"save dtype must be one of {sorted(SAVE_DTYPES)}, got {dtype!r}")
    cast = SAVE_DTYPES[dtype]
    state: Mapping[str, torch.Tensor] = {
        k: (v.detach().to("cpu", cast) if v.is_floating_point() else v.detach().cpu()).contiguous()
        for k, v in model.state_dict().items()
    }
    with atomic_path(output) as tmp:
        model.save_pretrained(tmp, state_dict=dict(state), safe_serialization=True)
        for processor in processors:
            processor.save_pretrained(tmp)
    return Path(output)


def saved_bridge_config(path: str | Path, model_type: str, option: str) -> dict[str, Any]:
    """The config.json of a saved bridge of ``model_type`` in ``path``; errors name ``option``."""
    path = Path(path)
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{option} {path}: expected a saved bridge (config.json + model.safetensors)")
    saved = json.loads((path / "config.json").read_text())
    if saved.get("model_type") != model_type:
        raise ValueError(f"{option} {path}: not a {model_type} (model_type {saved.get('model_type')!r})")
    return saved
