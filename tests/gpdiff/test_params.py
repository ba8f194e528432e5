"""ParamLayout: names/shapes/offsets, flatten/unflatten round trips, hash, JSON."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from stgray.errors import DataError
from stgray.gpdiff.params import ParamLayout


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv1d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6, 5))


def test_layout_entries_follow_named_parameters():
    m = _model()
    lay = ParamLayout.from_module("toy", m)
    named = list(m.named_parameters())
    assert lay.names == [n for n, _ in named]
    off = 0
    for e, (_, p) in zip(lay.entries, named):
        assert e.shape == tuple(p.shape) and e.offset == off and e.numel == p.numel()
        assert e.dtype == "float32"
        off += p.numel()
    assert lay.n_params == off == sum(p.numel() for p in m.parameters())


def test_flatten_unflatten_round_trip_single_and_batched():
    m = _model()
    lay = ParamLayout.from_module("toy", m)
    state = {k: v.detach() for k, v in m.named_parameters()}
    vec = lay.flatten(state)
    assert vec.shape == (lay.n_params,) and vec.dtype == torch.float32
    back = lay.unflatten(vec)
    assert list(back) == lay.names
    assert all(torch.equal(back[k], state[k]) for k in state)

    vecs = torch.stack([vec, vec * 2, -vec])
    b = lay.unflatten(vecs)
    for e in lay.entries:
        assert b[e.name].shape == (3, *e.shape)
        assert torch.equal(b[e.name][1], state[e.name] * 2)
    assert torch.equal(lay.flatten(b), vecs)  # batched flatten


def test_unflattened_vectors_drive_functional_call():
    m = _model()
    lay = ParamLayout.from_module("toy", m)
    vec = lay.flatten(dict(m.named_parameters()))
    x = torch.randn(4, 2, 8)
    with torch.no_grad():
        assert torch.equal(functional_call(m, lay.unflatten(vec), (x,)), m(x))
        # batched: (B, P) vectors with vmap (batched kernels: equal up to rounding)
        other = lay.flatten(dict(_model(1).named_parameters()))
        outs = torch.func.vmap(lambda p: functional_call(m, p, (x,)))(
            lay.unflatten(torch.stack([vec, other])))
        torch.testing.assert_close(outs[0], m(x))
        torch.testing.assert_close(outs[1], _model(1)(x))


def test_json_round_trip_and_arch_hash():
    lay = ParamLayout.from_module("toy", _model())
    again = ParamLayout.from_json(lay.to_json())
    assert again == lay and again.arch_hash == lay.arch_hash
    assert ParamLayout.from_module("toy", _model(5)).arch_hash == lay.arch_hash  # values don't count
    assert ParamLayout.from_module("other", _model()).arch_hash != lay.arch_hash
    bigger = nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6, 5))
    assert ParamLayout.from_module("toy", bigger).arch_hash != lay.arch_hash
    with pytest.raises(DataError):
        lay.check_same(ParamLayout.from_module("toy", bigger))


def test_dtypes_are_restored():
    state = {"a": torch.randn(2, 3, dtype=torch.float64), "b": torch.arange(4, dtype=torch.float16)}
    lay = ParamLayout.from_state("mixed", state)
    vec = lay.flatten(state)
    assert vec.dtype == torch.float32 and vec.shape == (10,)
    back = lay.unflatten(vec)
    assert back["a"].dtype == torch.float64 and back["b"].dtype == torch.float16
    assert torch.equal(back["b"], state["b"])


def test_errors():
    lay = ParamLayout.from_module("toy", _model())
    state = {k: v.detach() for k, v in _model().named_parameters()}
    with pytest.raises(DataError, match="missing"):
        lay.flatten({k: v for k, v in list(state.items())[1:]})
    with pytest.raises(DataError, match="unexpected"):
        lay.flatten({**state, "extra": torch.zeros(1)})
    with pytest.raises(DataError, match="shape"):
        lay.flatten({**state, "3.bias": torch.zeros(6)})
    with pytest.raises(DataError):
        lay.unflatten(torch.zeros(lay.n_params + 1))
    bad = lay.to_json().replace('"offset":18', '"offset":17')
    with pytest.raises(DataError, match="invalid param layout"):
        ParamLayout.from_json(bad)
