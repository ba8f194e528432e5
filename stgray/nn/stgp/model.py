"""The STGP model: encoder (two branches + gate) -> task prompts -> gated ST decoder -> head.

Stages and what they train (``parameters_for`` / ``set_stage``):

================== =========================================================
pretrain           everything except the four prompt banks
domain             the two domain banks (one per encoder branch)
task               the two task banks (decoder input: observed / masked)
task_extrapolation the two task banks and the head
finetune           everything except the prompt banks
================== =========================================================

``set_stage`` sets ``requires_grad`` accordingly and keeps every sub-module whose parameters
are all frozen in eval mode, also across later ``model.train()`` calls, so dropout never
randomises a frozen network while prompts train. Nothing upstream of the task banks changes
in the task stages, so an engine may run :meth:`STGPModel.encode` once under
``torch.no_grad()`` and reuse its tokens with :meth:`STGPModel.decode`.

Prompt banks are off in a new model. ``set_stage("domain")`` switches the domain banks on,
``set_stage("task")`` / ``("task_extrapolation")`` the task banks (domain banks stay as they
were: on after a domain stage, off when it was skipped); ``"pretrain"`` and ``"finetune"``
switch all banks off (full fine-tuning replaces prompts). The switches are buffers, saved
with the weights; :meth:`STGPModel.set_prompts` overrides them (e.g. ablations).
"""

from __future__ import annotations

from typing import Iterator, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from stgray.config import StageConfig
from stgray.nn.stgp.decoder import STGPDecoder
from stgray.nn.stgp.encoder import STGPEncoder, STGraph, as_graph

Stage = Literal["pretrain", "domain", "task", "task_extrapolation", "finetune"]
STAGES: tuple[str, ...] = ("pretrain", "domain", "task", "task_extrapolation", "finetune")


class STGPModelConfig(StageConfig):
    """STGP sizes. Defaults are the reference's (5-minute data: 25 patches x 12 steps)."""

    patch_len: int = Field(12, ge=1, description="steps per patch")
    num_patches: int = Field(25, ge=2, description="max patches per window (size of the position table)")
    steps_per_day: int = Field(288, ge=1, description="size of the time-of-day table")
    d_model: int = Field(128, ge=8)
    num_heads: int = Field(4, ge=1)
    ffn_dim: int = Field(256, ge=1)
    temporal_depth: int = Field(4, ge=1)
    spatial_depth: int = Field(4, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1, description="reference: 0.3")
    max_degree: int = Field(64, ge=2, description="degree-embedding table size; larger degrees are clipped")
    decoder_channels: int = Field(32, ge=1)
    decoder_blocks: int = Field(2, ge=1)
    decoder_dilations: tuple[int, ...] = (1, 2, 4)
    decoder_kernel: int = Field(3, ge=1, description="temporal conv taps over the patch axis")
    graph_order: int = Field(2, ge=1)
    skip_channels: int = Field(64, ge=1)
    head_hidden: int = Field(128, ge=1)
    domain_prompts: int | None = Field(25, ge=0, description="K of each domain bank; 0/None disables")
    task_prompts: int | None = Field(25, ge=0, description="K of each task bank; 0/None disables")
    prompt_threshold: float = Field(0.2, ge=0, le=1)
    prompt_init_std: float = Field(0.02, ge=0)
    bf16: bool = Field(False, description="compute the Transformer layers and the decoder layers in "
                       "bfloat16 (fp32 weights, embeddings, prompts, fusion, head and loss; fast on "
                       "CPUs with AMX / AVX512-BF16)")
    sparse_density: float = Field(0.1, ge=0, le=1,
                                  description="graph convs use sparse supports below this edge density "
                                  "(los_loop, 6% edges: sparse 2.7x faster than dense)")

    _unhashed = frozenset({"sparse_density"})

    @model_validator(mode="after")
    def _check(self) -> "STGPModelConfig":
        if self.d_model % self.num_heads:
            raise ValueError("d_model must be divisible by num_heads")
        if not self.decoder_dilations or min(self.decoder_dilations) < 1:
            raise ValueError("decoder_dilations must be positive")
        return self

    @property
    def window_len(self) -> int:
        return self.patch_len * self.num_patches


class STGPModel(nn.Module):
    """``forward(x (B,N,T), tod (B,T), dow (B,T), adj, mask (B,N,P)) -> recon (B,N,T)``.

    ``adj`` is an (N, N) float tensor (``adj[i, j]`` = weight of edge i -> j) or an
    :class:`STGraph` from :meth:`graph` (build it once per city to skip the set-up).
    x is normalised; values of masked cells are never read (they may be NaN).
    """

    def __init__(self, cfg: STGPModelConfig | None = None):
        super().__init__()
        self.cfg = cfg or STGPModelConfig()
        self.encoder = STGPEncoder(self.cfg)
        self.decoder = STGPDecoder(self.cfg)
        self._stage: str | None = None

    # --- forward ----------------------------------------------------------------------
    def graph(self, adj) -> STGraph:
        dev = next(self.parameters()).device
        return as_graph(adj, self.cfg).to(dev)

    def encode(self, x: Tensor, tod: Tensor, dow: Tensor, adj, mask: Tensor) -> Tensor:
        """Tokens (B, N, P, d): fused branch outputs at visible cells, mask tokens elsewhere."""
        return self.encoder(x, tod, dow, self._graph(adj, x), mask)

    def decode(self, tokens: Tensor, mask: Tensor, adj) -> Tensor:
        """Reconstruction (B, N, T) from encoder tokens."""
        out = self.decoder(tokens, mask, self._graph(adj, tokens))  # (B, N, P, L)
        return out.reshape(*out.shape[:2], -1)

    def forward(self, x: Tensor, tod: Tensor, dow: Tensor, adj, mask: Tensor) -> Tensor:
        g = self._graph(adj, x)
        if self.decoder.prompted:  # task prompts read every token
            return self.decode(self.encode(x, tod, dow, g, mask), mask, g)
        out = self.decoder.forward_parts(*self.encoder.parts(x, tod, dow, g, mask), mask, g)
        return out.reshape(*out.shape[:2], -1)

    def _graph(self, adj, like: Tensor) -> STGraph:
        g = as_graph(adj, self.cfg)
        return g if g.weight.device == like.device else g.to(like.device)

    # --- stages -----------------------------------------------------------------------
    def prompt_banks(self) -> dict[str, nn.Module]:
        return {"domain_temporal": self.encoder.domain_temporal,
                "domain_spatial": self.encoder.domain_spatial,
                "task_observed": self.decoder.task_observed, "task_masked": self.decoder.task_masked}

    def named_parameters_for(self, stage: Stage) -> Iterator[tuple[str, nn.Parameter]]:
        if stage not in STAGES:
            raise ValueError(f"unknown stage '{stage}' (expected one of {', '.join(STAGES)})")
        prompt_ids = {id(p) for bank in self.prompt_banks().values() for p in bank.parameters()}
        if stage in ("pretrain", "finetune"):
            keep = lambda name, p: id(p) not in prompt_ids  # noqa: E731
        else:
            prefixes = {"domain": ("encoder.domain_temporal.", "encoder.domain_spatial."),
                        "task": ("decoder.task_observed.", "decoder.task_masked."),
                        "task_extrapolation": ("decoder.task_observed.", "decoder.task_masked.",
                                               "decoder.head.")}[stage]
            keep = lambda name, p: name.startswith(prefixes)  # noqa: E731
        for name, p in self.named_parameters():
            if keep(name, p):
                yield name, p

    def parameters_for(self, stage: Stage) -> list[nn.Parameter]:
        """Exactly the parameters ``stage`` trains (give these to the optimizer)."""
        return [p for _, p in self.named_parameters_for(stage)]

    @property
    def stage(self) -> str | None:
        return self._stage

    def set_prompts(self, domain: bool | None = None, task: bool | None = None) -> "STGPModel":
        """Switch the domain / task banks on or off (None: leave as is)."""
        if domain is not None:
            self.encoder.domain_temporal.active = domain
            self.encoder.domain_spatial.active = domain
        if task is not None:
            self.decoder.task_observed.active = task
            self.decoder.task_masked.active = task
        return self

    def prompts_active(self) -> dict[str, bool]:
        return {name: bank.active for name, bank in self.prompt_banks().items()}

    def set_stage(self, stage: Stage | None) -> "STGPModel":
        """Freeze all but ``stage``'s parameters (None: everything trainable), set module
        modes and switch prompt banks (see the module docstring)."""
        keep = {id(p) for p in self.parameters_for(stage)} if stage is not None else None
        for p in self.parameters():
            p.requires_grad_(keep is None or id(p) in keep)
            if keep is not None and id(p) not in keep:
                p.grad = None
        self._stage = stage
        if stage in ("pretrain", "finetune"):
            self.set_prompts(domain=False, task=False)
        elif stage == "domain":
            self.set_prompts(domain=True)
        elif stage in ("task", "task_extrapolation"):
            self.set_prompts(task=True)
        return self.train(self.training)

    def train(self, mode: bool = True) -> "STGPModel":
        super().train(mode)
        if mode and self._stage is not None:
            _frozen_to_eval(self, True)
        return self


def _frozen_to_eval(m: nn.Module, parent_training: bool) -> None:
    """A module with parameters trains iff one of them requires grad; one without
    parameters (dropout) follows its parent."""
    params = list(m.parameters())
    m.training = any(p.requires_grad for p in params) if params else parent_training
    for c in m.children():
        _frozen_to_eval(c, m.training)


def masked_mae(recon: Tensor, target: Tensor, score_mask: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean |recon - target| over scored, valid, non-NaN entries of (B, N, T).

    ``score_mask`` is (B, N, T) or per cell (B, N, P) (repeated over each patch's steps);
    ``valid`` optionally excludes more entries (e.g. missing readings). 0 if nothing scored.
    """
    if score_mask.shape != recon.shape:
        T, P = recon.shape[-1], score_mask.shape[-1]
        if T % P:
            raise ValueError(f"score mask {tuple(score_mask.shape)} does not tile {tuple(recon.shape)}")
        score_mask = score_mask.repeat_interleave(T // P, dim=-1)
    sel = score_mask & ~torch.isnan(target)
    if valid is not None:
        sel = sel & valid
    diff = torch.where(sel, recon - torch.nan_to_num(target), torch.zeros_like(recon))
    return diff.abs().sum() / sel.sum().clamp(min=1)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
