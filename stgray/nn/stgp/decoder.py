"""STGP decoder: task prompts, a gated spatio-temporal network, and a head back to steps.

Each layer runs, in parallel on its input x (N, B, P, C) (node-major inside the decoder):
- t: a dilated temporal convolution over the patch axis ("same" padding, non-causal, since
  masked cells can sit anywhere in the window), and
- s: an order-``K`` graph convolution over [row-normalised A, row-normalised A^T]:
  Linear([x, S1 x, S1^2 x, S2 x, S2^2 x]);
then gates them, g = sigmoid(W1 t + W2 s), h = g * s + (1 - g) * t, adds a skip projection,
and updates x = LayerNorm(x + h) (the last layer only feeds its skip, so it has no norm).
The head maps the summed skips of each cell back to its L steps. ``blocks`` x
``len(dilations)`` layers (reference: 2 x (1, 2, 4)).

Diffusions: a dense graph (the usual city sizes) stacks [S1, S1^2, S2, S2^2] into one
(4N, N) matrix, one matmul per layer; a sparse one (``STGraph`` decides by edge density)
runs CSR products with precomputed transposes for the backward pass.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stgray.nn.stgp.encoder import FastDropout, STGraph
from stgray.nn.stgp.prompts import PromptBank

if TYPE_CHECKING:  # pragma: no cover
    from stgray.nn.stgp.model import STGPModelConfig


class _SpMM(torch.autograd.Function):
    """``a @ x`` for a sparse CSR ``a`` whose transpose is precomputed (no gradient to ``a``);
    autograd's own backward would convert ``a^T`` to CSR at every call."""

    @staticmethod
    def forward(ctx, a: Tensor, a_t: Tensor, x: Tensor) -> Tensor:
        ctx.a_t = a_t
        return torch.sparse.mm(a, x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return None, None, torch.sparse.mm(ctx.a_t, grad.contiguous())


def diffuse(support: Tensor, x: Tensor, support_t: Tensor | None = None) -> Tensor:
    """``y[i] = sum_j support[i, j] x[j]`` for node-major x (N, ...); support dense (M, N)
    -> y (M, ...), or CSR (N, N) with ``support_t`` its transpose for the backward pass."""
    flat = x.reshape(x.shape[0], -1)
    if support.layout != torch.strided:  # CSR mm has no bf16 kernel: run it in fp32
        with torch.autocast(x.device.type, enabled=False):
            xf = flat.to(support.dtype)
            if support_t is not None and torch.is_grad_enabled() and xf.requires_grad:
                y = _SpMM.apply(support, support_t, xf)
            else:
                y = torch.sparse.mm(support, xf)
        return y.to(x.dtype).view(x.shape)
    return torch.mm(support.to(x.dtype), flat).view(support.shape[0], *x.shape[1:])


class GatedSTLayer(nn.Module):
    """One decoder layer on node-major x (N, B, P, C).

    The dilated conv is a (1, k) ``Conv2d`` on a channels-last view of x (no copies; the
    CPU's oneDNN kernel), the graph conv diffuses x and sums one matmul per diffusion
    (``gcn`` holds the weights of ``Linear((1 + order * supports) * C, C)``; narrow
    concatenations are slow on the CPU).
    """

    def __init__(self, channels: int, skip_channels: int, dilation: int, kernel_size: int,
                 order: int, num_supports: int, dropout: float, last: bool = False):
        super().__init__()
        self.channels, self.dilation, self.kernel_size, self.order = channels, dilation, kernel_size, order
        self.tcn = nn.Conv2d(channels, channels, (1, kernel_size), dilation=(1, dilation))
        self.gcn = nn.Linear((1 + order * num_supports) * channels, channels)
        self.gate_t = nn.Linear(channels, channels)
        self.gate_s = nn.Linear(channels, channels, bias=False)
        self.skip = nn.Linear(channels, skip_channels)
        # the last layer's residual output is never used (only its skip): no norm to train
        self.norm = None if last else nn.LayerNorm(channels)
        self.drop = FastDropout(dropout)

    def temporal(self, x: Tensor) -> Tensor:
        """Dilated conv over the patch axis (dim 2), zero "same" padding, non-causal:
        t[p] = sum_i W_i x[p + (i - c) * dilation] with c = (k - 1) // 2."""
        N, B, P, C = x.shape
        total = (self.kernel_size - 1) * self.dilation
        left = total // 2
        v = x.reshape(N * B, 1, P, C)
        if total % 2:
            v = F.pad(v, (0, 0, left, total - left))
            pad = (0, 0)
        else:
            pad = (0, left)
        y = F.conv2d(v.permute(0, 3, 1, 2), self.tcn.weight.to(x.dtype), self.tcn.bias.to(x.dtype),
                     padding=pad, dilation=(1, self.dilation))  # channels-last in and out
        return y.permute(0, 2, 3, 1).reshape(N, B, P, C)

    def spatial(self, x: Tensor, graph: STGraph) -> Tensor:
        """(N, B, P, C) -> (N*B*P, C): gcn([x, S1 x, S1^2 x, S2 x, S2^2 x]) as chained addmm."""
        C, w = self.channels, self.gcn.weight.to(x.dtype)
        out = torch.addmm(self.gcn.bias.to(x.dtype), x.reshape(-1, C), w[:, :C].t())
        if graph.powers is not None:  # dense: every diffusion in one matmul
            hs = diffuse(graph.powers, x).view(-1, x.numel() // C, C)
            if hs.shape[0] != 2 * self.order:
                raise ValueError(f"graph built for order {hs.shape[0] // 2}; the decoder uses {self.order}")
            for j, h in enumerate(hs.unbind(0)):  # unbind: one gradient stack, not a zero-fill each
                out = torch.addmm(out, h, w[:, (j + 1) * C:(j + 2) * C].t())
            return out
        j = 1
        for a, a_t in zip(graph.supports, graph.supports_t):
            h = x
            for _ in range(self.order):
                h = diffuse(a, h, a_t)
                out = torch.addmm(out, h.reshape(-1, C), w[:, j * C:(j + 1) * C].t())
                j += 1
        return out

    def forward(self, x: Tensor, graph: STGraph, skip: Tensor) -> tuple[Tensor, Tensor]:
        """x (N, B, P, C), skip (N*B*P, skip) -> updated x and skip + W_skip h (no bias:
        the decoder adds all layers' skip biases once)."""
        C, dt = self.channels, x.dtype  # runs in x's dtype (fp32 weights cast on the fly)
        t = F.gelu(self.temporal(x).reshape(-1, C))
        s = F.gelu(self.spatial(x, graph))
        g = torch.addmm(self.gate_t.bias.to(dt), t, self.gate_t.weight.to(dt).t())
        g = torch.sigmoid(torch.addmm(g, s, self.gate_s.weight.to(dt).t()))
        h = self.drop(torch.addcmul(t, g, s - t))  # g * s + (1 - g) * t (fp32 lerp is slow)
        skip = torch.addmm(skip, h, self.skip.weight.to(dt).t())
        if self.norm is None:
            return x, skip
        n = self.norm
        return F.layer_norm(x + h.view(x.shape), n.normalized_shape, n.weight.to(dt), n.bias.to(dt), n.eps), skip


class STGPHead(nn.Module):
    """Summed skips (B, N, P, skip) -> steps (B, N, P, L)."""

    def __init__(self, skip_channels: int, hidden: int, patch_len: int):
        super().__init__()
        self.fc1 = nn.Linear(skip_channels, hidden)
        self.fc2 = nn.Linear(hidden, patch_len)

    def forward(self, skip: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(F.relu(skip))))


class STGPDecoder(nn.Module):
    """``forward(tokens (B,N,P,d), mask (B,N,P), graph) -> (B, N, P, L)``."""

    def __init__(self, cfg: "STGPModelConfig"):
        super().__init__()
        d, C = cfg.d_model, cfg.decoder_channels
        self.bf16 = cfg.bf16
        self.task_observed = PromptBank(cfg.task_prompts, d, cfg.prompt_threshold, cfg.prompt_init_std)
        self.task_masked = PromptBank(cfg.task_prompts, d, cfg.prompt_threshold, cfg.prompt_init_std)
        self.input = nn.Linear(d, C)
        dils = [dil for _ in range(cfg.decoder_blocks) for dil in cfg.decoder_dilations]
        self.layers = nn.ModuleList(
            GatedSTLayer(C, cfg.skip_channels, dil, cfg.decoder_kernel, cfg.graph_order, 2, cfg.dropout,
                         last=i == len(dils) - 1)
            for i, dil in enumerate(dils))
        self.head = STGPHead(cfg.skip_channels, cfg.head_hidden, cfg.patch_len)

    def prompt(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """Task prompts: the observed-cell bank at visible cells, the masked-cell bank at masked."""
        if not (self.task_observed.active or self.task_masked.active):
            return tokens
        m = mask[..., None]
        return tokens + torch.where(m, self.task_masked.prompt(tokens), self.task_observed.prompt(tokens))

    def forward(self, tokens: Tensor, mask: Tensor, graph: STGraph) -> Tensor:
        if tokens.shape[:3] != mask.shape:
            raise ValueError(f"tokens {tuple(tokens.shape)} and mask {tuple(mask.shape)} disagree")
        # Node-major (N, B, P, C) inside: graph convs then need no transposes.
        dt = torch.bfloat16 if self.bf16 else torch.float32
        x = self.input(self.prompt(tokens, mask).transpose(0, 1)).to(dt)
        skip = sum(layer.skip.bias for layer in self.layers).to(dt)
        for layer in self.layers:
            x, skip = layer(x, graph, skip)
        return self.head(skip.view(*x.shape[:3], -1).float()).transpose(0, 1)
