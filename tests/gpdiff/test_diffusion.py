"""Diffusion maths: config, schedulers, masked weighted loss, training, sampling, EMA."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from stgray.errors import ConfigError
from stgray.gpdiff.diffusion import (DiffusionConfig, build_denoiser, diffusion_loss, loss_weight,
                                     make_ema, make_optimizer, make_sampler, make_scheduler,
                                     resolve_device, sample, train_step)
from stgray.gpdiff.params import ParamLayout
from stgray.gpdiff.tokenizer import TokenLayout, Tokenizer

C = 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny_cfg(**kw) -> DiffusionConfig:
    base = dict(token_width=C, d_model=32, layers=2, heads=4, lr=3e-3, ema_decay=0.9)
    return DiffusionConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def two_targets():
    """Tokenizer and (2, P) parameter vectors of two small MLPs (P = 44)."""
    torch.manual_seed(0)
    ms = [nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)) for _ in range(2)]
    lay = ParamLayout.from_module("mlp", ms[0])
    vecs = torch.stack([lay.flatten(dict(m.named_parameters())) for m in ms])
    return Tokenizer.fit(lay, [vecs], C), vecs


class _ZeroEps(nn.Module):
    """Stub denoiser predicting zero noise: x0_hat = x_t / sqrt(alpha_bar_t) grows past 1."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, prompt):
        assert t.shape == (x.shape[0],) and prompt.shape[0] == x.shape[0]
        return torch.zeros_like(x) + self.w


def test_config_defaults_hash_and_validation():
    cfg = DiffusionConfig()
    assert (cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end) == (500, 1e-5, 0.02)
    assert cfg.prediction_type == "v_prediction" and cfg.ema_decay == 0.995
    assert cfg.n_sampling_steps() == 500
    assert DiffusionConfig(sampler="ddim").n_sampling_steps() == 50
    assert DiffusionConfig(device="cpu").config_hash() == cfg.config_hash()  # execution only
    assert DiffusionConfig(lr=1e-3).config_hash() != cfg.config_hash()
    assert cfg.tokenizer_config().width == 64
    with pytest.raises(ConfigError, match="divisible"):
        DiffusionConfig.from_mapping({"d_model": 30, "heads": 4})
    with pytest.raises(ConfigError, match="unknown key"):
        DiffusionConfig.from_mapping({"conditionning": "pre"})
    with pytest.raises(ConfigError):
        DiffusionConfig.from_mapping({"conditioning": "cross"})


def test_schedulers_and_device():
    sch = make_scheduler(DiffusionConfig())
    assert sch.config.clip_sample is False and sch.config.prediction_type == "v_prediction"
    assert torch.isclose(sch.betas[0], torch.tensor(1e-5)) and torch.isclose(sch.betas[-1], torch.tensor(0.02))
    ddim = make_sampler(sch, "ddim")
    assert type(ddim).__name__ == "DDIMScheduler" and ddim.config.num_train_timesteps == 500
    assert ddim.config.clip_sample is False
    cos = make_scheduler(DiffusionConfig(beta_schedule="squaredcos_cap_v2", prediction_type="epsilon"))
    assert cos.alphas_cumprod[-1] < 1e-4 and cos.config.prediction_type == "epsilon"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            resolve_device("cuda")


def test_loss_weight_is_snr_over_snr_plus_one():
    sch = make_scheduler(DiffusionConfig())
    t = torch.tensor([0, 10, 250, 499])
    ac = sch.alphas_cumprod[t].double()
    snr = ac / (1 - ac)
    torch.testing.assert_close(loss_weight(sch, t), (snr / (snr + 1)).float())
    eps = make_scheduler(DiffusionConfig(prediction_type="epsilon"))
    assert torch.equal(loss_weight(eps, t), torch.ones(4))


def test_loss_ignores_padding(two_targets):
    tok, vecs = two_targets
    x0 = tok.encode(vecs)
    mask = tok.mask
    sch = make_scheduler(_tiny_cfg())

    class Stub(nn.Module):
        def __init__(self, pad_value):
            super().__init__()
            self.pad_value = pad_value

        def forward(self, x, t, p):
            assert (x[:, ~mask] == 0).all()  # no noise at padding slots
            return torch.where(mask, torch.zeros_like(x), torch.full_like(x, self.pad_value))

    losses = [diffusion_loss(Stub(v), x0, torch.eye(2), mask, sch, torch.Generator().manual_seed(3))
              for v in (0.0, 1e3)]
    assert losses[0] > 0 and torch.equal(losses[0], losses[1])


def test_train_step_updates_model_and_ema(two_targets):
    tok, vecs = two_targets
    cfg = _tiny_cfg()
    torch.manual_seed(0)
    net = build_denoiser(cfg, tok.layout, 2)
    ema, opt, sch = make_ema(net, cfg.ema_decay), make_optimizer(net, cfg), make_scheduler(cfg)
    before = [p.detach().clone() for p in net.parameters()]
    g = torch.Generator().manual_seed(0)
    losses = [train_step(net, ema, opt, tok.encode(vecs), torch.eye(2), tok.mask, sch, cfg, g)
              for _ in range(3)]
    assert all(isinstance(v, float) and v > 0 for v in losses)
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert int(ema.n_averaged) == 3
    diff = [not torch.equal(a, b) for a, b in zip(ema.module.parameters(), net.parameters())]
    assert any(diff)  # EMA lags the model
    with pytest.raises(ConfigError, match="token_width"):
        build_denoiser(_tiny_cfg(token_width=16), tok.layout, 2)


def test_tiny_run_overfits_two_targets(two_targets):
    """2 prompts -> 2 parameter vectors; DDIM samples decode close to their own target."""
    tok, vecs = two_targets
    cfg = _tiny_cfg(conditioning="adaln")
    torch.manual_seed(0)
    net = build_denoiser(cfg, tok.layout, 2)
    ema, opt, sch = make_ema(net, cfg.ema_decay), make_optimizer(net, cfg), make_scheduler(cfg)
    tokens, prompts = tok.encode(vecs), torch.eye(2)
    idx = torch.arange(32) % 2
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    losses = [train_step(net, ema, opt, tokens[idx], prompts[idx], tok.mask, sch, cfg, g)
              for _ in range(300)]
    assert sum(losses[-30:]) / 30 < sum(losses[:30]) / 30
    out = sample(ema, prompts.repeat(8, 1), tok.layout, sch, "ddim", steps=25,
                 generator=torch.Generator().manual_seed(1))
    assert time.perf_counter() - t0 < 60
    dist = torch.cdist(tok.decode(out), vecs)  # (16, 2) parameter-space distances
    own, other = dist[torch.arange(16), idx[:16]], dist[torch.arange(16), 1 - idx[:16]]
    cross = (vecs[0] - vecs[1]).norm()
    assert own.max() < 0.5 * other.min(), (own, other)
    assert own.mean() < 0.15 * cross, (own.mean(), cross)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sampling_shapes_determinism_and_no_clamp(sampler):
    lay = TokenLayout.from_params(ParamLayout.from_state("s", {"a": torch.zeros(5, 3),
                                                               "b": torch.zeros(4)}), C)
    sch = make_scheduler(_tiny_cfg(prediction_type="epsilon"))
    steps = 40 if sampler == "ddpm" else 10
    prompts = torch.randn(3, 2)
    a = sample(_ZeroEps(), prompts, lay, sch, sampler, steps, torch.Generator().manual_seed(0))
    assert a.shape == (3, lay.n_tokens, C) and a.dtype == torch.float32
    assert (a[:, ~lay.mask] == 0).all()  # padding stays zero
    assert a[:, lay.mask].abs().max() > 1.5  # no clamping to [-1, 1]
    assert torch.isfinite(a).all()
    again = sample(_ZeroEps(), prompts, lay, sch, sampler, steps, torch.Generator().manual_seed(0))
    assert torch.equal(a, again)
    c = sample(_ZeroEps(), prompts, lay, sch, sampler, steps, torch.Generator().manual_seed(1))
    assert not torch.allclose(a, c)
    chunked = sample(_ZeroEps(), prompts, lay, sch, sampler, steps,
                     torch.Generator().manual_seed(0), batch_size=2)
    assert chunked.shape == a.shape

    # one generator per sample: each sample is reproducible whatever the batching
    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    full = sample(_ZeroEps(), prompts, lay, sch, sampler, steps, gens([10, 11, 12]))
    split = sample(_ZeroEps(), prompts, lay, sch, sampler, steps, gens([10, 11, 12]), batch_size=2)
    alone = sample(_ZeroEps(), prompts[2:], lay, sch, sampler, steps, gens([12]))
    torch.testing.assert_close(full, split)
    torch.testing.assert_close(full[2:], alone)
    with pytest.raises(ValueError, match="generators"):
        sample(_ZeroEps(), prompts, lay, sch, sampler, steps, gens([1, 2]))
    with pytest.raises(ConfigError, match="exceed"):
        sample(_ZeroEps(), prompts, lay, sch, sampler, 501)


def test_sample_with_real_denoiser_both_samplers(two_targets):
    tok, _ = two_targets
    cfg = _tiny_cfg(conditioning="pre_adaptive", num_train_timesteps=50)
    net = build_denoiser(cfg, tok.layout, 2).train()
    sch = make_scheduler(cfg)
    for sampler, steps in (("ddpm", None), ("ddim", 5)):
        out = sample(net, torch.randn(2, 2), tok.layout, sch, sampler, steps)
        assert out.shape == (2, tok.layout.n_tokens, C) and net.training  # mode restored
        assert tok.decode(out).shape == (2, tok.layout.n_params)
