"""Per-node zoo models: parameter counts, neighbourhoods, batched == single (values and grads)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stgray.nn.gpdiff.pernode import (PerNodeArch, batched_forward, build_neighbourhoods,
                                      gather_inputs, gather_targets, init_vectors, load_vector,
                                      make_layout, neighbour_lists, normalised_adjacency,
                                      reference_gwn_param_count, single_model)


def test_parameter_counts_at_reference_sizes():
    stgcn = PerNodeArch(arch="stgcn")  # c_in = 2 (value, time of day)
    gwn = PerNodeArch(arch="gwn")
    assert stgcn.c_in == 2
    assert make_layout(stgcn).n_params == 16_960
    assert sum(p.numel() for p in single_model(stgcn).parameters()) == 16_960
    # GWN: 91,904 in the reference = ours + 8 unused residual convs (8 x 32 x 32) + the
    # last layer's graph conv (160 x 32) and norm (2 x 32), whose output is discarded
    assert reference_gwn_param_count(gwn) == 91_904
    assert make_layout(gwn).n_params == 78_528 == 91_904 - 8 * 32 * 32 - 160 * 32 - 64
    assert sum(p.numel() for p in single_model(gwn).parameters()) == 78_528
    assert make_layout(PerNodeArch(arch="gwn", gwn_norm="none")).n_params == 78_528 - 7 * 64


@pytest.mark.parametrize("arch", ["stgcn", "gwn"])
def test_layout_matches_single_module(arch):
    a = PerNodeArch(arch=arch)
    lay = make_layout(a)
    named = [(n, tuple(p.shape)) for n, p in single_model(a).named_parameters()]
    assert named == [(e.name, e.shape) for e in lay.entries]
    # over a baseline: one more tensor, its per-horizon weight (the root's own: first)
    b = PerNodeArch(arch=arch, baseline="tod_mean")
    named_b = [(n, tuple(p.shape)) for n, p in single_model(b).named_parameters()]
    assert named_b == [(e.name, e.shape) for e in make_layout(b).entries] == [("baseline_weight", (6,))] + named
    assert lay.arch.startswith(arch + "/")
    # the layout names the architecture: same shapes, other inputs or gate -> other arch hash
    for other in ({"features": ("value", "dow")}, {"stgcn_gate": "add"} if arch == "stgcn" else {}):
        if other:
            assert make_layout(PerNodeArch(arch=arch, **other)).arch_hash != lay.arch_hash
    unrelated = {"gwn_skip": 64} if arch == "stgcn" else {"stgcn_gate": "add", "gwn_dropout": 0.1}
    assert make_layout(PerNodeArch(arch=arch, **unrelated)).arch_hash == lay.arch_hash


def test_neighbourhoods_and_normalisation():
    adj = np.zeros((5, 5), np.float32)
    adj[0, 1] = 1  # out-neighbour of 0
    adj[3, 0] = 2  # in-neighbour of 0 (weight 2)
    adj[1, 2] = 1
    assert [x.tolist() for x in neighbour_lists(adj, [0, 4, 2])] == [[0, 1, 3], [4], [2, 1]]
    nb = build_neighbourhoods(adj, [0, 4, 2])
    assert nb.idx.shape == (3, 3) and nb.mask.sum(1).tolist() == [3, 1, 2]
    # binary: sub-adjacency of [0, 1, 3] is 0->1, 3->0; D^-1/2 (A + I) D^-1/2 by row sums
    a = np.array([[1, 1, 0], [0, 1, 0], [1, 0, 1]], float)
    d = a.sum(1) ** -0.5
    np.testing.assert_allclose(nb.a_hat[0], d[:, None] * a * d[None, :], rtol=1e-6)
    # padded slots: zero rows and columns; isolated node: just itself
    assert nb.a_hat[1, 0, 0] == pytest.approx(1.0) and not nb.a_hat[1, 1:].any() and not nb.a_hat[1, :, 1:].any()
    weighted = build_neighbourhoods(adj, [0], binary=False)
    assert weighted.a_hat[0, 2, 0] > nb.a_hat[0, 2, 0]
    # epsilon floors the degree (a zero-weight "graph" with negative self weight cannot blow up)
    z = normalised_adjacency(-np.eye(2, dtype=np.float32), eps=1e-5)
    assert np.isfinite(z).all()


@pytest.mark.parametrize("binary", [True, False])
def test_neighbourhoods_from_a_sparse_adjacency_equal_the_dense_ones(binary):
    import scipy.sparse as sp

    rng = np.random.default_rng(3)
    adj = ((rng.random((30, 30)) < 0.1) * rng.uniform(0.1, 2.0, (30, 30))).astype(np.float32)
    s = sp.csr_array(adj)
    centres = [0, 5, 29, 12]
    assert [x.tolist() for x in neighbour_lists(s, centres)] == [x.tolist() for x in neighbour_lists(adj, centres)]
    a, b = build_neighbourhoods(adj, centres, binary=binary), build_neighbourhoods(s, centres, binary=binary)
    np.testing.assert_array_equal(a.idx, b.idx)
    np.testing.assert_array_equal(a.a_hat, b.a_hat)
    assert (s != sp.csr_array(adj)).nnz == 0  # the caller's matrix is not modified


def _toy(n=11, t=40, seed=0):
    rng = np.random.default_rng(seed)
    adj = (rng.random((n, n)) < 0.25).astype(np.float32)
    np.fill_diagonal(adj, 0)
    adj[4, :] = 0
    adj[:, 4] = 0  # an isolated node
    feats = torch.randn(t, n, 2, generator=torch.Generator().manual_seed(seed))
    return adj, feats


@pytest.mark.parametrize("arch,gate", [("stgcn", "mul"), ("stgcn", "add"), ("gwn", "mul")])
def test_batched_equals_single_models_values_and_grads(arch, gate):
    adj, feats = _toy()
    a = PerNodeArch(arch=arch, stgcn_gate=gate, gwn_dropout=0.0)
    lay = make_layout(a)
    centres = [0, 4, 5, 9]
    nb = build_neighbourhoods(adj, centres, pad_to=8)  # extra padding must not matter
    assert len(set(nb.mask.sum(1).tolist())) > 1
    m = len(centres)
    vec = init_vectors(a, [11, 12, 13, 14])
    params = {k: v.clone().requires_grad_(True) for k, v in lay.unflatten(vec).items()}
    starts = torch.tensor([0, 7, 20])
    x = gather_inputs(feats, torch.as_tensor(nb.idx), torch.as_tensor(nb.mask), starts, a.t_in)
    assert x.shape == (m, 8, 3, 12, 2)
    out = batched_forward(a, params, x, torch.as_tensor(nb.a_hat))
    assert out.shape == (m, 3, a.t_out)
    target = torch.randn_like(out)
    ((out - target) ** 2).mean((1, 2)).sum().backward()
    grads = lay.flatten({k: v.grad for k, v in params.items()})
    for i in range(m):
        mod = single_model(a)
        load_vector(mod, vec[i])
        k = int(nb.mask[i].sum())
        xs = x[i, :k].permute(1, 0, 2, 3)  # (B, K, T, C), unpadded
        o = mod(xs, torch.as_tensor(nb.a_hat[i, :k, :k]))[:, 0]
        torch.testing.assert_close(o, out[i].detach(), atol=1e-5, rtol=1e-5)
        ((o - target[i]) ** 2).mean().backward()
        g = lay.flatten({n: p.grad if p.grad is not None else torch.zeros_like(p)
                         for n, p in mod.named_parameters()})
        torch.testing.assert_close(g, grads[i], atol=1e-5, rtol=1e-4)
        assert g.abs().sum() > 0


def test_init_is_per_seed_and_targets_are_centres():
    a = PerNodeArch(arch="stgcn")
    v1 = init_vectors(a, [5, 6, 7])
    v2 = init_vectors(a, [7, 5])
    torch.testing.assert_close(v1[0], v2[1])
    torch.testing.assert_close(v1[2], v2[0])
    values = torch.arange(40 * 3, dtype=torch.float32).reshape(40, 3)
    y = gather_targets(values, torch.tensor([2, 0]), torch.tensor([1, 4]), 12, 6)
    torch.testing.assert_close(y[0, 1], values[4 + 12:4 + 18, 2])
