"""STGP model: graph bias, visible-cell encoder, decoder, stages and freezing, loss, size."""

from __future__ import annotations

import copy
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stgray.nn.stgp import (PatchTemplate, STGPModel, STGPModelConfig, STGraph, count_parameters,
                            masked_mae)


def tiny_cfg(**kw) -> STGPModelConfig:
    base = dict(patch_len=4, num_patches=5, steps_per_day=24, d_model=16, num_heads=2, ffn_dim=32,
                temporal_depth=2, spatial_depth=2, dropout=0.0, max_degree=8, decoder_channels=8,
                decoder_blocks=1, decoder_dilations=(1, 2), skip_channels=8, head_hidden=16,
                domain_prompts=3, task_prompts=3)
    base.update(kw)
    return STGPModelConfig(**base)


def ring_adj(n: int, seed: int = 0, back: int = 2) -> torch.Tensor:
    """(n, n) weighted ring: edges i -> i+1 and i+back -> i, weights in [0.2, 1.2)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.zeros(n, n)
    for i in range(n):
        a[i, (i + 1) % n] = 0.2 + torch.rand(1, generator=g).item()
        a[(i + back) % n, i] = 0.2 + torch.rand(1, generator=g).item()
    return a


def inputs(B=2, N=6, P=5, L=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = P * L
    x = torch.randn(B, N, T, generator=g)
    tod = (torch.arange(T)[None] + torch.tensor([[0], [7]])[:B]) % 24
    dow = torch.full((B, T), 3, dtype=torch.long)
    return x, tod, dow


def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every parameter (zero-initialised biases, mask token, ...) a non-trivial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def random_mask(B, N, P, p=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(B, N, P, generator=g) < p
    m[:, 0, 0] = False  # at least one visible cell
    return m


# --- graph ------------------------------------------------------------------------------

def test_graphormer_bias_from_weighted_adjacency():
    m = STGPModel(tiny_cfg())
    randomise(m)
    gb = m.encoder.graph_bias
    a = ring_adj(6)
    g = STGraph.from_adj(a)
    bias = gb.bias(g)
    H = m.cfg.num_heads
    assert bias.shape == (H, 6, 6)
    top = a.max()
    # an edge: per-head linear function of the normalised weight
    torch.testing.assert_close(bias[:, 0, 1], gb.edge_scale * a[0, 1] / top + gb.edge_bias)
    # a zero-weight pair: the no-edge bias; the diagonal: the self bias
    assert a[0, 3] == 0
    assert torch.equal(bias[:, 0, 3], gb.no_edge_bias)
    assert torch.equal(bias[:, 2, 2], gb.self_bias)
    # changing one (non-maximal) edge weight changes exactly that pair's entries
    i, j = 0, 1
    assert a[i, j] < top
    b2 = a.clone()
    b2[i, j] = a[i, j] * 0.5
    diff = (gb.bias(STGraph.from_adj(b2)) != bias).any(0)
    expect = torch.zeros(6, 6, dtype=torch.bool)
    expect[i, j] = True
    assert torch.equal(diff, expect)
    # a self-loop in the adjacency is not an edge
    b3 = a.clone()
    b3[4, 4] = 5.0
    assert torch.equal(gb.bias(STGraph.from_adj(b3)), bias)
    # at given node pairs (sets of nodes, as the spatial branch asks): the same entries
    idx = torch.tensor([[3, 0, 2], [5, 5, 1]])
    assert torch.equal(gb.bias(g, idx[:, :, None], idx[:, None, :]), bias[:, idx[:, :, None], idx[:, None, :]])


def test_degrees_beyond_the_table_and_odd_weights_do_not_crash():
    cfg = tiny_cfg(max_degree=4)
    m = STGPModel(cfg).eval()
    N = 12
    star = torch.zeros(N, N)
    star[0, 1:] = 1.0
    star[1:, 0] = 2.0
    g = STGraph.from_adj(star, max_degree=4)
    assert int(g.out_degree[0]) == 3 and int(g.in_degree[0]) == 3  # 11 clipped to table size - 1
    x, tod, dow = inputs(N=N)
    mask = random_mask(2, N, 5)
    for adj in (star, star * 1000.0, star - 0.5, torch.where(star > 0, torch.nan, 0.0)):
        out = m(x, tod, dow, adj, mask)
        assert torch.isfinite(out).all()
    g = STGraph.from_adj(star * 1000.0)
    assert float(g.weight.max()) == 1.0 and float(g.weight.min()) == 0.0


def test_dense_and_sparse_supports_agree():
    cfg = tiny_cfg()
    m = STGPModel(cfg).eval()
    randomise(m)
    a = ring_adj(6)
    gd = STGraph.from_adj(a, sparse_density=0.0)
    gs = STGraph.from_adj(a, sparse_density=1.0)
    assert not gd.sparse and gs.sparse
    x, tod, dow = inputs()
    mask = random_mask(2, 6, 5)
    xd = x.clone().requires_grad_()
    xs = x.clone().requires_grad_()
    tok = m.encode(x, tod, dow, gd, mask)
    td, ts = tok.detach().clone().requires_grad_(), tok.detach().clone().requires_grad_()
    rd, rs = m.decode(td, mask, gd), m.decode(ts, mask, gs)
    torch.testing.assert_close(rd, rs, rtol=1e-5, atol=1e-5)
    rd.square().sum().backward()
    rs.square().sum().backward()
    torch.testing.assert_close(td.grad, ts.grad, rtol=1e-4, atol=1e-5)
    del xd, xs


# --- encoder ----------------------------------------------------------------------------

def reference_encode(enc, x, tod, dow, graph, mask):
    """The encoder written cell by cell: one sequence / set at a time, no packing."""
    B, N, T = x.shape
    L, d = enc.cfg.patch_len, enc.cfg.d_model
    P = T // L
    time_e = enc.time_embedding(tod, dow, P)
    e = F.linear(x.view(B, N, P, L), enc.patch_embed.weight.view(d, L), enc.patch_embed.bias)
    deg = enc.graph_bias.degree_embedding(graph)
    bias = enc.graph_bias.bias(graph)
    t_out = torch.zeros(B, N, P, d)
    s_out = torch.zeros(B, N, P, d)
    for b in range(B):
        for n in range(N):
            vis = (~mask[b, n]).nonzero().squeeze(1)
            if len(vis):
                h = enc.domain_temporal((e[b, n, vis] + enc.pos_embed[vis] + time_e[b, vis])[None])
                for layer in enc.temporal:
                    h = layer(h)
                t_out[b, n, vis] = enc.temporal_norm(h)[0]
        for p in range(P):
            vis = (~mask[b, :, p]).nonzero().squeeze(1)
            if len(vis):
                h = enc.domain_spatial((e[b, vis, p] + deg[vis] + time_e[b, p])[None])
                am = bias[:, vis][:, :, vis][None]
                for layer in enc.spatial:
                    h = layer(h, am)
                s_out[b, vis, p] = enc.spatial_norm(h)[0]
    gate = torch.sigmoid(enc.gate(torch.cat([t_out, s_out], -1)))
    fused = gate * t_out + (1 - gate) * s_out
    base = (enc.mask_token + enc.pos_embed[:P])[None] + time_e
    return torch.where(mask[..., None], base[:, None], fused)


@pytest.mark.parametrize("kind", ["random", "pretrain", "kriging", "forecast"])
def test_packed_encoder_matches_cell_by_cell_reference(kind):
    m = STGPModel(tiny_cfg()).eval()
    randomise(m)
    m.set_prompts(domain=True)
    B, N, P = 2, 6, 5
    tpl = PatchTemplate(patch_len=4, num_patches=P)
    mask = {"random": random_mask(B, N, P, seed=1),
            "pretrain": tpl.pretrain_mask(B, N, generator=torch.Generator().manual_seed(1)),
            "kriging": tpl.kriging_mask(B, N, [1, 4]),
            "forecast": tpl.forecast_mask(B, N)}[kind]
    x, tod, dow = inputs()
    g = STGraph.from_adj(ring_adj(N))
    with torch.no_grad():  # frozen bias: SDPA kernels
        got = m.encode(x, tod, dow, g, mask)
        want = reference_encode(m.encoder, x, tod, dow, g, mask)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # with a trainable bias the spatial attention runs on plain ops: same result
    torch.testing.assert_close(m.encode(x, tod, dow, g, mask).detach(), got, rtol=1e-4, atol=1e-5)


def test_spatial_bias_is_shared_across_sets_with_the_same_nodes():
    from stgray.nn.stgp.encoder import _packing

    m = STGPModel(tiny_cfg())
    tpl = PatchTemplate(patch_len=4, num_patches=5)
    g = STGraph.from_adj(ring_adj(6))
    pre = tpl.pretrain_mask(2, 6, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(pre[0].all(-1), pre[1].all(-1))  # different masked nodes per sample
    shapes = {}
    for name, mask in {"forecast": tpl.forecast_mask(2, 6), "pretrain": pre,
                       "random": random_mask(2, 6, 5, seed=1)}.items():
        B, N, P = mask.shape
        cells = (~mask).reshape(-1).nonzero().squeeze(1)
        b, n, p = cells // (N * P), (cells // P) % N, cells % P
        key = (b * P + p) * N + n
        order = torch.argsort(key)
        shapes[name] = tuple(m.encoder._spatial_mask(g, _packing(key[order] // N, order), n[order], P).shape)
    assert shapes["forecast"] == (1, 2, 6, 6)  # one bias for every set
    assert shapes["pretrain"] == (2, 1, 2, 3, 3)  # one per sample
    assert shapes["random"][0] == 10  # one per set (2 samples x 5 patches), padded


def test_masked_values_never_influence_outputs():
    m = STGPModel(tiny_cfg()).eval()
    randomise(m)
    x, tod, dow = inputs()
    adj = ring_adj(6)
    for mask in (random_mask(2, 6, 5, seed=2), PatchTemplate(4, 5).kriging_mask(2, 6, [0, 3])):
        steps = mask.repeat_interleave(4, -1)
        x2 = torch.where(steps, torch.randn_like(x) * 100, x)
        x3 = torch.where(steps, torch.full_like(x, float("nan")), x)
        with torch.no_grad():
            t1 = m.encode(x, tod, dow, adj, mask)
            t2 = m.encode(x2, tod, dow, adj, mask)
            r1, r3 = m(x, tod, dow, adj, mask), m(x3, tod, dow, adj, mask)
        assert torch.equal(t1, t2)
        assert torch.equal(r1, r3) and torch.isfinite(r3).all()
    # ... and the visible values do matter
    mask = random_mask(2, 6, 5, seed=2)
    x4 = torch.where(mask.repeat_interleave(4, -1), x, x + 1)
    with torch.no_grad():
        assert not torch.equal(m.encode(x4, tod, dow, adj, mask), m.encode(x, tod, dow, adj, mask))
    # gradients stay finite with NaN in masked cells
    m.train()
    x5 = torch.where(mask.repeat_interleave(4, -1), torch.full_like(x, float("nan")), x)
    r = m(x5, tod, dow, adj, mask)
    masked_mae(r, x, mask).backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_encode_decode_equals_forward_and_shapes():
    m = STGPModel(tiny_cfg()).eval()
    x, tod, dow = inputs()
    adj = ring_adj(6)
    mask = random_mask(2, 6, 5)
    with torch.no_grad():
        tok = m.encode(x, tod, dow, adj, mask)
        assert tok.shape == (2, 6, 5, 16)
        r = m.decode(tok, mask, adj)
        assert r.shape == x.shape
        assert torch.equal(r, m(x, tod, dow, m.graph(adj), mask))
    # training (dropout on): forward skips the (B, N, P, d) tokens, same values and gradients
    m.train()
    grads = []
    for run in (lambda: m(x, tod, dow, adj, mask), lambda: m.decode(m.encode(x, tod, dow, adj, mask), mask, adj)):
        m.zero_grad()
        torch.manual_seed(3)
        masked_mae(run(), x, mask).backward()
        grads.append({k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "decoder.input.weight" in grads[0]
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-5, atol=1e-6)


def test_forecast_window_of_three_patches():
    """12 in + 6 out, patch 6: three patches, dilations 1, 2, 4 larger than the patch axis."""
    cfg = tiny_cfg(patch_len=6, num_patches=3, decoder_dilations=(1, 2, 4), decoder_blocks=2)
    m = STGPModel(cfg)
    tpl = PatchTemplate.for_forecast(12, 6, patch_len=6)
    B, N = 3, 5
    x = torch.randn(B, N, 18)
    tod = torch.arange(18)[None].repeat(B, 1) % 24
    dow = torch.zeros(B, 18, dtype=torch.long)
    mask, score = tpl.task_masks("forecast", B, N)
    r = m(x, tod, dow, ring_adj(N), mask)
    assert r.shape == (B, N, 18)
    masked_mae(r, x, score).backward()


def test_input_validation():
    m = STGPModel(tiny_cfg())
    x, tod, dow = inputs()
    adj = ring_adj(6)
    with pytest.raises(ValueError, match="mask"):
        m(x, tod, dow, adj, torch.zeros(2, 6, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="patch_len"):
        m(x[..., :-1], tod[:, :-1], dow[:, :-1], adj, torch.zeros(2, 6, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="nodes"):
        m(x, tod, dow, ring_adj(7), torch.zeros(2, 6, 5, dtype=torch.bool))
    with pytest.raises(ValueError):
        STGPModelConfig(d_model=10, num_heads=4)


def test_bf16_autocast_runs():
    m = STGPModel(tiny_cfg())
    x, tod, dow = inputs()
    mask = random_mask(2, 6, 5)
    for density in (0.0, 1.0):  # dense and sparse supports
        adj = STGraph.from_adj(ring_adj(6), sparse_density=density)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            r = m(x, tod, dow, adj, mask)
        masked_mae(r.float(), x, mask).backward()
        assert torch.isfinite(r.float()).all()
    # bf16: bf16 Transformer layers (padded and unpadded packs), fp32 elsewhere
    m32 = STGPModel(tiny_cfg()).eval()
    randomise(m32)
    m16 = STGPModel(tiny_cfg(bf16=True)).eval()
    m16.load_state_dict(m32.state_dict())
    adj = ring_adj(6)
    with torch.no_grad():
        a, b = m32.encode(x, tod, dow, adj, mask), m16.encode(x, tod, dow, adj, mask)
        ra, rb = m32(x, tod, dow, adj, mask), m16(x, tod, dow, adj, mask)
    assert a.dtype == b.dtype == rb.dtype == torch.float32
    torch.testing.assert_close(b, a, rtol=0.05, atol=0.05)
    torch.testing.assert_close(rb, ra, rtol=0.05, atol=0.05)
    m16.train()
    masked_mae(m16(x, tod, dow, adj, mask), x, mask).backward()
    assert all(torch.isfinite(p.grad).all() for p in m16.parameters() if p.grad is not None)


# --- stages -----------------------------------------------------------------------------

PROMPT_PREFIXES = ("encoder.domain_temporal.", "encoder.domain_spatial.",
                   "decoder.task_observed.", "decoder.task_masked.")


def test_parameters_for_each_stage():
    m = STGPModel(tiny_cfg())
    names = {n for n, _ in m.named_parameters()}
    prompts = {n for n in names if n.startswith(PROMPT_PREFIXES)}
    head = {n for n in names if n.startswith("decoder.head.")}
    by_stage = {s: {n for n, _ in m.named_parameters_for(s)} for s in
                ("pretrain", "domain", "task", "task_extrapolation", "finetune")}
    assert len(prompts) == 4 and head
    assert by_stage["pretrain"] == by_stage["finetune"] == names - prompts
    assert by_stage["domain"] == {"encoder.domain_temporal.prompts", "encoder.domain_spatial.prompts"}
    assert by_stage["task"] == {"decoder.task_observed.prompts", "decoder.task_masked.prompts"}
    assert by_stage["task_extrapolation"] == by_stage["task"] | head
    with pytest.raises(ValueError, match="unknown stage"):
        m.parameters_for("warmup")
    # banks disabled by K=0 contribute nothing
    m0 = STGPModel(tiny_cfg(domain_prompts=0, task_prompts=None))
    assert m0.parameters_for("domain") == [] and m0.parameters_for("task") == []


def _one_step(m: STGPModel, stage: str, mask=None, steps: int = 2):
    m.set_stage(stage)
    m.train()
    opt = torch.optim.Adam(m.parameters_for(stage), lr=1e-2, weight_decay=1e-2)
    x, tod, dow = inputs()
    adj = ring_adj(6)
    mask = random_mask(2, 6, 5) if mask is None else mask
    for _ in range(steps):
        opt.zero_grad()
        loss = masked_mae(m(x, tod, dow, adj, mask), x, mask)
        loss.backward()
        opt.step()


@pytest.mark.parametrize("stage", ["domain", "task", "task_extrapolation"])
def test_prompt_stage_step_changes_only_its_parameters(stage):
    torch.manual_seed(0)
    m = STGPModel(tiny_cfg(dropout=0.3))
    randomise(m)
    m.set_stage("domain")  # task stages run after a domain stage: domain banks are on
    before = copy.deepcopy(m.state_dict())
    _one_step(m, stage)
    trained = {n for n, _ in m.named_parameters_for(stage)}
    after = m.state_dict()
    params = dict(m.named_parameters())
    for name in params:
        if name in trained:
            assert not torch.equal(before[name], after[name]), f"{name} did not train"
        else:
            assert torch.equal(before[name], after[name]), f"{name} changed in stage {stage}"
            assert params[name].grad is None, f"{name} accumulated a gradient"


def test_pretrain_step_leaves_prompts_alone():
    m = STGPModel(tiny_cfg())
    randomise(m)
    before = copy.deepcopy(m.state_dict())
    _one_step(m, "pretrain", steps=1)
    for name, p in m.named_parameters():
        assert torch.equal(before[name], p.detach()) == name.startswith(PROMPT_PREFIXES), name


def test_frozen_modules_stay_in_eval_mode_and_frozen_encoder_is_deterministic():
    m = STGPModel(tiny_cfg(dropout=0.5))
    x, tod, dow = inputs()
    adj = ring_adj(6)
    mask = random_mask(2, 6, 5)

    m.set_stage("domain").train()
    assert m.training and m.encoder.training and m.encoder.domain_temporal.training
    assert not m.decoder.training and not any(l.training for l in m.encoder.temporal)
    assert not any(mod.training for mod in m.encoder.temporal.modules())  # dropout included
    a = m.encode(x, tod, dow, adj, mask)
    b = m.encode(x, tod, dow, adj, mask)
    assert torch.equal(a, b)  # no dropout in the frozen encoder while domain prompts train

    m.set_stage("task")
    m.train()  # a later train() keeps frozen modules in eval
    assert not m.encoder.training and not m.decoder.layers.training and not m.decoder.head.training
    assert m.decoder.task_masked.training
    with torch.no_grad():  # the engine caches the frozen encoder's tokens once
        tok = m.encode(x, tod, dow, adj, mask)
    r1, r2 = m.decode(tok, mask, adj), m.decode(tok, mask, adj)
    assert torch.equal(r1, r2)
    masked_mae(r1, x, mask).backward()
    with_grad = {n for n, p in m.named_parameters() if p.grad is not None}
    assert with_grad == {"decoder.task_observed.prompts", "decoder.task_masked.prompts"}

    m.set_stage("task_extrapolation").train()
    assert m.decoder.head.training and not m.decoder.layers.training

    m.set_stage("pretrain").train()
    banks = {id(b) for b in m.prompt_banks().values()}
    assert all(mod.training for mod in m.modules() if id(mod) not in banks)
    assert not any(b.training for b in m.prompt_banks().values())  # frozen (and switched off)
    assert not torch.equal(m.encode(x, tod, dow, adj, mask), m.encode(x, tod, dow, adj, mask))
    m.eval()
    assert not any(mod.training for mod in m.modules())


def test_prompt_switches_follow_stages_and_persist():
    m = STGPModel(tiny_cfg())
    assert not any(m.prompts_active().values())
    m.set_stage("domain")
    assert m.prompts_active() == {"domain_temporal": True, "domain_spatial": True,
                                  "task_observed": False, "task_masked": False}
    m.set_stage("task")
    assert all(m.prompts_active().values())
    m2 = STGPModel(tiny_cfg())
    m2.load_state_dict(m.state_dict())
    assert all(m2.prompts_active().values())
    m.set_stage("finetune")
    assert not any(m.prompts_active().values())
    # one-stage ablation: task prompts without a domain stage
    m3 = STGPModel(tiny_cfg()).set_stage("task")
    assert m3.prompts_active()["task_masked"] and not m3.prompts_active()["domain_spatial"]


def test_active_prompts_change_the_output():
    m = STGPModel(tiny_cfg()).eval()
    x, tod, dow = inputs()
    adj = ring_adj(6)
    mask = random_mask(2, 6, 5)
    with torch.no_grad():
        r0 = m(x, tod, dow, adj, mask)
        m.set_prompts(domain=True)
        r1 = m(x, tod, dow, adj, mask)
        m.set_prompts(domain=False, task=True)
        r2 = m(x, tod, dow, adj, mask)
    assert not torch.equal(r0, r1) and not torch.equal(r0, r2)


# --- loss, config, size -----------------------------------------------------------------

def test_masked_mae():
    recon = torch.zeros(1, 2, 4)
    target = torch.tensor([[[1.0, 2, 3, 4], [5, 6, float("nan"), 8]]])
    cells = torch.tensor([[[False, True], [True, True]]])  # (B, N, P) with L = 2
    # scored: 3, 4 | 5, 6, nan, 8 -> |.| mean over the 5 finite values
    assert masked_mae(recon, target, cells).item() == pytest.approx((3 + 4 + 5 + 6 + 8) / 5)
    steps = torch.zeros(1, 2, 4, dtype=torch.bool)
    steps[0, 0, 0] = True
    assert masked_mae(recon, target, steps).item() == pytest.approx(1.0)
    valid = target != 8
    assert masked_mae(recon, target, cells, valid).item() == pytest.approx((3 + 4 + 5 + 6) / 4)
    none = masked_mae(recon.requires_grad_(), target, torch.zeros(1, 2, 2, dtype=torch.bool))
    assert none.item() == 0.0
    none.backward()
    assert torch.equal(recon.grad, torch.zeros_like(recon))


def test_config_hash_and_validation():
    a = STGPModelConfig()
    assert a.config_hash() == STGPModelConfig(sparse_density=0.5).config_hash()
    assert a.config_hash() != STGPModelConfig(task_prompts=10).config_hash()
    assert STGPModelConfig.from_mapping(a.model_dump(mode="json")) == a


def test_parameter_count_at_reference_sizes():
    m = STGPModel(STGPModelConfig())  # d 128, depth 4, heads 4, FFN 256, 25 x 12, K 25
    n = count_parameters(m)
    print(f"\nSTGP parameters at reference sizes: {n:,}")
    assert abs(n - 1.24e6) / 1.24e6 < 0.10


def test_forward_backward_at_reference_size_runs():
    """207 nodes, batch 8, 25 patches x 12 steps, reference sizes: prints the time.

    One thread: on a shared 2-core machine two OpenMP threads competing with other jobs can
    be 5x slower than one. bench/ measures throughput properly."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _reference_step()
    finally:
        torch.set_num_threads(threads)


def _reference_step():
    m = STGPModel(STGPModelConfig())
    m.set_stage("pretrain").train()
    opt = torch.optim.Adam(m.parameters_for("pretrain"), lr=1e-3)
    B, N = 8, 207
    rng = np.random.default_rng(0)
    adj = torch.tensor(rng.random((N, N)) * (rng.random((N, N)) < 0.04), dtype=torch.float32)
    g = m.graph(adj)
    tpl = PatchTemplate(patch_len=12, num_patches=25)
    x = torch.randn(B, N, 300)
    tod = (torch.arange(300)[None] + torch.arange(B)[:, None] * 37) % 288
    dow = torch.zeros(B, 300, dtype=torch.long)
    times = []
    for seed in range(2):  # the first step pays one-off set-up costs
        mask, score = tpl.task_masks("pretrain", B, N, generator=torch.Generator().manual_seed(seed))
        t0 = time.perf_counter()
        loss = masked_mae(m(x, tod, dow, g, mask), x, score)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        assert torch.isfinite(loss)
    print(f"\nSTGP pre-training step (fwd+bwd+Adam) at 207 nodes, batch 8, 25x12, reference sizes, "
          f"{torch.get_num_threads()} thread: {times[-1]:.2f}s = {B / times[-1]:.1f} windows/s "
          f"(first step {times[0]:.2f}s)")
