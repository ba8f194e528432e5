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

Diffusions (:class:`_GraphConv`, one autograd node per layer) by Horner's scheme: the
weight blocks multiply x first, then each support S chains ``order`` products,
S (z_1 + S (z_2 + ..)); sparse graphs (``STGraph`` decides by edge density) as CSR products
in fp32 with precomputed transposes for the backward pass (in bf16 the dense copy of a
small sparse graph is used instead). Only x is kept: the backward pass runs the transposed
chain once for the gradients of x and of the weights.

The gate, its GELUs and dropout run as one fused function (:class:`GatedMix`), and the
dropout scale is folded into the skip projection and the residual add.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stgray.nn.stgp.encoder import FastDropout, STGraph
from stgray.nn.stgp.kernels import GatedMix, Linear, ReluMLP, compute_dtype, mm_dw, mm_dx, mm_dx_add_, mm_fwd
from stgray.nn.stgp.prompts import PromptBank

if TYPE_CHECKING:  # pragma: no cover
    from stgray.nn.stgp.model import STGPModelConfig


def _op_mm(op: Tensor, a: Tensor, acc: Tensor | None = None) -> Tensor:
    """``acc + op @ a`` (``op @ a`` without acc) for a dense or CSR (N, N) ``op`` and (N, F)
    ``a``, in a's dtype; CSR products run in fp32 (no bf16 kernel). A dense product adds into
    acc in place (acc is a temporary: no copy of it, ~12% of a (207, 6400) product)."""
    if op.layout != torch.strided:
        if a.dtype == torch.float32:
            return torch.mm(op, a) if acc is None else torch.addmm(acc, op, a)
        y = torch.mm(op, a.float()).to(a.dtype)
        return y if acc is None else acc.add_(y)
    op = op.to(a.dtype)
    return torch.mm(op, a) if acc is None else acc.addmm_(op, a)


class _GraphConv(torch.autograd.Function):
    """``y = b + x W_0^T + sum_s sum_k (S_s^k x) W_(s,k)^T`` on node-major x (N, R, C), for
    the supports S_s of ``ops`` (``STGraph.diffusion_ops``) and k = 1..order, with
    W = [W_0, W_(1,1), .., W_(1,order), W_(2,1), ..] the weight of
    ``Linear((1 + 2 * order) * C, C)``. Returns (N * R, C) in x's dtype. No gradient flows
    to the graph.

    Horner's scheme: the products with the weight blocks come first, z_(s,k) = x W_(s,k)^T,
    then y_s = S_s (z_(s,1) + S_s (z_(s,2) + ..)): ``order`` graph products per support, and
    nothing but x kept for the backward pass, which runs the transposed chain
    a_(s,k) = (S_s^T)^k g once for the gradients of both x and W (no recomputed powers)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, ops, order: int) -> Tensor:
        n, c = x.shape[0], weight.shape[0]
        x2 = x.reshape(-1, c)
        blocks = weight.view(c, -1, c).transpose(0, 1).contiguous()  # (1 + 2 * order, C, C): W_j
        y = mm_fwd(x2, blocks[0], bias).view(n, -1)
        for s, (op, _) in enumerate(ops):
            acc = None
            for k in range(order, 0, -1):
                z = mm_fwd(x2, blocks[1 + s * order + k - 1], None).view(n, -1)
                acc = z if acc is None else _op_mm(op, acc, z)
            y = _op_mm(op, acc, y)
        ctx.ops, ctx.order = ops, order
        ctx.save_for_backward(x, blocks)
        return y.view(-1, c)

    @staticmethod
    def backward(ctx, g: Tensor):
        with torch.autocast(g.device.type, enabled=False):
            return _GraphConv._backward(ctx, g)

    @staticmethod
    def _backward(ctx, g: Tensor):
        x, blocks = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        n, c, order = x.shape[0], blocks.shape[1], ctx.order
        x2 = x.reshape(-1, c)
        g = g.to(x.dtype).contiguous()
        gx = mm_dx(g, blocks[0]) if need_x else None
        gw = torch.empty_like(blocks) if need_w else None
        if need_w:
            gw[0] = mm_dw(g, x2)
        if need_x or need_w:
            for s, (_, op_t) in enumerate(ctx.ops):
                a = g
                for k in range(1, order + 1):
                    j = 1 + s * order + k - 1
                    a = _op_mm(op_t, a.view(n, -1)).view(-1, c)  # (S_s^T)^k g
                    if need_w:
                        gw[j] = mm_dw(a, x2)
                    if need_x:
                        mm_dx_add_(gx, a, blocks[j])
        gb = g.sum(0) if need_b else None
        gw = gw.transpose(0, 1).reshape(c, -1) if need_w else None
        return (gx.view(x.shape) if need_x else None), gw, gb, None, None


class GatedSTLayer(nn.Module):
    """One decoder layer on node-major x (N, B, P, C).

    The dilated conv is a (1, k) ``Conv2d`` on a channels-last view of x (no copies; the
    CPU's oneDNN kernel), the graph conv is :class:`_GraphConv` (``gcn`` holds the weights of
    ``Linear((1 + order * supports) * C, C)``). Dropout's scale is folded into the skip
    projection and the residual add (one product with the keep mask, inside the gate).
    """

    def __init__(self, channels: int, skip_channels: int, dilation: int, kernel_size: int,
                 order: int, num_supports: int, dropout: float, last: bool = False):
        super().__init__()
        if num_supports != 2:
            raise ValueError("the graph conv runs on two supports (A and A^T)")
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
        """(N, B, P, C) -> (N*B*P, C): gcn([x, S1 x, S1^2 x, S2 x, S2^2 x]) (under autocast:
        in the autocast dtype)."""
        dt = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            return _GraphConv.apply(x.reshape(x.shape[0], -1, self.channels).to(dt), self.gcn.weight.to(dt),
                                    self.gcn.bias.to(dt), graph.diffusion_ops(dt), self.order)

    def forward(self, x: Tensor, graph: STGraph, skip: Tensor) -> tuple[Tensor, Tensor]:
        """x (N, B, P, C), skip (N*B*P, skip) -> updated x and skip + W_skip h (no bias:
        the decoder adds all layers' skip biases once)."""
        C, dt = self.channels, compute_dtype(x)  # fp32 weights cast on the fly
        with torch.autocast(x.device.type, enabled=False):
            tp = self.temporal(x.to(dt)).reshape(-1, C)
        sp = self.spatial(x, graph)
        keep = self.drop.keep_mask(sp)
        h = GatedMix.apply(tp, sp, self.gate_t.weight.to(dt), self.gate_t.bias.to(dt),
                           self.gate_s.weight.to(dt), keep)
        scale = self.drop.scale if keep is not None else 1.0
        skip = skip + Linear.apply(h, (self.skip.weight * scale).to(dt), None)
        if self.norm is None:
            return x, skip
        n = self.norm
        xd = x.dtype
        return F.layer_norm(torch.add(x, h.view(x.shape), alpha=scale), n.normalized_shape,
                            n.weight.to(xd), n.bias.to(xd), n.eps), skip


class STGPHead(nn.Module):
    """Summed skips (B, N, P, skip) -> steps (B, N, P, L)."""

    def __init__(self, skip_channels: int, hidden: int, patch_len: int):
        super().__init__()
        self.fc1 = nn.Linear(skip_channels, hidden)
        self.fc2 = nn.Linear(hidden, patch_len)

    def forward(self, skip: Tensor) -> Tensor:
        """fc2(relu(fc1(relu(skip)))), the hidden layer recomputed in the backward pass."""
        dt = compute_dtype(skip)
        x = skip.reshape(-1, skip.shape[-1]).to(dt)
        y = ReluMLP.apply(x, self.fc1.weight.to(dt), self.fc1.bias.to(dt), self.fc2.weight.to(dt),
                          self.fc2.bias.to(dt))
        return y.view(*skip.shape[:-1], y.shape[-1])


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
        if not self.prompted:
            return tokens
        m = mask[..., None]
        return tokens + torch.where(m, self.task_masked.prompt(tokens), self.task_observed.prompt(tokens))

    def prompted_input(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """``input(prompt(tokens, mask))`` (B, N, P, C) without the prompted (B, N, P, d) tokens:
        input(t + s P) = input(t) + s (P W_in^T), with the two banks' scores s side by side
        (the other bank's half zeroed at each cell): two thin products instead of two
        d-wide prompt sums, a select and a d-wide input product (and their gradients)."""
        w, b = self.input.weight, self.input.bias
        x = F.linear(tokens, w, b)
        banks = [(bank, sel) for bank, sel in ((self.task_masked, mask), (self.task_observed, ~mask)) if bank.active]
        if not banks:
            return x
        prompts = torch.cat([bank.prompts for bank, _ in banks])  # (sum K, d)
        scores = torch.sigmoid(tokens @ prompts.t())  # (B, N, P, sum K)
        keep, i = [], 0
        for bank, sel in banks:  # a bank's scores count at its cells and above its threshold
            keep.append(sel[..., None] & (scores[..., i:i + bank.num_prompts] >= bank.threshold))
            i += bank.num_prompts
        keep = keep[0] if len(keep) == 1 else torch.cat(keep, -1)
        scores = torch.where(keep, scores, 0.0)
        return torch.addmm(x.reshape(-1, x.shape[-1]), scores.reshape(-1, scores.shape[-1]),
                           prompts @ w.t()).view(x.shape)

    def forward(self, tokens: Tensor, mask: Tensor, graph: STGraph) -> Tensor:
        if tokens.shape[:3] != mask.shape:
            raise ValueError(f"tokens {tuple(tokens.shape)} and mask {tuple(mask.shape)} disagree")
        # Node-major (N, B, P, C) inside: graph convs then need no transposes.
        x = self.prompted_input(tokens, mask)  # (B, N, P, C): C < d, so transpose after
        return self._body(x.transpose(0, 1).contiguous(), graph)

    @property
    def prompted(self) -> bool:
        return self.task_observed.active or self.task_masked.active

    def forward_parts(self, base: Tensor, cells: Tensor, fused: Tensor, mask: Tensor, graph: STGraph) -> Tensor:
        """``forward`` on the encoder's ``parts`` (task banks off): the input layer maps the
        (B, P, d) masked-cell tokens and the (V, d) visible ones, never the (B, N, P, d) whole."""
        if self.prompted:
            raise ValueError("forward_parts runs without task prompts (they read every token)")
        B, N, P = mask.shape
        w, b = self.input.weight, self.input.bias
        x = F.linear(base, w, b)[None].expand(N, B, P, -1).contiguous()  # (N, B, P, C), a fresh copy
        if cells.numel():
            bi, rest = cells // (N * P), cells % (N * P)  # canonical (b, n, p) -> node-major (n, b, p)
            ni, pi = rest // P, rest % P
            x.view(-1, x.shape[-1]).index_put_(((ni * B + bi) * P + pi,), F.linear(fused, w, b))
        return self._body(x, graph)

    def _body(self, x: Tensor, graph: STGraph) -> Tensor:
        """Node-major input (N, B, P, C) -> (B, N, P, L)."""
        dt = torch.bfloat16 if self.bf16 else torch.float32
        x = x.to(dt)
        skip = sum(layer.skip.bias for layer in self.layers).to(dt)
        for layer in self.layers:
            x, skip = layer(x, graph, skip)
        return self.head(skip.view(*x.shape[:3], -1).float()).transpose(0, 1)

