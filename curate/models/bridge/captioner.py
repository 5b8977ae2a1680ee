"""The bridge captioner: frozen image encoder -> small Q-Former -> soft prompt of a frozen LM.

BLIP-2's generative half at the scale of this machine. EfficientNet-Lite0's 49 image
tokens are read by a few learned queries (self-attention among the queries, then
cross-attention to the image tokens); a linear map puts the query outputs into the
language model's embedding space, where they become a soft prompt in front of a short
fixed text prompt ("A picture of"). Only the bridge is trained, with the LM loss on the
caption tokens, so only the bridge is saved: ``model.safetensors`` holds a few MB and
the frozen LM (SmolLM2-135M-Instruct by default) and image encoder come from their
registry packages. The LM is loaded lazily on first use, outside the module tree, so
``state_dict``/``save_pretrained``/DDP see the bridge alone.

BLIP-2 trains its Q-Former for image-text matching before it connects it to the LM.
``itc_prefix_tokens > 0`` does the same with a bootstrapped filter: the filter
(``curate.models.bridge.filter``, its config in ``itc_filter``) is held inside, frozen, and
its ITC image embedding, which lives in the text encoder's space and was trained on many
more pairs than a captioner sees, goes through a small trained MLP into that many more
soft-prompt tokens after the queries'. The filter's weights are saved with the bridge's.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from curate.models.bridge import backbones
from curate.models.bridge.filter import BridgeFilterConfig, BridgeFilterModel
from curate.models.sampling import sample_from_embeds, seeded_uniforms

ARTICLES = ("a", "an", "the")


class BridgeCaptionerConfig(PretrainedConfig):
    """Sizes of the bridge and the frozen parts it connects.

    ``language_model``: None means the packaged SmolLM2 (``backbones.language_model_dir()``),
    which keeps a saved config portable across machines; a local directory (any
    safetensors causal LM with a tokenizer) overrides it, e.g. a tiny LM in tests.
    """

    model_type = "curate-bridge-captioner"

    def __init__(
        self,
        language_model: str | None = None,
        lm_hidden_size: int = 576,
        image_encoder: str = "efficientnet-lite0",
        image_dim: int = backbones.IMAGE_DIM,
        num_image_tokens: int = 49,
        hidden_size: int = 256,
        num_queries: int = 8,
        num_layers: int = 2,
        num_heads: int = 4,
        mlp_ratio: int = 4,
        dropout: float = 0.1,
        prompt: str = "A picture of",
        max_caption_tokens: int = 24,
        image_resize: str = "crop",
        itc_prefix_tokens: int = 0,
        itc_filter: dict | None = None,
        **kwargs: Any,
    ) -> None:
        self.language_model = language_model
        self.lm_hidden_size = lm_hidden_size
        self.image_encoder = image_encoder
        self.image_dim = image_dim
        self.num_image_tokens = num_image_tokens
        self.hidden_size = hidden_size
        self.num_queries = num_queries
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.dropout = dropout
        self.prompt = prompt
        self.max_caption_tokens = max_caption_tokens
        # how images are squared for the encoder (backbones.preprocess_images); with an ITC
        # prefix it must be the filter's own
        self.image_resize = image_resize
        self.itc_prefix_tokens = itc_prefix_tokens
        self.itc_filter = itc_filter
        super().__init__(**kwargs)


@dataclass
class BridgeCaptionerOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    num_tokens: torch.Tensor | None = None


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {heads}")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads
        q = self.q(x).view(b, n, h, d // h).transpose(1, 2)
        k, v = self.kv(context).view(b, context.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class QFormerLayer(nn.Module):
    """Pre-norm: queries attend to each other, then to the image tokens, then an MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, dropout: float) -> None:
        super().__init__()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads, dropout)
        self.norm_cross = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, heads, dropout)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, dim * mlp_ratio), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim * mlp_ratio, dim)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, queries: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        h = self.norm_self(queries)
        queries = queries + self.drop(self.self_attn(h, h))
        queries = queries + self.drop(self.cross_attn(self.norm_cross(queries), image))
        return queries + self.drop(self.mlp(self.norm_mlp(queries)))


def itc_filter_config(config: BridgeCaptionerConfig) -> BridgeFilterConfig:
    """The held filter's config; refuses a captioner whose images are squared unlike the filter's."""
    if not config.itc_filter:
        raise ValueError("itc_prefix_tokens > 0 needs itc_filter: the config of the filter it holds")
    filter_config = BridgeFilterConfig.from_dict(config.itc_filter)
    # the captioner reads the image embedding alone: no hubness banks (megabytes) travel with it
    filter_config.hub_k = filter_config.hub_bank = 0
    if filter_config.image_resize != config.image_resize:
        raise ValueError(
            f"the captioner squares images by {config.image_resize!r}, its ITC filter by "
            f"{filter_config.image_resize!r}: they must share the image features"
        )
    return filter_config


@functools.cache
def _load_language_model(path: str | None):
    """(frozen causal LM, tokenizer); the packaged SmolLM2 when ``path`` is None."""
    if path is None:
        return backbones.language_model()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
    lm.eval()
    for p in lm.parameters():
        p.requires_grad_(False)
    return lm, tok


def caption_target(caption: str, prompt: str | None) -> str:
    """The text the LM learns after the prompt: "A picture of" + " a frog." reads as one sentence."""
    caption = " ".join(caption.split())
    if not prompt:
        return caption
    first, _, rest = caption.partition(" ")
    if first.lower() in ARTICLES and rest:
        caption = f"{first.lower()} {rest}"
    return " " + caption


class BridgeCaptionerModel(PreTrainedModel):
    """Trainable bridge + lazily attached frozen LM; ``generate_captions`` writes captions."""

    config_class = BridgeCaptionerConfig
    base_model_prefix = "bridge"
    main_input_name = "image_features"

    def __init__(self, config: BridgeCaptionerConfig) -> None:
        super().__init__(config)
        if config.image_encoder != "efficientnet-lite0":
            raise ValueError(f"unsupported image_encoder {config.image_encoder!r} (efficientnet-lite0)")
        d = config.hidden_size
        self.image_norm = nn.LayerNorm(config.image_dim)
        self.image_proj = nn.Linear(config.image_dim, d)
        self.image_pos = nn.Parameter(torch.zeros(1, config.num_image_tokens, d))
        self.queries = nn.Parameter(torch.zeros(1, config.num_queries, d))
        layer = functools.partial(QFormerLayer, d, config.num_heads, config.mlp_ratio, config.dropout)
        self.layers = nn.ModuleList(layer() for _ in range(config.num_layers))
        self.out_norm = nn.LayerNorm(d)
        self.out_proj = nn.Linear(d, config.lm_hidden_size)
        self.itc: BridgeFilterModel | None = None
        if config.itc_prefix_tokens > 0:
            filter_config = itc_filter_config(config)
            self.itc = BridgeFilterModel(filter_config)
            self.itc.requires_grad_(False)
            self.itc_proj = nn.Sequential(
                nn.LayerNorm(filter_config.proj_dim),
                nn.Linear(filter_config.proj_dim, d),
                nn.GELU(),
                nn.Dropout(config.dropout),
                nn.Linear(d, config.itc_prefix_tokens * config.lm_hidden_size),
            )
        # a tuple is not registered as a submodule: the frozen LM stays out of state_dict and DDP
        self._frozen: tuple[Any, Any] | None = None
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, BridgeCaptionerModel):
            nn.init.normal_(module.image_pos, std=0.02)
            nn.init.normal_(module.queries, std=0.02)

    def train(self, mode: bool = True) -> BridgeCaptionerModel:
        super().train(mode)
        if self.itc is not None:
            self.itc.eval()  # frozen: no dropout in the filter while the bridge trains
        return self

    def load_itc_filter(self, state: dict[str, torch.Tensor]) -> None:
        """The held filter's weights (a saved bridge filter's ``model.safetensors``)."""
        if self.itc is None:
            raise ValueError("this captioner has no ITC prefix (itc_prefix_tokens is 0)")
        own = self.itc.state_dict()
        state = {k: v for k, v in state.items() if not k.startswith("hub_")}  # banks: see itc_filter_config
        self.itc.load_state_dict({k: v.to(own[k].dtype) if k in own else v for k, v in state.items()})

    # -- frozen parts --------------------------------------------------------------------------

    def language_model(self):
        """(frozen LM, tokenizer), loaded on first use and kept on the bridge's device and dtype."""
        if self._frozen is None:
            lm, tok = _load_language_model(self.config.language_model)
            if lm.config.hidden_size != self.config.lm_hidden_size:
                raise ValueError(
                    f"language model {self.config.language_model or 'SmolLM2 (packaged)'} has hidden size "
                    f"{lm.config.hidden_size}, the bridge projects to {self.config.lm_hidden_size}"
                )
            self._frozen = (lm, tok)
        lm, tok = self._frozen
        ref = self.out_proj.weight
        if lm.device != ref.device or lm.dtype != ref.dtype:
            lm.to(device=ref.device, dtype=ref.dtype)
        return lm, tok

    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images -> (B, 49, image_dim) tokens of the frozen image encoder, in the bridge's dtype."""
        pixels = backbones.preprocess_images(images, resize=self.config.image_resize)
        pixels = pixels.to(self.out_proj.weight.device)
        return backbones.encode_images(pixels).to(self.out_proj.weight.dtype)

    def prompt_ids(self, prompt: str | None = None) -> tuple[list[int], list[int]]:
        """Token ids around the soft prefix: ([BOS], text prompt); the config's prompt unless overridden."""
        _, tok = self.language_model()
        prompt = self.config.prompt if prompt is None else prompt
        before = [tok.bos_token_id] if tok.bos_token_id is not None else []
        after = tok(prompt, add_special_tokens=False).input_ids if prompt else []
        return before, after

    # -- bridge ------------------------------------------------------------------------------

    def bridge(self, image_features: torch.Tensor) -> torch.Tensor:
        """(B, 49, image_dim) -> (B, num_queries + itc_prefix_tokens, lm_hidden): the soft prompt."""
        x = image_features.to(self.out_proj.weight.dtype)
        image = self.image_proj(self.image_norm(x)) + self.image_pos
        queries = self.queries.expand(x.shape[0], -1, -1)
        for layer in self.layers:
            queries = layer(queries, image)
        soft = self.out_proj(self.out_norm(queries))
        if self.itc is None:
            return soft
        with torch.no_grad():
            embedding = self.itc.image_itc(x)
        extra = self.itc_proj(embedding).view(x.shape[0], self.config.itc_prefix_tokens, -1)
        return torch.cat([soft, extra], dim=1)

    def _prefix_embeds(self, image_features: torch.Tensor, prompt: str | None = None) -> torch.Tensor:
        """[BOS] [soft prompt] [text prompt] as LM input embeddings."""
        lm, _ = self.language_model()
        embed = lm.get_input_embeddings()
        soft = self.bridge(image_features)
        b = soft.shape[0]
        before, after = (
            embed(torch.tensor(ids, dtype=torch.long, device=soft.device)).unsqueeze(0).expand(b, -1, -1)
            for ids in self.prompt_ids(prompt)
        )
        return torch.cat([before, soft, after], dim=1)

    def tokenize_captions(self, captions: list[str], device: torch.device | str = "cpu"):
        """Captions -> (ids, mask) right-padded, each ending in EOS, at most max_caption_tokens."""
        _, tok = self.language_model()
        eos = tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        limit = self.config.max_caption_tokens
        rows = []
        for c in captions:
            ids = tok(caption_target(c, self.config.prompt), add_special_tokens=False).input_ids
            rows.append([*ids[: limit - 1], eos])
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return ids.to(device), mask.to(device)

    def forward(
        self,
        image_features: torch.Tensor,
        caption_ids: torch.Tensor,
        caption_mask: torch.Tensor,
        return_logits: bool = False,
    ) -> BridgeCaptionerOutput:
        """LM loss (mean over caption tokens) of the captions given the images.

        Prefix, prompt and padding are never targets; the LM head runs on caption
        positions only, which saves a (B, prefix, vocab) matmul per step.
        """
        lm, _ = self.language_model()
        prefix = self._prefix_embeds(image_features)
        captions = lm.get_input_embeddings()(caption_ids)
        inputs = torch.cat([prefix, captions], dim=1)
        p = prefix.shape[1]
        mask = torch.cat([caption_mask.new_ones(caption_mask.shape[0], p), caption_mask], dim=1)
        hidden = lm.base_model(inputs_embeds=inputs, attention_mask=mask).last_hidden_state
        # position t predicts token t+1: the last prefix position predicts the first caption token
        hidden = hidden[:, p - 1 : p - 1 + caption_ids.shape[1]]
        logits = lm.get_output_embeddings()(hidden).float()
        targets = caption_ids.masked_fill(caption_mask == 0, -100)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        return BridgeCaptionerOutput(
            loss=loss, logits=logits if return_logits else None, num_tokens=caption_mask.sum()
        )

    # -- generation --------------------------------------------------------------------------

    @torch.inference_mode()
    def generate_captions(
        self,
        images: list[Image.Image] | torch.Tensor,
        num_captions: int = 1,
        do_sample: bool = True,
        top_p: float = 0.9,
        temperature: float = 1.0,
        max_new_tokens: int = 20,
        num_beams: int = 1,
        seed: int | None = None,
        min_new_tokens: int = 0,
        repetition_penalty: float = 1.0,
        prompt: str | None = None,
        seeds: list[int] | None = None,
    ) -> list[list[str]]:
        """``num_captions`` captions per image: nucleus sampling (BLIP's choice), greedy or beam.

        ``images`` are PIL images or precomputed (B, 49, image_dim) features. A ``seed``
        makes sampling repeatable; ``seeds`` (one per image) make each image's captions
        depend on its own seed only, not on the rest of the batch. ``prompt`` overrides the
        trained text prompt (rarely wise).
        """
        if isinstance(images, torch.Tensor):
            features = images.to(self.out_proj.weight.device)
        else:
            if not images:
                return []
            features = self.encode_images(images)
        if features.ndim != 3:
            raise ValueError(f"image features must be (B, tokens, dim), got {tuple(features.shape)}")
        lm, tok = self.language_model()
        embeds = self._prefix_embeds(features, prompt)
        eos = tok.eos_token_id
        if seed is not None:
            torch.manual_seed(seed)
        if do_sample:  # prefix prefilled once per image, nucleus found without a vocabulary sort
            if seeds is not None and len(seeds) != features.shape[0]:
                raise ValueError(f"{len(seeds)} seeds for {features.shape[0]} images")
            uniforms = None if seeds is None else seeded_uniforms(seeds, num_captions, max_new_tokens)
            ids = sample_from_embeds(
                lm,
                embeds,
                num_captions,
                max_new_tokens,
                eos,
                top_p=top_p,
                temperature=temperature,
                min_new_tokens=min_new_tokens,
                repetition_penalty=repetition_penalty,
                uniforms=uniforms,
            )
        else:  # greedy or beam search: generate() as is
            ids = lm.generate(
                inputs_embeds=embeds,
                attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device),
                do_sample=False,
                num_beams=max(num_beams, num_captions),
                num_return_sequences=num_captions,
                max_new_tokens=max_new_tokens,
                min_new_tokens=min_new_tokens,
                repetition_penalty=repetition_penalty,
                eos_token_id=eos,
                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos,
            )
        texts = [" ".join(t.split()) for t in tok.batch_decode(ids, skip_special_tokens=True)]
        return [texts[i * num_captions : (i + 1) * num_captions] for i in range(features.shape[0])]

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def register() -> None:
    """Make ``AutoConfig``/``AutoModel`` load a bridge captioner directory without remote code."""
    from transformers import AutoConfig, AutoModel

    with contextlib.suppress(ValueError):  # already registered (module reloaded)
        AutoConfig.register(BridgeCaptionerConfig.model_type, BridgeCaptionerConfig)
    with contextlib.suppress(ValueError):
        AutoModel.register(BridgeCaptionerConfig, BridgeCaptionerModel)
