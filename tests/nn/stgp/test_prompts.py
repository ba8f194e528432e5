"""Prompt banks: matrix-product form equals the reference's (B, N, P, K, d) form."""

from __future__ import annotations

import torch

from stgray.nn.stgp.prompts import PromptBank, naive_prompt


def _bank(k=5, d=8, thr=0.2, std=1.0) -> PromptBank:
    torch.manual_seed(0)
    bank = PromptBank(k, d, threshold=thr, init_std=std)
    bank.active = True
    return bank


def test_matches_naive_computation():
    bank = _bank()
    x = torch.randn(2, 3, 4, 8)
    s = torch.sigmoid(x @ bank.prompts.t())
    assert (s < 0.2).any() and (s >= 0.2).any()  # the threshold matters in this case
    torch.testing.assert_close(bank(x), naive_prompt(x, bank.prompts, 0.2), rtol=1e-5, atol=1e-6)
    # gradients agree too
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    bank(xa).square().sum().backward()
    ga = bank.prompts.grad.clone()
    bank.prompts.grad = None
    naive_prompt(xb, bank.prompts, 0.2).square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ga, bank.prompts.grad, rtol=1e-5, atol=1e-5)


def test_scores_below_threshold_are_zero():
    bank = _bank(thr=0.6)
    x = torch.randn(50, 8)
    s = bank.scores(x)
    raw = torch.sigmoid(x @ bank.prompts.t())
    assert torch.equal(s == 0, raw < 0.6)
    torch.testing.assert_close(bank.prompt(x), s @ bank.prompts)


def test_disabled_and_inactive_banks_are_identity():
    for k in (0, None):
        b = PromptBank(k, 8)
        assert not b.enabled and list(b.parameters()) == []
        b.active = True
        x = torch.randn(3, 8)
        assert b(x) is x and not b.active
        assert torch.equal(b.prompt(x), torch.zeros_like(x))
    b = PromptBank(4, 8)
    assert b.enabled and not b.active  # banks start switched off
    x = torch.randn(3, 8)
    assert b(x) is x
    b.active = True
    assert not torch.equal(b(x), x)
    assert b.state_dict()["active_flag"].item() is True


def test_no_k_by_d_intermediate():
    """(2, 207, 25, 128) with K=25: the naive form allocates 2*207*25*25*128*4 B = 132 MB."""
    from torch.profiler import ProfilerActivity, profile

    bank = _bank(k=25, d=128, std=0.02)
    x = torch.randn(2, 207, 25, 128)  # 5.3 MB
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = bank(x)
    assert out.shape == x.shape
    biggest = max(e.cpu_memory_usage for e in prof.events())
    assert biggest < 20e6, f"an op allocated {biggest / 1e6:.0f} MB"
