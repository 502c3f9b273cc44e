"""sslam_fast: fused kernels and a lean trainer for SSLAM / EAT self-supervised audio pretraining.

Importing the package is cheap: it neither imports triton nor initialises CUDA. Ops live in ``sslam_fast.ops``.
"""

__version__ = "0.1.0"
