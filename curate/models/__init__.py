"""Model wrappers: each owns loading, device, dtype and ``__call__`` on a batch.

Stages hold settings and resources; wrappers hold the model. Every wrapper loads from
a Hugging Face id or a local directory, from safetensors unless the user allows
pickled weights, with ``trust_remote_code`` off unless the user turns it on.
"""

from __future__ import annotations

# model_type of the bridge family's config.json, here so that code deciding how to run a
# model (the driver) can read it without importing torch
BRIDGE_FILTER_TYPE = "curate-bridge-filter"
BRIDGE_CAPTIONER_TYPE = "curate-bridge-captioner"

# the candidate fields a scorer fills (curate.schema.CANDIDATE_TYPE): the ITM head's
# P(match) and the CLIP (or bridge ITC) cosine similarity
ITM_SCORE = "itm_score"
CLIP_SCORE = "clip_score"

# the drop reasons of the model filters (docs/rules.md), named for the filter and its bound
NSFW_ABOVE_THRESHOLD = "nsfw_above_threshold"
WATERMARK_ABOVE_THRESHOLD = "watermark_above_threshold"
AESTHETIC_BELOW_THRESHOLD = "aesthetic_below_threshold"


def resolve_label(id2label: dict[int, str], label: int | str) -> int:
    """The class index ``label`` names; ValueError listing the model's labels when none matches."""
    labels = {int(k): str(v) for k, v in id2label.items()}
    if isinstance(label, int) and label in labels:
        return label
    if isinstance(label, str):
        matches = [i for i, name in labels.items() if name.lower() == label.lower()]
        if len(matches) == 1:
            return matches[0]
    known = ", ".join(f"{i}: {name!r}" for i, name in sorted(labels.items()))
    raise ValueError(f"label {label!r} is not a class of the model (its classes: {known})")
