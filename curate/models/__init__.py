"""Model wrappers: each owns loading, device, dtype and ``__call__`` on a batch.

Stages hold settings and resources; wrappers hold the model. Every wrapper loads from
a Hugging Face id or a local directory, from safetensors unless the user allows
pickled weights, with ``trust_remote_code`` off unless the user turns it on.
"""

# model_type of the bridge family's config.json, here so that code deciding how to run a
# model (the driver) can read it without importing torch
BRIDGE_FILTER_TYPE = "curate-bridge-filter"
BRIDGE_CAPTIONER_TYPE = "curate-bridge-captioner"

# the candidate fields a scorer fills (curate.schema.CANDIDATE_TYPE): the ITM head's
# P(match) and the CLIP (or bridge ITC) cosine similarity
ITM_SCORE = "itm_score"
CLIP_SCORE = "clip_score"
