"""The decoder's input in plain PyTorch (ALGORITHM §3): the definition, the CPU fallback, the test oracle.

``decoder_scatter`` mirrors ``[E] models/base.py : ModalitySpecificEncoder.decoder_input``: the CLS token is dropped,
``N - k`` mask tokens ``x.new_empty(...).normal_(0, mask_noise_std)`` (:func:`mask_noise`) are appended and
``gather(ids_restore)`` puts every token back at its position.

``decoder_scatter_backward`` is the explicit formula autograd applies to that forward (``scatter_add`` for the
gather); ``tests/test_decoder_scatter.py`` checks it against autograd of the forward.
"""

from __future__ import annotations

import torch


def mask_noise(
    x: torch.Tensor, num_masked: int, mask_noise_std: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The (R, N - k, D) mask tokens, drawn exactly as upstream: ``x.new_empty(...).normal_(0, std)`` in x's dtype.

    With ``mask_noise_std == 0`` they are exact zeros and no random numbers are drawn.
    """
    shape = (x.shape[0], num_masked, x.shape[2])
    if mask_noise_std == 0:
        return x.new_zeros(shape)
    return x.new_empty(shape).normal_(0.0, mask_noise_std, generator=generator)


def decoder_scatter(x: torch.Tensor, ids_restore: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``gather(cat[x[:, 1:], noise], 1, ids_restore)``: the decoder input of ALGORITHM §3.

    Args:
        x: (R, 1 + k, D) student encoder output (CLS first).
        ids_restore: (R, N) int64; position n takes visible token ``ids_restore[r, n]`` when it is < k, else mask token
            ``ids_restore[r, n] - k``.
        noise: (R, N - k, D) mask tokens in x's dtype (see :func:`mask_noise`).

    Returns:
        (R, N, D) in x's dtype.
    """
    R, N = ids_restore.shape
    src = torch.cat([x[:, 1:], noise.to(x.dtype)], dim=1)
    return torch.gather(src, 1, ids_restore.unsqueeze(-1).expand(R, N, x.shape[2]))


def decoder_scatter_backward(grad: torch.Tensor, ids_restore: torch.Tensor, k: int) -> torch.Tensor:
    """Gradient of :func:`decoder_scatter` wrt x: (R, 1 + k, D), CLS row zero, visible tokens get their grad rows."""
    R, N, D = grad.shape
    src = torch.zeros(R, N, D, dtype=grad.dtype, device=grad.device)
    src.scatter_add_(1, ids_restore.unsqueeze(-1).expand(R, N, D), grad)  # gather's backward
    return torch.cat([src.new_zeros(R, 1, D), src[:, :k]], dim=1)
