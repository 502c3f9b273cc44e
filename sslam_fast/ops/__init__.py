"""The drop-in public ops: ``from sslam_fast.ops import kaldi_fbank, eat_features, ...``.

Every op is a ``torch.library`` custom op in the ``sslam_fast`` namespace with a fake kernel, a plain-PyTorch
reference and faster backends chosen by ``backend=`` / ``SSLAM_FAST_BACKEND`` (see ``sslam_fast._backend``).
``ema_update_`` (in-place over parameter lists, torch ``_foreach`` ops), ``sample_mix_windows`` (returns ints) and
``mask_indices`` (a stable sort, traceable as is) are plain functions.
"""

from sslam_fast.ops.attention import attention
from sslam_fast.ops.decoder import decoder_block, ln_gelu_residual
from sslam_fast.ops.ema import ema_decay, ema_update_
from sslam_fast.ops.fbank import eat_features, kaldi_fbank
from sslam_fast.ops.loss import masked_mse
from sslam_fast.ops.masks import inverse_block_mask, mask_indices
from sslam_fast.ops.mix import mix_waveforms, partial_max_mix, sample_mix_windows
from sslam_fast.ops.mlp import gelu_mlp
from sslam_fast.ops.routing import clone_gather, decoder_scatter
from sslam_fast.ops.targets import layer_targets

__all__ = [
    "attention",
    "clone_gather",
    "decoder_block",
    "decoder_scatter",
    "eat_features",
    "gelu_mlp",
    "ema_decay",
    "ema_update_",
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
