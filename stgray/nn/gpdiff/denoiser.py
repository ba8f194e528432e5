"""Transformer denoiser over parameter tokens, conditioned on a per-node prompt.

Input x_t (B, L, C) tokens, diffusion step t (B,), prompt (B, D) -> prediction (B, L, C)
(v or epsilon). Attention runs over the L tokens of each sample only (batch_first), never
across the batch as in two reference variants.

Conditioning (``conditioning``):
  pre            prompt projected to d and added to every token (with the step embedding)
  pre_adaptive   tokens cross-attend to K prompt tokens before the encoder
  post_adaptive  tokens cross-attend to K prompt tokens after the encoder
  adaln          DiT adaLN-Zero: per-layer shift/scale/gate from prompt + step embedding
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
from torch import nn

Conditioning = Literal["pre", "pre_adaptive", "post_adaptive", "adaln"]
CONDITIONINGS: tuple[str, ...] = ("pre", "pre_adaptive", "post_adaptive", "adaln")


def sinusoidal_embedding(x: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(N,) positions or steps (any real dtype) -> (N, dim) float32 [cos | sin]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device,
                                                           dtype=torch.float32) / half)
    a = x.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(a), torch.sin(a)], dim=-1)
    return nn.functional.pad(emb, (0, dim % 2))


class StepEmbedding(nn.Module):
    """Diffusion step (B,) -> (B, d): sinusoidal then a 2-layer SiLU MLP."""

    def __init__(self, d: int, freq_dim: int = 128):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, d), nn.SiLU(), nn.Linear(d, d))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(t, self.freq_dim))


class CrossAttentionBlock(nn.Module):
    """Pre-norm: x += MHA(LN(x), mem, mem); x += FFN(LN(x)). x (B, L, d), mem (B, K, d)."""

    def __init__(self, d: int, heads: int, ff: int, dropout: float):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(d, ff), nn.GELU(), nn.Dropout(dropout), nn.Linear(ff, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mem: torch.Tensor) -> torch.Tensor:
        h = self.n1(x)
        x = x + self.drop(self.attn(h, mem, mem, need_weights=False)[0])
        return x + self.drop(self.ff(self.n2(x)))


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class AdaLNBlock(nn.Module):
    """DiT block with adaLN-Zero: shift/scale/gate for attention and MLP from c (B, d)."""

    def __init__(self, d: int, heads: int, ff: int, dropout: float):
        super().__init__()
        self.n1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.n2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(d, ff), nn.GELU(), nn.Dropout(dropout), nn.Linear(ff, d))
        self.drop = nn.Dropout(dropout)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        s1, g1, a1, s2, g2, a2 = self.ada(c).chunk(6, dim=-1)
        h = _modulate(self.n1(x), s1, g1)
        x = x + a1[:, None] * self.drop(self.attn(h, h, h, need_weights=False)[0])
        h = _modulate(self.n2(x), s2, g2)
        return x + a2[:, None] * self.drop(self.ff(h))


class GPDiffDenoiser(nn.Module):
    """Denoiser for tokens of one ``TokenLayout``.

    Args:
        width: token width C.
        tensor_ids: (L,) tensor index of each token (``TokenLayout.token_tensor``).
        prompt_dim: D of the prompt vectors.
        d_model, layers, heads, ff_mult, dropout: Transformer size.
        conditioning: one of ``CONDITIONINGS``.
        pos_emb: "learned" or "sinusoidal" token position embedding.
        prompt_tokens: K prompt tokens for the adaptive (cross-attention) strategies.
    """

    def __init__(self, width: int, tensor_ids: Sequence[int] | torch.Tensor, prompt_dim: int,
                 d_model: int = 512, layers: int = 6, heads: int = 8, ff_mult: int = 4,
                 dropout: float = 0.0, conditioning: Conditioning = "adaln",
                 pos_emb: Literal["learned", "sinusoidal"] = "sinusoidal", prompt_tokens: int = 4):
        super().__init__()
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"unknown conditioning '{conditioning}'; choose from {CONDITIONINGS}")
        if d_model % heads:
            raise ValueError(f"d_model {d_model} is not divisible by heads {heads}")
        ids = torch.as_tensor(tensor_ids, dtype=torch.long)
        self.width, self.n_tokens, self.prompt_dim = width, int(ids.numel()), prompt_dim
        self.conditioning, self.d = conditioning, d_model
        n_tensors = int(ids.max()) + 1 if ids.numel() else 1
        ff = ff_mult * d_model

        self.register_buffer("tensor_ids", ids, persistent=False)
        self.inp = nn.Linear(width, d_model)
        self.step = StepEmbedding(d_model)
        self.tensor_emb = nn.Embedding(n_tensors, d_model)
        nn.init.normal_(self.tensor_emb.weight, std=0.02)
        if pos_emb == "learned":
            self.pos = nn.Parameter(torch.randn(self.n_tokens, d_model) * 0.02)
        elif pos_emb == "sinusoidal":
            self.register_buffer("pos", sinusoidal_embedding(torch.arange(self.n_tokens), d_model),
                                 persistent=False)
        else:
            raise ValueError(f"unknown pos_emb '{pos_emb}'")

        if conditioning in ("pre", "adaln"):
            self.prompt = nn.Sequential(nn.Linear(prompt_dim, d_model), nn.SiLU(),
                                        nn.Linear(d_model, d_model))
        else:
            self.k = prompt_tokens
            self.prompt = nn.Sequential(nn.Linear(prompt_dim, d_model), nn.SiLU(),
                                        nn.Linear(d_model, prompt_tokens * d_model))
            self.prompt_pos = nn.Parameter(torch.randn(prompt_tokens, d_model) * 0.02)
            self.cross = CrossAttentionBlock(d_model, heads, ff, dropout)

        if conditioning == "adaln":
            self.blocks = nn.ModuleList(AdaLNBlock(d_model, heads, ff, dropout)
                                        for _ in range(layers))
            self.final_norm = nn.LayerNorm(d_model, elementwise_affine=False, eps=1e-6)
            self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(d_model, 2 * d_model))
            nn.init.zeros_(self.final_ada[1].weight)
            nn.init.zeros_(self.final_ada[1].bias)
        else:
            self.blocks = nn.ModuleList(
                nn.TransformerEncoderLayer(d_model, heads, ff, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
                for _ in range(layers))
            self.final_norm = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, width)
        nn.init.zeros_(self.out.weight)  # start by predicting 0 (DiT)
        nn.init.zeros_(self.out.bias)

    @classmethod
    def from_token_layout(cls, layout, prompt_dim: int, **kw) -> "GPDiffDenoiser":
        """Build for a ``stgray.gpdiff.tokenizer.TokenLayout``."""
        return cls(layout.width, layout.token_tensor, prompt_dim, **kw)

    def _prompt_tokens(self, prompt: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        p = self.prompt(prompt).view(prompt.shape[0], self.k, self.d)
        return p + self.prompt_pos[None] + temb[:, None]

    def forward(self, x: torch.Tensor, t: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """x (B, L, C), t (B,) or scalar step, prompt (B, D) -> (B, L, C)."""
        B = x.shape[0]
        t = t.reshape(-1).expand(B) if t.numel() == 1 else t
        temb = self.step(t)
        h = self.inp(x) + (self.pos + self.tensor_emb(self.tensor_ids))[None].to(x.dtype)
        if self.conditioning == "adaln":
            c = temb + self.prompt(prompt)
            for blk in self.blocks:
                h = blk(h, c)
            shift, scale = self.final_ada(c).chunk(2, dim=-1)
            return self.out(_modulate(self.final_norm(h), shift, scale))
        if self.conditioning == "pre":
            h = h + (temb + self.prompt(prompt))[:, None]
        else:
            h = h + temb[:, None]
            mem = self._prompt_tokens(prompt, temb)
            if self.conditioning == "pre_adaptive":
                h = self.cross(h, mem)
        for blk in self.blocks:
            h = blk(h)
        if self.conditioning == "post_adaptive":
            h = self.cross(h, mem)
        return self.out(self.final_norm(h))
