"""BLIP's filter objectives as modules: ITC (InfoNCE both ways) and ITM with hard negatives.

ITM negatives are mined from the batch's ITC similarities as BLIP does: for each image
a negative text is sampled with probability softmax(similarity) over the other texts,
and for each text a negative image likewise, so the matching head trains on the pairs
the contrastive model finds hardest. Rows that share a caption count as positives of
each other (``positive_mask``): they are soft ITC targets and never sampled as negatives.
Similarities are computed on each worker's local batch (no all-gather across workers).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


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
