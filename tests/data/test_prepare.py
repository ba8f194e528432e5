"""Resampling, protocol splits, train-only normalisation, windows, kriging split."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from stgray.data.city import City
from stgray.data.prepare import PrepareConfig, load_prepared, prepare, prepare_to_store, resample
from stgray.errors import DataError


def make_city(days: float = 10, step_s: int = 600, n: int = 5, agg=("sum", "mean")) -> City:
    t = int(days * 86400 / step_s)
    rng = np.random.default_rng(0)
    s = rng.poisson(5.0, size=(t, n, 2)).astype(np.float32)
    edges = np.array([[i, (i + 1) % n] for i in range(n)])
    return City(name="toy", series=s, start=pd.Timestamp("2024-01-01"), step_s=step_s,
                features=["inflow", "speed"], units=["n/step", "mph"], aggregation=list(agg),
                edges=edges, weights=np.ones(n, np.float32), node_ids=[str(i) for i in range(n)])


def test_resample_sums_counts_and_averages_speeds():
    c = make_city(days=1, step_s=600)
    r = resample(c, 3600)
    assert r.series.shape == (24, 5, 2) and r.step_s == 3600
    np.testing.assert_allclose(r.series[0, :, 0], c.series[:6, :, 0].sum(0))
    np.testing.assert_allclose(r.series[0, :, 1], c.series[:6, :, 1].mean(0), rtol=1e-6)
    with pytest.raises(DataError, match="not a multiple"):
        resample(c, 900 + 60)


def test_target_protocol_splits_and_train_only_stats():
    p = prepare(make_city(days=30), PrepareConfig(step_s=3600, target_test_days=7), "target")
    assert p.splits == {"train": (0, 72), "val": (72, 144), "test": (144, 144 + 168)}
    assert p.mean == pytest.approx(float(p.raw[:72].mean()))
    assert p.std == pytest.approx(float(p.raw[:72].std()))
    assert abs(float(p.x[:72].mean())) < 1e-5
    # unobserved nodes: 30% of 5, seeded, stable
    assert len(p.unobserved) == 2
    np.testing.assert_array_equal(p.unobserved, prepare(make_city(days=30), PrepareConfig(), "target").unobserved)


def test_source_split_and_windows():
    p = prepare(make_city(days=10), PrepareConfig(), "source")
    assert p.splits == {"train": (0, 192), "val": (192, 240)}
    s = p.window_starts("val", 12, 6)
    assert s[0] == 192 - 12 and s[-1] + 18 == 240  # outputs inside val, inputs may reach back
    xi, yo = p.windows(s[:3], 12, 6)
    assert xi.shape == (3, 12, 5) and yo.shape == (3, 6, 5)
    np.testing.assert_array_equal(yo[0], p.x[192:198])


def test_target_too_short_is_refused():
    with pytest.raises(DataError, match="needs at least 7.0"):
        prepare(make_city(days=5), PrepareConfig(), "target")


def test_time_features():
    p = prepare(make_city(days=10), PrepareConfig(), "source")
    assert p.tod[:25].tolist() == list(range(24)) + [0]
    assert p.dow[0] == 0 and p.dow[24] == 1  # 2024-01-01 is a Monday


def test_prepared_round_trip_in_store(local_store):
    from stgray.data.city import write_city

    c = make_city(days=10)
    with local_store.writer("city", {"toy": 1}, label="toy") as w:
        write_city(w, c)
    cid = local_store.id_for("city", {"toy": 1})
    aid, skipped = prepare_to_store(local_store, cid, PrepareConfig(), "target")
    assert not skipped
    assert prepare_to_store(local_store, cid, PrepareConfig(), "target") == (aid, True)
    p = load_prepared(local_store, aid)
    q = prepare(c, PrepareConfig(), "target")
    np.testing.assert_array_equal(p.raw, q.raw)
    np.testing.assert_allclose(p.x, q.x, atol=1e-6)
    assert p.splits == q.splits


def test_adjacency_is_sparse_and_matches_the_dense_one():
    import scipy.sparse as sp

    from stgray.data.prepare import adjacency_from_edges

    c = make_city(days=10, n=6)
    p = prepare(c, PrepareConfig(), "source")
    assert isinstance(p.adj, sp.csr_array) and p.adj.nnz == 6
    np.testing.assert_array_equal(p.dense_adj(), c.adjacency())
    # a repeated edge keeps its last weight, a zero weight is no edge (as a dense assignment)
    a = adjacency_from_edges(np.array([[0, 1], [0, 1], [1, 2]]), np.array([1.0, 3.0, 0.0]), 3)
    assert a.nnz == 1 and a[0, 1] == 3.0
    # a dense array given to Prepared is converted
    q = prepare(c, PrepareConfig(), "source")
    q.__init__(**{**q.__dict__, "adj": c.adjacency()})
    assert isinstance(q.adj, sp.csr_array) and (q.adj != p.adj).nnz == 0


def test_prepared_stores_edges_and_reads_the_older_dense_format(local_store):
    import io

    from stgray.data.city import write_city

    c = make_city(days=10, n=7)
    with local_store.writer("city", {"toy": 2}, label="toy") as w:
        write_city(w, c)
    cid = local_store.id_for("city", {"toy": 2})
    aid, _ = prepare_to_store(local_store, cid, PrepareConfig(), "source")
    m = local_store.manifest(aid)
    with np.load(io.BytesIO(local_store.read_bytes(aid, "arrays.npz", m))) as z:
        assert "adj" not in z.files and len(z["adj_w"]) == 7
        old = {k: z[k] for k in ("raw", "tod", "dow", "unobserved")}
    np.testing.assert_array_equal(load_prepared(local_store, aid).dense_adj(), c.adjacency())
    buf = io.BytesIO()  # an artifact written before edges: a dense (N, N) "adj"
    np.savez(buf, adj=c.adjacency(), **old)
    with local_store.writer("prepared", {"old": 1}, [cid], label="old") as w:
        w.put_bytes("arrays.npz", buf.getvalue())
        w.put_json("stats.json", local_store.read_json(aid, "stats.json", m))
    old_p = load_prepared(local_store, local_store.id_for("prepared", {"old": 1}, [cid]))
    np.testing.assert_array_equal(old_p.dense_adj(), c.adjacency())


def test_deseasonalise_keeps_the_series_and_never_reads_unobserved_nodes():
    from stgray.data.prepare import deseasonalise, seasonal_baseline

    p = prepare(make_city(days=30), PrepareConfig(step_s=3600, target_test_days=7), "target")
    d = deseasonalise(p)
    assert p.offset is None and d.offset.shape == p.x.shape
    np.testing.assert_allclose(d.x + d.offset, p.x, atol=1e-6)
    obs, un = p.observed, p.unobserved
    np.testing.assert_allclose(d.offset[:, obs], seasonal_baseline(p)[:, obs])
    # test steps: each observed node's time-of-day mean over the 3 train days
    t = p.splits["test"][0]
    lo, hi = p.splits["train"]
    same = np.arange(lo, hi)[p.tod[lo:hi] == p.tod[t]]
    np.testing.assert_allclose(d.offset[t, obs], p.x[same][:, obs].mean(0), rtol=1e-5)
    # the unobserved nodes get the observed nodes' mean profile; their own values are unread
    np.testing.assert_allclose(d.offset[:, un], np.repeat(d.offset[:, obs].mean(1, keepdims=True), len(un), 1),
                               rtol=1e-5)
    p.x[:, un] += 100.0
    np.testing.assert_array_equal(deseasonalise(p).offset, d.offset)
    assert deseasonalise(d) is d
