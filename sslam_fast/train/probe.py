"""Linear probe of a pre-trained student on the held-out half of the built-in default set (trainer's end-of-run check).

CLS features of ``student.extract_features(eat_features(clips))`` (no grad) for the held-out clips, standardised with
the statistics of the fitting half; a 10-way linear layer (BCE with logits, weight decay, full-batch Adam, fixed seed)
is fitted on the first half and scored by mAP on the second half, for the trained student and a freshly initialised
``EATEncoder`` of the same config.
"""

from __future__ import annotations

import torch

from sslam_fast.metrics import mean_average_precision

__all__ = ["clip_features", "fit_and_score", "linear_probe"]


@torch.no_grad()
def clip_features(encoder, default_set, cfg, device="cpu", batch_size: int = 32) -> torch.Tensor:
    """(num_heldout, D) float32 CLS features of the held-out clips (first ``clip_samples`` of each, no crop)."""
    from sslam_fast._progress import progress
    from sslam_fast.data import AudioClipDataset
    from sslam_fast.ops import eat_features

    ds = AudioClipDataset(default_set.heldout_manifest, cfg.clip_samples, sample_rate=cfg.sample_rate,
                          random_crop=False, as_int16=False)
    was_training = encoder.training
    encoder.eval()
    feats = []
    for start in progress(range(0, len(ds), batch_size), desc="linear-probe features", unit="batch"):
        items = [ds[i] for i in range(start, min(start + batch_size, len(ds)))]
        if any(it is None for it in items):
            raise ValueError(f"unreadable held-out clip in {default_set.heldout_manifest}")
        wav = torch.stack([it["audio"] for it in items]).to(device)
        lengths = torch.tensor([it["length"] for it in items], device=device)
        fb = eat_features(wav, lengths, sample_rate=cfg.sample_rate, target_length=cfg.target_length,
                          norm_mean=cfg.norm_mean, norm_std=cfg.norm_std)
        feats.append(encoder.extract_features(fb)[:, 0].float().cpu())
    encoder.train(was_training)
    return torch.cat(feats)


def fit_and_score(feats: torch.Tensor, labels: torch.Tensor, *, steps: int = 300, lr: float = 0.01,
                  weight_decay: float = 1e-3, seed: int = 0) -> float:
    """Fit on the first half, return the mAP on the second half."""
    n = feats.shape[0] // 2
    x_fit, x_test = feats[:n].double(), feats[n:].double()
    mean, std = x_fit.mean(0), x_fit.std(0).clamp_min(1e-6)
    x_fit, x_test = ((x_fit - mean) / std).float(), ((x_test - mean) / std).float()
    y_fit = labels[:n].float()
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(feats.shape[1], labels.shape[1])
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.01)
        head.bias.zero_()
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(head(x_fit), y_fit).backward()
        opt.step()
    with torch.no_grad():
        scores = head(x_test).numpy()
    return float(mean_average_precision(scores, labels[n:].numpy())[0])


def linear_probe(student, default_set, cfg, device="cpu", seed: int = 0) -> dict:
    """``{"pretrained": mAP, "random_init": mAP}`` of the probe (see module docstring)."""
    from sslam_fast.models import EATEncoder

    labels = default_set.labels("heldout")
    pre = fit_and_score(clip_features(student, default_set, cfg, device), labels, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = EATEncoder(cfg.model_config()).to(device)
    rnd = fit_and_score(clip_features(fresh, default_set, cfg, device), labels, seed=seed)
    return {"pretrained": pre, "random_init": rnd}
