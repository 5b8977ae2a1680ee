"""LAION's aesthetic predictor: linear layers over a unit CLIP image embedding.

LAION-Aesthetics V1 is one ``nn.Linear(768, 1)`` over CLIP ViT-L/14 (keys ``weight``, ``bias``); the
improved predictor (``sac+logos+ava1-l14-linearMSE``) is ``nn.Sequential`` of Linear(768, 1024),
Dropout, Linear(1024, 128), Dropout, Linear(128, 64), Dropout, Linear(64, 16), Linear(16, 1)
(keys ``layers.0`` ... ``layers.7``), with no activation between them; its ``reluMSE`` variants have
ReLUs. Both score on a 1-10 scale. The head runs on the embedding the ranker already computed, so
no image is encoded twice. Weights are a safetensors file; LAION's own ``.pth`` files (pickles)
load only with ``allow_pickle_weights``.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from curate.config import AestheticConfig

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def weights_path(cfg: AestheticConfig) -> str:
    """The weights file ``cfg`` names: a local file, a file in a local directory, or a file of a
    Hugging Face repository (fetched into the hub cache, or found there offline)."""
    if os.path.isfile(cfg.model):
        return cfg.model
    if os.path.isdir(cfg.model):
        path = os.path.join(cfg.model, cfg.filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"aesthetic head: no {cfg.filename} in {cfg.model}")
        return path
    from huggingface_hub import hf_hub_download

    return hf_hub_download(cfg.model, cfg.filename, revision=cfg.revision)


def _layer_order(prefix: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", prefix)]


def linear_layers(state: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (weight, bias) of each linear layer of ``state``, in layer order, checked to chain
    from the embedding to one score."""
    prefixes = sorted(
        (k[: -len("weight")] for k, v in state.items() if k.endswith("weight") and v.dim() == 2),
        key=_layer_order,
    )
    if not prefixes:
        raise ValueError(f"no linear layers in the weights (keys: {sorted(state)[:8]})")
    layers = []
    for prefix in prefixes:
        weight = state[f"{prefix}weight"]
        bias = state.get(f"{prefix}bias")
        if bias is None:
            bias = torch.zeros(weight.shape[0])
        if layers and layers[-1][0].shape[0] != weight.shape[1]:
            raise ValueError(
                f"layer {prefix or 'weight'} takes {weight.shape[1]} inputs but the layer before gives "
                f"{layers[-1][0].shape[0]}"
            )
        layers.append((weight.float(), bias.float()))
    if layers[-1][0].shape[0] != 1:
        raise ValueError(f"the last layer gives {layers[-1][0].shape[0]} outputs, not one score")
    return layers


class AestheticHead:
    """``head(embeddings)`` -> one score per row of a (N, D) array of unit image embeddings."""

    def __init__(self, cfg: AestheticConfig, device: torch.device | str = "cpu") -> None:
        try:
            path = weights_path(cfg)
            if path.endswith(PICKLE_SUFFIXES):
                if not cfg.allow_pickle_weights:
                    raise ValueError(
                        f"{path} is a pickle; convert it to safetensors or set aesthetic.allow_pickle_weights"
                    )
                state = torch.load(path, map_location="cpu", weights_only=True)
                state = state.get("state_dict", state)
            else:
                from safetensors.torch import load_file

                state = load_file(path)
            layers = linear_layers(state)
        except Exception as exc:
            raise RuntimeError(
                f"cannot load the aesthetic head from {cfg.model!r}: {type(exc).__name__}: {exc}"
            ) from exc
        self.device = torch.device(device)
        self.layers = [(w.to(self.device), b.to(self.device)) for w, b in layers]
        self.relu = cfg.activation == "relu"
        self.input_dim = int(layers[0][0].shape[1])

    @torch.inference_mode()
    def __call__(self, embeddings: np.ndarray) -> list[float]:
        x = torch.as_tensor(np.asarray(embeddings, np.float32), device=self.device)
        if x.dim() != 2 or x.shape[1] != self.input_dim:
            raise ValueError(
                f"the aesthetic head takes {self.input_dim}-d image embeddings, the ranker gives "
                f"{tuple(x.shape[1:])}: pair it with the ranker it was trained on (CLIP ViT-L/14: 768)"
            )
        for i, (weight, bias) in enumerate(self.layers):
            x = x @ weight.T + bias
            if self.relu and i < len(self.layers) - 1:
                x = torch.relu(x)
        return x[:, 0].tolist()
