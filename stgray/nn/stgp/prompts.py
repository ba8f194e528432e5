"""STGP prompt banks: K learned prompt vectors added to tokens by their thresholded affinity.

For a token x (d,) and a bank P (K, d): s = sigmoid(x P^T), scores below ``threshold`` are
zeroed, and the token becomes x + s P = x + sum_k s_k P_k. Computed as two matrix products,
(..., d) @ (d, K) -> (..., K) @ (K, d); the reference builds a (..., K, d) tensor instead
(about 0.5 GB at batch 8, 207 nodes, 25 patches).

A bank with K = 0 (or None) is disabled: it owns no parameter and returns its input.
An enabled bank is also switched on or off (``active``, a buffer, so it is saved with the
weights); an inactive bank returns its input and costs nothing. ``STGPModel.set_stage``
switches banks on for the stages that train them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class PromptBank(nn.Module):
    """``forward(x (..., d)) -> x + prompt(x)``."""

    def __init__(self, num_prompts: int | None, dim: int, threshold: float = 0.2, init_std: float = 0.02):
        super().__init__()
        self.num_prompts = int(num_prompts or 0)
        self.dim = dim
        self.threshold = float(threshold)
        if self.num_prompts > 0:
            # Small random init: zeros would give every prompt the same gradient forever.
            self.prompts = nn.Parameter(torch.randn(self.num_prompts, dim) * init_std)
        else:
            self.register_parameter("prompts", None)
        self.register_buffer("active_flag", torch.tensor(False))

    @property
    def enabled(self) -> bool:
        """Has prompts (K > 0)."""
        return self.prompts is not None

    @property
    def active(self) -> bool:
        """Has prompts and is switched on."""
        return self.prompts is not None and bool(self.active_flag)

    @active.setter
    def active(self, on: bool) -> None:
        self.active_flag.fill_(bool(on))

    def scores(self, x: Tensor) -> Tensor:
        """(..., d) -> (..., K): sigmoid affinities, those below the threshold set to 0."""
        s = torch.sigmoid(x @ self.prompts.t())
        return s.masked_fill(s < self.threshold, 0.0)

    def prompt(self, x: Tensor) -> Tensor:
        """The added prompt sum_k s_k P_k, shape of ``x`` (zeros when inactive)."""
        if not self.active:
            return torch.zeros_like(x)
        return self.scores(x) @ self.prompts

    def forward(self, x: Tensor) -> Tensor:
        if not self.active:
            return x
        return x + self.scores(x) @ self.prompts

    def extra_repr(self) -> str:
        return (f"num_prompts={self.num_prompts}, dim={self.dim}, threshold={self.threshold}, "
                f"active={self.active}")


def naive_prompt(x: Tensor, prompts: Tensor, threshold: float) -> Tensor:
    """The reference's formulation (materialises (..., K, d)); for tests only."""
    xe = x.unsqueeze(-2)  # (..., 1, d)
    s = torch.sigmoid((xe * prompts).sum(-1, keepdim=True))  # (..., K, 1)
    s = torch.where(s < threshold, torch.zeros_like(s), s)
    return x + (s * prompts).sum(-2)
