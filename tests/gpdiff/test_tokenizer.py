"""Tokenizer: layer-aware tokens, exact round trips, streaming statistics, Parquet shards."""

from __future__ import annotations

import io
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn
from torch.func import functional_call

from stgray.errors import DataError
from stgray.gpdiff.params import ParamLayout
from stgray.gpdiff.tokenizer import (ParamStats, StatsAccumulator, TokenLayout, TokenParquetWriter,
                                     Tokenizer, layout_metadata, read_token_parquet,
                                     write_token_parquet)

C = 8


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv1d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6, 5))


@pytest.fixture(scope="module")
def zoo():
    """ParamLayout and (6, P) parameter vectors of six differently initialised models."""
    models = [_model(s) for s in range(6)]
    lay = ParamLayout.from_module("toy", models[0])
    vecs = torch.stack([lay.flatten(dict(m.named_parameters())) for m in models])
    return lay, vecs


def test_tokens_never_straddle_tensors(zoo):
    lay, _ = zoo
    tl = TokenLayout.from_params(lay, C)
    assert tl.n_tokens == sum(math.ceil(e.numel / C) for e in lay.entries)
    idx = tl.gather_index.view(tl.n_tokens, C)
    for k in range(tl.n_tokens):
        e = lay.entries[tl.token_tensor[k]]
        real = idx[k][tl.mask[k]]
        assert len(real) == tl.token_valid[k]
        assert ((real >= e.offset) & (real < e.offset + e.numel)).all()
        assert (idx[k][~tl.mask[k]] == lay.n_params).all()  # padding -> the zero slot
    # every parameter appears exactly once, in order
    assert torch.equal(idx[tl.mask], torch.arange(lay.n_params))
    # ranks count tokens within each tensor
    assert tl.token_rank.tolist() == [0, 1, 2, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0]
    assert TokenLayout.from_json(tl.to_json()) == tl


def test_round_trip_exact_on_valid_positions(zoo):
    lay, vecs = zoo
    tok = Tokenizer.fit(lay, [vecs], C)
    t32 = tok.encode(vecs)
    assert t32.shape == (6, tok.layout.n_tokens, C) and t32.dtype == torch.float32
    assert (t32[:, ~tok.mask] == 0).all()  # padding slots are zero
    # float64 tokens: bit-exact; float32 tokens: exact up to float32 rounding of the tokens
    assert torch.equal(tok.decode(tok.encode(vecs, dtype=torch.float64)), vecs)
    torch.testing.assert_close(tok.decode(t32), vecs, rtol=0, atol=1e-6)
    # unnormalised tokens are bit-exact in float32
    raw = Tokenizer(tok.layout)
    assert torch.equal(raw.decode(raw.encode(vecs)), vecs)
    # padding is ignored by decode; single vectors work too
    garbage = t32.clone()
    garbage[:, ~tok.mask] = 1e6
    assert torch.equal(tok.decode(garbage), tok.decode(t32))
    assert torch.equal(tok.decode(t32[2]), tok.decode(t32)[2])
    assert torch.equal(tok.encode(vecs[2]), t32[2])
    # normalised: each position has mean 0, std 1 over the zoo; no clamping
    z = tok.encode(vecs, dtype=torch.float64)[:, tok.mask]
    torch.testing.assert_close(z.mean(0), torch.zeros(lay.n_params, dtype=torch.float64))
    torch.testing.assert_close(z.std(0, unbiased=False), torch.ones(lay.n_params, dtype=torch.float64))
    big = tok.encode(vecs * 10)
    assert big.abs().max() > 1
    torch.testing.assert_close(tok.decode(big), vecs * 10, rtol=1e-6, atol=1e-5)


def test_tokens_to_parquet_to_params_give_identical_predictions(zoo, tmp_path):
    lay, vecs = zoo
    tok = Tokenizer.fit(lay, [vecs], C)
    path = tmp_path / "shard.parquet"
    write_token_parquet(path, "cityA", np.arange(6), "toy", tok.encode(vecs, dtype=torch.float64),
                        np.zeros((6, 3), np.float32))
    back = torch.from_numpy(read_token_parquet(path).tokens)
    decoded = tok.decode(back)
    torch.testing.assert_close(decoded, vecs, rtol=0, atol=1e-6)
    m, x = _model(0), torch.randn(4, 2, 8)
    with torch.no_grad():
        for i in range(6):
            ref = _model(i)(x)
            torch.testing.assert_close(functional_call(m, lay.unflatten(decoded[i]), (x,)), ref)
            # float64 tokens in memory: bit-identical parameters and predictions
            exact = tok.decode(tok.encode(vecs[i], dtype=torch.float64))
            assert torch.equal(functional_call(m, lay.unflatten(exact), (x,)), ref)


def test_streaming_stats_equal_one_shot(zoo):
    lay, vecs = zoo
    rng = np.random.default_rng(0)
    data = rng.normal(3.0, 2.0, size=(101, lay.n_params)) * rng.uniform(0, 5, lay.n_params)
    data[:, 7] = 0.25  # constant position -> std floored at eps
    one = ParamStats.fit([data], lay.n_params, eps=1e-4)
    splits = np.split(data, [1, 2, 30, 30, 64, 100])  # sizes 1, 1, 28, 0, 34, 36, 1
    stream = ParamStats.fit(splits, lay.n_params, eps=1e-4)
    np.testing.assert_allclose(one.mean, data.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stream.mean, data.mean(0), rtol=1e-12)
    ref_std = np.maximum(data.std(0), 1e-4)
    np.testing.assert_allclose(one.std, ref_std, rtol=1e-10)
    np.testing.assert_allclose(stream.std, ref_std, rtol=1e-10)
    assert stream.std[7] == 1e-4 and stream.count == 101
    # accumulators from several workers merge to the same result (torch batches too)
    a, b = StatsAccumulator(lay.n_params), StatsAccumulator(lay.n_params)
    a.update(torch.from_numpy(data[:40]))
    b.update(data[40:70]).update(data[70:])
    merged = a.merge(b).finalize(1e-4)
    np.testing.assert_allclose(merged.mean, one.mean, rtol=1e-12)
    np.testing.assert_allclose(merged.std, one.std, rtol=1e-10)


def test_stats_serialise_without_pickle(zoo):
    lay, vecs = zoo
    st = ParamStats.fit([vecs[:3], vecs[3:]], lay.n_params, eps=1e-5, arch_hash=lay.arch_hash)
    data = st.to_bytes()
    with np.load(io.BytesIO(data), allow_pickle=False) as z:  # plain arrays only
        assert set(z.files) == {"mean", "std", "count", "eps", "arch_hash"}
    back = ParamStats.from_bytes(data)
    assert np.array_equal(back.mean, st.mean) and np.array_equal(back.std, st.std)
    assert (back.count, back.eps, back.arch_hash) == (6, 1e-5, lay.arch_hash)
    tl = TokenLayout.from_params(lay, C)
    assert torch.equal(Tokenizer(tl, back).encode(vecs), Tokenizer(tl, st).encode(vecs))
    with pytest.raises(DataError, match="unreadable"):
        ParamStats.from_bytes(b"not an npz")
    with pytest.raises(DataError):
        Tokenizer(tl, ParamStats.fit([vecs[:, :10]], 10))  # wrong size
    other = ParamStats(back.mean, back.std, 6, 1e-5, arch_hash="0" * 16)
    with pytest.raises(DataError, match="another architecture"):
        Tokenizer(tl, other)


def test_parquet_schema_and_round_trip(zoo, tmp_path):
    lay, vecs = zoo
    tok = Tokenizer.fit(lay, [vecs], C)
    L = tok.layout.n_tokens
    toks = tok.encode(vecs).numpy()
    prompts = np.random.default_rng(1).normal(size=(6, 5)).astype(np.float32)
    path = tmp_path / "s.parquet"
    with TokenParquetWriter(path, L, C, 5, metadata=layout_metadata(tok.layout)) as w:
        w.write("nyc", [0, 1, 2], "toy", toks[:3], prompts[:3])  # streamed in two batches
        w.write(["dc", "dc", "dc"], np.array([7, 8, 9]), "toy", torch.from_numpy(toks[3:]),
                prompts[3:])
    schema = pq.read_schema(path)
    assert schema.field("city").type == pa.string()
    assert schema.field("node").type == pa.int32()
    assert schema.field("arch").type == pa.string()
    assert schema.field("tokens").type == pa.list_(pa.float32(), L * C)
    assert schema.field("prompt").type == pa.list_(pa.float32(), 5)

    t = read_token_parquet(path)
    assert len(t) == 6 and t.tokens.shape == (6, L, C) and t.tokens.dtype == np.float32
    assert np.array_equal(t.tokens, toks) and np.array_equal(t.prompts, prompts)
    assert t.city.tolist() == ["nyc"] * 3 + ["dc"] * 3
    assert t.node.tolist() == [0, 1, 2, 7, 8, 9] and t.node.dtype == np.int32
    assert set(t.arch) == {"toy"}
    assert TokenLayout.from_json(t.metadata["stgray.token_layout"]) == tok.layout

    with pytest.raises(DataError, match="do not fit"):
        with TokenParquetWriter(tmp_path / "bad.parquet", L, C, 5) as w:
            w.write("x", [0], "toy", toks[:1], prompts[:1, :4])


def test_parquet_into_artifact_store(zoo, local_store):
    lay, vecs = zoo
    tok = Tokenizer.fit(lay, [vecs], C)
    with local_store.writer("tokens", {"t": 1}) as w:
        with w.open("shard.parquet") as f:
            write_token_parquet(f, "nyc", range(6), "toy", tok.encode(vecs), np.ones((6, 2)))
        w.put_bytes("stats.npz", tok.stats.to_bytes())
        aid = w.id
    t = read_token_parquet(io.BytesIO(local_store.read_bytes(aid, "shard.parquet")))
    stats = ParamStats.from_bytes(local_store.read_bytes(aid, "stats.npz"))
    dec = Tokenizer(tok.layout, stats).decode(torch.from_numpy(t.tokens))
    torch.testing.assert_close(dec, vecs, rtol=0, atol=1e-6)
