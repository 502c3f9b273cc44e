"""Fine-tuning and linear evaluation of a pretrained encoder with upstream's recipes (``finetune.py``).

``config``: the recipe as a ``FinetuneConfig`` and its presets; ``optim``: layer-decayed parameter groups and the
schedule; ``augment``: the on-device augmentations and losses; ``sampler``: AS-2M's weighted sampling; ``data``:
labelled sets; ``loop``: the training loop.
"""
