"""sslam_fast: fused kernels and a lean trainer for SSLAM / EAT self-supervised audio pretraining.

Importing the package is cheap: it neither imports triton nor initialises CUDA. Ops live in ``sslam_fast.ops``.
"""

__version__ = "0.1.0"

_LAZY = {"load_pretrained": "sslam_fast.checkpoint", "load_pretraining": "sslam_fast.checkpoint"}


def __getattr__(name: str):
    # Loading checkpoints pulls in the models; resolve on first use so ``import sslam_fast`` stays light.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sslam_fast' has no attribute {name!r}")
