"""GPDiffDenoiser: shapes for every conditioning, per-sample attention, conditioning works."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stgray.nn.gpdiff.denoiser import CONDITIONINGS, GPDiffDenoiser, sinusoidal_embedding

C, D = 8, 3
TENSOR_IDS = [0, 0, 0, 1, 2, 2, 2, 2, 3]  # L = 9 tokens of 4 tensors


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _net(conditioning: str, pos_emb: str = "sinusoidal", seed: int = 0) -> GPDiffDenoiser:
    torch.manual_seed(seed)
    net = GPDiffDenoiser(C, TENSOR_IDS, D, d_model=32, layers=2, heads=4, conditioning=conditioning,
                         pos_emb=pos_emb, prompt_tokens=3)
    with torch.no_grad():  # zero-initialised output/gates would make every output 0
        for p in net.parameters():
            if (p == 0).all():
                nn.init.normal_(p, std=0.2)
    return net.eval()


def _inputs(B: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, len(TENSOR_IDS), C, generator=g),
            torch.randint(0, 500, (B,), generator=g), torch.randn(B, D, generator=g))


@pytest.mark.parametrize("pos_emb", ["learned", "sinusoidal"])
@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_output_shape(conditioning, pos_emb):
    net = _net(conditioning, pos_emb)
    x, t, p = _inputs()
    out = net(x, t, p)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert net(x[:1], torch.tensor(7), p[:1]).shape == (1, len(TENSOR_IDS), C)  # scalar step
    out.sum().backward()  # differentiable end to end


def test_fresh_model_predicts_zero():
    torch.manual_seed(0)
    net = GPDiffDenoiser(C, TENSOR_IDS, D, d_model=32, layers=1, heads=4)
    x, t, p = _inputs()
    assert (net(x, t, p) == 0).all()  # DiT-style zero-initialised output layer


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_attention_stays_within_each_sample(conditioning):
    net = _net(conditioning)
    x, t, p = _inputs(B=6)
    with torch.no_grad():
        out = net(x, t, p)
        perm = torch.tensor([3, 0, 5, 1, 4, 2])
        torch.testing.assert_close(net(x[perm], t[perm], p[perm]), out[perm])
        x2, t2, p2 = x.clone(), t.clone(), p.clone()
        x2[0] += 5.0
        t2[0] = 3
        p2[0] = -p2[0]
        out2 = net(x2, t2, p2)
        assert not torch.allclose(out2[0], out[0])
        torch.testing.assert_close(out2[1:], out[1:])
        # a sample alone gives the same result as inside a batch
        torch.testing.assert_close(net(x[2:3], t[2:3], p[2:3]), out[2:3])


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_prompt_and_step_change_the_output(conditioning):
    net = _net(conditioning)
    x, t, p = _inputs()
    with torch.no_grad():
        out = net(x, t, p)
        assert (net(x, t, p + 1.0) - out).abs().max() > 1e-3
        assert (net(x, t + 100, p) - out).abs().max() > 1e-3


def test_tensor_embedding_distinguishes_tokens():
    net = _net("pre")
    x, t, p = _inputs(B=1)
    x[:] = 0.3  # identical token contents; sinusoidal positions off via zeroed buffer
    net.pos.zero_()
    with torch.no_grad():
        out = net(x, t, p)[0]
    assert torch.allclose(out[0], out[1], atol=1e-5)  # same tensor, same content
    assert not torch.allclose(out[0], out[3], atol=1e-3)  # different tensor


def test_bad_arguments():
    with pytest.raises(ValueError, match="conditioning"):
        GPDiffDenoiser(C, TENSOR_IDS, D, d_model=32, heads=4, conditioning="cross")
    with pytest.raises(ValueError, match="divisible"):
        GPDiffDenoiser(C, TENSOR_IDS, D, d_model=30, heads=4)
    with pytest.raises(ValueError, match="pos_emb"):
        GPDiffDenoiser(C, TENSOR_IDS, D, d_model=32, heads=4, pos_emb="rotary")


def test_sinusoidal_embedding_shape():
    e = sinusoidal_embedding(torch.arange(4), 7)
    assert e.shape == (4, 7) and torch.equal(e[0, :3], torch.ones(3))
