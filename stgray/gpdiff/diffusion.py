"""Diffusion maths for GPDiff: schedulers, masked loss, one training step, sampling, EMA.

Pure torch + diffusers (no Ray): a Ray Train per-worker loop calls ``train_step``.
Noise is drawn only at real token slots (padding stays exactly 0 in x_t, in training and
in sampling), the loss is masked to those slots, and nothing is clamped: tokens are
standardised per parameter position, so generated values may lie outside [-1, 1].
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor
from pydantic import Field, model_validator
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from stgray.config import StageConfig
from stgray.engines.common import resolve_device  # noqa: F401  (re-exported)
from stgray.errors import ConfigError
from stgray.gpdiff.tokenizer import TokenizerConfig, TokenLayout
from stgray.nn.gpdiff.denoiser import GPDiffDenoiser

Sampler = Literal["ddpm", "ddim"]


class DiffusionConfig(StageConfig):
    """The ``diffusion`` stage. Defaults follow the reference (DDPM 500, linear 1e-5..0.02,
    v-prediction, Adam 8e-5, batch 64, EMA 0.995, d=512, 80k steps)."""

    _unhashed: ClassVar[frozenset[str]] = frozenset({"device"})

    # tokens (must match the shard's TokenLayout)
    token_width: int = Field(64, gt=0, description="token width C")
    stats_eps: float = Field(1e-5, gt=0, description="floor of the per-position std")
    # denoiser
    d_model: int = Field(512, gt=0)
    layers: int = Field(6, ge=0)
    heads: int = Field(8, gt=0)
    ff_mult: int = Field(4, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    conditioning: Literal["pre", "pre_adaptive", "post_adaptive", "adaln"] = "adaln"
    pos_emb: Literal["learned", "sinusoidal"] = "sinusoidal"
    prompt_tokens: int = Field(4, gt=0, description="K prompt tokens (adaptive conditionings)")
    # diffusion process
    num_train_timesteps: int = Field(500, gt=1)
    beta_schedule: Literal["linear", "squaredcos_cap_v2"] = "linear"
    beta_start: float = Field(1e-5, gt=0)
    beta_end: float = Field(0.02, gt=0, lt=1)
    prediction_type: Literal["v_prediction", "epsilon"] = "v_prediction"
    timestep_spacing: Literal["leading", "trailing", "linspace"] = Field(
        "trailing", description="inference timesteps; 'trailing' starts at the last (noisiest) step")
    # optimisation
    lr: float = Field(8e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0, description="max grad norm; null = off")
    batch_size: int = Field(64, gt=0)
    ema_decay: float = Field(0.995, ge=0, le=1)
    train_steps: int = Field(80_000, ge=0)
    # sampling
    sampler: Sampler = "ddpm"
    sampling_steps: int | None = Field(None, gt=0, description="null: all steps (ddpm) / 50 (ddim)")
    ddim_eta: float = Field(0.0, ge=0)
    # execution
    seed: int = 0
    device: str = Field("auto", description="'auto' = cuda if available else cpu")
    amp: bool = Field(False, description="bf16 autocast; only used on CUDA")

    @model_validator(mode="after")
    def _check(self) -> "DiffusionConfig":
        if self.d_model % self.heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by heads ({self.heads})")
        if self.beta_schedule == "linear" and not self.beta_start < self.beta_end:
            raise ValueError("beta_start must be below beta_end")
        return self

    def tokenizer_config(self) -> TokenizerConfig:
        """The part that defines the token shard (so training settings do not re-tokenise)."""
        return TokenizerConfig(width=self.token_width, stats_eps=self.stats_eps)

    def n_sampling_steps(self) -> int:
        if self.sampling_steps is not None:
            return self.sampling_steps
        return self.num_train_timesteps if self.sampler == "ddpm" else 50


# ------------------------------------------------------------------------------------
# construction
# ------------------------------------------------------------------------------------
def make_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    """Training-time DDPM scheduler (``add_noise``, ``get_velocity``, ``alphas_cumprod``)."""
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps,
                         beta_start=cfg.beta_start, beta_end=cfg.beta_end,
                         beta_schedule=cfg.beta_schedule, prediction_type=cfg.prediction_type,
                         clip_sample=False, timestep_spacing=cfg.timestep_spacing)


def make_sampler(scheduler: DDPMScheduler, sampler: Sampler = "ddpm"):
    """A fresh DDPM or DDIM scheduler with the training scheduler's config."""
    if sampler == "ddpm":
        return DDPMScheduler.from_config(scheduler.config)
    if sampler == "ddim":
        return DDIMScheduler.from_config(scheduler.config)
    raise ConfigError(f"unknown sampler '{sampler}' (ddpm or ddim)", field="sampler")


def build_denoiser(cfg: DiffusionConfig, layout: TokenLayout, prompt_dim: int) -> GPDiffDenoiser:
    if layout.width != cfg.token_width:
        raise ConfigError(f"token_width {cfg.token_width} does not match the shard's token "
                          f"width {layout.width}", field="token_width")
    return GPDiffDenoiser.from_token_layout(
        layout, prompt_dim, d_model=cfg.d_model, layers=cfg.layers, heads=cfg.heads,
        ff_mult=cfg.ff_mult, dropout=cfg.dropout, conditioning=cfg.conditioning,
        pos_emb=cfg.pos_emb, prompt_tokens=cfg.prompt_tokens)


def make_optimizer(model: nn.Module, cfg: DiffusionConfig) -> torch.optim.Optimizer:
    """AdamW (= Adam when weight_decay is 0)."""
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_ema(model: nn.Module, decay: float = 0.995) -> AveragedModel:
    """EMA copy of ``model`` (the denoiser has no running-stat buffers to average).

    The first ``update_parameters`` copies the weights; later ones lerp by ``1 - decay``.
    Call the EMA model like the model (``ema(x, t, prompt)``) or use ``ema.module``.
    """
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)


# ------------------------------------------------------------------------------------
# loss and training step
# ------------------------------------------------------------------------------------
def loss_weight(scheduler: DDPMScheduler, t: torch.Tensor) -> torch.Tensor:
    """(B,) weights: snr/(snr+1) for v-prediction (= alpha_bar_t), 1 for epsilon."""
    if scheduler.config.prediction_type != "v_prediction":
        return torch.ones(t.shape, device=t.device)
    ac = scheduler.alphas_cumprod.to(device=t.device, dtype=torch.float64)[t]
    snr = ac / (1 - ac)
    return (snr / (snr + 1)).float()


def _expand_mask(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    mask = mask.to(device=x.device, dtype=x.dtype)
    return mask.expand_as(x) if mask.dim() == x.dim() else mask[None].expand_as(x)


def diffusion_loss(model: nn.Module, x0: torch.Tensor, prompts: torch.Tensor,
                   token_mask: torch.Tensor, scheduler: DDPMScheduler,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Weighted MSE on the prediction target over real slots.

    x0 (B, L, C) clean tokens (padding 0), prompts (B, D), token_mask (L, C) or (B, L, C).
    Per sample: mean of squared errors over its real slots, times ``loss_weight``; then
    the mean over the batch.
    """
    B = x0.shape[0]
    m = _expand_mask(token_mask, x0)
    noise = randn_tensor(tuple(x0.shape), generator=generator, device=x0.device, dtype=x0.dtype) * m
    t = torch.randint(0, scheduler.config.num_train_timesteps, (B,), generator=generator,
                      device=generator.device if generator is not None else x0.device).to(x0.device)
    xt = scheduler.add_noise(x0, noise, t)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(x0, noise, t)
    else:
        target = noise
    pred = model(xt, t, prompts)
    se = (pred.float() - target.float()) ** 2 * m
    per_sample = se.flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1)
    return (per_sample * loss_weight(scheduler, t)).mean()


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def train_step(model: nn.Module, ema: AveragedModel | None, opt: torch.optim.Optimizer,
               batch_tokens: torch.Tensor, batch_prompts: torch.Tensor, token_mask: torch.Tensor,
               scheduler: DDPMScheduler, cfg: DiffusionConfig,
               generator: torch.Generator | None = None) -> float:
    """One optimiser step on a batch; updates ``ema``; returns the loss.

    batch_tokens (B, L, C) float, batch_prompts (B, D) float, token_mask (L, C) bool.
    Inputs are moved to the model's device. With ``cfg.amp`` on CUDA the forward pass
    runs under bf16 autocast (no grad scaler needed).
    """
    dev = _model_device(model)
    x0 = batch_tokens.to(dev, torch.float32, non_blocking=True)
    prompts = batch_prompts.to(dev, torch.float32, non_blocking=True)
    model.train()
    use_amp = cfg.amp and dev.type == "cuda"
    with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_amp):
        loss = diffusion_loss(model, x0, prompts, token_mask, scheduler, generator)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip is not None:
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    if ema is not None:
        ema.update_parameters(model)
    return float(loss.detach())


# ------------------------------------------------------------------------------------
# sampling
# ------------------------------------------------------------------------------------
@torch.no_grad()
def sample(model: nn.Module, prompts: torch.Tensor, layout: TokenLayout,
           scheduler: DDPMScheduler, sampler: Sampler = "ddpm", steps: int | None = None,
           generator: torch.Generator | list[torch.Generator] | None = None, eta: float = 0.0,
           batch_size: int | None = None) -> torch.Tensor:
    """Generate tokens (B, L, C) float32 on the model's device for prompts (B, D).

    ``scheduler`` is the training scheduler (its config defines the process); ``steps``
    defaults to all training steps for ddpm and 50 for ddim; ``eta`` is DDIM's noise
    (0 = deterministic). Padding slots are 0; values are not clamped. ``batch_size``
    splits large prompt sets into chunks. ``generator`` may be a list of B generators
    (one per sample, e.g. seeded by node): then each sample is reproducible whatever
    the batching; with one generator the draws depend on the chunking.
    """
    dev = _model_device(model)
    prompts = prompts.to(dev, torch.float32)
    B = prompts.shape[0]
    if isinstance(generator, (list, tuple)) and len(generator) != B:
        raise ValueError(f"{len(generator)} generators for {B} prompts")
    if batch_size and B > batch_size:
        gens = (list(generator[i:i + batch_size]) for i in range(0, B, batch_size)) \
            if isinstance(generator, (list, tuple)) else (generator for _ in range(0, B, batch_size))
        return torch.cat([sample(model, p, layout, scheduler, sampler, steps, g, eta)
                          for p, g in zip(prompts.split(batch_size), gens)])
    sched = make_sampler(scheduler, sampler)
    n = steps or (scheduler.config.num_train_timesteps if sampler == "ddpm" else 50)
    if n > scheduler.config.num_train_timesteps:
        raise ConfigError(f"{n} sampling steps exceed the {scheduler.config.num_train_timesteps} "
                          "training steps", field="sampling_steps")
    sched.set_timesteps(n, device=dev)
    if isinstance(generator, tuple):
        generator = list(generator)
    m = layout.mask.to(dev, torch.float32)[None]
    x = randn_tensor((B, layout.n_tokens, layout.width), generator=generator, device=dev,
                     dtype=torch.float32) * m
    was_training = model.training
    model.eval()
    try:
        for t in sched.timesteps:
            out = model(x, t.expand(B), prompts).float()
            kw = {"eta": eta} if sampler == "ddim" else {}
            x = sched.step(out, t, x, generator=generator, **kw).prev_sample * m
    finally:
        model.train(was_training)
    return x
