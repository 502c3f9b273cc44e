"""EAT / SSLAM objectives (ALGORITHM §4, §5): the model on sslam_fast.ops ("fast") against the upstream-structured
sslam_fast.reference.model ("plain") and a hand computation; gradients, EMA, validation."""

from __future__ import annotations

import math

import pytest
import torch

from sslam_fast.models import ModelConfig, PretrainingModel
from sslam_fast.ops import ema_decay
from sslam_fast.reference import model as refm

# the two ways to compute the loss terms / the EMA step of a PretrainingModel, as (model, *args, **kw) functions
FAST, PLAIN = PretrainingModel.losses, refm.losses
EMA_FAST, EMA_PLAIN = PretrainingModel.ema_step, refm.ema_step


def _masks(R: int, N: int, keep: int, seed: int = 0) -> torch.Tensor:
    """(R, N) bool, True = masked, exactly ``keep`` visible tokens per row."""
    g = torch.Generator().manual_seed(seed)
    order = torch.rand(R, N, generator=g).argsort(1)[:, :keep]
    m = torch.ones(R, N, dtype=torch.bool)
    m.scatter_(1, order, False)
    return m


def _model(stage: str = "eat", seed: int = 0, **kw) -> PretrainingModel:
    torch.manual_seed(seed)
    m = PretrainingModel(ModelConfig.tiny(stage=stage, **kw))
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # a teacher that differs from the student, as after some training
        for name, p in m.teacher.named_parameters():
            if name != "pos_embed":
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return m


def _source(B: int, cfg: ModelConfig, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 1, cfg.num_frames, 128, generator=g)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _run(losses, model, *args, **kw):
    """``losses(model, *args, **kw)`` (FAST or PLAIN) and the gradients of every parameter that got one."""
    model.zero_grad(set_to_none=True)
    out = losses(model, *args, **kw)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in out.items()}, grads


# --- hand computation (loops, explicit norms; blocks and decoder are checked against formulas in test_models.py) ---


def _ln(z, eps):
    mu = z.mean(-1, keepdim=True)
    return (z - mu) / torch.sqrt(((z - mu) ** 2).mean(-1, keepdim=True) + eps)


def _hand_targets(layers, k):
    acc = 0
    for y in layers[-k:]:
        mu = y.mean(1, keepdim=True)
        acc = acc + (y - mu) / torch.sqrt(((y - mu) ** 2).mean(1, keepdim=True) + 1e-5)
    return _ln(acc / k, 1e-5)


def _hand_layers(enc, tokens):
    h = torch.cat([enc.cls_token.expand(tokens.shape[0], 1, -1), tokens], 1)
    h = _ln(h, 1e-6) * enc.input_norm.weight + enc.input_norm.bias
    out = []
    for blk in enc.blocks:
        h, f = refm.block(blk, h)
        out.append(f[:, 1:])
    return h, out


def _patches(enc, x):
    return enc.patch_embed(x).flatten(2).transpose(1, 2) + enc.pos_embed[:, : x.shape[2] // 16 * 8]


def _hand_student(model, x, masks):
    st, K = model.student, model.cfg.clones
    R, N = masks.shape
    xp = _patches(st, x)
    dec_in, cls = torch.zeros(R, N, xp.shape[-1]), []
    for r in range(R):
        vis = (~masks[r]).nonzero()[:, 0]
        h, _ = _hand_layers(st, xp[r // K, vis][None])
        cls.append(h[0, 0])
        dec_in[r, vis] = h[0, 1:]  # mask tokens are zeros at std 0
    return refm.decoder(model.decoder, dec_in, (N // 8, 8)), torch.stack(cls)


def _hand_losses(model, source, masks, windows=None):
    cfg = model.cfg
    K, k, D = cfg.clones, cfg.average_top_k_layers, cfg.embed_dim
    B, T = source.shape[0], source.shape[2]
    x, m = source, masks
    if windows is not None:
        w = cfg.mix_window_frames
        mix = source.clone()
        for i in range(B):
            for fr in range(T):
                if not any(s <= fr < s + w for s in windows):
                    mix[i, :, fr] = torch.maximum(source[i, :, fr], source[(i - 1) % B, :, fr])
        x, m = torch.cat([source, mix]), torch.cat([masks, masks])
    pred, cls = _hand_student(model, x, m)
    with torch.no_grad():
        _, ya = _hand_layers(model.teacher, _patches(model.teacher, x))
    Y = _hand_targets(ya, k)
    ct = Y.mean(1) if windows is None else _hand_targets(ya, 1).mean(1)
    S = int(m.sum())
    patch = sum(((pred[r][m[r]] - Y[r // K][m[r]]) ** 2).sum() for r in range(len(m))) / math.sqrt(D)
    cls_rows = sum(((cls[r] - ct[r // K]) ** 2).sum() for r in range(len(m))) / math.sqrt(D)
    mix_patch = torch.zeros(())
    if windows is not None:
        rows = [t for t in range(T // 16) if not any(s // 16 <= t < (s + w) // 16 for s in windows)]
        kept = [t * 8 + f for t in rows for f in range(8)]
        with torch.no_grad():
            _, zb = _hand_layers(model.teacher, _patches(model.teacher, source)[:, kept])
        Z, Yu = _hand_targets(zb, k), Y[:B]
        t_srl = Yu.clone()
        for i in range(B):
            for j, n in enumerate(kept):
                t_srl[i, n] = (Yu[i, n] + Z[(i - 1) % B, j]) / 2
        for r in range(B * K):
            mr = masks[r]
            mix_patch = mix_patch + 2 * ((pred[B * K + r][mr] - t_srl[r // K][mr]) ** 2).sum() / math.sqrt(D)
    return {"patch": patch, "mix_patch": mix_patch, "cls": cls_rows * S, "sample_size": S,
            "loss": (patch + mix_patch) / S + cls_rows}


@pytest.mark.parametrize("losses", [PLAIN, FAST], ids=["plain", "fast"])
@pytest.mark.parametrize("windows", [None, (16, 96)], ids=["eat", "sslam"])
def test_losses_match_hand_computation(windows, losses):
    stage = "eat" if windows is None else "sslam"
    model = _model(stage, clones=2)
    cfg = model.cfg
    source = _source(2, cfg)
    masks = _masks(2 * cfg.clones, cfg.num_patches, 13)
    got = {k: v.detach() for k, v in losses(model, source, masks, windows, mask_noise_std=0.0).items()}
    with torch.no_grad():
        want = _hand_losses(model, source, masks, windows)
    assert float(got["sample_size"]) == want["sample_size"] == (2 if windows else 1) * 2 * 2 * (128 - 13)
    for key in ("patch", "mix_patch", "cls", "loss"):
        assert got[key].dtype == torch.float32 and got[key].dim() == 0
        assert abs(float(got[key]) - float(want[key])) <= 1e-5 * abs(float(want[key])) + 1e-6, key
    if windows is None:
        assert float(got["mix_patch"]) == 0.0
    else:
        assert float(got["mix_patch"]) > 0


# --- fast vs plain --------------------------------------------------------------------------------------------------

CASES = [
    pytest.param(1, 26, None, id="eat-B1-keep26"),
    pytest.param(3, 26, None, id="eat-B3-keep26"),
    pytest.param(2, 1, None, id="eat-B2-keep1"),
    pytest.param(1, 26, (16, 96), id="sslam-B1-s16-96"),
    pytest.param(3, 26, (0, 48), id="sslam-B3-s0-48"),
    pytest.param(2, 7, (112, 208), id="sslam-B2-s112-208"),
]


@pytest.mark.parametrize("B,keep,windows", CASES)
def test_fast_matches_plain_losses_and_grads(B, keep, windows):
    model = _model("eat" if windows is None else "sslam")
    cfg = model.cfg
    source = _source(B, cfg, seed=B)
    masks = _masks(B * cfg.clones, cfg.num_patches, keep, seed=keep)
    fast, g_fast = _run(FAST, model, source, masks, windows, mask_noise_std=0.0)
    plain, g_plain = _run(PLAIN, model, source, masks, windows, mask_noise_std=0.0)
    for key in fast:
        a, b = float(fast[key]), float(plain[key])
        assert abs(a - b) <= 1e-5 * abs(b), (key, a, b)
    assert float(fast["loss"]) > 0 and (float(fast["mix_patch"]) > 0) == (windows is not None)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(g_fast) == set(g_plain) == trained  # every student / decoder parameter, no teacher
    assert not any(n.startswith("teacher.") for n in trained)
    for n in trained:
        assert _rel(g_fast[n], g_plain[n]) < 1e-5, n
        assert float(g_plain[n].abs().max()) > 0, n


def test_fast_path_on_triton_kernels(monkeypatch):
    """Every op of the fast path on its Triton kernel (interpreter on CPU), and no repeat_interleave anywhere.

    Stage 2 runs every op stage 1 runs, plus partial_max_mix and teacher B's targets."""
    windows = (16, 96)
    model = _model("sslam")
    cfg = model.cfg
    source, masks = _source(1, cfg), _masks(cfg.clones, cfg.num_patches, 9)
    plain, g_plain = _run(PLAIN, model, source, masks, windows, mask_noise_std=0.0)

    def boom(*a, **k):
        raise AssertionError("repeat_interleave in the fast path")

    monkeypatch.setattr(torch.Tensor, "repeat_interleave", boom)
    monkeypatch.setattr(torch, "repeat_interleave", boom)
    monkeypatch.setenv("SSLAM_FAST_BACKEND", "triton")
    fast, g_fast = _run(FAST, model, source, masks, windows, mask_noise_std=0.0)
    for key in fast:
        assert abs(float(fast[key]) - float(plain[key])) <= 1e-5 * abs(float(plain[key])), key
    for n in g_plain:
        assert _rel(g_fast[n], g_plain[n]) < 1e-5, n
    with pytest.raises(AssertionError, match="repeat_interleave"):  # the plain path is upstream's: it repeats
        refm.losses(model, source, masks, windows, mask_noise_std=0.0)


def test_sslam_patch_terms_write_one_gradient():
    """SSLAM's patch sum (all rows) and source-retention sum (the mixed rows) write pred's gradient once: autograd of
    ``masked_mse(pred[n:], ...)`` would fill a zero tensor of pred's size for the slice (``slice_backward``) and add
    it to the other term's. The sums and the gradient are bit for bit autograd's of the two separate calls, also when
    only one of the terms reaches the loss; in the model's step no slice gradient of pred is made either."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from sslam_fast.models.objectives import _patch_terms
    from sslam_fast.ops import masked_mse

    class Calls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(func)
            return func(*args, **(kwargs or {}))

    K, B, N, D = 4, 3, 16, 8
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(2 * B * K, N, D, generator=g, requires_grad=True)
    Y, t_srl = torch.randn(2 * B, N, D, generator=g), torch.randn(B, N, D, generator=g)
    masks = torch.rand(B * K, N, generator=g) < 0.8
    mask_all = torch.cat([masks, masks])
    patch, mix = _patch_terms(pred, Y, mask_all, t_srl, masks, K)
    want_patch = masked_mse(pred, Y, mask_all, clones=K)
    want_mix = masked_mse(pred[B * K:], t_srl, masks, clones=K)
    assert torch.equal(patch, want_patch) and torch.equal(mix, want_mix)
    for wp, wm in ((0.7, 1.3), (1.0, 0.0), (0.0, 1.0)):  # both terms, the patch term only, the mixed term only

        def total(p, m, wp=wp, wm=wm):  # a term of weight 0 stays out of the graph: its gradient is None, not zeros
            return (wp * p if wp else 0.0) + (wm * 2 * m if wm else 0.0)

        (want,) = torch.autograd.grad(total(want_patch, want_mix), pred, retain_graph=True)
        mode = Calls()
        with mode:
            (got,) = torch.autograd.grad(total(patch, mix), pred, retain_graph=True)
        assert torch.equal(got, want), (wp, wm)
        assert torch.ops.aten.slice_backward.default not in mode.seen, (wp, wm)
    model = _model("sslam")
    cfg = model.cfg
    source, masks = _source(2, cfg), _masks(2 * cfg.clones, cfg.num_patches, 9)
    out = model.losses(source, masks, (16, 96), mask_noise_std=0.0)
    mode = Calls()
    with mode:
        out["loss"].backward()
    assert torch.ops.aten.slice_backward.default not in mode.seen


def test_default_fast_path_makes_no_clone_copies(monkeypatch):
    """On the default backends (CPU: cpp / reference) the fast path never repeat-interleaves the clip batch."""

    def boom(*a, **k):
        raise AssertionError("repeat_interleave in the fast path")

    model = _model("sslam")
    cfg = model.cfg
    source, masks = _source(2, cfg), _masks(2 * cfg.clones, cfg.num_patches, 9)
    monkeypatch.setattr(torch.Tensor, "repeat_interleave", boom)
    monkeypatch.setattr(torch, "repeat_interleave", boom)
    monkeypatch.delenv("SSLAM_FAST_BACKEND", raising=False)
    out = model.losses(source, masks, (16, 96))
    out["loss"].backward()
    assert math.isfinite(float(out["loss"]))


def test_fast_path_under_torch_compile():
    """The whole fast step (stage 2: every op) through torch.compile with inductor on CPU: the custom ops' fake
    kernels must describe their outputs exactly (strides included), and the numbers must not move."""
    windows = (16, 96)
    model = _model("sslam")
    cfg = model.cfg
    source, masks = _source(2, cfg), _masks(2 * cfg.clones, cfg.num_patches, 9)
    eager, g_eager = _run(FAST, model, source, masks, windows, mask_noise_std=0.0)
    torch._dynamo.reset()
    compiled = torch.compile(lambda s, m: model.losses(s, m, windows, mask_noise_std=0.0))
    model.zero_grad(set_to_none=True)
    out = compiled(source, masks)
    out["loss"].backward()
    for key in eager:
        assert abs(float(out[key]) - float(eager[key])) <= 1e-5 * abs(float(eager[key])), key
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert _rel(p.grad, g_eager[n]) < 1e-5, n
    assert set(g_eager) == {n for n, p in model.named_parameters() if p.grad is not None}
    torch._dynamo.reset()


@pytest.mark.parametrize("losses", [FAST, PLAIN], ids=["fast", "plain"])
def test_mask_noise_changes_loss(losses):
    model = _model("eat")
    model.requires_grad_(False)  # values only
    cfg = model.cfg
    source, masks = _source(2, cfg), _masks(2 * cfg.clones, cfg.num_patches, 26)
    base = losses(model, source, masks, mask_noise_std=0.0)
    again = losses(model, source, masks, mask_noise_std=0.0)
    assert float(base["loss"]) == float(again["loss"])  # std 0: deterministic
    torch.manual_seed(1)
    n1 = losses(model, source, masks)  # cfg.mask_noise_std = 0.01
    torch.manual_seed(2)
    n2 = losses(model, source, masks, mask_noise_std=0.5)
    for out in (n1, n2):
        assert math.isfinite(float(out["loss"]))
        assert float(out["patch"]) != float(base["patch"])
        assert float(out["cls"]) == float(base["cls"])  # mask tokens only reach the decoder
    assert float(n1["patch"]) != float(n2["patch"])


def test_forward_is_losses_and_teacher_gets_no_grad():
    model = _model("sslam")
    cfg = model.cfg
    source, masks = _source(2, cfg), _masks(2 * cfg.clones, cfg.num_patches, 26)
    torch.manual_seed(5)
    out = model(source, masks, (32, 80))
    torch.manual_seed(5)
    ref = model.losses(source, masks, (32, 80))
    assert float(out["loss"].detach()) == float(ref["loss"].detach())
    out["loss"].backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert model.student.pos_embed.grad is None
    assert model.student.cls_token.grad is not None and model.decoder.proj.weight.grad is not None


# --- EMA ------------------------------------------------------------------------------------------------------------


def test_ema_decay_schedule():
    assert ema_decay(0) == pytest.approx(0.9998, abs=1e-12)
    assert ema_decay(50000) == pytest.approx(0.99999 - (0.99999 - 0.9998) * 0.5, abs=1e-12)
    assert ema_decay(100000) == ema_decay(400000) == 0.99999


def _student_moved(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("ema_step", [EMA_FAST, EMA_PLAIN], ids=["fast", "plain"])
def test_ema_step_update_and_guard(ema_step):
    model = _model("eat")
    _student_moved(model)
    before = {n: p.clone() for n, p in model.teacher.named_parameters()}
    # a fresh run: step 0 is skipped (num_updates >= n), step 1 updates
    assert ema_step(model, 0) is False and model.num_updates == 0
    assert ema_step(model, 1) is True and model.num_updates == 1
    d = ema_decay(1)
    s = dict(model.student.named_parameters())
    for n, p in model.teacher.named_parameters():
        want = s[n] if n == "pos_embed" else before[n] * d + s[n] * (1 - d)  # the frozen table is copied
        torch.testing.assert_close(p, want, rtol=1e-6, atol=1e-7)
    assert ema_step(model, 1) is False  # same update count again: skipped
    # resuming stage 2 from a checkpoint at 400k updates: step 0 skips and the schedule restarts (ALGORITHM §11.9)
    model.num_updates = 400000
    snap = [p.clone() for p in model.teacher.parameters()]
    assert ema_step(model, 0) is False and model.num_updates == 0
    assert all(torch.equal(a, b) for a, b in zip(snap, model.teacher.parameters()))
    assert ema_step(model, 1) is True
    # starting from num_updates == 0 with n > 1 (a resumed run's first step): skipped
    model.num_updates = 0
    assert ema_step(model, 7) is False and model.num_updates == 7
    model.eval()
    assert ema_step(model, 8) is False and model.num_updates == 8  # eval mode: no EMA


def test_ema_fast_equals_plain():
    a, b = _model("eat"), _model("eat")
    _student_moved(a)
    _student_moved(b)
    for n in (1, 2, 3):
        assert EMA_FAST(a, n) and EMA_PLAIN(b, n)
    for (na, pa), (nb, pb) in zip(a.teacher.named_parameters(), b.teacher.named_parameters()):
        assert na == nb
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-7)
        assert not pa.requires_grad


# --- validation -----------------------------------------------------------------------------------------------------


def test_bad_inputs_name_the_argument():
    model = _model("sslam")
    cfg = model.cfg
    N, R = cfg.num_patches, 2 * cfg.clones
    source, masks = _source(2, cfg), _masks(R, N, 26)
    with pytest.raises(ValueError, match="source"):
        model.losses(source[:, 0], masks, (16, 96))
    with pytest.raises(ValueError, match="source"):
        model.losses(source[..., :64], masks, (16, 96))
    with pytest.raises(ValueError, match="source"):
        model.losses(source[:, :, :250], masks, (16, 96))
    with pytest.raises(TypeError, match="source"):
        model.losses(source.double(), masks, (16, 96))
    with pytest.raises(ValueError, match="masks"):
        model.losses(source, masks[:-1], (16, 96))
    with pytest.raises(TypeError, match="masks"):
        model.losses(source, masks.float(), (16, 96))
    bad = masks.clone()
    bad[3, (~bad[3]).nonzero()[0, 0]] = True  # one row keeps one token fewer
    with pytest.raises(ValueError, match="masks"):
        model.losses(source, bad, (16, 96))
    for w in [(16, 208 + 16), (16, 32), (-16, 96), (8, 96), (16,), "ab", (16.0, 96)]:
        with pytest.raises(ValueError, match="mix_windows"):
            model.losses(source, masks, w)
    with pytest.raises(ValueError, match="mix_windows"):
        model.losses(source, masks, None)  # stage 2 needs windows
    with pytest.raises(ValueError, match="mix_windows"):
        _model("eat").losses(source, masks, (16, 96))  # stage 1 takes none
    with pytest.raises(ValueError, match="mask_noise_std"):
        model.losses(source, masks, (16, 96), mask_noise_std=-1.0)
    with pytest.raises(ValueError, match="fbank"):
        model.student.extract_features(torch.randn(1, 1, 24, 128))


# --- GPU ------------------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("windows", [None, (240, 528)], ids=["eat", "sslam"])
def test_cuda_base_fast_matches_plain(windows):
    """The real SSLAM shapes (1024 x 128 inputs, D 768, 12 blocks; B 4 x K 8 clones) in fp32 on the GPU."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    cfg = ModelConfig.base(stage="eat" if windows is None else "sslam", clones=8)
    model = PretrainingModel(cfg).cuda()
    B = 4
    source = torch.randn(B, 1, 1024, 128, device="cuda")
    masks = _masks(B * 8, 512, 102).cuda()
    fast, g_fast = _run(FAST, model, source, masks, windows, mask_noise_std=0.0)
    plain, g_plain = _run(PLAIN, model, source, masks, windows, mask_noise_std=0.0)
    for key in fast:
        assert abs(float(fast[key]) - float(plain[key])) <= 1e-4 * abs(float(plain[key])), key
    for n in g_plain:
        assert _rel(g_fast[n], g_plain[n]) < 1e-3, n
    assert float(fast["sample_size"]) == (1 if windows is None else 2) * B * 8 * 410
