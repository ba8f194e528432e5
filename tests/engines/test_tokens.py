"""The tokens stage: zoo table -> normalised layer-aware tokens + prompts in Parquet shards.

Test zoos are written here in the zoo engine's format (``zoo.parquet`` + ``layout.json`` +
``splits.json``) from tiny torch modules, so these tests do not depend on zoo training.
Source cities are small synthetic series written as real ``city`` -> ``prepared`` artifacts.
"""

from __future__ import annotations

import io
import json
import tracemalloc

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from stgray.data.city import CITY_KIND, City, edges_from_dense, write_city
from stgray.data.prepare import PrepareConfig, load_prepared, prepare_to_store
from stgray.engines.tokens import (TokensConfig, load_tokens_info, read_token_shard, run_tokens,
                                   tokens_id_for, zoo_sources)
from stgray.errors import DataError
from stgray.gpdiff.params import ParamLayout
from stgray.gpdiff.prompts import node_prompts
from stgray.gpdiff.tokenizer import TokenLayout


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------
# helpers (also used by test_diffusion_engine.py)
# ------------------------------------------------------------------------------------
def synthetic_city(name: str, nodes: int, days: int = 10, seed: int = 0) -> City:
    """Hourly daily-cycle flows on a ring graph."""
    rng = np.random.default_rng(seed)
    t = np.arange(days * 24)
    base = 5 + 4 * np.sin(2 * np.pi * (t[:, None] % 24) / 24 + rng.uniform(0, 6, nodes))
    series = rng.poisson(np.maximum(base * rng.uniform(0.5, 2, nodes), 0.1)).astype(np.float32)
    adj = np.zeros((nodes, nodes), np.float32)
    for i in range(nodes):
        adj[i, (i + 1) % nodes] = adj[(i + 1) % nodes, i] = 1.0
    e, w = edges_from_dense(adj)
    return City(name=name, series=series[:, :, None], start=pd.Timestamp("2024-01-01"),
                step_s=3600, features=["flow"], units=["n/h"], aggregation=["sum"], edges=e,
                weights=w, node_ids=[str(i) for i in range(nodes)])


def prepared_source(store, name: str, nodes: int, seed: int = 0) -> str:
    city = synthetic_city(name, nodes, seed=seed)
    with store.writer(CITY_KIND, {"synthetic": name, "nodes": nodes, "seed": seed},
                      label=name, meta=city.summary()) as w:
        write_city(w, city)
    pid, _ = prepare_to_store(store, w.id, PrepareConfig(), "source")
    return pid


def mlp_layout(hidden: int = 6) -> ParamLayout:
    return ParamLayout.from_module("mlp", nn.Sequential(nn.Linear(4, hidden), nn.ReLU(),
                                                        nn.Linear(hidden, 2)))


def write_test_zoo(store, sources: dict[str, tuple[str, int]], layout: ParamLayout | None = None,
                   seed: int = 0, row_group_size: int | None = None):
    """A ``zoo`` artifact in the zoo engine's format: one row per node of every source
    (``{city: (prepared id, nodes)}``), parameters of freshly initialised tiny MLPs
    (scaled per node so that positions have different means/stds). Returns (id, params)."""
    layout = layout or mlp_layout()
    g = torch.Generator().manual_seed(seed)
    rows = {k: [] for k in ("city", "prepared_id", "node")}
    vecs = []
    for city, (pid, n) in sources.items():
        for node in range(n):
            torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=g)))
            hidden = layout.entries[0].shape[0]
            m = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 2))
            vecs.append(layout.flatten(dict(m.named_parameters())) * (1 + 0.1 * node) + 0.01 * node)
            rows["city"].append(city)
            rows["prepared_id"].append(pid)
            rows["node"].append(node)
    params = torch.stack(vecs).numpy().astype(np.float32)
    k = len(params)
    table = pa.table({
        "city": pa.array(rows["city"], pa.string()),
        "prepared_id": pa.array(rows["prepared_id"], pa.string()),
        "node": pa.array(rows["node"], pa.int64()),
        "arch": pa.array([layout.arch] * k, pa.string()),
        "params": pa.FixedSizeListArray.from_arrays(pa.array(params.reshape(-1), pa.float32()),
                                                    layout.n_params),
        "val_mae": pa.array(np.ones(k), pa.float64()),
        "val_rmse": pa.array(np.ones(k), pa.float64()),
        "train_loss": pa.array(np.ones(k), pa.float64()),
        "best_epoch": pa.array(np.ones(k, np.int32), pa.int32()),
    })
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=row_group_size)
    lj = json.loads(layout.to_json())
    lj.update(arch_hash=layout.arch_hash, n_params=layout.n_params)
    splits = {pid: store.read_json(pid, "stats.json") for pid, _ in sources.values()}
    with store.writer("zoo", {"test-zoo": seed, "sources": sorted(p for p, _ in sources.values()),
                              "arch": layout.arch_hash}, label="test zoo") as w:
        w.put_bytes("zoo.parquet", buf.getvalue())
        w.put_bytes("layout.json", json.dumps(lj).encode())
        w.put_json("splits.json", splits)
    return w.id, params


def small_sources(store) -> dict[str, tuple[str, int]]:
    return {"alpha": (prepared_source(store, "alpha", 7, seed=1), 7),
            "beta": (prepared_source(store, "beta", 5, seed=2), 5)}


# ------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------
def test_round_trip_through_the_store_in_several_shards(store):
    srcs = small_sources(store)
    zoo_id, params = write_test_zoo(store, srcs)
    cfg = TokensConfig(width=8, rows_per_shard=5, read_batch_rows=3)  # batches straddle shards
    prepared = {c: pid for c, (pid, _) in srcs.items()}
    info: dict = {}
    tid, skipped = run_tokens(store, cfg, zoo_id, prepared, info=info)
    assert not skipped and info["rows"] == 12 and info["shards"] == 3

    ti = load_tokens_info(store, tid)
    assert ti.shard_rows == [5, 5, 2] and ti.rows == 12 and len(ti.shard_paths) == 3
    lay = mlp_layout()
    assert ti.param_layout.arch_hash == lay.arch_hash
    assert ti.token_layout == TokenLayout.from_params(lay, 8)
    m = store.manifest(tid)
    assert (m.meta["L"], m.meta["C"], m.meta["P"], m.meta["shards"]) == (ti.n_tokens, 8, 44, 3)
    assert set(m.inputs) == {zoo_id, *prepared.values()}
    # statistics are the zoo's per-position mean/std
    np.testing.assert_allclose(ti.stats.mean, params.astype(np.float64).mean(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ti.stats.std, params.astype(np.float64).std(0), rtol=1e-6)

    tables = [read_token_shard(store, tid, n) for n in ti.shards]
    assert [len(t) for t in tables] == [5, 5, 2]
    tok = np.concatenate([t.tokens for t in tables])
    assert tok.shape == (12, ti.n_tokens, 8) and tok.dtype == np.float32
    assert np.all(tok[:, ~ti.token_layout.mask.numpy()] == 0)  # padding slots are 0
    dec = ti.tokenizer().decode(torch.from_numpy(tok)).numpy()
    np.testing.assert_allclose(dec, params, rtol=1e-6, atol=1e-7)  # float32 rounding only
    # prompts: the train split of each node's own source city
    cities = np.concatenate([t.city for t in tables])
    nodes = np.concatenate([t.node for t in tables])
    pr = np.concatenate([t.prompts for t in tables])
    assert cities.tolist() == ["alpha"] * 7 + ["beta"] * 5 and nodes.tolist() == [*range(7), *range(5)]
    want = {c: node_prompts(load_prepared(store, pid), "train", cfg.walk_length)
            for c, pid in prepared.items()}
    np.testing.assert_array_equal(pr, np.stack([want[c][n] for c, n in zip(cities, nodes)]))
    assert ti.prompt_dim == pr.shape[1] == 24 + 4 + 8 + 3

    # idempotent: the same work (also with the sources taken from the zoo) is found
    assert zoo_sources(store, zoo_id) == prepared
    assert tokens_id_for(store, cfg, zoo_id) == tid
    assert run_tokens(store, cfg, zoo_id) == (tid, True)
    # read_batch_rows is execution-only; rows_per_shard changes the artifact
    assert run_tokens(store, cfg.model_copy(update={"read_batch_rows": 64}), zoo_id)[1]
    assert tokens_id_for(store, cfg.model_copy(update={"rows_per_shard": 6}), zoo_id) != tid


def test_refuses_prompts_from_other_sources_and_non_finite_params(local_store):
    srcs = small_sources(local_store)
    zoo_id, _ = write_test_zoo(local_store, srcs)
    other = prepared_source(local_store, "alpha", 7, seed=9)  # same name, other data
    with pytest.raises(DataError, match="trained on"):
        run_tokens(local_store, TokensConfig(width=8), zoo_id,
                   {"alpha": other, "beta": srcs["beta"][0]})
    with pytest.raises(DataError, match="no prepared artifact.*beta"):
        run_tokens(local_store, TokensConfig(width=8), zoo_id, {"alpha": srcs["alpha"][0]})
    # a NaN model is refused with the node named
    zoo2, params = write_test_zoo(local_store, {"beta": srcs["beta"]}, seed=3)
    t = pq.read_table(io.BytesIO(local_store.read_bytes(zoo2, "zoo.parquet")))
    params[3, 5] = np.nan
    t = t.set_column(t.schema.get_field_index("params"), "params",
                     pa.FixedSizeListArray.from_arrays(pa.array(params.reshape(-1)), params.shape[1]))
    buf = io.BytesIO()
    pq.write_table(t, buf)
    with local_store.writer("zoo", {"nan": 1}) as w:
        w.put_bytes("zoo.parquet", buf.getvalue())
        w.put_bytes("layout.json", mlp_layout().to_json().encode())
        w.put_json("splits.json", local_store.read_json(zoo2, "splits.json"))
    with pytest.raises(DataError, match="non-finite.*beta node 3"):
        run_tokens(local_store, TokensConfig(width=8), w.id)


def test_streaming_memory_does_not_hold_the_zoo(local_store, monkeypatch):
    """A 600-model zoo with P = 3,922 (9.4 MB of float32): Python/numpy allocations of the
    two streaming passes stay far below the zoo's size and scale with the batch (16 rows),
    not the zoo.
    (The checksum pass before them reads fixed 8 MB chunks, and prompts are O(city size):
    both are left out of the measured peak.)"""
    import stgray.engines.tokens as T

    pid = prepared_source(local_store, "gamma", 600, seed=4)
    lay = mlp_layout(hidden=560)
    zoo_id, params = write_test_zoo(local_store, {"gamma": (pid, 600)}, lay, row_group_size=64)
    zoo_bytes = params.nbytes
    cfg = TokensConfig(width=32, rows_per_shard=100, read_batch_rows=16)
    peaks = []

    def excluded(fn):  # record the peak of the phase before ``fn``; leave ``fn``'s out
        def wrapped(*a, **k):
            peaks.append(tracemalloc.get_traced_memory()[1])
            out = fn(*a, **k)
            tracemalloc.reset_peak()
            return out
        return wrapped

    monkeypatch.setattr(local_store, "verify", excluded(local_store.verify))
    monkeypatch.setattr(T, "source_prompts", excluded(T.source_prompts))
    tracemalloc.start()
    try:
        tid, _ = run_tokens(local_store, cfg, zoo_id)
        peaks.append(tracemalloc.get_traced_memory()[1])
    finally:
        tracemalloc.stop()
    peak = max(peaks[1:])  # pass 1 (statistics) and pass 2 (tokens -> shards)
    assert len(peaks) == 3
    ti = load_tokens_info(local_store, tid)
    assert ti.shard_rows == [100] * 6
    batch_bytes = 16 * lay.n_params * 4
    assert peak < min(zoo_bytes / 4, 12 * batch_bytes), \
        f"peak {peak / 1e6:.2f} MB vs zoo {zoo_bytes / 1e6:.1f} MB, batch {batch_bytes / 1e6:.2f} MB"
    last = read_token_shard(local_store, tid, ti.shards[-1])
    dec = ti.tokenizer().decode(torch.from_numpy(last.tokens)).numpy()
    np.testing.assert_allclose(dec, params[500:], rtol=1e-5, atol=1e-6)
