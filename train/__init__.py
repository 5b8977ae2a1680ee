"""Training on curated output: the entry scripts (``python -m train.NAME``) over the ``train.lib`` library.

Scripts, each top to bottom with its CPU and multi-GPU commands in its docstring, none
importing another:

- ``train_filter``, ``train_captioner``: the bootstrapped bridges (frozen EfficientNet-Lite0,
  MiniLM and SmolLM2, trainable fusion / Q-Former) on cached frozen features;
  ``evaluate``, ``evaluate_captioner``: their ITM AUC, recall@K and CIDEr-D.
- ``train_clip``: the downstream frozen-tower contrastive model; ``experiment``: raw vs
  CapFilt vs BLIP-2-ranked web data, composing ``curate run`` and the scripts above.
- ``pretrain_clip``: a Hugging Face CLIP (towers and all) from curated shards streamed as
  they are; ``finetune_blip``: the Hugging Face BLIP captioner and ITM filter, saved for a
  pipeline file's ``captioner.model`` / ``filter.model``.

``train.lib`` holds what they share: data, streaming, models, losses, launch (Ray Train),
checkpoints, metrics and evaluation.
"""
