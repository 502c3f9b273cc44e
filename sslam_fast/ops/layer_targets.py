"""EAT / SSLAM teacher targets as a dispatching custom op: ``layer_targets`` (ALGORITHM §4 make_targets, §5.3).

``layer_targets(layer_outputs, top_k, token_index)`` instance-normalises each of the last ``top_k`` FFN outputs over
tokens, averages them and LayerNorms the mean over channels (fp32, eps 1e-5, no affine). ``token_index`` restricts
everything to a token subset, as SSLAM's teacher B needs (instance-norm statistics over its 272 kept tokens).

Backends: ``reference`` (``sslam_fast.reference.layer_targets``, any device) and ``triton`` (kernels/layer_targets.py;
CUDA, or CPU under ``TRITON_INTERPRET=1``). Targets are computed under ``no_grad`` upstream, so the op has no
backward: the public function detaches its input.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sslam_fast import _backend
from sslam_fast._checks import MODEL_DTYPES, check_tensor, is_int, value_checks_enabled
from sslam_fast.reference import layer_targets as ref

__all__ = ["layer_targets"]


def _validate(layers: torch.Tensor, token_index: torch.Tensor | None) -> None:
    """What the kernels index by (metadata only); the range of token_index is a value check of the public function."""
    check_tensor("layers", layers, ndim=4)
    if token_index is not None:
        check_tensor("token_index", token_index, ndim=1, dtypes=(torch.int64,), device=layers.device)


def _fake(layers, token_index, backend):
    _, B, T, D = layers.shape
    if token_index is not None:
        T = token_index.shape[0]
    return layers.new_empty((B, T, D), dtype=torch.float32)


_op = _backend.define_op(
    "layer_targets",
    "(Tensor layers, Tensor? token_index) -> Tensor",
    fake=_fake,
    kernels={
        "reference": ref.layer_targets,
        "triton": _backend.triton_kernel("layer_targets", "layer_targets_triton"),
    },
    validate=_validate,
)


def _stack_top_k(layer_outputs, top_k) -> torch.Tensor:
    """The last ``top_k`` layers as one (top_k, B, T, D) tensor: a view of a stacked input, one copy of a list."""
    if not is_int(top_k):
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__}")
    top_k = int(top_k)
    if isinstance(layer_outputs, torch.Tensor):
        check_tensor("layer_outputs", layer_outputs, ndim=4, dtypes=MODEL_DTYPES)
        L = layer_outputs.shape[0]
        if not 1 <= top_k <= L:
            raise ValueError(f"top_k must lie in [1, {L}] (the number of layers), got {top_k}")
        return layer_outputs[L - top_k :]  # a view: no copy
    if not isinstance(layer_outputs, Sequence) or isinstance(layer_outputs, (str, bytes)):
        raise TypeError(
            f"layer_outputs must be a list/tuple of (B, T, D) tensors or one (L, B, T, D) tensor, "
            f"got {type(layer_outputs).__name__}"
        )
    L = len(layer_outputs)
    if L == 0:
        raise ValueError("layer_outputs must hold at least one layer")
    if not 1 <= top_k <= L:
        raise ValueError(f"top_k must lie in [1, {L}] (the number of layers), got {top_k}")
    first = check_tensor("layer_outputs[0]", layer_outputs[0], ndim=3, dtypes=MODEL_DTYPES)
    for i in range(L - top_k, L):
        y = check_tensor(f"layer_outputs[{i}]", layer_outputs[i], ndim=3, dtypes=MODEL_DTYPES, device=first.device)
        if y.shape != first.shape or y.dtype != first.dtype:
            raise ValueError(
                f"layer_outputs[{i}] must match layer_outputs[0] ({tuple(first.shape)}, {first.dtype}), "
                f"got {tuple(y.shape)}, {y.dtype}"
            )
    return torch.stack([y.detach() for y in layer_outputs[L - top_k :]])


def _check_token_index(token_index, num_tokens: int, device: torch.device) -> torch.Tensor | None:
    if token_index is None:
        return None
    check_tensor("token_index", token_index, ndim=1, dtypes=(torch.int64,), device=device)
    if token_index.numel() and value_checks_enabled():
        lo, hi = (int(v) for v in torch.aminmax(token_index))  # one sync: an out-of-range index would read wild memory
        if lo < 0 or hi >= num_tokens:
            raise ValueError(f"token_index must lie in [0, {num_tokens}) (the tokens), got values in [{lo}, {hi}]")
    return token_index


def layer_targets(layer_outputs, top_k: int, token_index: torch.Tensor | None = None, *, backend: str = "auto"):
    """Teacher targets from the FFN outputs of the teacher blocks (ALGORITHM §4 ``make_targets``).

    Args:
        layer_outputs: a list/tuple of L tensors (B, T, D), oldest layer first, or one stacked (L, B, T, D) tensor;
            float32 / float16 / bfloat16 (upcast to fp32 inside). A list is stacked (its last ``top_k`` layers only,
            one copy); a stacked tensor is sliced without a copy (any strides; unit stride over D avoids a copy in
            the Triton backend).
        top_k: how many of the last layers to average, 1..L (12 for the frame targets, 1 for SSLAM's CLS target).
        token_index: optional (T',) int64 on the same device, values in [0, T): compute on these tokens only. The
            output is then (B, T', D) and the instance-norm statistics run over the T' tokens (SSLAM teacher B).
        backend: "auto" | "reference" | "triton".

    Returns:
        (B, T or T', D) float32: ``LayerNorm_D(mean_{last top_k l} InstanceNorm_T(y_l))``, both norms with eps 1e-5,
        biased variance, no affine. No gradient (upstream computes targets under ``no_grad``). A single token
        (T' = 1) normalises to 0. Non-finite inputs propagate (no check: a teacher overflow must stay visible).
    """
    layers = _stack_top_k(layer_outputs, top_k).detach()
    token_index = _check_token_index(token_index, layers.shape[2], layers.device)
    chosen = _backend.resolve("layer_targets", backend, layers.device)
    return _op(layers, token_index, chosen)
