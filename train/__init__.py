"""Training on curated output: the bootstrapped filter and captioner bridges, losses, evaluation.

``data`` reads img2dataset-layout WebDataset tars (the curated ``OUT/shards`` or the
fetched tuxpaint split), ``features`` caches the frozen backbones' outputs, ``common``
holds seeding, checkpoints, metrics logging and the Ray Train launcher, and the
``train_*`` / ``evaluate*`` modules are thin entry scripts (``python -m train.NAME``).
"""
