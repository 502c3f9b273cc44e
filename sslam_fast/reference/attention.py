"""Plain-PyTorch encoder attention: the definition (ALGORITHM §2.1) in code, the CPU fallback, the test oracle.

``attention`` mirrors ``[E] models/modules.py : AltAttention.forward`` (no cosine attention, no ALiBi, no padding mask,
dropout 0), from the per-head q, k, v on: ``q`` is multiplied by ``head_dim ** -0.5`` in its own dtype, the scores
``q @ k^T`` are formed in the input dtype, the softmax runs in fp32 (``softmax(dim=-1, dtype=torch.float32)``) and is
cast back to the input dtype before ``@ v``. The attention matrix is materialised: (B, H, L, L) per call.

For head dim 64 the scale is 1/8, a power of two, so scaling q first (upstream) and scaling the scores
(``(q @ k^T) * scale``) give the same bits; for other head dims they may differ in the last bit of q.
``attention_backward`` is torch's autograd of ``attention``: the upstream gradient.
"""

from __future__ import annotations

import torch

HEAD_DIMS = (16, 32, 64, 128)


def softmax_scale(head_dim: int) -> float:
    """``head_dim ** -0.5``: the ``AltAttention.scale`` default (``qk_scale=None``); 1/8 for the model's 64."""
    return head_dim**-0.5


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Materialised softmax attention, exactly as upstream computes it.

    Args:
        q, k, v: (B, H, L, D) float32 / float16 / bfloat16, same shape, dtype and device (B may be clips x clones).

    Returns:
        (B, H, L, D) in the input dtype: ``softmax_fp32((q * D**-0.5) @ k^T).to(dtype) @ v``.
    """
    dtype = q.dtype
    q = q * softmax_scale(q.shape[-1])
    attn = q @ k.transpose(-2, -1)
    attn = attn.softmax(dim=-1, dtype=torch.float32).to(dtype=dtype)
    return attn @ v


def attention_lse(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(B, H, L) fp32 natural log-sum-exp of the scaled scores of each query row, in fp32 from the inputs."""
    s = (q.float() @ k.float().transpose(-2, -1)) * softmax_scale(q.shape[-1])
    return torch.logsumexp(s, dim=-1)



def _autograd_keys() -> torch.DispatchKeySet:
    """The dispatch keys ``torch._C._AutoDispatchBelowAutograd`` switches off (autograd's)."""
    outside = torch._C._dispatch_tls_local_exclude_set()
    with torch._C._AutoDispatchBelowAutograd():
        return torch._C._dispatch_tls_local_exclude_set() - outside


_AUTOGRAD_KEYS = _autograd_keys()


def attention_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of :func:`attention` for the upstream gradient ``grad_out``: torch's autograd of the materialised
    forward, recomputed on detached inputs (the gradient upstream training computes, bit for bit).

    A custom op's kernel (``sslam_fast::attention_backward``) runs with autograd's dispatch keys switched off, which
    ``torch.enable_grad`` does not undo: they are switched back on for the recomputation, as torch's own
    ``invoke_leaf_function`` does.
    """
    include = torch._C._dispatch_tls_local_include_set()
    exclude = torch._C._dispatch_tls_local_exclude_set() - _AUTOGRAD_KEYS
    with torch._C._ForceDispatchKeyGuard(include, exclude), torch.enable_grad():
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        return torch.autograd.grad(attention(q, k, v), (q, k, v), grad_out)
