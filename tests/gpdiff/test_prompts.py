"""Per-node prompts: shapes, and the sparse spatial prompt against a dense computation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from stgray.data.city import City
from stgray.data.prepare import PrepareConfig, prepare
from stgray.gpdiff.prompts import node_prompts, spatial_prompts


def _dense_degrees(adj: np.ndarray) -> np.ndarray:
    a = adj.astype(np.float64).copy()
    np.fill_diagonal(a, 0.0)
    wmax = a.max() if a.max() > 0 else 1.0
    return np.stack([np.log1p((a > 0).sum(0)), np.log1p((a > 0).sum(1)),
                     np.log1p((a / wmax).sum(0) + (a / wmax).sum(1))], 1)


def test_spatial_prompts_sparse_equal_dense():
    rng = np.random.default_rng(0)
    adj = ((rng.random((40, 40)) < 0.08) * rng.uniform(0.5, 3.0, (40, 40))).astype(np.float32)
    adj[7, 7] = 2.0  # a self loop is ignored
    dense, sparse = spatial_prompts(adj, 6), spatial_prompts(sp.csr_array(adj), 6)
    assert dense.shape == (40, 9) and dense.dtype == np.float32
    np.testing.assert_array_equal(dense, sparse)
    np.testing.assert_allclose(sparse[:, 6:], _dense_degrees(adj), rtol=1e-6)
    # random-walk return probability after one step is 0 without self loops
    np.testing.assert_array_equal(sparse[:, 0], 0.0)


def test_node_prompts_shape():
    t, n = 24 * 8, 5
    s = np.random.default_rng(1).poisson(4.0, (t, n, 1)).astype(np.float32)
    c = City(name="toy", series=s, start=pd.Timestamp("2024-01-01"), step_s=3600, features=["inflow"],
             units=["n"], aggregation=["sum"], edges=np.array([[i, (i + 1) % n] for i in range(n)]),
             weights=np.ones(n, np.float32), node_ids=[str(i) for i in range(n)])
    p = prepare(c, PrepareConfig(), "target")
    pr = node_prompts(p, "train", walk_length=4)
    assert pr.shape == (n, 24 + 4 + 4 + 3) and np.isfinite(pr).all()
