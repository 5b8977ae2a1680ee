"""The training objectives as modules: ITC / InfoNCE, ITM with hard negatives, and the LM targets.

ITM negatives are mined from the batch's ITC similarities as BLIP does: for each image
a negative text is sampled with probability softmax(similarity) over the other texts,
and for each text a negative image likewise, so the matching head trains on the pairs
the contrastive model finds hardest. Rows that share a caption count as positives of
each other (``positive_mask``): they are soft ITC targets and never sampled as negatives.

``ITCLoss`` and the bridge's ``FilterLoss`` work on each worker's local batch.
``ClipLoss`` (CLIP pre-training, the BLIP filter's ITC) takes its negatives from the
global batch: every worker's features are gathered with gradients (``gather_with_grad``,
as open_clip does), so the loss and the gradient DDP averages are those of one process
holding the whole global batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from train.lib.launch import distributed


def positive_mask(captions: Sequence[str]) -> torch.Tensor:
    """(b, b) True where two rows carry the same caption (case and spacing ignored): not negatives."""
    norm = [" ".join(c.lower().split()) for c in captions]
    index = {c: i for i, c in enumerate(dict.fromkeys(norm))}
    ids = torch.tensor([index[c] for c in norm])
    return ids[:, None] == ids[None, :]


def _positives(n: int, positive_mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    eye = torch.eye(n, dtype=torch.bool, device=device)
    return eye if positive_mask is None else positive_mask.to(device).bool() | eye


class ITCLoss(nn.Module):
    """Image-text contrastive loss: mean of image->text and text->image cross-entropy.

    Targets are the diagonal, or, with ``positive_mask``, uniform over each row's positives.
    """

    def forward(
        self,
        image_feat: torch.Tensor,
        text_feat: torch.Tensor,
        logit_scale: torch.Tensor,
        positive_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        logits = logit_scale.exp() * image_feat @ text_feat.t()
        pos = _positives(len(logits), positive_mask, logits.device).float()
        targets = pos / pos.sum(1, keepdim=True)
        i2t = -(F.log_softmax(logits, dim=1) * targets).sum(1).mean()
        t2i = -(F.log_softmax(logits.t(), dim=1) * targets.t()).sum(1).mean()
        return (i2t + t2i) / 2


def mine_hard_negatives(
    sim_i2t: torch.Tensor,
    positive_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(neg text per image, neg image per text), sampled by softmax over similarities, positives excluded.

    A row whose every other entry is a positive has no negative: it gets a uniform pick of
    the non-identical rows (and, in a batch of one, itself).
    """
    n = sim_i2t.shape[0]
    pos = _positives(n, positive_mask, sim_i2t.device)
    sim = sim_i2t.detach().float()

    def sample(s: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(s, dim=1).masked_fill(pos, 0.0)
        empty = weights.sum(1) <= 0
        if empty.any():
            fallback = (~torch.eye(n, dtype=torch.bool, device=s.device)).float()
            if n == 1:
                fallback = torch.ones_like(fallback)
            weights[empty] = fallback[empty]
        return torch.multinomial(weights, 1, generator=generator).squeeze(1)

    return sample(sim), sample(sim.t())


class ITMLoss(nn.Module):
    """ITM cross-entropy over B positives, B (image, hard negative text), B (hard negative image, text).

    ``itm_fn(image_index, text_index) -> (3B, 2) logits`` scores pairs of batch rows, so the
    model can encode each image and text once and only index them per pair.
    """

    def forward(
        self,
        itm_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        sim_i2t: torch.Tensor,
        positive_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        n = sim_i2t.shape[0]
        neg_text, neg_image = mine_hard_negatives(sim_i2t, positive_mask, generator)
        arange = torch.arange(n, device=sim_i2t.device)
        logits = itm_fn(torch.cat([arange, arange, neg_image]), torch.cat([arange, neg_text, arange]))
        labels = torch.cat([torch.ones(n), torch.zeros(2 * n)]).long().to(logits.device)
        loss = F.cross_entropy(logits.float(), labels)
        acc = (logits.argmax(-1) == labels).float().mean()
        return {"loss": loss, "logits": logits, "labels": labels, "acc": acc.detach()}


class FilterLoss(nn.Module):
    """ITC + ITM of a bridge filter in one forward, so DDP sees one call per step.

    Wrap this module (not the bare model) with DDP: the ITM pass runs on pairs chosen
    from the ITC pass, and both must be inside the one forward whose backward DDP syncs.
    """

    def __init__(self, model: nn.Module, itm_weight: float = 1.0, itc_weight: float = 1.0) -> None:
        super().__init__()
        self.model = model
        self.itc = ITCLoss()
        self.itm = ITMLoss()
        self.itm_weight = itm_weight
        self.itc_weight = itc_weight

    def forward(
        self,
        image_tokens: torch.Tensor,
        text_states: torch.Tensor,
        text_mask: torch.Tensor,
        text_pooled: torch.Tensor,
        positive_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        image_feat = self.model.image_itc(image_tokens)
        text_feat = self.model.text_itc(text_pooled)
        itc = self.itc(image_feat, text_feat, self.model.logit_scale, positive_mask)

        def itm_fn(image_index: torch.Tensor, text_index: torch.Tensor) -> torch.Tensor:
            return self.model.itm_logits(
                image_tokens, text_states[text_index], text_mask[text_index], image_index=image_index
            )

        itm = self.itm(itm_fn, image_feat @ text_feat.t(), positive_mask, generator)
        loss = self.itc_weight * itc + self.itm_weight * itm["loss"]
        return {"loss": loss, "itc": itc.detach(), "itm": itm["loss"].detach(), "itm_acc": itm["acc"]}


# -- the global batch: features of every worker ----------------------------------------------------


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every worker's rows of ``x`` concatenated in rank order, differentiable (``x`` with one worker).

    torch's autograd all_gather: its backward sends each worker's gradient of the
    gathered tensor back to the worker that owns the rows and sums it there, so a row
    used as a negative on another worker trains this worker's encoders too.
    """
    if not distributed():
        return x
    import torch.distributed.nn.functional as dist_nn

    return torch.cat(dist_nn.all_gather(x.contiguous()), dim=0)


def gather_ids(x: torch.Tensor) -> torch.Tensor:
    """Every worker's rows of an integer tensor (caption ids), in rank order; no gradient."""
    if not distributed():
        return x
    import torch.distributed as dist

    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


class ClipLoss(nn.Module):
    """InfoNCE of this worker's rows against the global batch's columns (both directions).

    With W workers of ``n`` rows each, worker r scores its images against all W * n texts
    and its texts against all images (open_clip's ``local_loss``: n x Wn logits, not the
    Wn x Wn matrix on every worker); its row i's positive is global column r * n + i, plus
    every column with the same ``caption_ids`` (soft targets, as ``ITCLoss``). The mean of
    the workers' losses is the global batch's loss, and since features are gathered with
    gradients, DDP's average of the workers' gradients is the gradient of that loss.
    With one worker this is ``ITCLoss`` with ``positive_mask`` from the caption ids.
    """

    def forward(
        self,
        image_feat: torch.Tensor,
        text_feat: torch.Tensor,
        logit_scale: torch.Tensor,
        caption_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        n = image_feat.shape[0]
        image_feat, text_feat = image_feat.float(), text_feat.float()
        all_image, all_text = gather_with_grad(image_feat), gather_with_grad(text_feat)
        total = all_image.shape[0]
        if total % n:
            raise ValueError(f"workers hold different batch sizes ({n} rows here, {total} in all)")
        rank = torch.distributed.get_rank() if distributed() else 0
        scale = logit_scale.float().exp()
        logits_i2t = scale * image_feat @ all_text.t()
        logits_t2i = scale * text_feat @ all_image.t()
        pos = torch.zeros(n, total, dtype=torch.bool, device=image_feat.device)
        pos[torch.arange(n), torch.arange(n) + rank * n] = True
        if caption_ids is not None:
            ids = caption_ids.to(image_feat.device)
            pos |= ids[:, None] == gather_ids(ids)[None, :]
        targets = pos.float() / pos.sum(1, keepdim=True)
        i2t = -(F.log_softmax(logits_i2t, dim=1) * targets).sum(1).mean()
        t2i = -(F.log_softmax(logits_t2i, dim=1) * targets).sum(1).mean()
        return (i2t + t2i) / 2


class BlipFilterLoss(nn.Module):
    """ITC + ITM of a Hugging Face ``BlipForImageTextRetrieval`` in one forward (wrap this in DDP).

    ITC as the model's own ``use_itm_head=False`` path computes it (projected [CLS] of the
    vision tower and of the text encoder without cross-attention), with negatives from the
    global batch (``ClipLoss``) and BLIP's learnt temperature, which lives here and not in
    the saved model (inference uses the ITM head and the cosine, neither needs it). ITM as
    the pipeline's filter scores (text encoder cross-attending to the image tokens, the
    ITM head on [CLS]), on each positive pair and a hard negative text and image per row,
    mined within this worker's batch.
    """

    def __init__(
        self, model: nn.Module, itm_weight: float = 1.0, itc_weight: float = 1.0, temperature: float = 0.07
    ) -> None:
        super().__init__()
        self.model = model
        self.itc = ClipLoss()
        self.itm = ITMLoss()
        self.itm_weight = itm_weight
        self.itc_weight = itc_weight
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        caption_ids: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        m = self.model
        image_embeds = m.vision_model(pixel_values=pixel_values).last_hidden_state
        text_states = m.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        image_feat = F.normalize(m.vision_proj(image_embeds[:, 0, :]).float(), dim=-1)
        text_feat = F.normalize(m.text_proj(text_states[:, 0, :]).float(), dim=-1)
        itc = self.itc(image_feat, text_feat, self.logit_scale.clamp(max=math.log(100.0)), caption_ids)

        def itm_fn(image_index: torch.Tensor, text_index: torch.Tensor) -> torch.Tensor:
            embeds = image_embeds[image_index]
            hidden = m.text_encoder(
                input_ids=input_ids[text_index],
                attention_mask=attention_mask[text_index],
                encoder_hidden_states=embeds,
                encoder_attention_mask=torch.ones(embeds.shape[:-1], dtype=torch.long, device=embeds.device),
            ).last_hidden_state
            return m.itm_head(hidden[:, 0, :])

        local = None if caption_ids is None else caption_ids[:, None] == caption_ids[None, :]
        itm = self.itm(itm_fn, image_feat @ text_feat.t(), local)
        loss = self.itc_weight * itc + self.itm_weight * itm["loss"]
        return {"loss": loss, "itc": itc.detach(), "itm": itm["loss"].detach(), "itm_acc": itm["acc"]}


def lm_targets(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, bos_token_id: int, prompt_length: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(decoder input ids, labels) of a BLIP captioner for tokenised ``prompt + caption`` texts.

    As BLIP trains and as ``BlipForConditionalGeneration.generate`` starts: the first token
    ([CLS]) becomes the decoder's BOS ([DEC]); padding and the prompt's tokens are not
    predicted (label -100; the model shifts labels by one itself).
    """
    ids = input_ids.clone()
    ids[:, 0] = bos_token_id
    labels = ids.masked_fill(attention_mask == 0, -100)
    labels[:, :prompt_length] = -100
    return ids, labels
