"""The HEAR 2021 API and an X-ARES encoder over an EAT / SSLAM encoder (ALGORITHM §1, §8).

HEAR (this module is the API module)::

    import sslam_fast.hear as hear
    model = hear.load_model("SSLAM_Pretrained/checkpoint_last.pt")        # any file sslam_fast.load_pretrained reads
    scene = hear.get_scene_embeddings(audio, model)                        # (n, D)
    emb, ts = hear.get_timestamp_embeddings(audio, model)                  # (n, T, D), (n, T) centre times in ms

X-ARES::

    encoder = XaresEncoder("SSLAM_Pretrained/checkpoint_last.pt")          # forward(audio (B, samples)) -> (B, T', D)

``audio`` is a (n, samples) floating tensor of mono sounds in [-1, 1] at ``model.sample_rate`` = 16 kHz, any length
of at least one 25 ms frame (400 samples); it is moved to the model's device and the results are returned there.

The input transform and the features are those of ``python -m sslam_fast.extract`` (``[E]
feature_extract/feature_extract.py``, ``[S] SSLAM_Inference/feature_extract/feature_extract.py : main``):
``sslam_fast.ops.eat_features`` over the whole batch at once (clip-mean removal, Kaldi fbank, AudioSet normalisation),
padded to ``target_length`` frames (default 1024, upstream's ``--target_length=1024``), and the encoder's block-12
output (``extract_features``). Neither EAT nor SSLAM ships a HEAR or X-ARES wrapper, so the embeddings follow the
features upstream's ``feature_extract.py`` offers:

* scene embedding = the CLS token (its ``utterance`` granularity), size D;
* timestamp embeddings = one per 16-frame time patch of its ``frame`` granularity, the mean of that patch's 8
  frequency-patch tokens (tokens n = 8 t + f), size D. Patch t covers frames [16 t, 16 t + 16); frame i covers
  [10 i, 10 i + 25) ms, so the patch's centre is 160 t + 87.5 ms (the mean of its frame centres) and the hop is 160 ms.
  A clip of F Kaldi frames (F = 1 + (samples - 400) // 160) gets ceil(F / 16) timestamps: the patches holding only
  padding are dropped.

Long clips: a clip of more than ``target_length`` frames (``"auto"``: more than the model's positional table,
``max_time_patches * 16`` frames, 122.9 s for the base model) is cut into consecutive chunks of that many frames
(frame-aligned, no overlap: chunk c holds frames [c L, (c + 1) L) of the whole clip's fbank, so chunk 0 is exactly
upstream's cropped input); each chunk runs through the encoder alone, padded to ``target_length`` (``"auto"``: the last
chunk to its own length rounded up to 16), and the timestamp embeddings of the chunks are concatenated along time (the
patch grid runs on across chunks). The scene embedding of a chunked clip is the mean of its chunks' CLS tokens
weighted by their real frame counts; for a clip of one chunk it is its CLS token, exactly ``extract``'s
``utterance`` feature.

``load_model("", tiny=True)`` builds a random tiny encoder (``ModelConfig.tiny()``: D 64, 2 blocks) initialised from
``torch.manual_seed(seed)`` inside ``torch.random.fork_rng`` (the caller's random state is left as it was), for tests
and trials without a checkpoint.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn as nn

__all__ = [
    "FRAME_SHIFT_MS",
    "HearModel",
    "PATCH_HOP_MS",
    "XaresEncoder",
    "get_scene_embeddings",
    "get_timestamp_embeddings",
    "load_model",
    "patch_centres_ms",
]

SAMPLE_RATE = 16000
FRAME_LENGTH = 400  # 25 ms at 16 kHz (ALGORITHM §1.4)
FRAME_SHIFT = 160  # 10 ms
FRAME_SHIFT_MS = 10.0
FRAME_LENGTH_MS = 25.0
UPSTREAM_TARGET_LENGTH = 1024  # the --target_length=1024 of upstream's feature_extract.sh
PATCH_HOP_MS = 16 * FRAME_SHIFT_MS  # 160 ms between timestamp embeddings (one per 16-frame time patch)
AUDIO_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _frames(num_samples: int) -> int:
    """Kaldi frames of a 16 kHz clip (``snip_edges``): 1 + (N - 400) // 160, 0 below one frame."""
    return 0 if num_samples < FRAME_LENGTH else 1 + (num_samples - FRAME_LENGTH) // FRAME_SHIFT


def patch_centres_ms(num_patches: int, patch_frames: int = 16, device=None) -> torch.Tensor:
    """(num_patches,) float32 centre times in ms of consecutive ``patch_frames``-frame patches: the mean of the
    centres 10 i + 12.5 ms of the frames i each patch holds."""
    first = (patch_frames - 1) * FRAME_SHIFT_MS / 2 + FRAME_LENGTH_MS / 2
    return torch.arange(num_patches, dtype=torch.float64, device=device).mul(patch_frames * FRAME_SHIFT_MS).add(
        first).to(torch.float32)


class HearModel(nn.Module):
    """An encoder with the HEAR attributes (``sample_rate``, ``scene_embedding_size``, ``timestamp_embedding_size``)
    and the batched embedding computation the module functions call.

    ``encoder``: anything with ``cfg`` (``ModelConfig``) and ``extract_features(fbank) -> (B, 1 + N, D)`` (an
    ``EATEncoder``; an ``AudioClassifier`` is replaced by its ``encoder``). ``target_length``: frames each chunk is
    padded to (a positive multiple of 16 within the positional table; default 1024, upstream's), or ``"auto"``.
    ``batch_size``: chunks per encoder call. ``norm_mean`` / ``norm_std``: the fbank normalisation (AudioSet's by
    default, ALGORITHM §1.6).
    """

    sample_rate = SAMPLE_RATE

    def __init__(self, encoder: nn.Module, *, target_length: int | str = UPSTREAM_TARGET_LENGTH, batch_size: int = 8,
                 norm_mean: float = -4.268, norm_std: float = 4.569) -> None:
        super().__init__()
        encoder = getattr(encoder, "encoder", encoder)
        if not (hasattr(encoder, "cfg") and hasattr(encoder, "extract_features")):
            raise TypeError(f"encoder must be an EATEncoder or AudioClassifier, got {type(encoder).__name__}")
        self.encoder = encoder.eval()
        cfg = encoder.cfg
        self.patch = cfg.patch_size
        self.freq_patches = cfg.grid[1]
        self.max_frames = cfg.max_time_patches * cfg.patch_size
        if isinstance(target_length, str):
            if target_length != "auto":
                raise ValueError(f"target_length must be 'auto' or a positive multiple of 16, got {target_length!r}")
            self.target_length: int | None = None
        else:
            if isinstance(target_length, bool) or not isinstance(target_length, int) or target_length <= 0 \
                    or target_length % self.patch:
                raise ValueError(f"target_length must be 'auto' or a positive multiple of {self.patch}, "
                                 f"got {target_length!r}")
            if target_length > self.max_frames:
                raise ValueError(f"target_length {target_length} exceeds the model's positional table "
                                 f"({self.max_frames} frames)")
            self.target_length = target_length
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.batch_size = batch_size
        self.norm_mean = float(norm_mean)
        self.norm_std = float(norm_std)
        if not (math.isfinite(self.norm_mean) and math.isfinite(self.norm_std) and self.norm_std > 0):
            raise ValueError(f"norm_mean must be finite and norm_std finite and > 0, got {norm_mean}, {norm_std}")
        self.scene_embedding_size = cfg.embed_dim
        self.timestamp_embedding_size = cfg.embed_dim

    @property
    def chunk_frames(self) -> int:
        """Frames per chunk: ``target_length``, or the positional table under ``"auto"``."""
        return self.target_length or self.max_frames

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    def check_audio(self, audio, name: str = "audio") -> torch.Tensor:
        """(n, samples) floating, finite, at least one frame long; returned as float32 on the model's device."""
        if not isinstance(audio, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (n_sounds, n_samples), got {type(audio).__name__}")
        if audio.dim() != 2:
            raise ValueError(f"{name} must have shape (n_sounds, n_samples) (2 dimensions), got {tuple(audio.shape)}")
        if audio.dtype not in AUDIO_DTYPES:
            raise TypeError(f"{name} must be floating point (float32, float64, float16, bfloat16) in [-1, 1], "
                            f"got {str(audio.dtype).replace('torch.', '')}")
        if audio.shape[0] == 0:
            raise ValueError(f"{name} holds no sounds: shape {tuple(audio.shape)}")
        if audio.shape[1] < FRAME_LENGTH:
            raise ValueError(f"{name} sounds have {audio.shape[1]} samples; at least {FRAME_LENGTH} (one 25 ms frame "
                             f"at {SAMPLE_RATE} Hz) are needed")
        bad = ~torch.isfinite(audio).all(dim=1)
        if bool(bad.any()):
            rows = bad.nonzero().flatten().tolist()
            more = "..." if len(rows) > 5 else ""
            raise ValueError(f"{name} holds NaN or infinite samples (sound(s) {rows[:5]}{more})")
        return audio.to(device=self.device, dtype=torch.float32)

    def segments(self, num_frames: int) -> list[tuple[int, int, int]]:
        """``(first frame, input length, real frames)`` of each chunk of a clip of ``num_frames`` frames."""
        L = self.chunk_frames
        out = []
        for start in range(0, num_frames, L):
            real = min(L, num_frames - start)
            length = self.target_length or -(-real // self.patch) * self.patch
            out.append((start, length, real))
        return out

    @torch.no_grad()
    def embed(self, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scene (n, D), timestamp embeddings (n, ceil(F / 16), D))`` of ``audio`` (see the module docstring)."""
        from sslam_fast.ops import eat_features

        audio = self.check_audio(audio)
        n, num_samples = audio.shape
        F = _frames(num_samples)
        segs = self.segments(F)
        L, p = self.chunk_frames, self.patch
        total = segs[-1][0] + segs[-1][1]  # fbank frames needed: the last chunk's start plus its input length
        n_full = sum(1 for _, length, _ in segs if length == L)  # leading chunks of L frames (all but an "auto" tail)
        weights = torch.tensor([real for _, _, real in segs], dtype=torch.float32, device=audio.device)
        weights = (weights / weights.sum()).view(1, -1, 1)
        group = max(1, self.batch_size // len(segs))  # sounds per fbank call: about batch_size chunks each
        scenes, stamps = [], []
        for g0 in range(0, n, group):
            fb = eat_features(audio[g0: g0 + group], sample_rate=SAMPLE_RATE, target_length=total,
                              norm_mean=self.norm_mean, norm_std=self.norm_std)  # (g, 1, total, 128)
            g, M = fb.shape[0], fb.shape[-1]
            parts = []  # (cls (g, k, D), patch embeddings (g, k * T / 16, D)) of k chunks of T frames
            if n_full:
                x = fb[:, 0, : n_full * L].reshape(g * n_full, L, M).unsqueeze(1)
                parts.append(self._tokens(x, g, n_full))
            if n_full < len(segs):
                start, length, _ = segs[-1]
                parts.append(self._tokens(fb[:, :, start: start + length], g, 1))
            cls = torch.cat([c for c, _ in parts], dim=1)
            scenes.append(cls[:, 0] if len(segs) == 1 else (cls * weights).sum(dim=1))
            stamps.append(torch.cat([t for _, t in parts], dim=1)[:, : -(-F // p)])
        return torch.cat(scenes), torch.cat(stamps)

    def _tokens(self, x: torch.Tensor, g: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Chunks (g * k, 1, T, 128), sound-major -> CLS (g, k, D) and the per-time-patch means of the frequency
        tokens (g, k * T / 16, D)."""
        y = self._run(x)  # (g * k, 1 + T / 16 * W, D)
        D = y.shape[-1]
        cls = y[:, 0].reshape(g, k, D)
        patches = y[:, 1:].unflatten(1, (-1, self.freq_patches)).mean(dim=2)  # token n = W t + f -> (g * k, T/16, D)
        return cls, patches.reshape(g, -1, D)

    def _run(self, fbank: torch.Tensor) -> torch.Tensor:
        """The encoder's block-12 output of (B, 1, T, 128), ``batch_size`` rows per call."""
        return torch.cat([self.encoder.extract_features(fbank[i: i + self.batch_size])
                          for i in range(0, fbank.shape[0], self.batch_size)])

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """(n, samples) -> (n, T, D) timestamp embeddings."""
        return self.embed(audio)[1]


def _tiny_encoder(seed: int) -> nn.Module:
    from sslam_fast.models import EATEncoder, ModelConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return EATEncoder(ModelConfig.tiny()).eval()


def load_model(model_file_path: str | os.PathLike = "", *, tiny: bool = False, seed: int = 0,
               target_length: int | str = UPSTREAM_TARGET_LENGTH, batch_size: int = 8, device=None,
               norm_mean: float = -4.268, norm_std: float = 4.569, trust_checkpoint: bool = False) -> HearModel:
    """HEAR ``load_model``: a :class:`HearModel` over the encoder of ``model_file_path`` (any checkpoint
    ``sslam_fast.load_pretrained`` reads: fairseq pre-trained or fine-tuned, HF port; a fine-tuned file's classifier
    head is not used), in eval mode, on ``device`` (default: the CPU).

    ``model_file_path=""`` with ``tiny=True``: a random tiny encoder seeded by ``seed`` (see the module docstring).
    ``target_length``: frames each chunk is padded to, 1024 (upstream's) by default, or ``"auto"``.
    """
    path = os.fspath(model_file_path) if model_file_path is not None else ""
    if path and tiny:
        raise ValueError("pass either model_file_path or tiny=True, not both")
    if not path and not tiny:
        raise ValueError("model_file_path is empty: pass a checkpoint that sslam_fast.load_pretrained reads (or "
                         "tiny=True for a random tiny encoder)")
    if tiny:
        encoder = _tiny_encoder(seed)
    else:
        from sslam_fast import load_pretrained

        encoder = load_pretrained(path, trust_checkpoint=trust_checkpoint)
    model = HearModel(encoder, target_length=target_length, batch_size=batch_size, norm_mean=norm_mean,
                      norm_std=norm_std)
    if device is not None:
        model = model.to(device)
    return model.eval()


def _check_model(model) -> HearModel:
    if not isinstance(model, HearModel):
        raise TypeError(f"model must come from sslam_fast.hear.load_model, got {type(model).__name__}")
    return model


def get_scene_embeddings(audio: torch.Tensor, model: HearModel) -> torch.Tensor:
    """HEAR: (n, samples) at 16 kHz -> (n, D) float32: the CLS token (chunked clips: the frame-weighted mean of their
    chunks' CLS tokens)."""
    return _check_model(model).embed(audio)[0]


def get_timestamp_embeddings(audio: torch.Tensor, model: HearModel) -> tuple[torch.Tensor, torch.Tensor]:
    """HEAR: (n, samples) at 16 kHz -> ((n, T, D) embeddings, (n, T) centre times in ms), one per 16-frame time patch
    (the mean of its frequency-patch tokens), T = ceil(F / 16) for F Kaldi frames, 160 ms apart from 87.5 ms."""
    emb = _check_model(model).embed(audio)[1]
    ts = patch_centres_ms(emb.shape[1], model.patch, device=emb.device).expand(emb.shape[0], -1).contiguous()
    return emb, ts


class XaresEncoder(nn.Module):
    """The X-ARES audio-encoder shape: ``forward(audio (B, samples) or (samples,)) -> (B, T', D)`` timestamp
    embeddings (as :func:`get_timestamp_embeddings`), with ``sampling_rate`` 16000, ``output_dim`` D and
    ``hop_size_in_ms`` 160. ``checkpoint`` and ``kwargs`` are those of :func:`load_model`; audio given on another
    device is moved to the encoder's."""

    def __init__(self, checkpoint: str | os.PathLike = "", **kwargs) -> None:
        super().__init__()
        self.hear = load_model(checkpoint, **kwargs)
        self.sampling_rate = SAMPLE_RATE
        self.output_dim = self.hear.timestamp_embedding_size
        self.hop_size_in_ms = PATCH_HOP_MS

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        if isinstance(audio, torch.Tensor) and audio.dim() == 1:
            audio = audio.unsqueeze(0)
        return self.hear.embed(audio)[1]
