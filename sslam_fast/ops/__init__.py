"""The drop-in public ops: ``from sslam_fast.ops import kaldi_fbank, eat_features, ...``.

One module per op (``sslam_fast/ops/<op>.py``), each declared through ``sslam_fast._backend.define_op``: a
``torch.library`` custom op ``torch.ops.sslam_fast.<op>`` with a fake kernel, a plain-PyTorch reference
(``sslam_fast/reference/<op>.py``) and faster backends chosen by ``backend=`` / ``SSLAM_FAST_BACKEND``; a
differentiable op has a backward custom op ``<op>_backward`` run by the backend that ran its forward.
``ema_update_`` (in place over parameter lists, torch ``_foreach`` ops), ``ema_decay`` (a number),
``sample_mix_windows`` (draws two ints) and ``mask_indices`` (a stable sort, traceable as is) are plain functions.

``sslam_fast.ops.<op>`` names the function; the module is ``importlib.import_module("sslam_fast.ops.<op>")``.
"""

from sslam_fast.ops.attention import attention
from sslam_fast.ops.clone_gather import clone_gather
from sslam_fast.ops.decoder_block import decoder_block
from sslam_fast.ops.decoder_scatter import decoder_scatter
from sslam_fast.ops.eat_features import eat_features
from sslam_fast.ops.ema import ema_decay, ema_update_
from sslam_fast.ops.gelu_mlp import gelu_mlp
from sslam_fast.ops.inverse_block_mask import inverse_block_mask
from sslam_fast.ops.kaldi_fbank import kaldi_fbank
from sslam_fast.ops.layer_targets import layer_targets
from sslam_fast.ops.ln_gelu_residual import ln_gelu_residual
from sslam_fast.ops.mask_indices import mask_indices
from sslam_fast.ops.masked_mse import masked_mse
from sslam_fast.ops.mix_waveforms import mix_waveforms
from sslam_fast.ops.partial_max_mix import partial_max_mix, sample_mix_windows

__all__ = [
    "attention",
    "clone_gather",
    "decoder_block",
    "decoder_scatter",
    "eat_features",
    "ema_decay",
    "ema_update_",
    "gelu_mlp",
    "inverse_block_mask",
    "kaldi_fbank",
    "layer_targets",
    "ln_gelu_residual",
    "mask_indices",
    "masked_mse",
    "mix_waveforms",
    "partial_max_mix",
    "sample_mix_windows",
]
