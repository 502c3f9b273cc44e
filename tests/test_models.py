"""The EAT / SSLAM model (ALGORITHM §2-§5): layout, initialisation, formulas of the blocks, decoder and encoder, on
sslam_fast.ops and on the upstream-structured sslam_fast.reference.model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sslam_fast.models import AudioClassifier, CNNDecoder, EATEncoder, ModelConfig, PretrainingModel
from sslam_fast.models.encoder import sincos_pos_table
from sslam_fast.reference import model as refm


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


# --- layout and formulas ----------------------------------------------------------------------------------------------

CONTRACT_KEYS = {"patch_embed.weight", "patch_embed.bias", "pos_embed", "cls_token", "input_norm.weight",
                 "input_norm.bias"}
BLOCK_KEYS = {f"{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
              for p in ("weight", "bias")}


def test_tiny_layout_and_contract_names():
    cfg = ModelConfig.tiny()
    m = PretrainingModel(cfg)
    D, W = cfg.embed_dim, cfg.grid[1]
    keys = set(m.student.state_dict())
    want = CONTRACT_KEYS | {f"blocks.{i}.{k}" for i in range(cfg.depth) for k in BLOCK_KEYS}
    assert keys == want
    assert set(m.teacher.state_dict()) == want
    dec_keys = {f"blocks.{i}.0.{p}" for i in range(cfg.decoder_layers) for p in ("weight", "bias")}
    assert set(m.decoder.state_dict()) == dec_keys | {"proj.weight", "proj.bias"}
    sd = m.student.state_dict()
    assert sd["patch_embed.weight"].shape == (D, 1, 16, 16)
    assert sd["pos_embed"].shape == (1, cfg.max_time_patches * W, D)
    assert sd["cls_token"].shape == (1, 1, D)
    assert sd["blocks.0.attn.qkv.weight"].shape == (3 * D, D)
    assert sd["blocks.1.mlp.fc1.weight"].shape == (4 * D, D)
    assert m.decoder.state_dict()["blocks.0.0.weight"].shape == (D, D // cfg.decoder_groups, 3, 3)
    assert not m.student.pos_embed.requires_grad
    assert all(not p.requires_grad for p in m.teacher.parameters()) and not m.teacher.training
    m.train()
    assert m.student.training and not m.teacher.training
    assert m.num_updates == 0
    # the teacher starts as the student (make_target_model)
    for k, v in m.student.state_dict().items():
        assert torch.equal(v, m.teacher.state_dict()[k]), k
    # ALGORITHM §2.3 initialisation
    assert float(m.student.blocks[0].attn.qkv.bias.detach().abs().max()) == 0
    assert abs(float(m.student.blocks[0].mlp.fc1.weight.detach().std()) - 0.02) < 0.002
    assert float(m.student.cls_token.detach().std()) > 0.5  # N(0, 1)
    assert torch.equal(m.student.input_norm.weight, torch.ones(D))


def test_base_param_count():
    cfg = ModelConfig.base()
    with torch.device("meta"):
        parts = (EATEncoder(cfg), CNNDecoder(cfg))
    n = sum(p.numel() for part in parts for p in part.parameters() if p.requires_grad)
    assert 87e6 < n < 89e6  # "about 88M including the decoder" (ALGORITHM §2.1): 85.25M encoder + 2.59M decoder
    assert parts[0].pos_embed.is_meta


def test_pos_table_frequency_first():
    D, H, W = 32, 5, 3
    pos = sincos_pos_table(D, H, W)
    assert pos.shape == (H * W, D) and pos.dtype == torch.float32
    Q = D // 4
    for t in range(H):
        for f in range(W):
            n = W * t + f
            for k in range(Q):
                w = 10000 ** (-k / Q)
                want = (math.sin(f * w), math.cos(f * w), math.sin(t * w), math.cos(t * w))
                got = (pos[n, k], pos[n, Q + k], pos[n, 2 * Q + k], pos[n, 3 * Q + k])
                for g, e in zip(got, want):
                    assert abs(float(g) - e) < 1e-6
    # the model's table: 768 time patches of 8 frequency patches, patches only
    enc = EATEncoder(ModelConfig.tiny())
    assert torch.equal(enc.pos_embed[0], sincos_pos_table(64, 768, 8))


@pytest.mark.parametrize("run", [lambda blk, x: blk(x), refm.block], ids=["fast", "plain"])
def test_post_ln_block_formula(run):
    torch.manual_seed(0)
    enc = EATEncoder(ModelConfig.tiny())
    blk = enc.blocks[0]
    with torch.no_grad():
        for p in blk.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(3, 17, 64)
    out, t = run(blk, x)
    # hand-written: a = x + proj(attn(qkv(x))); r = LN1(a); f = fc2(gelu(fc1(r))); out = LN2(r + f)
    D, Hh = 64, 4
    qkv = x @ blk.attn.qkv.weight.T + blk.attn.qkv.bias
    q, k, v = qkv.split(D, dim=-1)
    heads = []
    for h in range(Hh):
        sl = slice(h * 16, (h + 1) * 16)
        s = q[..., sl] @ k[..., sl].transpose(1, 2) / 4.0
        heads.append(torch.softmax(s, -1) @ v[..., sl])
    a = x + torch.cat(heads, -1) @ blk.attn.proj.weight.T + blk.attn.proj.bias

    def ln(z, mod):
        mu = z.mean(-1, keepdim=True)
        var = ((z - mu) ** 2).mean(-1, keepdim=True)
        return (z - mu) / torch.sqrt(var + 1e-6) * mod.weight + mod.bias

    r = ln(a, blk.norm1)
    h1 = r @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias
    f = (0.5 * h1 * (1 + torch.erf(h1 / math.sqrt(2)))) @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias
    want = ln(r + f, blk.norm2)
    torch.testing.assert_close(t, f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_qkv_heads_are_upstreams_views_with_the_same_gradients():
    """q, k, v are the views upstream's ``permute(2, 0, 3, 1, 4)`` and ``qkv[i]`` give, and the gradients through them
    (the stacked backward of ``unbind``) are bit for bit those of the indexing form."""
    torch.manual_seed(0)
    attn = EATEncoder(ModelConfig.tiny()).blocks[0].attn
    x = torch.randn(3, 17, 64, requires_grad=True)
    grads = [torch.randn(3, 4, 17, 16) for _ in range(3)]

    def upstream(x):
        qkv = attn.qkv(x).reshape(3, 17, 3, 4, 16).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    got, want = attn.qkv_heads(x), upstream(x)
    for a, b in zip(got, want):
        assert torch.equal(a, b) and a.stride() == b.stride() and a.storage_offset() == b.storage_offset()
    params = [x, attn.qkv.weight, attn.qkv.bias]
    g_got = torch.autograd.grad(got, params, grads)
    g_want = torch.autograd.grad(want, params, grads)
    for a, b in zip(g_got, g_want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("R,H", [(1, 1), (3, 5), (2, 16)], ids=["R1-H1", "R3-H5", "R2-H16"])
def test_decoder_fast_plain_and_formula(R, H):
    torch.manual_seed(0)
    cfg = ModelConfig.tiny()
    dec = CNNDecoder(cfg)
    x = torch.randn(R, H * 8, 64, requires_grad=True)
    out_f = dec(x, (H, 8))
    out_p = refm.decoder(dec, x, (H, 8))
    z = x.detach().transpose(1, 2).reshape(R, 64, H, 8)
    for blk in dec.blocks:
        y = F.conv2d(z, blk[0].weight, blk[0].bias, padding=1, groups=4)
        mu = y.mean(1, keepdim=True)
        var = ((y - mu) ** 2).mean(1, keepdim=True)
        z = F.gelu((y - mu) / torch.sqrt(var + 1e-5)) + z
    want = z.reshape(R, 64, H * 8).transpose(1, 2) @ dec.proj.weight.T + dec.proj.bias
    torch.testing.assert_close(out_p, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_f, want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out_f)
    (gf,) = torch.autograd.grad(out_f, x, g)
    (gp,) = torch.autograd.grad(out_p, x, g)
    assert _rel(gf, gp) < 1e-5


@pytest.mark.parametrize("T", [16, 48, 272], ids=["T16", "T48", "T272"])
def test_extract_features_any_length(T):
    torch.manual_seed(0)
    cfg = ModelConfig.tiny()
    enc = EATEncoder(cfg)
    x = torch.randn(2, 1, T, 128)
    a = enc.extract_features(x)
    b = refm.extract_features(enc, x[:, 0])  # (B, T, 128) is accepted too
    assert a.shape == (2, 1 + T // 16 * 8, 64)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # CLS first, the positional table added to the patches only: the CLS row equals a CLS-only forward's
    ln = enc.input_norm(enc.cls_token.expand(2, 1, 64))
    patches = enc.patch_embed(x).flatten(2).transpose(1, 2) + enc.pos_embed[:, : T // 16 * 8]
    h = torch.cat([ln, enc.input_norm(patches)], 1)
    for blk in enc.blocks:
        h, _ = refm.block(blk, h)
    torch.testing.assert_close(a, h, rtol=1e-5, atol=1e-5)


def test_extract_features_base_1024_and_classifier():
    torch.manual_seed(0)
    cfg = ModelConfig.base(depth=1, average_top_k_layers=1)  # the real width and input length; one block keeps it cheap
    clf = AudioClassifier(cfg)
    x = torch.randn(1, 1, 1024, 128)
    with torch.no_grad():
        feats = clf.extract_features(x)
        logits = clf(x)
    assert feats.shape == (1, 513, 768)
    assert logits.shape == (1, 527)
    torch.testing.assert_close(logits, clf.head(clf.fc_norm(feats[:, 0])))
    assert set(clf.state_dict()) >= {"encoder.pos_embed", "fc_norm.weight", "head.weight", "head.bias"}
    assert clf.fc_norm.eps == 1e-6
