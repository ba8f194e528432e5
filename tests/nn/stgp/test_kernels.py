"""Fused STGP layers equal the plain-op formulations they replace (outputs and gradients)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from stgray.nn.stgp import STGPModel, STGPModelConfig, STGraph
from stgray.nn.stgp.decoder import GatedSTLayer
from stgray.nn.stgp.encoder import EncoderLayer, FastDropout
from stgray.nn.stgp.kernels import (BiasedAttention, DropoutAdd, GatedMix, GeluLinear, Linear, LNLinear, ReluMLP,
                                   mm_dw, softmax_)
from stgray.nn.stgp import kernels as K
from .test_model import ring_adj


def _leaves(*shapes, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in shapes]


def _grads(out, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out.shape, generator=g).to(out.dtype)
    return torch.autograd.grad((out * w).sum(), inputs, allow_unused=True)


def _same(fused, plain, inputs, rtol=1e-5, atol=1e-5):
    torch.testing.assert_close(fused, plain, rtol=rtol, atol=atol)
    for a, b in zip(_grads(fused, inputs), _grads(plain, inputs)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("onednn", [False, True])  # MKL's products / oneDNN's (MKL stuck on AVX2)
def test_linear_kernels_match_plain_ops(onednn, monkeypatch):
    if onednn and not K._probe_onednn():
        pytest.skip("this torch build has no oneDNN linear")
    monkeypatch.setattr(K, "_ONEDNN", onednn)
    x, lw, lb, w, b = _leaves((3, 7, 16), (16,), (16,), (24, 16), (24,))
    _same(LNLinear.apply(x, lw, lb, 1e-5, w, b), F.linear(F.layer_norm(x, (16,), lw, lb, 1e-5), w, b),
          [x, lw, lb, w, b])
    u, w2, b2 = _leaves((3, 7, 24), (16, 24), (16,), seed=2)
    _same(GeluLinear.apply(u, w2, b2), F.linear(F.gelu(u), w2, b2), [u, w2, b2])
    _same(Linear.apply(x, w, b), F.linear(x, w, b), [x, w, b])
    # frozen weights: only the input gradient
    xf = x.detach().requires_grad_()
    (gx,) = torch.autograd.grad(LNLinear.apply(xf, lw.detach(), lb.detach(), 1e-5, w.detach(), b.detach()).sum(),
                                [xf])
    (gx2,) = torch.autograd.grad(F.linear(F.layer_norm(xf, (16,), lw, lb, 1e-5), w, b).sum(), [xf])
    torch.testing.assert_close(gx, gx2, rtol=1e-5, atol=1e-5)


def test_dropout_add_matches_plain_ops():
    x, y = _leaves((30, 8), (30, 8))
    keep = torch.rand(30, 8, generator=torch.Generator().manual_seed(2)) > 0.3
    _same(DropoutAdd.apply(x, y, keep), x + y * keep, [x, y])


def _plain_attention(q, k, v, bias):
    s, h, n, dh = q.shape
    if bias.dim() == 5:
        g = bias.shape[0]
        q, k, v = (t.reshape(g, s // g, h, n, dh) for t in (q, k, v))
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh) + bias, dim=-1)
    return (p @ v).reshape(s, h, n, dh)


@pytest.mark.parametrize("keep", [True, False])  # probabilities kept / recomputed
@pytest.mark.parametrize("kind", ["grouped", "shared", "per_set_padded"])
def test_biased_attention_matches_plain_ops(kind, keep, monkeypatch):
    S, H, L, dh = 6, 2, 5, 4
    monkeypatch.setattr(BiasedAttention, "KEEP_PROBS_BYTES", 1 << 20 if keep else 0)
    q, k, v = _leaves((S, H, L, dh), (S, H, L, dh), (S, H, L, dh))
    shape = {"grouped": (3, 1, H, L, L), "shared": (1, H, L, L), "per_set_padded": (S, H, L, L)}[kind]
    (bias,) = _leaves(shape, seed=3)
    if kind == "per_set_padded":  # the last key of every other set is padding
        pad = torch.zeros(S, 1, 1, L)
        pad[::2, ..., -1] = -math.inf
        bias_in = bias + pad
    else:
        bias_in = bias
    _same(BiasedAttention.apply(_packed(q, k, v), bias_in), _plain_attention(q, k, v, bias_in), [q, k, v, bias])


def _packed(q, k, v):
    """(S, H, L, dh) x 3 -> the projection's layout (S, L, 3, H, dh)."""
    return torch.stack([q, k, v]).permute(1, 3, 0, 2, 4)


@pytest.mark.parametrize("keep", [True, False])
def test_attention_without_bias_matches_sdpa(keep, monkeypatch):
    monkeypatch.setattr(BiasedAttention, "KEEP_PROBS_BYTES", 1 << 20 if keep else 0)
    q, k, v = _leaves((6, 2, 5, 4), (6, 2, 5, 4), (6, 2, 5, 4))
    _same(BiasedAttention.apply(_packed(q, k, v), None), F.scaled_dot_product_attention(q, k, v), [q, k, v])


def test_biased_attention_bf16_close_to_fp32():
    q, k, v = _leaves((4, 2, 6, 8), (4, 2, 6, 8), (4, 2, 6, 8))
    (bias,) = _leaves((2, 1, 2, 6, 6), seed=4)
    ref = _plain_attention(q, k, v, bias)
    lo = [t.detach().bfloat16().requires_grad_() for t in (q, k, v, bias)]
    out = BiasedAttention.apply(_packed(*lo[:3]), lo[3])
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)
    for a, b in zip(_grads(out.float(), lo), _grads(ref, [q, k, v, bias])):
        torch.testing.assert_close(a.float(), b, rtol=0.1, atol=0.1)


@pytest.mark.parametrize("dropout", [False, True])
def test_gated_mix_matches_plain_ops(dropout):
    tp, sp, wt, bt, ws = _leaves((40, 8), (40, 8), (8, 8), (8,), (8, 8))
    keep = torch.rand(40, 8, generator=torch.Generator().manual_seed(5)) > 0.3 if dropout else None
    t, s = F.gelu(tp), F.gelu(sp)
    g = torch.sigmoid(F.linear(t, wt, bt) + F.linear(s, ws))
    plain = g * s + (1 - g) * t
    if keep is not None:
        plain = plain * keep
    _same(GatedMix.apply(tp, sp, wt, bt, ws, keep), plain, [tp, sp, wt, bt, ws])


def _plain_gcn(layer: GatedSTLayer, x, graph: STGraph):
    """Linear([x, S1 x, .., S1^K x, S2 x, .., S2^K x]) with dense supports."""
    hs = [x]
    for s in graph.supports:
        s = s.to_dense() if s.layout != torch.strided else s
        h = x
        for _ in range(layer.order):
            h = torch.einsum("ij,j...->i...", s, h)
            hs.append(h)
    return F.linear(torch.cat(hs, -1), layer.gcn.weight, layer.gcn.bias).reshape(-1, layer.channels)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("density", [0.0, 1.0])  # dense / sparse supports
def test_graph_conv_matches_concatenated_linear(density, order):
    torch.manual_seed(0)
    layer = GatedSTLayer(8, 6, dilation=1, kernel_size=3, order=order, num_supports=2, dropout=0.0)
    graph = STGraph.from_adj(ring_adj(7, back=3), sparse_density=density)
    assert graph.sparse == (density == 1.0)
    (x,) = _leaves((7, 2, 5, 8))
    params = [x, layer.gcn.weight, layer.gcn.bias]
    _same(layer.spatial(x, graph), _plain_gcn(layer, x, graph), params, rtol=1e-5, atol=1e-5)
    # frozen layer (task prompting): the input gradient alone
    layer.requires_grad_(False)
    (gx,) = torch.autograd.grad(layer.spatial(x, graph).square().sum(), [x])
    (ref,) = torch.autograd.grad(_plain_gcn(layer, x, graph).square().sum(), [x])
    torch.testing.assert_close(gx, ref, rtol=1e-5, atol=1e-5)


def test_graph_conv_bf16_uses_dense_copy_of_sparse_graph():
    torch.manual_seed(0)
    layer = GatedSTLayer(8, 6, dilation=1, kernel_size=3, order=2, num_supports=2, dropout=0.0)
    graph = STGraph.from_adj(ring_adj(7, back=3), sparse_density=1.0)
    assert graph.sparse and graph.dense
    assert all(op.layout == torch.strided for op, _ in graph.diffusion_ops(torch.bfloat16))
    assert all(op.layout == torch.sparse_csr for op, _ in graph.diffusion_ops())
    (x,) = _leaves((7, 2, 5, 8))
    out = layer.spatial(x.bfloat16(), graph)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), _plain_gcn(layer, x, graph), rtol=0.05, atol=0.05)


def _plain_layer(layer: GatedSTLayer, x, graph, skip):
    """The decoder layer in plain ops (no dropout)."""
    N, B, P, C = x.shape
    k, dil = layer.kernel_size, layer.dilation
    total = (k - 1) * dil
    xt = x.permute(0, 1, 3, 2).reshape(N * B, C, P)
    t = F.conv1d(F.pad(xt, (total // 2, total - total // 2)), layer.tcn.weight[:, :, 0], layer.tcn.bias,
                 dilation=dil)
    t = F.gelu(t.reshape(N, B, C, P).permute(0, 1, 3, 2).reshape(-1, C))
    s = F.gelu(_plain_gcn(layer, x, graph))
    g = torch.sigmoid(layer.gate_t(t) + layer.gate_s(s))
    h = g * s + (1 - g) * t
    skip = skip + F.linear(h, layer.skip.weight)
    if layer.norm is None:
        return x, skip
    return layer.norm(x + h.view(x.shape)), skip


@pytest.mark.parametrize("dilation", [1, 2])
def test_decoder_layer_matches_plain_ops(dilation):
    torch.manual_seed(0)
    layer = GatedSTLayer(8, 6, dilation=dilation, kernel_size=3, order=2, num_supports=2, dropout=0.0)
    graph = STGraph.from_adj(ring_adj(7, back=3))
    x, skip = _leaves((7, 2, 5, 8), (70, 6))
    fx, fs = layer(x, graph, skip)
    px, ps = _plain_layer(layer, x, graph, skip)
    params = [x, skip] + list(layer.parameters())
    _same(torch.cat([fx.reshape(-1), fs.reshape(-1)]), torch.cat([px.reshape(-1), ps.reshape(-1)]), params)


def _plain_encoder_layer(layer: EncoderLayer, x, mask=None):
    s, n, d = x.shape
    h = layer.num_heads
    q, k, v = layer.qkv(layer.norm1(x)).view(s, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
    if mask is None:
        a = _plain_attention(q, k, v, torch.zeros(1, 1, 1, 1))
    else:
        a = _plain_attention(q, k, v, mask)
    x = x + layer.proj(a.transpose(1, 2).reshape(s, n, d))
    return x + layer.ff2(F.gelu(layer.ff1(layer.norm2(x))))


@pytest.mark.parametrize("bias", [None, "frozen", "trained"])
def test_encoder_layer_matches_plain_transformer(bias):
    torch.manual_seed(0)
    layer = EncoderLayer(16, 2, 24, dropout=0.0).train()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    (x,) = _leaves((6, 5, 16))
    mask = None
    if bias is not None:
        (mask,) = _leaves((3, 1, 2, 5, 5), seed=7)
        mask.requires_grad_(bias == "trained")
    params = [x] + list(layer.parameters()) + ([mask] if bias == "trained" else [])
    _same(layer(x, mask), _plain_encoder_layer(layer, x, mask), params, rtol=1e-4, atol=1e-5)


def test_relu_mlp_matches_plain_ops():
    x, w1, b1, w2, b2 = _leaves((50, 6), (12, 6), (12,), (4, 12), (4,))
    _same(ReluMLP.apply(x, w1, b1, w2, b2), F.linear(F.relu(F.linear(F.relu(x), w1, b1)), w2, b2),
          [x, w1, b1, w2, b2])


def test_fast_dropout_rate_scale_and_folding():
    d = FastDropout(0.1).train()
    x = torch.ones(1000, 64)
    keep = d.keep_mask(x)
    assert keep.dtype == torch.bool and keep.shape == x.shape
    assert abs(keep.float().mean().item() - (1 - 26 / 256)) < 0.01
    assert abs(d(x).mean().item() - 1.0) < 0.02
    assert d.keep_mask(torch.ones(3, 5)).shape == (3, 5)  # sizes that are not a multiple of 8 bytes
    torch.manual_seed(3)
    a, b = d.keep_mask(x), d.keep_mask(x)
    torch.manual_seed(3)
    assert torch.equal(d.keep_mask(x), a) and not torch.equal(a, b)  # torch's seed fixes the draws
    assert abs((a ^ b).float().mean().item() - 2 * (26 / 256) * (1 - 26 / 256)) < 0.01  # independent draws
    assert FastDropout(0.1).eval().keep_mask(x) is None and FastDropout(0.0).train().keep_mask(x) is None
    # the encoder layer folds the scale into the weights and the mask into the residual add:
    # x + dropout(linear(a))
    layer = EncoderLayer(16, 2, 24, dropout=0.1).train()
    a = torch.randn(4, 5, 16)
    x0 = torch.randn(4, 5, 16)
    torch.manual_seed(3)
    got = layer._residual(x0, Linear, layer.proj, a, torch.float32) - x0
    torch.manual_seed(3)
    keep = layer.drop.keep_mask(got)
    torch.testing.assert_close(got, layer.proj(a) * keep * layer.drop.scale, rtol=1e-5, atol=1e-6)


def test_prompted_input_matches_prompt_then_input():
    cfg = STGPModelConfig(patch_len=4, num_patches=5, steps_per_day=24, d_model=16, num_heads=2, ffn_dim=32,
                          temporal_depth=1, spatial_depth=1, decoder_channels=8, decoder_blocks=1,
                          decoder_dilations=(1,), skip_channels=8, head_hidden=16, task_prompts=3,
                          prompt_init_std=0.5)
    dec = STGPModel(cfg).decoder
    tokens = torch.randn(2, 6, 5, 16)
    mask = torch.rand(2, 6, 5, generator=torch.Generator().manual_seed(0)) < 0.4
    for masked_on, observed_on in [(False, False), (True, True), (True, False), (False, True)]:
        dec.task_masked.active, dec.task_observed.active = masked_on, observed_on
        s = torch.sigmoid(tokens @ dec.task_masked.prompts.t())
        assert (s < 0.2).any() and (s >= 0.2).any()  # the threshold matters here
        tk = tokens.clone().requires_grad_()
        want = dec.input(dec.prompt(tk, mask))
        got = dec.prompted_input(tk, mask)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        params = [tk, dec.input.weight] + [p for p in (dec.task_masked.prompts, dec.task_observed.prompts)]
        for a, b in zip(_grads(got, params), _grads(want, params)):
            if a is None or b is None:
                assert (a is None or not a.abs().sum()) and (b is None or not b.abs().sum())
            else:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_weight_gradient_product_of_tall_thin_inputs():
    g, x = torch.randn(10001, 32, dtype=torch.float64), torch.randn(10001, 24, dtype=torch.float64)
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):  # blocks of rows per thread (and a remainder for 2 of them)
            torch.set_num_threads(t)
            torch.testing.assert_close(mm_dw(g.float(), x.float()).double(), g.t() @ x, rtol=1e-4, atol=1e-3)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("n", [5, 13, 40])
def test_softmax_in_place_matches_torch(n):
    x = torch.randn(30, 3, n) * 4
    x[0, 0, : n // 2] = -math.inf  # masked keys
    torch.testing.assert_close(softmax_(x.clone()), torch.softmax(x, -1))
