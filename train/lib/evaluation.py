"""Evaluation of every trained model on held-out human-captioned data.

Bridge filter (on the frozen-feature cache of a split; ``filter_metrics``):
- ``itm_auc``: ROC-AUC of P(match) for each image's own caption against a mismatched
  one (a caption of another image, drawn with ``seed``, never an identical string);
  ``itm_acc`` at threshold 0.5; ``itc_auc`` the same AUC with ITC cosine (the ranker).
- ``i2t_r1/5/10``, ``t2i_r1/5/10``: retrieval over the whole split by ITC cosine; a
  duplicate caption of the right image counts as a hit.

Bridge captioner (``evaluate_captioner``): CIDEr-D of one deterministic caption per
image (greedy, or beam search) against the image's human caption(s) (``train.lib.cider``).

Frozen-tower contrastive heads (``evaluate_contrastive``): recall@1/5/10 both ways and
zero-shot classification over the split's top-level categories ("A picture of {name}.").

Hugging Face models on streamed batches (``train.lib.stream.eval_batches``):
``clip_retrieval`` (zero-shot retrieval recall@K both ways), ``blip_filter_metrics``
(ITM AUC against a mismatched caption of the same batch, ITC retrieval) and
``blip_captioner_metrics`` (token-weighted LM loss, CIDEr-D of greedy captions).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from curate.models.bridge import backbones
from train.lib.cider import cider_d_per_image
from train.lib.feature_shards import FeatureShard
from train.lib.features import Features
from train.lib.losses import lm_targets, positive_mask
from train.lib.metrics import recall_at_k, roc_auc
from train.lib.models import ContrastiveHeads
from train.lib.optim import autocast
from train.lib.stream import ImageTransform, to_device

# -- the bridge filter -----------------------------------------------------------------------------


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def mismatch_indices(captions: list[str], seed: int) -> list[int]:
    """For each row, another row with a different caption, drawn with a fixed seed."""
    rng = np.random.default_rng(seed)
    norm = [_norm(c) for c in captions]
    out = []
    for c in norm:
        choices = [j for j in range(len(norm)) if norm[j] != c]
        if not choices:
            raise ValueError("every caption in the split is the same: no mismatched pairs")
        out.append(int(choices[rng.integers(len(choices))]))
    return out


@torch.no_grad()
def itm_probabilities(
    model: torch.nn.Module,
    features: Features,
    image_idx: list[int],
    text_idx: list[int],
    batch_size: int = 128,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """P(match) of (image_idx[k], text_idx[k]) pairs from cached features."""
    out = []
    for start in range(0, len(image_idx), batch_size):
        img = features.batch(image_idx[start : start + batch_size], device)
        txt = features.batch(text_idx[start : start + batch_size], device)
        logits = model.itm_logits(img["image_tokens"], txt["text_states"], txt["text_mask"]).float()
        out.append(torch.softmax(logits, -1)[:, 1].cpu())
    return torch.cat(out).numpy()


@torch.no_grad()
def itc_embeddings(
    model: torch.nn.Module, features: Features, rows: list[int], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit ITC embeddings (image, text) of ``rows`` of the cached features, 256 rows at a time."""
    img, txt = [], []
    for start in range(0, len(rows), 256):
        b = features.batch(rows[start : start + 256], device)
        img.append(model.image_itc(b["image_tokens"]))
        txt.append(model.text_itc(b["text_pooled"]))
    return torch.cat(img), torch.cat(txt)


@torch.no_grad()
def itc_similarity(
    model: torch.nn.Module, features: Features, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(N images, N texts) ITC similarity (the cosine, hubness-corrected where the filter is)."""
    img, txt = itc_embeddings(model, features, list(range(len(features))), device)
    return model.similarity_matrix(img, txt).float().cpu()


@torch.no_grad()
def filter_metrics(
    model: torch.nn.Module, features: Features, seed: int = 0, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """ITM ROC-AUC / accuracy against mismatched captions, ITC AUC, and R@1/5/10 both ways."""
    was_training = model.training
    model.eval()
    n = len(features)
    rows = list(range(n))
    neg = mismatch_indices(features.captions, seed)
    p_pos = itm_probabilities(model, features, rows, rows, device=device)
    p_neg = itm_probabilities(model, features, rows, neg, device=device)
    labels = np.r_[np.ones(n), np.zeros(n)]
    sim = itc_similarity(model, features, device)
    itc_scores = np.r_[sim.diagonal().numpy(), sim[torch.arange(n), torch.tensor(neg)].numpy()]
    out = {
        "itm_auc": roc_auc(np.r_[p_pos, p_neg], labels),
        "itm_acc": float(((np.r_[p_pos, p_neg] >= 0.5) == labels).mean()),
        "itc_auc": roc_auc(itc_scores, labels),
    }
    out.update(recall_at_k(sim, (1, 5, 10), features.positive_mask(rows)))
    model.train(was_training)
    return out


# -- the bridge captioner --------------------------------------------------------------------------


def caption_features(
    model,
    image_tokens: torch.Tensor,
    batch_size: int = 32,
    num_beams: int = 1,
    max_new_tokens: int = 20,
) -> list[str]:
    """One deterministic caption per row of cached (N, 49, 1280) image tokens."""
    was_training = model.training
    model.eval()
    device = model.out_proj.weight.device
    out: list[str] = []
    try:
        for start in range(0, len(image_tokens), batch_size):
            feats = image_tokens[start : start + batch_size].to(device=device, dtype=torch.float32)
            caps = model.generate_captions(
                feats, num_captions=1, do_sample=False, num_beams=num_beams, max_new_tokens=max_new_tokens
            )
            out.extend(c[0] if c else "" for c in caps)
    finally:
        model.train(was_training)
    return out


def score_captions(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus CIDEr-D plus what helps reading it: count, mean caption length, exact matches."""
    scores = cider_d_per_image(candidates, references) if candidates else []
    n = len(scores)
    return {
        "cider": sum(scores) / n if n else 0.0,
        "n": n,
        "mean_words": sum(len(c.split()) for c in candidates) / n if n else 0.0,
        "exact": sum(
            any(" ".join(c.lower().split()) == " ".join(r.lower().split()) for r in refs)
            for c, refs in zip(candidates, references)
        )
        / n
        if n
        else 0.0,
    }


def load_captioner(captioner_dir: str | Path, device: str = "cpu"):
    """A saved bridge captioner in float32 on ``device`` (fp16 files are upcast)."""
    from curate.models.base import resolve_device
    from curate.models.bridge import BridgeCaptionerModel

    model = BridgeCaptionerModel.from_pretrained(str(captioner_dir), use_safetensors=True)
    model = model.to(device=resolve_device(device), dtype=torch.float32)
    model.eval()
    return model


def evaluate_captioner(
    captioner_dir: str,
    shards: list[str],
    max_samples: int | None,
    device: str,
    seed: int,
    *,
    num_beams: int = 1,
    max_new_tokens: int = 20,
    batch_size: int = 32,
    cache_dir: str | None = None,
    return_captions: bool = False,
) -> dict:
    """CIDEr-D of the captioner in ``captioner_dir`` on the first ``max_samples`` of ``shards``.

    Returns ``{"cider", "n", "mean_words", "exact"}`` (and ``"captions"``: a list of
    ``{"key", "caption", "reference"}`` when ``return_captions``). Greedy and beam search
    do not sample; ``seed`` seeds torch anyway, for a caller's stochastic extensions.
    """
    from train.lib.data import list_shards
    from train.lib.features import cached_features

    torch.manual_seed(seed)
    model = load_captioner(captioner_dir, device)
    feats, _ = cached_features(
        list_shards(shards), cache_dir=cache_dir, max_samples=max_samples, resize=model.config.image_resize
    )
    candidates = caption_features(model, feats.image_tokens, batch_size, num_beams, max_new_tokens)
    references = [[c] for c in feats.captions]
    result: dict = score_captions(candidates, references)
    if return_captions:
        result["captions"] = [
            {"key": k, "caption": c, "reference": r}
            for k, c, r in zip(feats.keys, candidates, feats.captions)
        ]
    return result


# -- the frozen-tower contrastive heads ------------------------------------------------------------

# readable names for tuxpaint's top-level stamp directories (zero-shot class prompts)
CATEGORY_NAMES = {"naturalforces": "natural forces", "town": "town buildings and signs", "people": "people"}
ZERO_SHOT_PROMPT = "A picture of {}."


def category_label(category: str | None) -> str | None:
    """Zero-shot label of a tuxpaint category path: its top-level directory, readable."""
    if not category:
        return None
    top = category.split("/")[0]
    return CATEGORY_NAMES.get(top, top.replace("_", " "))


@torch.no_grad()
def evaluate_contrastive(
    model: ContrastiveHeads, shards: Sequence[FeatureShard], ks: Sequence[int] = (1, 5, 10)
) -> dict:
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


# -- Hugging Face CLIP and BLIP on streamed batches ------------------------------------------------


def _recall(image: list[torch.Tensor], text: list[torch.Tensor], ids: list[torch.Tensor], ks) -> dict:
    caption_ids = torch.cat(ids)
    sim = torch.cat(image) @ torch.cat(text).t()
    out: dict = recall_at_k(sim, ks, caption_ids[:, None] == caption_ids[None, :])
    out["n"] = len(caption_ids)
    return out


@torch.no_grad()
def clip_retrieval(
    model,
    batches: Iterable[dict],
    transform: ImageTransform,
    device: torch.device,
    precision: str = "fp32",
    ks: Sequence[int] = (1, 5, 10),
) -> dict:
    """Zero-shot retrieval of a CLIPModel: recall@K image->text and text->image over all
    held-out samples (each with its first caption; a duplicate caption counts as a hit)."""
    was = model.training
    model.eval()
    image, text, ids = [], [], []
    for batch in batches:
        with autocast(device, precision):
            out = model(**to_device(batch, device, transform))
        image.append(out.image_embeds.float().cpu())
        text.append(out.text_embeds.float().cpu())
        ids.append(batch["caption_ids"])
    model.train(was)
    if not ids:
        raise ValueError("no held-out samples to evaluate on")
    return _recall(image, text, ids, ks)


def _other_caption(ids: torch.Tensor) -> torch.Tensor:
    """For each row, the next row (cyclically) whose caption differs; the row itself if none does."""
    n = len(ids)
    out = torch.arange(n)
    for i in range(n):
        for step in range(1, n):
            if ids[(i + step) % n] != ids[i]:
                out[i] = (i + step) % n
                break
    return out


@torch.no_grad()
def blip_filter_metrics(
    model,
    batches: Iterable[dict],
    transform: ImageTransform,
    device: torch.device,
    precision: str = "fp32",
    ks: Sequence[int] = (1, 5, 10),
) -> dict:
    """A BlipForImageTextRetrieval on held-out samples: ITM ROC-AUC and accuracy (at 0.5) of each
    image's own caption against another caption of its batch, and ITC retrieval recall@K."""
    was = model.training
    model.eval()
    image, text, ids, scores, labels = [], [], [], [], []
    for batch in batches:
        inputs = to_device(batch, device, transform)
        with autocast(device, precision):
            image_embeds = model.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state
            states = model.text_encoder(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
            ).last_hidden_state
            image.append(F.normalize(model.vision_proj(image_embeds[:, 0]).float(), dim=-1).cpu())
            text.append(F.normalize(model.text_proj(states[:, 0]).float(), dim=-1).cpu())
            ids.append(batch["caption_ids"])
            own = torch.arange(len(batch["caption_ids"]))
            other = _other_caption(batch["caption_ids"])
            differ = other != own
            for image_index, text_index, label in ((own, own, 1.0), (own[differ], other[differ], 0.0)):
                if not len(image_index):
                    continue  # every caption of the batch the same: no mismatched pair
                embeds = image_embeds[image_index.to(device)]
                hidden = model.text_encoder(
                    input_ids=inputs["input_ids"][text_index.to(device)],
                    attention_mask=inputs["attention_mask"][text_index.to(device)],
                    encoder_hidden_states=embeds,
                    encoder_attention_mask=torch.ones(embeds.shape[:-1], dtype=torch.long, device=device),
                ).last_hidden_state
                p = torch.softmax(model.itm_head(hidden[:, 0]).float(), -1)[:, 1].cpu()
                scores.append(p)
                labels.append(torch.full_like(p, label))
    model.train(was)
    if not ids:
        raise ValueError("no held-out samples to evaluate on")
    s, y = torch.cat(scores).numpy(), torch.cat(labels).numpy()
    out = _recall(image, text, ids, ks)
    out["itm_acc"] = float(((s >= 0.5) == (y == 1)).mean())
    if 0 < y.sum() < len(y):
        out["itm_auc"] = roc_auc(s, y)
    return out


@torch.no_grad()
def blip_captioner_metrics(
    model,
    tokenizer,
    batches: Iterable[dict],
    transform: ImageTransform,
    device: torch.device,
    precision: str = "fp32",
    prompt: str = "",
    prompt_length: int = 0,
    cider_samples: int = 64,
    max_new_tokens: int = 20,
) -> dict:
    """A BlipForConditionalGeneration on held-out samples: LM loss per caption token, and
    CIDEr-D of greedy captions of the first ``cider_samples`` images (``prompt`` stripped)."""
    was = model.training
    model.eval()
    loss_sum, tokens = 0.0, 0
    candidates: list[str] = []
    references: list[list[str]] = []
    bos = model.config.text_config.bos_token_id
    for batch in batches:
        inputs = to_device(batch, device, transform)
        ids, labels = lm_targets(inputs["input_ids"], inputs["attention_mask"], bos, prompt_length)
        with autocast(device, precision):
            out = model(
                pixel_values=inputs["pixel_values"],
                input_ids=ids,
                attention_mask=inputs["attention_mask"],
                labels=labels,
            )
        n = int((labels[:, 1:] != -100).sum())
        loss_sum += float(out.loss) * n
        tokens += n
        take = min(len(batch["captions"]), cider_samples - len(candidates))
        if take > 0:
            pixel_values = inputs["pixel_values"][:take]
            kwargs = {}
            if prompt:
                tok = tokenizer([prompt] * take, return_tensors="pt").to(device)
                kwargs = {"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"]}
            with autocast(device, precision):
                generated = model.generate(pixel_values=pixel_values, max_new_tokens=max_new_tokens, **kwargs)
            for text, ref in zip(
                tokenizer.batch_decode(generated, skip_special_tokens=True), batch["captions"]
            ):
                text = " ".join(text.split())
                if prompt and text.lower().startswith(prompt.strip().lower()):
                    text = text[len(prompt.strip()) :].strip()
                candidates.append(text)
                references.append([ref])
    model.train(was)
    if not tokens:
        raise ValueError("no held-out samples to evaluate on")
    out_metrics: dict = {"loss": loss_sum / tokens}
    if len(candidates) > 1:  # CIDEr-D of a single image is 0 by construction
        scored = score_captions(candidates, references)
        out_metrics.update(cider=scored["cider"], cider_n=scored["n"], example=candidates[0])
    return out_metrics
