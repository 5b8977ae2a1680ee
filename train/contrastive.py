"""The downstream CLIP-style model: frozen packaged towers, trainable projection heads, InfoNCE.

Towers: EfficientNet-Lite0 (ImageNet weights, mean-pooled 1280-d) and all-MiniLM-L6-v2
(mean-pooled 384-d), both frozen, as LiT ("locked-image tuning", Zhai et al., 2022) does
with its image tower. Trained: one MLP head per side into a shared 256-d space and the
temperature. Why not towers from scratch: a few thousand web pairs on a 2-core CPU cannot
train a vision or language tower; heads over frozen towers train in seconds from cached
embeddings (``train.feature_shards``), so several seeds per arm fit the budget, and what
differs between arms is only the text the heads learn to align with, which is what
curation changes.

Evaluation (``evaluate``): image->text and text->image recall@1/5/10 over a held-out
human-captioned split (duplicate captions count as hits), and zero-shot classification
over the split's top-level categories with "A picture of {name}." prompts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from curate.models.bridge import backbones
from train.feature_shards import FeatureShard
from train.metrics import recall_at_k

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

# readable names for tuxpaint's top-level stamp directories (zero-shot class prompts)
CATEGORY_NAMES = {"naturalforces": "natural forces", "town": "town buildings and signs", "people": "people"}
ZERO_SHOT_PROMPT = "A picture of {}."


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


def positive_mask(captions: Sequence[str]) -> torch.Tensor:
    """(b, b) True where two rows carry the same caption (case and spacing ignored): not negatives."""
    norm = [" ".join(c.lower().split()) for c in captions]
    index = {c: i for i, c in enumerate(dict.fromkeys(norm))}
    ids = torch.tensor([index[c] for c in norm])
    return ids[:, None] == ids[None, :]


def category_label(category: str | None) -> str | None:
    """Zero-shot label of a tuxpaint category path: its top-level directory, readable."""
    if not category:
        return None
    top = category.split("/")[0]
    return CATEGORY_NAMES.get(top, top.replace("_", " "))


@torch.no_grad()
def evaluate(model: ContrastiveHeads, shards: Sequence[FeatureShard], ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Retrieval recall@K both ways (first caption per image) and zero-shot accuracy where labelled."""
    model = model.eval()
    image = torch.cat([s.image for s in shards]).float()
    text = torch.cat([s.first_captions() for s in shards]).float()
    captions = [c[0] for s in shards for c in s.captions]
    img, txt = model.encode_image(image), model.encode_text(text)
    metrics: dict = recall_at_k(img @ txt.t(), ks, positive_mask=positive_mask(captions))
    metrics["n"] = len(captions)
    labels = [category_label(c) for s in shards for c in s.categories]
    labelled = [i for i, lab in enumerate(labels) if lab is not None]
    classes = sorted({labels[i] for i in labelled})
    if len(classes) >= 2:
        prompts = [ZERO_SHOT_PROMPT.format(c) for c in classes]
        class_emb = model.encode_text(backbones.encode_texts(prompts)[2].float())
        pred = (img[labelled] @ class_emb.t()).argmax(1)
        truth = torch.tensor([classes.index(labels[i]) for i in labelled])
        metrics["zeroshot_acc"] = float((pred == truth).float().mean())
        per_class = [
            float((pred[truth == c] == c).float().mean()) for c in range(len(classes)) if (truth == c).any()
        ]
        metrics["zeroshot_balanced_acc"] = sum(per_class) / len(per_class)
        metrics["zeroshot_classes"] = len(classes)
    return metrics
