"""FLOPs per sample of a pipeline's model stages, counted from the models' configs, and MFU.

Samples/s says how fast a run is; MFU (model FLOPs utilisation: FLOPs the models need per
second over the accelerator's peak) says how far it is from what the hardware allows, so the
bench reports both. The count is analytic, from the shapes in each model's config and the
texts the stages actually see, so it costs nothing at run time and needs no weights.

Convention (the one MFU figures use, and what ``torch.utils.flop_counter`` counts, which the
tests check it against): FLOPs are 2 x the multiply-adds of the matrix products: linear
layers, convolutions and attention's two products (scores QK^T and the weighted sum of V,
``4 * queries * keys * width``); norms, activations, softmax, embedding lookups and sampling
are left out. A forward pass over a padded text pays its padded length, as the pipeline
pads it; a token decoded with a key/value cache attends to the positions before it and
itself.

Model FLOPs count each product the outputs need once (``reuse=True``): an image's vision
tower once per model; the keys and values of its cross-attention once per image (they do
not depend on the text); a captioner's prompt prefilled once per image, before the
captions part ways. Transformers' ``generate()`` with ``num_return_sequences`` (a BLIP
captioner with ``fast_decoding: false``, or beam search) and the ITM filter redo the last
two per caption and per text; ``reuse=False`` counts that (hardware FLOPs). ``executed`` is
what the implementation runs, which the tests compare with torch's counter: the fast BLIP
path (``curate.models.fast_caption``) runs the ``reuse=True`` count. A caption of ``g``
sampled tokens (its end token included) feeds ``g - 1`` of them back through the decoder
and reads the LM head ``g - 1`` times after the prompt's one.

Counted: BLIP captioner (``BlipForConditionalGeneration``), BLIP ITM
(``BlipForImageTextRetrieval``), CLIP-style dual encoders (``CLIPModel``) and the bridge
models of the CPU demo. The bridges' EfficientNet-Lite0 has no Hugging Face config; it is
counted from the block list of its package (``efficientnet_lite_pytorch``), MiniLM and
SmolLM2 from theirs, the bridge heads from the bridge configs. Other model types (BLIP-2,
generic image-text-to-text models, the KALE rewriter) are reported as not counted.

    python -m bench.flops                        # gpu.yaml's stages at the papers' shapes
    python -m bench.flops --slug "NVIDIA H200"   # the file name bench/gpu.sh gives its JSON
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# --- primitives -----------------------------------------------------------------------------------


def linear(rows: int, d_in: int, d_out: int) -> int:
    """A (rows, d_in) x (d_in, d_out) product; bias adds are not counted."""
    return 2 * rows * d_in * d_out


def attention(queries: int, keys: int, width: int) -> int:
    """Scores (QK^T) and the weighted sum of values, over all heads (``width`` = heads x head size)."""
    return 4 * queries * keys * width


def conv2d(out_h: int, out_w: int, c_in: int, c_out: int, kernel: int, groups: int = 1) -> int:
    return 2 * out_h * out_w * c_out * (c_in // groups) * kernel * kernel


@dataclass(frozen=True)
class Tower:
    """A stack of identical transformer layers: self-attention, optional cross-attention, MLP.

    ``q_width``/``kv_width``: heads x head size of the queries and of the keys and values (they
    differ under grouped-query attention); ``gated``: a SwiGLU MLP (three ``ffn`` matrices);
    ``cross_width``: the width of the states the layers cross-attend to (0: no cross-attention).
    """

    layers: int
    width: int
    ffn: int
    q_width: int
    kv_width: int
    gated: bool = False
    cross_width: int = 0

    @classmethod
    def of(cls, cfg: Any, cross_width: int = 0) -> Tower:
        """From a Hugging Face text or vision config (BERT, BLIP, CLIP, Llama fields)."""
        width = cfg.hidden_size
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or width // heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        # SwiGLU MLPs (gate, up and down projections) in the causal LMs the bridges use
        gated = getattr(cfg, "model_type", "") in ("llama", "mistral", "qwen2", "qwen3")
        return cls(
            layers=cfg.num_hidden_layers,
            width=width,
            ffn=cfg.intermediate_size,
            q_width=heads * head_dim,
            kv_width=kv_heads * head_dim,
            gated=gated,
            cross_width=cross_width,
        )

    def _linears(self, tokens: int) -> int:
        """One layer's products whose size depends only on the number of new positions."""
        w, q, kv = self.width, self.q_width, self.kv_width
        out = linear(tokens, w, q) + 2 * linear(tokens, w, kv) + linear(tokens, q, w)
        out += (3 if self.gated else 2) * linear(tokens, w, self.ffn)
        if self.cross_width:
            out += linear(tokens, w, q) + linear(tokens, q, w)  # cross-attention's query and output
        return out

    def forward(self, tokens: int, cross_tokens: int = 0) -> int:
        """A full pass over ``tokens`` positions, each attending to all of them (and to
        ``cross_tokens`` states, whose keys and values are :meth:`cross_kv`)."""
        per_layer = self._linears(tokens) + attention(tokens, tokens, self.q_width)
        if self.cross_width:
            per_layer += attention(tokens, cross_tokens, self.q_width)
        return self.layers * per_layer

    def decode(self, cached: int, steps: int, cross_tokens: int = 0) -> int:
        """``steps`` positions fed one at a time after ``cached`` ones: position p attends to p + 1."""
        if steps <= 0:
            return 0
        keys = steps * cached + steps * (steps + 1) // 2
        per_layer = self._linears(steps) + attention(1, keys, self.q_width)
        if self.cross_width:
            per_layer += attention(steps, cross_tokens, self.q_width)
        return self.layers * per_layer

    def cross_kv(self, cross_tokens: int) -> int:
        """Every layer's cross-attention keys and values of ``cross_tokens`` states."""
        return (
            self.layers * 2 * linear(cross_tokens, self.cross_width, self.kv_width) if self.cross_width else 0
        )


@dataclass(frozen=True)
class VisionTower:
    """A ViT: patch embedding (a convolution, counted as the matmul it is), then a :class:`Tower`
    over the patches and a class token."""

    tower: Tower
    height: int
    width: int
    patch: int
    channels: int = 3

    @property
    def patches(self) -> int:
        return (self.height // self.patch) * (self.width // self.patch)

    @property
    def tokens(self) -> int:
        return self.patches + 1

    def flops(self) -> int:
        embed = linear(self.patches, self.channels * self.patch * self.patch, self.tower.width)
        return embed + self.tower.forward(self.tokens)


# --- the stages' models ---------------------------------------------------------------------------


def _per_image(counts: Sequence[Sequence[int]]) -> tuple[int, int]:
    """(images, images with at least one entry)."""
    return len(counts), sum(1 for c in counts if len(c))


@dataclass(frozen=True)
class BlipCaptioner:
    """BLIP's image-grounded text decoder: ViT, then a BERT decoder cross-attending to all its
    tokens; the LM head is a dense transform plus the vocabulary projection."""

    vision: VisionTower
    decoder: Tower
    vocab: int
    prompt_tokens: int = 1  # [DEC] alone; with a text prompt, [DEC] + its tokens

    def _head(self, positions: int) -> int:
        d = self.decoder.width
        return linear(positions, d, d) + linear(positions, d, self.vocab)

    def flops(self, captions: Sequence[Sequence[int]], reuse: bool = True) -> int:
        """``captions``: per image, the sampled tokens of each of its captions (end token included)."""
        images, _ = _per_image(captions)
        m, p = self.vision.tokens, self.prompt_tokens
        prefill = self.decoder.forward(p, m) + self.decoder.cross_kv(m) + self._head(1)
        total = images * self.vision.flops()
        total += (images if reuse else sum(len(c) for c in captions)) * prefill
        for per_image in captions:
            for g in per_image:
                total += self.decoder.decode(p, g - 1, m) + self._head(max(g - 1, 0))
        return total


@dataclass(frozen=True)
class BlipItm:
    """BLIP's ITM filter: ViT once per image, then a BERT encoder over each text cross-attending to
    the image's tokens, and a 2-way head on the first token."""

    vision: VisionTower
    encoder: Tower

    def flops(self, texts: Sequence[Sequence[int]], reuse: bool = True) -> int:
        """``texts``: per image, each scored text's padded length."""
        images, with_texts = _per_image(texts)
        m = self.vision.tokens
        total = images * self.vision.flops()
        kv = with_texts if reuse else sum(len(t) for t in texts)
        total += kv * self.encoder.cross_kv(m)
        for per_image in texts:
            for length in per_image:
                total += self.encoder.forward(length, m) + linear(1, self.encoder.width, 2)
        return total


@dataclass(frozen=True)
class Clip:
    """A dual encoder: each image through the vision tower once, each text through the text
    tower; both pooled and projected into the joint space (the cosine is not a matmul)."""

    vision: VisionTower
    text: Tower
    projection: int

    def flops(self, texts: Sequence[Sequence[int]]) -> int:
        images, _ = _per_image(texts)
        total = images * (self.vision.flops() + linear(1, self.vision.tower.width, self.projection))
        for per_image in texts:
            for length in per_image:
                total += self.text.forward(length) + linear(1, self.text.width, self.projection)
        return total


def efficientnet_flops(name: str = "efficientnet-lite0", image_size: int = 224) -> tuple[int, int, int]:
    """(FLOPs of ``extract_features``, output tokens, output channels) of an EfficientNet from its
    package's block list: stem, MBConv blocks (expand 1x1, depthwise kxk, project 1x1), head 1x1.
    "Same" padding: a stride-s convolution maps n pixels to ceil(n / s)."""
    from efficientnet_lite_pytorch.utils import get_model_params, round_filters, round_repeats

    blocks, gp = get_model_params(name, None)
    size = math.ceil(image_size / 2)
    stem = round_filters(32, gp, gp.fix_head_stem)
    total = conv2d(size, size, 3, stem, 3)
    for i, b in enumerate(blocks):
        c_in, c_out = round_filters(b.input_filters, gp), round_filters(b.output_filters, gp)
        repeats = b.num_repeat
        if gp.fix_head_stem and i == 0:
            c_in = 32
        if not (gp.fix_head_stem and i in (0, len(blocks) - 1)):
            repeats = round_repeats(b.num_repeat, gp)
        for r in range(repeats):
            stride = b.stride[0] if r == 0 else 1
            inner = c_in * b.expand_ratio
            if b.expand_ratio != 1:
                total += conv2d(size, size, c_in, inner, 1)
            size = math.ceil(size / stride)
            total += conv2d(size, size, inner, inner, b.kernel_size, groups=inner)
            if b.se_ratio and 0 < b.se_ratio <= 1:
                squeezed = max(1, int(c_in * b.se_ratio))
                total += conv2d(1, 1, inner, squeezed, 1) + conv2d(1, 1, squeezed, inner, 1)
            total += conv2d(size, size, inner, c_out, 1)
            c_in = c_out
    head = round_filters(1280, gp, gp.fix_head_stem)
    total += conv2d(size, size, c_in, head, 1)
    return total, size * size, head


@dataclass(frozen=True)
class BridgeCaptioner:
    """The demo's captioner: EfficientNet-Lite0 tokens -> Q-Former (learned queries) -> soft
    prompt of a frozen causal LM; the prefix ([BOS], soft prompt, text prompt) is prefilled once
    per image, as ``curate.models.sampling`` does."""

    image_flops: int
    image_tokens: int
    image_dim: int
    qformer: Tower  # cross-attends to the projected image tokens
    queries: int
    lm: Tower
    lm_vocab: int
    prompt_tokens: int  # [BOS] + text prompt, around the soft prompt
    itc_tokens: int = 0  # soft-prompt tokens of an ITC prefix
    itc_flops: int = 0  # per image: the held filter's ITC image embedding and the prefix's MLP

    def per_image(self) -> int:
        d = self.qformer.width
        n = self.queries
        out = self.image_flops + self.itc_flops + linear(self.image_tokens, self.image_dim, d)
        out += self.qformer.forward(n, self.image_tokens) + self.qformer.cross_kv(self.image_tokens)
        out += linear(n, d, self.lm.width)
        prefix = n + self.itc_tokens + self.prompt_tokens
        return out + self.lm.forward(prefix) + linear(1, self.lm.width, self.lm_vocab)

    def flops(self, captions: Sequence[Sequence[int]]) -> int:
        images, _ = _per_image(captions)
        prefix = self.queries + self.itc_tokens + self.prompt_tokens
        total = images * self.per_image()
        for per_image in captions:
            for g in per_image:
                total += self.lm.decode(prefix, g - 1) + linear(max(g - 1, 0), self.lm.width, self.lm_vocab)
        return total


@dataclass(frozen=True)
class BridgeFilter:
    """The demo's filter and ranker: EfficientNet-Lite0 image tokens and MiniLM text states; ITM
    through ``fusion`` layers (text self-attention, cross-attention to the image tokens and the
    label-prior token, MLP; the last layer updates the first token only), ITC through small
    projections. ``itm``/``itc``: which heads the stage asks for (both when fused). The image
    heads (projection, label prior) count once per image; the implementation repeats them for
    each chunk of texts, under 1% more (the tests' tolerance)."""

    image_flops: int
    image_tokens: int
    image_dim: int
    text: Tower  # MiniLM
    fusion: Tower
    proj_dim: int
    classes: int  # the label prior's ImageNet classes
    label_prior: bool
    itm_itc_prior: bool
    hub_bank: int = 0  # rows of each hubness bank (0: no correction): one (1, proj) x bank product a side

    def _label_prior(self) -> int:
        return linear(1, self.image_dim, self.classes) + linear(1, self.classes, self.text.width)

    def _image_itc(self) -> int:
        out = linear(1, self.image_dim, self.proj_dim)
        return out + (linear(1, self.text.width, self.proj_dim) if self.label_prior else 0)

    def _fusion(self, length: int) -> int:
        """The fusion layers over a text of ``length`` tokens, the last one for the first token only."""
        f, h = self.fusion, self.fusion.width
        if f.layers == 0:
            return 0
        context = self.image_tokens + int(self.label_prior)
        full = Tower(f.layers - 1, h, f.ffn, f.q_width, f.kv_width, cross_width=f.cross_width)
        last = (
            linear(length, h, 2 * h)  # keys and values of every position
            + f._linears(1)
            - 2 * linear(1, h, f.kv_width)
            + attention(1, length, h)
            + attention(1, context, h)
        )
        return full.forward(length, context) + last

    def flops(self, texts: Sequence[Sequence[int]], itm: bool = True, itc: bool = True) -> int:
        images, _ = _per_image(texts)
        h = self.fusion.width
        itc_text = itc or (itm and self.itm_itc_prior)
        image = self.image_flops
        if self.label_prior and (itm or itc_text):
            image += self._label_prior()
        fused = self.fusion.layers > 0  # without fusion layers the ITM head reads the first token alone
        if itm and fused:
            context = self.image_tokens + int(self.label_prior)
            image += linear(self.image_tokens, self.image_dim, h) + self.fusion.cross_kv(context)
            image += linear(1, self.text.width, h) if self.label_prior else 0
        if itc_text:
            image += self._image_itc()
        # the similarity's users (the ITC score, the ITM evidence) each take the hubness of both sides
        hub_uses = int(itc) + int(itm and self.itm_itc_prior) if self.hub_bank else 0
        image += hub_uses * linear(1, self.proj_dim, self.hub_bank)
        total = images * image
        for per_image in texts:
            for length in per_image:
                total += self.text.forward(length)
                if itm:
                    projected = length if fused else 1
                    total += linear(projected, self.text.width, h) + self._fusion(length) + linear(1, h, 2)
                if itc_text:
                    total += linear(1, self.text.width, self.proj_dim)
                total += hub_uses * linear(1, self.proj_dim, self.hub_bank)
        return total


# --- from a pipeline's configs and texts -----------------------------------------------------------


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def processor_image_size(directory: str | Path, default: int) -> tuple[int, int]:
    """(height, width) the model directory's image processor produces: crop size when it crops,
    else its resize target; ``default`` (the config's image size) where it says neither."""
    directory = Path(directory)
    proc = _json(directory / "preprocessor_config.json") or _json(directory / "processor_config.json").get(
        "image_processor", {}
    )
    size = proc.get("crop_size") if proc.get("do_center_crop") else proc.get("size")
    if isinstance(size, dict) and "height" in size:
        return int(size["height"]), int(size["width"])
    if isinstance(size, dict) and "shortest_edge" in size:
        return int(size["shortest_edge"]), int(size["shortest_edge"])
    if isinstance(size, int):
        return size, size
    return default, default


def vision_tower(vision_cfg: Any, directory: str | Path | None = None) -> VisionTower:
    size = vision_cfg.image_size
    h, w = processor_image_size(directory, size) if directory else (size, size)
    return VisionTower(
        Tower.of(vision_cfg), h, w, vision_cfg.patch_size, getattr(vision_cfg, "num_channels", 3)
    )


def blip_captioner(cfg: Any, directory: str | Path | None = None, prompt_tokens: int = 1) -> BlipCaptioner:
    vision = vision_tower(cfg.vision_config, directory)
    text = cfg.text_config
    decoder = Tower.of(text, cross_width=text.encoder_hidden_size)
    return BlipCaptioner(vision, decoder, text.vocab_size, prompt_tokens)


def blip_itm(cfg: Any, directory: str | Path | None = None) -> BlipItm:
    vision = vision_tower(cfg.vision_config, directory)
    return BlipItm(vision, Tower.of(cfg.text_config, cross_width=cfg.text_config.encoder_hidden_size))


def clip(cfg: Any, directory: str | Path | None = None) -> Clip:
    return Clip(vision_tower(cfg.vision_config, directory), Tower.of(cfg.text_config), cfg.projection_dim)


def bridge_captioner(cfg: dict, lm_cfg: Any, prompt_tokens: int) -> BridgeCaptioner:
    """From a bridge captioner's config.json (a dict) and its language model's config."""
    image, tokens, dim = efficientnet_flops(cfg.get("image_encoder", "efficientnet-lite0"))
    d = cfg["hidden_size"]
    qformer = Tower(cfg["num_layers"], d, d * cfg["mlp_ratio"], d, d, cross_width=d)
    lm, vocab, itc = Tower.of(lm_cfg), lm_cfg.vocab_size, cfg.get("itc_prefix_tokens", 0)
    itc_flops = 0
    if itc:  # the held filter's image embedding (its text side only maps the label prior), then the MLP
        held = cfg["itc_filter"]
        prior = bool(held.get("label_prior", True))
        proj, text = held["proj_dim"], held["text_dim"]
        label_prior = linear(1, dim, 1000) + linear(1, 1000, text) + linear(1, text, proj)
        itc_flops = linear(1, dim, proj) + (label_prior if prior else 0)
        itc_flops += linear(1, proj, d) + linear(1, d, itc * lm.width)
    return BridgeCaptioner(
        image, tokens, dim, qformer, cfg["num_queries"], lm, vocab, prompt_tokens, itc, itc_flops
    )


def bridge_filter(cfg: dict, text_cfg: Any) -> BridgeFilter:
    """From a bridge filter's config.json (a dict) and MiniLM's config."""
    image, tokens, dim = efficientnet_flops(cfg.get("image_encoder", "efficientnet-lite0"), cfg["image_size"])
    h = cfg["hidden_size"]
    fusion = Tower(cfg["num_layers"], h, int(h * cfg["mlp_ratio"]), h, h, cross_width=h)
    return BridgeFilter(
        image,
        tokens,
        dim,
        Tower.of(text_cfg),
        fusion,
        cfg["proj_dim"],
        1000,
        bool(cfg.get("label_prior", True)),
        bool(cfg.get("itm_itc_prior", True)),
        int(cfg.get("hub_bank", 0)) if cfg.get("hub_k", 0) > 0 else 0,
    )


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), max(1, size))]


def padded_lengths(
    texts: Sequence[Sequence[str]],
    tokenizer: Any,
    max_length: int,
    batch_images: int,
    batch_texts: int,
    shortest_first: bool = False,
) -> list[list[int]]:
    """Per image, each text's length as the stage pads it: images in batches of ``batch_images``
    (the stage's batch), their texts in chunks of ``batch_texts`` padded to the chunk's longest
    (``shortest_first``: sorted by characters first, as the bridge filter does)."""
    out: list[list[int]] = [[0] * len(t) for t in texts]
    for batch in _chunks(list(range(len(texts))), batch_images):
        pairs = [(i, j, t) for i in batch for j, t in enumerate(texts[i])]
        if shortest_first:
            pairs.sort(key=lambda p: len(p[2]))
        for chunk in _chunks(pairs, batch_texts):
            ids = tokenizer([t for _, _, t in chunk], truncation=True, max_length=max_length)["input_ids"]
            width = max(len(x) for x in ids)
            for i, j, _ in chunk:
                out[i][j] = width
    return out


def caption_lengths(
    captions: Sequence[Sequence[str]], tokenizer: Any, num_captions: int, max_new: int, min_new: int = 0
) -> list[list[int]]:
    """Per image, ``num_captions`` sampled-token counts: each caption's tokens plus its end token,
    at most ``max_new`` (a caption cut there has no end token) and at least ``min_new`` + 1 (the
    end token is barred before). The captions a stage dropped (repeats, empty) were still
    written: they count as the mean."""
    low = min(min_new + 1, max_new)
    lengths = [
        [min(max(len(tokenizer(c, add_special_tokens=False)["input_ids"]) + 1, low), max_new) for c in cs]
        for cs in captions
    ]
    flat = [g for gs in lengths for g in gs]
    mean = round(sum(flat) / len(flat)) if flat else max_new
    return [gs[:num_captions] + [mean] * (num_captions - len(gs)) for gs in lengths]


@dataclass
class StageCount:
    """One stage's FLOPs over the given samples and what they were counted from."""

    flops: int = 0
    samples: int = 0
    texts_per_sample: float = 0.0
    tokens_per_text: float = 0.0  # padded (scorers) or sampled per caption (captioner)
    executed: int = 0  # with reuse=False: what transformers' implementation computes

    @property
    def per_sample(self) -> float:
        return self.flops / self.samples if self.samples else 0.0


def _stats(lengths: list[list[int]], samples: int) -> tuple[float, float]:
    flat = [x for xs in lengths for x in xs]
    return len(flat) / max(1, samples), (sum(flat) / len(flat) if flat else 0.0)


def _sequences(cfg: Any, lengths: list[list[int]]) -> list[list[int]]:
    """The sequences a captioner decodes per image: one per caption when sampling; with beam
    search, ``max(num_beams, num_captions)`` beams, each as long as the image's longest caption
    (beams run until the search ends; an approximation, the beams' own lengths are not seen)."""
    if cfg.decoding != "beam":
        return lengths
    beams = max(cfg.num_beams, cfg.num_captions)
    return [[max(gs)] * beams if gs else [] for gs in lengths]


def _model_type(directory: str) -> str:
    return str(_json(Path(directory) / "config.json").get("model_type", ""))


def pipeline_flops(
    cfg: Any, texts: Sequence[Sequence[str]], captions: Sequence[Sequence[str]]
) -> tuple[dict[str, StageCount], list[str]]:
    """Each model stage's FLOPs over these samples, and the stages that cannot be counted.

    ``texts``: per sample, what the scorers score (alt-text, when there is one, and the
    captions); ``captions``: per sample, the captions the captioner wrote. ``cfg``: the
    :class:`curate.config.PipelineConfig`, whose model paths are read for configs and tokenizers.
    """
    from transformers import AutoConfig, AutoTokenizer

    from curate.stages.models import fused_scoring

    counts: dict[str, StageCount] = {}
    skipped: list[str] = []
    n = len(texts)
    if cfg.captioner is not None:
        c = cfg.captioner
        kind = _model_type(c.model)
        if kind == "blip":
            tok = AutoTokenizer.from_pretrained(c.model)
            prompt = 1 + (len(tok(c.prompt, add_special_tokens=False)["input_ids"]) if c.prompt else 0)
            model = blip_captioner(AutoConfig.from_pretrained(c.model), c.model, prompt)
            lengths = _sequences(
                c, caption_lengths(captions, tok, c.num_captions, c.max_new_tokens, c.min_new_tokens)
            )
            fast = c.fast_decoding and c.decoding == "nucleus"  # HFCaptioner.fast
            counts["captioner"] = StageCount(
                model.flops(lengths), n, *_stats(lengths, n), executed=model.flops(lengths, reuse=fast)
            )
        elif kind == "curate-bridge-captioner":
            from curate.models.bridge import backbones

            bcfg = _json(Path(c.model) / "config.json")
            lm_dir = bcfg.get("language_model") or str(backbones.language_model_dir())
            tok = AutoTokenizer.from_pretrained(lm_dir)
            prompt_text = bcfg.get("prompt", "") if c.prompt is None else c.prompt
            prompt = int(tok.bos_token_id is not None)
            prompt += len(tok(prompt_text, add_special_tokens=False)["input_ids"]) if prompt_text else 0
            model = bridge_captioner(bcfg, AutoConfig.from_pretrained(lm_dir), prompt)
            lengths = _sequences(
                c, caption_lengths(captions, tok, c.num_captions, c.max_new_tokens, c.min_new_tokens)
            )
            f = model.flops(lengths)
            counts["captioner"] = StageCount(f, n, *_stats(lengths, n), executed=f)
        else:
            skipped.append(f"captioner ({kind or 'unknown model type'})")
    fused = fused_scoring(cfg.filter, cfg.ranker)  # one stage, both heads, as the pipeline runs it
    for name in ("filter", "ranker"):
        section = getattr(cfg, name)
        if section is None or (fused and name == "ranker"):
            continue
        kind = _model_type(section.model)
        label = "filter+ranker" if fused else name
        if kind == "curate-bridge-filter":
            from curate.models.bridge import backbones

            bcfg = _json(Path(section.model) / "config.json")
            text_dir = str(backbones.text_model_dir())
            tok = AutoTokenizer.from_pretrained(text_dir)
            model = bridge_filter(bcfg, AutoConfig.from_pretrained(text_dir))
            bs = section.resources.batch_size
            lengths = padded_lengths(texts, tok, bcfg.get("max_text_tokens", 48), bs, bs, shortest_first=True)
            f = model.flops(lengths, itm=fused or name == "filter", itc=fused or name == "ranker")
            counts[label] = StageCount(f, n, *_stats(lengths, n), executed=f)
        elif kind == "blip" and name == "filter":
            from curate.models.itm import ITMFilter

            tok = AutoTokenizer.from_pretrained(section.model)
            model = blip_itm(AutoConfig.from_pretrained(section.model), section.model)
            # the length the filter truncates to (the scorer loader keeps its default)
            max_tokens = inspect.signature(ITMFilter).parameters["max_text_tokens"].default
            bs = section.resources.batch_size
            lengths = padded_lengths(texts, tok, max_tokens, bs, bs)
            counts[label] = StageCount(
                model.flops(lengths), n, *_stats(lengths, n), executed=model.flops(lengths, reuse=False)
            )
        elif kind == "clip" and name == "ranker":
            config = AutoConfig.from_pretrained(section.model)
            tok = AutoTokenizer.from_pretrained(section.model)
            model = clip(config, section.model)
            max_tokens = int(getattr(config.text_config, "max_position_embeddings", 77))
            bs = section.resources.batch_size
            lengths = padded_lengths(texts, tok, max_tokens, bs, bs)
            f = model.flops(lengths)
            counts[label] = StageCount(f, n, *_stats(lengths, n), executed=f)
        else:
            skipped.append(f"{name} ({kind or 'unknown model type'})")
    if getattr(cfg, "rewriter", None) is not None:
        skipped.append("rewriter (an LLM; not counted)")
    return counts, skipped


def texts_from_output(output: str | Path) -> tuple[list[list[str]], list[list[str]]]:
    """(texts, captions) per sample of a run's output Parquet: the candidates the scorers scored
    (alt-text first) and the synthetic ones among them. Rows without candidates count as samples
    with no texts."""
    import pyarrow.parquet as pq

    texts: list[list[str]] = []
    captions: list[list[str]] = []
    for path in sorted(Path(output, "samples").glob("*.parquet")):
        for cands in pq.read_table(path, columns=["candidates"]).column("candidates").to_pylist():
            cands = cands or []
            texts.append([c["text"] for c in cands])
            captions.append([c["text"] for c in cands if c["source"] == "synthetic"])
    return texts, captions


# --- peaks and MFU ----------------------------------------------------------------------------------

# Dense (no structured sparsity) bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s, and
# the slug a results file is named by. Matched against the CUDA device name in this order, so the
# more specific names come first ("H200" contains "H20", "GH200" contains "H200").
GPU_PEAKS: list[tuple[str, str, float]] = [
    (r"GH200", "gh200", 989.4),
    (r"H200 NVL", "h200-nvl", 835.5),
    (r"H200", "h200", 989.4),
    (r"H100 NVL", "h100-nvl", 835.5),
    (r"H100 PCIe", "h100-pcie", 756.0),
    (r"H100", "h100-sxm", 989.4),
    (r"\bH20\b", "h20", 148.0),
    (r"B200", "b200", 2250.0),
    (r"A100", "a100", 312.0),
    (r"L40S", "l40s", 362.1),
    (r"\bL40\b", "l40", 181.0),
    (r"\bL4\b", "l4", 121.0),
    (r"\bA10\b", "a10", 125.0),
]


def gpu_peak(device_name: str) -> tuple[str, float] | None:
    """(slug, dense bf16 TFLOP/s) of a CUDA device name, or None when the table does not know it."""
    for pattern, slug, tflops in GPU_PEAKS:
        if re.search(pattern, device_name, re.IGNORECASE):
            return slug, tflops
    return None


def gpu_slug(device_name: str) -> str:
    """The results file's name for a device: the table's slug, else the name in lower-case words."""
    known = gpu_peak(device_name)
    if known:
        return known[0]
    name = re.sub(r"^nvidia\s+", "", device_name.strip(), flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def mfu(flops_per_sample: float, samples_per_s: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation, a fraction: the FLOP/s the samples need over the peak."""
    return flops_per_sample * samples_per_s / (peak_tflops * 1e12) if peak_tflops > 0 else 0.0


# --- gpu.yaml at the papers' shapes, from configs alone ---------------------------------------------


def paper_models() -> tuple[BlipCaptioner, BlipItm, Clip]:
    """bench/gpu.yaml's captioner, filter and ranker at bench/paper_models.py's shapes, from their
    configs (a vocabulary file is written for the tokenizers; no weights)."""
    import tempfile

    from bench.paper_models import PAPER
    from tests.random_models import blip_config, clip_config, tokenizer

    with tempfile.TemporaryDirectory() as d:
        blip = blip_config(tokenizer(Path(d) / "blip", PAPER.blip_vocab), PAPER)
        dual = clip_config(tokenizer(Path(d) / "clip", PAPER.clip_vocab), PAPER)
    return blip_captioner(blip), blip_itm(blip), clip(dual)


def paper_counts(
    num_captions: int = 3,
    caption_tokens: int = 30,
    itm_tokens: int = 32,
    clip_tokens: int = 32,
    alt: bool = True,
) -> dict[str, StageCount]:
    """FLOPs of one sample through :func:`paper_models`: ``num_captions`` captions of
    ``caption_tokens`` sampled tokens; the filter and the ranker score them and the alt-text
    (``alt``), padded to ``itm_tokens`` and ``clip_tokens``."""
    cap, itm, rank = paper_models()
    k = num_captions + int(alt)
    captions, itm_texts, clip_texts = (
        [[caption_tokens] * num_captions],
        [[itm_tokens] * k],
        [[clip_tokens] * k],
    )
    return {
        "captioner": StageCount(
            cap.flops(captions), 1, num_captions, caption_tokens, cap.flops(captions, False)
        ),
        "filter": StageCount(itm.flops(itm_texts), 1, k, itm_tokens, itm.flops(itm_texts, False)),
        "ranker": StageCount(rank.flops(clip_texts), 1, k, clip_tokens, rank.flops(clip_texts)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--slug", metavar="DEVICE_NAME", help="print the results file name for a CUDA device name"
    )
    ap.add_argument("--num-captions", type=int, default=3, help="captions per image (gpu.yaml: 3)")
    ap.add_argument(
        "--caption-tokens", type=int, default=30, help="sampled tokens per caption (gpu.yaml: <= 30)"
    )
    ap.add_argument(
        "--itm-tokens", type=int, default=32, help="padded length of a text in the ITM filter (at most 64)"
    )
    ap.add_argument(
        "--clip-tokens", type=int, default=32, help="padded length of a text in CLIP (at most 77)"
    )
    ap.add_argument("--no-alt", action="store_true", help="samples without an alt-text")
    args = ap.parse_args(argv)
    if args.slug is not None:
        print(gpu_slug(args.slug))
        return 0
    counts = paper_counts(
        args.num_captions, args.caption_tokens, args.itm_tokens, args.clip_tokens, not args.no_alt
    )
    total = sum(c.per_sample for c in counts.values())
    executed = sum(c.executed / c.samples for c in counts.values())
    print(f"{'stage':<10} {'GFLOP/sample':>12} {'texts':>6} {'tokens':>7} {'as run (GFLOP)':>15}")
    for name, c in counts.items():
        print(
            f"{name:<10} {c.per_sample / 1e9:>12.1f} {c.texts_per_sample:>6.0f} {c.tokens_per_text:>7.0f} "
            f"{c.executed / c.samples / 1e9:>15.1f}"
        )
    print(f"{'total':<10} {total / 1e9:>12.1f} {'':>6} {'':>7} {executed / 1e9:>15.1f}")
    for _, slug, tflops in GPU_PEAKS:
        if slug in ("h100-sxm", "h200", "a100", "l4"):
            print(f"bound on {slug} ({tflops:g} TFLOP/s dense bf16): {tflops * 1e12 / total:,.0f} samples/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
