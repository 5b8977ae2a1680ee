"""The bootstrapped CapFilt filter: a small image-grounded text encoder over frozen backbones.

BLIP's filter at this machine's scale. Frozen EfficientNet-Lite0 gives 49 image tokens
(1280-d), frozen all-MiniLM-L6-v2 gives text token states (384-d). Trained here:

- ITM: text tokens projected to ``hidden_size`` run through ``num_layers`` fusion layers
  (self-attention over the text, cross-attention to the projected image tokens, MLP),
  and a 2-way head on the first token ([CLS], marked with a learned "encode" vector as
  BLIP's [ENC]) gives P(match).
- ITC: mean-pooled image tokens and mean-pooled MiniLM states, each projected to
  ``proj_dim`` and normalised, with a learned temperature.
- Label prior (``label_prior``): the frozen ImageNet classifier head turns the pooled
  image into class probabilities; their average of the class names' MiniLM embeddings
  (``backbones.imagenet_label_embeddings``) puts the image in the text encoder's space.
  The image's ITC embedding is that vector through the text side's adapter plus a
  learned projection of the pooled features (zero at init), and the fusion layers see it
  as a 50th image token. With ``proj_dim == text_dim`` the text adapter starts as the
  identity, so training starts from the zero-shot match and learns corrections: what
  lets a bridge trained on a few hundred captions generalise to unseen concepts.
- Hubness correction (``hub_k > 0``): some texts sit close to every image and some images
  to every text (hubs), so one threshold on the cosine keeps too much for them. As CSLS
  does for cross-lingual retrieval, the similarity used for ITC scores and as the ITM
  head's evidence is ``cos - (r_image + r_text) / 2``, where ``r`` is the mean cosine of the
  ``hub_k`` nearest entries of a fixed bank of the other side's embeddings (``hub_images``,
  ``hub_texts``: ``hub_bank`` rows of the training set's, set by ``set_hub_banks`` after
  training and saved with the weights). Banks of zeros correct nothing.

The frozen backbones are not submodules: they load from their registry packages
(``backbones.py``), so ``save_pretrained`` writes only the trainable bridge (a few MB)
and ``BridgeFilterModel.from_pretrained(dir)`` reads safetensors only.

Two kinds of inputs: precomputed features (``itm_logits``, ``image_itc``, ``text_itc``;
what training on a feature cache uses) and raw PIL images and strings (``itm_scores``,
``itc_scores``; what the pipeline's ITM filter and ranker call).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers import initialization as init

from curate.models import BRIDGE_FILTER_TYPE
from curate.models.bridge import backbones

MODEL_TYPE = BRIDGE_FILTER_TYPE


class BridgeFilterConfig(PretrainedConfig):
    """Sizes of the trainable bridge; the backbone fields name what it was trained on."""

    model_type = MODEL_TYPE

    def __init__(
        self,
        image_dim: int = backbones.IMAGE_DIM,
        text_dim: int = backbones.TEXT_DIM,
        image_tokens: int = 49,
        hidden_size: int = 256,
        num_layers: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        proj_dim: int = backbones.TEXT_DIM,
        dropout: float = 0.1,
        itc_dropout: float = 0.5,
        feature_dropout: float = 0.0,
        label_prior: bool = True,
        label_temperature: float = 0.5,
        label_prompt: str = "A {}.",
        itm_itc_prior: bool = True,
        itm_itc_gain: float = 5.0,
        itc_temperature: float = 0.07,
        hub_k: int = 0,
        hub_bank: int = 0,
        max_text_tokens: int = 48,
        image_size: int = backbones.IMAGE_SIZE,
        image_resize: str = "pad",
        image_encoder: str = "efficientnet-lite0",
        text_encoder: str = "sentence-transformers/all-MiniLM-L6-v2",
        initializer_range: float = 0.02,
        **kwargs,
    ) -> None:
        self.image_dim = image_dim
        self.text_dim = text_dim
        self.image_tokens = image_tokens
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.proj_dim = proj_dim
        self.dropout = dropout
        self.itc_dropout = itc_dropout
        self.feature_dropout = feature_dropout
        self.label_prior = label_prior
        self.label_temperature = label_temperature
        self.label_prompt = label_prompt
        self.itm_itc_prior = itm_itc_prior
        self.itm_itc_gain = itm_itc_gain
        self.itc_temperature = itc_temperature
        self.hub_k = hub_k
        self.hub_bank = hub_bank
        self.max_text_tokens = max_text_tokens
        self.image_size = image_size
        self.image_resize = image_resize
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.initializer_range = initializer_range
        super().__init__(**kwargs)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden_size {dim} is not a multiple of num_heads {heads}")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        key_mask: torch.Tensor | None,
        context_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``context_index``: row of ``context`` for each row of ``x`` (keys/values computed once per row)."""
        b, n, d = x.shape
        q = self.q(x).view(b, n, self.heads, -1).transpose(1, 2)
        kv = self.kv(context)
        if context_index is not None:
            kv = kv.index_select(0, context_index)
        k, v = kv.view(b, kv.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        mask = None if key_mask is None else key_mask[:, None, None, :].bool()
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class _FusionLayer(nn.Module):
    """Pre-norm: text self-attention, cross-attention to image tokens, MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = _Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = _Attention(dim, heads, dropout)
        self.norm3 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        image: torch.Tensor,
        image_index: torch.Tensor | None,
        first_only: bool = False,
    ) -> torch.Tensor:
        """``first_only``: update only token 0 (the last layer: only its output is read)."""
        h = self.norm1(text)
        if first_only:
            text = text[:, :1]
        text = text + self.drop(self.self_attn(h[:, : text.shape[1]], h, text_mask))
        text = text + self.drop(self.cross_attn(self.norm2(text), image, None, image_index))
        return text + self.drop(self.mlp(self.norm3(text)))


class _Adapter(nn.Module):
    """Text-side ITC map: identity plus a zero-initialised linear correction when sizes allow."""

    def __init__(self, dim_in: int, dim_out: int, dropout: float) -> None:
        super().__init__()
        self.residual = dim_in == dim_out
        self.norm = nn.Identity() if self.residual else nn.LayerNorm(dim_in)
        self.drop = nn.Dropout(dropout)
        self.linear = nn.Linear(dim_in, dim_out)
        self.linear._zero_init = self.residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(self.drop(self.norm(x)))
        return x + y if self.residual else y


def _pair_chunks(texts_per_image: list[list[str]], batch_size: int):
    """Chunks of (positions, image indices, texts) over every (image, text) pair, shortest
    texts first: a chunk is padded to its longest text, so a 40-token alt-text among
    6-token captions would make the text encoder and the fusion pay 40 for each."""
    pairs = [(i, t) for i, ts in enumerate(texts_per_image) for t in ts]
    order = sorted(range(len(pairs)), key=lambda k: len(pairs[k][1]))
    for start in range(0, len(order), batch_size):
        positions = order[start : start + batch_size]
        yield positions, [pairs[k][0] for k in positions], [pairs[k][1] for k in positions]


def _place(flat: list[float], positions: list[int], values: list[float]) -> None:
    for p, v in zip(positions, values):
        flat[p] = v


def _split(flat: list[float], texts: list[list[str]]) -> list[list[float]]:
    out, pos = [], 0
    for ts in texts:
        out.append(flat[pos : pos + len(ts)])
        pos += len(ts)
    return out


class BridgeFilterModel(PreTrainedModel):
    """ITM + ITC bridge between frozen EfficientNet-Lite0 and all-MiniLM-L6-v2 (see module doc)."""

    config_class = BridgeFilterConfig
    base_model_prefix = "bridge_filter"
    main_input_name = "image_tokens"

    def __init__(self, config: BridgeFilterConfig) -> None:
        super().__init__(config)
        if config.label_prior:
            backbones.imagenet_class_names()  # fail at load, naming the package, not at the first batch
        d = config.hidden_size
        fdrop = config.feature_dropout
        self.image_in = nn.Sequential(
            nn.LayerNorm(config.image_dim), nn.Dropout(fdrop), nn.Linear(config.image_dim, d)
        )
        # one more image token for the label prior (it lives in the text space: text_in projects it)
        self.image_pos = nn.Parameter(torch.zeros(config.image_tokens + int(config.label_prior), d))
        self.text_in = nn.Sequential(
            nn.LayerNorm(config.text_dim), nn.Dropout(fdrop), nn.Linear(config.text_dim, d)
        )
        self.enc_token = nn.Parameter(torch.zeros(d))
        self.layers = nn.ModuleList(
            _FusionLayer(d, config.num_heads, config.mlp_ratio, config.dropout)
            for _ in range(config.num_layers)
        )
        self.norm = nn.LayerNorm(d)
        self.itm_head = nn.Linear(d, 2)
        self.image_itc_proj = nn.Sequential(
            nn.LayerNorm(config.image_dim),
            nn.Dropout(config.itc_dropout),
            nn.Linear(config.image_dim, config.proj_dim),
        )
        # with the label prior the image side starts at zero: its ITC embedding is the prior's
        self.image_itc_proj[-1]._zero_init = config.label_prior
        self.text_itc_proj = _Adapter(config.text_dim, config.proj_dim, config.itc_dropout)
        self.logit_scale = nn.Parameter(torch.tensor(0.0))
        # the ITC cosine as evidence for the match logit (learned gain): see itm_logits
        self.itc_gain = nn.Parameter(torch.tensor(0.0)) if config.itm_itc_prior else None
        if (config.hub_k > 0) != (config.hub_bank > 0) or config.hub_k > config.hub_bank:
            raise ValueError(
                f"hub_k {config.hub_k} needs a hub_bank of at least that many rows, got {config.hub_bank}"
            )
        if config.hub_bank > 0:  # the hubness correction's banks: filled by set_hub_banks, saved
            self.register_buffer("hub_images", torch.zeros(config.hub_bank, config.proj_dim))
            self.register_buffer("hub_texts", torch.zeros(config.hub_bank, config.proj_dim))
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, nn.Linear) and getattr(module, "_zero_init", False):
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        if isinstance(module, BridgeFilterModel):
            init.normal_(module.image_pos, mean=0.0, std=self.config.initializer_range)
            init.normal_(module.enc_token, mean=0.0, std=self.config.initializer_range)
            init.constant_(module.logit_scale, math.log(1.0 / self.config.itc_temperature))
            if module.itc_gain is not None:
                init.constant_(module.itc_gain, self.config.itm_itc_gain)

    # -- from features (training) ------------------------------------------------------------------

    def itm_logits(
        self,
        image_tokens: torch.Tensor,
        text_states: torch.Tensor,
        text_mask: torch.Tensor,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Image tokens (I, 49, 1280), text states (N, T, 384), mask (N, T) -> (N, 2) [no match, match].

        Text n is paired with image ``image_index[n]`` (default: n, so I == N): each image
        is projected once however many texts are scored against it. With ``itm_itc_prior``
        the match logit also gets ``itc_gain`` times the ITC similarity (``pair_similarity``):
        the fusion layers learn what the contrastive similarity misses instead of relearning
        what it has.
        """
        dtype = self.image_pos.dtype
        image_tokens = image_tokens.to(dtype)
        # without fusion layers the head reads the first token alone: nothing else is projected
        text = self.text_in((text_states if len(self.layers) else text_states[:, :1]).to(dtype))
        text = torch.cat([text[:, :1] + self.enc_token, text[:, 1:]], dim=1)
        if len(self.layers):
            image = self.image_in(image_tokens) + self.image_pos[: image_tokens.shape[1]]
            if self.config.label_prior:
                prior = self.text_in(self.label_prior(image_tokens)) + self.image_pos[-1]
                image = torch.cat([image, prior.unsqueeze(1)], dim=1)
            last = len(self.layers) - 1
            for i, layer in enumerate(self.layers):
                text = layer(text, text_mask, image, image_index, first_only=i == last)
        logits = self.itm_head(self.norm(text[:, 0]))
        if self.itc_gain is None:
            return logits
        mask = text_mask.unsqueeze(-1).to(dtype)
        pooled = (text_states.to(dtype) * mask).sum(1) / mask.sum(1).clamp(min=1)
        image_feat = self.image_itc(image_tokens)
        image_hub = self.image_hubness(image_feat)  # once per image, however many texts
        if image_index is not None:
            image_feat = image_feat.index_select(0, image_index)
            image_hub = None if image_hub is None else image_hub.index_select(0, image_index)
        sim = self.pair_similarity(image_feat, self.text_itc(pooled), image_hub)
        return logits + torch.stack([torch.zeros_like(sim), self.itc_gain * sim], dim=-1)

    def _frozen_prior(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        # frozen tensors from the backbone packages, kept off the module's state (never saved)
        key = (device, dtype)
        cache = self.__dict__.setdefault("_prior_cache", {})
        if key not in cache:
            weight, bias = backbones.image_classifier_head()
            labels = backbones.imagenet_label_embeddings(self.config.label_prompt)
            cache[key] = tuple(t.to(device=device, dtype=dtype) for t in (weight, bias, labels))
        return cache[key]

    def label_prior(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """(B, 49, 1280) -> (B, 384): ImageNet class probabilities times class-name embeddings."""
        dtype = self.image_pos.dtype
        weight, bias, labels = self._frozen_prior(image_tokens.device, dtype)
        with torch.no_grad():
            logits = F.linear(image_tokens.to(dtype).mean(1), weight, bias)
            return torch.softmax(logits / self.config.label_temperature, dim=-1) @ labels

    def image_itc(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """(B, 49, 1280) -> (B, proj_dim), unit norm."""
        image_tokens = image_tokens.to(self.image_pos.dtype)
        feat = self.image_itc_proj(image_tokens.mean(1))
        if self.config.label_prior:
            feat = feat + self.text_itc_proj(self.label_prior(image_tokens))
        return F.normalize(feat, dim=-1)

    def text_itc(self, text_pooled: torch.Tensor) -> torch.Tensor:
        """Mean-pooled MiniLM (B, 384) -> (B, proj_dim), unit norm."""
        return F.normalize(self.text_itc_proj(text_pooled.to(self.image_pos.dtype)), dim=-1)

    # -- the similarity: cosine, less each side's hubness ------------------------------------------

    def _hub(self, feat: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
        """(B, proj_dim) -> (B,): mean cosine of the ``hub_k`` nearest bank rows."""
        return (feat @ bank.to(feat.dtype).t()).topk(self.config.hub_k, dim=-1).values.mean(-1)

    def image_hubness(self, image_feat: torch.Tensor) -> torch.Tensor | None:
        """(I, proj_dim) unit image embeddings -> (I,) their hubness (None without the correction)."""
        return self._hub(image_feat, self.hub_texts) if self.config.hub_k > 0 else None

    def pair_similarity(
        self, image_feat: torch.Tensor, text_feat: torch.Tensor, image_hub: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Unit ITC embeddings of N pairs (N, proj_dim) each -> (N,) similarity (see module doc);
        ``image_hub``: the images' ``image_hubness`` when already at hand."""
        cos = (image_feat * text_feat).sum(-1)
        if self.config.hub_k <= 0:
            return cos
        if image_hub is None:
            image_hub = self.image_hubness(image_feat)
        return cos - (image_hub + self._hub(text_feat, self.hub_images)) / 2

    def similarity_matrix(self, image_feat: torch.Tensor, text_feat: torch.Tensor) -> torch.Tensor:
        """Unit ITC embeddings (I, proj_dim), (T, proj_dim) -> (I, T) similarity of every pair."""
        sim = image_feat @ text_feat.t()
        if self.config.hub_k <= 0:
            return sim
        hub_i, hub_t = self.image_hubness(image_feat), self._hub(text_feat, self.hub_images)
        return sim - (hub_i[:, None] + hub_t[None, :]) / 2

    @torch.no_grad()
    def set_hub_banks(self, image_feat: torch.Tensor, text_feat: torch.Tensor) -> None:
        """Fill the banks with ``hub_bank`` rows of unit ITC embeddings (a training set's)."""
        if self.config.hub_bank <= 0:
            raise ValueError("this filter has no hubness banks (hub_bank is 0)")
        for name, feat in (("hub_images", image_feat), ("hub_texts", text_feat)):
            bank = getattr(self, name)
            if feat.shape != bank.shape:
                raise ValueError(f"{name} takes {tuple(bank.shape)} embeddings, got {tuple(feat.shape)}")
            bank.copy_(feat)

    def forward(
        self,
        image_tokens: torch.Tensor,
        text_states: torch.Tensor,
        text_mask: torch.Tensor,
        text_pooled: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Paired features -> ITM logits and the ITC embeddings of both sides."""
        return {
            "itm_logits": self.itm_logits(image_tokens, text_states, text_mask),
            "image_feat": self.image_itc(image_tokens),
            "text_feat": self.text_itc(text_pooled),
        }

    # -- from raw inputs (pipeline) ----------------------------------------------------------------

    @property
    def _device(self) -> torch.device:
        return self.image_pos.device

    @torch.inference_mode()
    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images -> frozen image tokens (B, 49, 1280) on this model's device."""
        size, resize = self.config.image_size, self.config.image_resize
        pixels = backbones.preprocess_images(images, size, resize=resize).to(self._device)
        return backbones.encode_images(pixels)

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Strings -> frozen MiniLM (states, mask, mean-pooled) on this model's device."""
        return backbones.encode_texts(texts, max_length=self.config.max_text_tokens, device=self._device)

    @torch.inference_mode()
    def itm_scores(
        self, images: list[Image.Image], texts_per_image: list[list[str]], batch_size: int = 64
    ) -> list[list[float]]:
        """P(match) for every text of every image; each image is encoded once."""
        return self._pair_scores(images, texts_per_image, batch_size, itm=True, itc=False)[0]

    @torch.inference_mode()
    def itc_scores(
        self, images: list[Image.Image], texts_per_image: list[list[str]], batch_size: int = 64
    ) -> list[list[float]]:
        """Cosine similarity of the ITC embeddings for every text of every image."""
        return self._pair_scores(images, texts_per_image, batch_size, itm=False, itc=True)[1]

    @torch.inference_mode()
    def itm_itc_scores(
        self, images: list[Image.Image], texts_per_image: list[list[str]], batch_size: int = 64
    ) -> tuple[list[list[float]], list[list[float]]]:
        """``itm_scores`` and ``itc_scores`` in one pass: each image and each text encoded once."""
        return self._pair_scores(images, texts_per_image, batch_size, itm=True, itc=True)

    @torch.inference_mode()
    def scores_and_features(
        self,
        images: list[Image.Image],
        texts_per_image: list[list[str]],
        batch_size: int = 64,
        itm: bool = True,
    ) -> tuple[list[list[float]], list[list[float]], torch.Tensor, torch.Tensor]:
        """ITM (when ``itm``) and ITC scores with the unit ITC embeddings they came from: the
        images' (I, proj_dim) and every text's (N, proj_dim, in ``texts_per_image``'s order), for
        heads on the image embedding and for the embeddings a run writes out."""
        return self._pair_scores(images, texts_per_image, batch_size, itm=itm, itc=True, features=True)

    def _pair_scores(
        self,
        images: list[Image.Image],
        texts_per_image: list[list[str]],
        batch_size: int,
        itm: bool,
        itc: bool,
        features: bool = False,
    ) -> tuple:
        """The asked-for heads' scores of every (image, text) pair, in ``texts_per_image``'s
        order; a head not asked for gives empty lists. ``features`` adds the ITC embeddings."""
        total = sum(map(len, texts_per_image))
        dim = self.config.proj_dim
        if not images:
            return ([], [], torch.zeros(0, dim), torch.zeros(0, dim)) if features else ([], [])
        image_tokens = self.encode_images(images)
        image_feat = self.image_itc(image_tokens).float() if itc else None
        image_hub = self.image_hubness(image_feat) if itc else None
        text_feats = torch.zeros(total, dim, device=self._device) if features else None
        itm_flat, itc_flat = [0.0] * total, [0.0] * total
        for positions, image_index, texts in _pair_chunks(texts_per_image, batch_size):
            states, mask, pooled = self.encode_texts(texts)
            idx = torch.tensor(image_index, device=self._device)
            if itm:
                logits = self.itm_logits(image_tokens, states, mask, image_index=idx).float()
                _place(itm_flat, positions, torch.softmax(logits, dim=-1)[:, 1].tolist())
            if itc:
                text_feat = self.text_itc(pooled).float()
                hub = None if image_hub is None else image_hub.index_select(0, idx)
                sim = self.pair_similarity(image_feat.index_select(0, idx), text_feat, hub)
                _place(itc_flat, positions, sim.tolist())
                if text_feats is not None:
                    text_feats[torch.tensor(positions, device=self._device)] = text_feat
        scores = (
            _split(itm_flat, texts_per_image) if itm else [],
            _split(itc_flat, texts_per_image) if itc else [],
        )
        return (*scores, image_feat.cpu(), text_feats.cpu()) if features else scores


def register() -> None:
    """Make ``AutoConfig``/``AutoModel`` load a bridge filter directory without remote code."""
    from transformers import AutoConfig, AutoModel

    with contextlib.suppress(ValueError):  # already registered (module reloaded)
        AutoConfig.register(MODEL_TYPE, BridgeFilterConfig)
    with contextlib.suppress(ValueError):
        AutoModel.register(BridgeFilterConfig, BridgeFilterModel)
