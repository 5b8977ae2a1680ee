"""The training library: everything the entry scripts one level up (``python -m train.NAME``) import.

Scripts never import each other; what two of them share lives here, by role:

- ``data``: image-caption samples of WebDataset shards, over curate's reader
  (``curate.io.reader.iter_samples``), and a curated sample's kept captions;
  ``stream``: decoded, augmented, tokenised batches streamed from shards in DataLoader
  workers, resumable at any step; ``features`` / ``feature_shards``: frozen-backbone
  outputs cached once (the bridge trainers and the frozen-tower contrastive model).
- ``models``: the frozen-tower contrastive heads, Hugging Face CLIP / BLIP loading and
  atomic ``save_pretrained``; ``losses``: ITC, ITM with hard negatives, InfoNCE over
  the batch gathered from every worker; ``optim``: weight-decay groups, warm-up +
  cosine schedule, bf16 autocast.
- ``launch``: seeding, worker rank and device, DDP, the Ray Train launcher and the
  command-line options every training script shares; ``checkpoint``: checkpoints and
  hyperparameter dataclasses; ``metrics``: ROC-AUC, recall@K, the JSONL metrics log;
  ``evaluation``: filter, captioner and retrieval evaluation; ``cider``: CIDEr-D;
  ``websubset``: a spread subset of web shards.
"""
