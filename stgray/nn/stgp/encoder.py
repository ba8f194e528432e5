"""STGP encoder: patch embedding and two parallel Transformer branches over the *visible*
(node, patch) cells, fused by a gate; masked cells get a learned mask token.

- Temporal branch (TSFormer-style): one sequence per node of its visible patches, with a
  learnable embedding per patch index and time-of-day / day-of-week embeddings.
- Spatial branch (Graphormer-style): one set per patch of its visible nodes, with in/out
  degree embeddings and a per-head attention bias computed from the weighted adjacency.

Only visible cells are embedded and attended to: the values of masked cells are never read,
so they cannot influence any output. Visible cells are packed into dense (sequences, length,
d) batches (padding only when sequences differ in length), so a pre-training batch with 50%
of patches and 50% of nodes masked costs about a quarter of a full one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stgray.nn.stgp.kernels import (BiasedAttention, DropoutAdd, GeluLinear, Linear, LNLinear, compute_dtype,
                                   keep_as, sdpa)
from stgray.nn.stgp.prompts import PromptBank

if TYPE_CHECKING:  # pragma: no cover
    from stgray.nn.stgp.model import STGPModelConfig


# --- graph ------------------------------------------------------------------------------

DENSE_COPY_NODES = 1024  # sparse graphs up to this size also keep dense supports (bf16)

@dataclass
class STGraph:
    """Everything the model derives from one weighted adjacency ``adj[i, j]`` (edge i -> j).

    weight: (N, N) edge weights scaled to [0, 1] by the largest off-diagonal weight
        (NaN and negative weights count as no edge; the diagonal is not an edge).
    edge: (N, N) bool, weight > 0 off the diagonal.
    in_degree / out_degree: (N,) int64 edge counts, clipped to ``max_degree - 1``.
    supports: [row-normalised A, row-normalised A^T] (= the column-normalised A,
        transposed), dense or sparse CSR; applied as ``x'_i = sum_j S[i, j] x_j``.
    supports_t: sparse graphs only: the supports' transposes (CSR), for the backward pass.
    dense: sparse graphs of at most ``DENSE_COPY_NODES`` nodes only: dense copies of the
        supports (bf16 compute uses them: no bf16 CSR kernel).

    Graphs with an edge density below ``sparse_density`` are stored sparse and diffuse by
    CSR products in fp32. A sparse product costs about six dense multiply-adds per stored
    weight on the CPU (fp32), so sparse wins below about 15% density: 2.7x on the 207-node
    los_loop graph (6% edges). In bf16 the dense product is about as fast as the fp32
    sparse one and needs no casts.
    """

    weight: Tensor
    edge: Tensor
    in_degree: Tensor
    out_degree: Tensor
    supports: list[Tensor] = field(default_factory=list)
    supports_t: list[Tensor] = field(default_factory=list)
    dense: list[Tensor] = field(default_factory=list)

    @property
    def num_nodes(self) -> int:
        return int(self.weight.shape[0])

    @property
    def sparse(self) -> bool:
        return bool(self.supports_t)

    @classmethod
    def from_adj(cls, adj, max_degree: int = 64, sparse_density: float = 0.1) -> "STGraph":
        a = torch.as_tensor(adj).detach().float()
        if a.dim() != 2 or a.shape[0] != a.shape[1]:
            raise ValueError(f"adjacency must be (N, N); got {tuple(a.shape)}")
        n = a.shape[0]
        a = torch.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0).clamp(min=0.0)
        a = a * (1.0 - torch.eye(n, dtype=a.dtype, device=a.device))
        top = a.max() if a.numel() else a.new_zeros(())
        weight = a / top if float(top) > 0 else torch.zeros_like(a)
        edge = weight > 0
        out_deg = edge.sum(1).clamp(max=max_degree - 1)
        in_deg = edge.sum(0).clamp(max=max_degree - 1)
        fwd, bwd = _row_normalise(weight), _row_normalise(weight.t())
        density = float(edge.sum()) / max(n * n, 1)
        if density < sparse_density:
            return cls(weight, edge, in_deg.long(), out_deg.long(), [_to_sparse(fwd), _to_sparse(bwd)],
                       [_to_sparse(fwd.t()), _to_sparse(bwd.t())], [fwd, bwd] if n <= DENSE_COPY_NODES else [])
        return cls(weight, edge, in_deg.long(), out_deg.long(), [fwd, bwd])

    def to(self, device) -> "STGraph":
        return STGraph(self.weight.to(device), self.edge.to(device), self.in_degree.to(device),
                       self.out_degree.to(device), [s.to(device) for s in self.supports],
                       [s.to(device) for s in self.supports_t], [s.to(device) for s in self.dense])

    def diffusion_ops(self, dtype: torch.dtype = torch.float32) -> list[tuple[Tensor, Tensor]]:
        """``[(S, S^T)]`` per support, as the graph conv applies them to (N, F) features:
        dense (S^T a transposed view) for dense graphs and, in low precision, for sparse
        ones with a dense copy; CSR with precomputed CSR transposes otherwise (fp32
        products)."""
        if not self.sparse:
            return [(s, s.t()) for s in self.supports]
        if self.dense and dtype in (torch.bfloat16, torch.float16):
            return [(s, s.t()) for s in self.dense]
        return list(zip(self.supports, self.supports_t))


def _row_normalise(a: Tensor) -> Tensor:
    d = a.sum(1, keepdim=True)
    return torch.where(d > 0, a / d.clamp(min=1e-12), torch.zeros_like(a))


def _to_sparse(a: Tensor) -> Tensor:
    """Dense (N, N) -> sparse CSR (what ``torch.sparse.mm`` runs fastest on the CPU)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return a.contiguous().to_sparse_csr()


def as_graph(adj, cfg) -> STGraph:
    """An ``STGraph`` as is, or one built from an adjacency tensor / array."""
    if isinstance(adj, STGraph):
        return adj
    return STGraph.from_adj(adj, cfg.max_degree, cfg.sparse_density)


class GraphormerBias(nn.Module):
    """Degree embeddings and a per-head attention bias from the weighted adjacency.

    bias[h, i, j] = w_h * weight[i, j] + c_h   for an edge i -> j,
                  = e_h                        for a pair without an edge (weight 0),
                  = s_h                        on the diagonal.
    """

    def __init__(self, num_heads: int, dim: int, max_degree: int):
        super().__init__()
        self.max_degree = max_degree
        self.in_degree = nn.Embedding(max_degree, dim)
        self.out_degree = nn.Embedding(max_degree, dim)
        nn.init.normal_(self.in_degree.weight, std=0.02)
        nn.init.normal_(self.out_degree.weight, std=0.02)
        self.edge_scale = nn.Parameter(torch.zeros(num_heads))
        self.edge_bias = nn.Parameter(torch.zeros(num_heads))
        self.no_edge_bias = nn.Parameter(torch.zeros(num_heads))
        self.self_bias = nn.Parameter(torch.zeros(num_heads))

    def degree_embedding(self, g: STGraph) -> Tensor:
        """(N, d)."""
        top = self.max_degree - 1
        return self.in_degree(g.in_degree.clamp(0, top)) + self.out_degree(g.out_degree.clamp(0, top))

    def bias(self, g: STGraph, rows: Tensor | None = None, cols: Tensor | None = None) -> Tensor:
        """(H, N, N) float; with broadcastable node indices ``rows``, ``cols``: (H, *shape) of
        the bias between those node pairs, computed at the pairs (no (H, N, N) gather: the
        parameters' gradients come from sums, not a scatter)."""
        if rows is None:
            w, e = g.weight, g.edge
            eye = torch.eye(g.num_nodes, dtype=torch.bool, device=w.device)
        else:
            w, e, eye = g.weight[rows, cols], g.edge[rows, cols], rows == cols
        par = [t.view(-1, *([1] * w.dim())) for t in (self.edge_scale, self.edge_bias, self.no_edge_bias,
                                                       self.self_bias)]
        b = torch.where(e, par[0] * w + par[1], par[2])
        return torch.where(eye, par[3], b)


# --- transformer ------------------------------------------------------------------------

class FastDropout(nn.Module):
    """Inverted dropout from one random byte per element, about 3x faster on the CPU than
    ``nn.Dropout``'s Bernoulli draw. The drop probability is rounded to a multiple of 1/256
    (0.1 -> 26/256); kept outputs are scaled by ``scale`` = 1/(1 - p_used).

    Layers fold the two steps into neighbouring ops: ``keep_mask`` gives the elements to keep
    (multiplied in with the residual add, forward and backward) and ``scale`` goes into the
    preceding linear's weights or the following residual add."""

    def __init__(self, p: float):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError("dropout must be in [0, 1)")
        self.p = p
        self._cut = int(round(p * 256))

    @property
    def scale(self) -> float:
        return 256.0 / (256 - self._cut)

    @property
    def active(self) -> bool:
        return self.training and self._cut > 0

    def keep_mask(self, x: Tensor) -> Tensor | None:
        """Bool, shape of x: True = keep (None when inactive: eval mode or p rounds to 0).
        Apply it as a product with ``kernels.keep_as(keep, dtype)`` (vectorised; ``where``
        and ``masked_fill`` on a bool mask are not).

        On the CPU the bytes come from numpy's SFC64 (``random_raw``: ~6x faster than torch's
        serial Mersenne Twister, 0.28 vs 1.64 ms per 1.4 MB), seeded by one draw from torch's
        default generator, so ``torch.manual_seed`` still fixes the masks; elsewhere from
        torch (four bytes to an int32 draw)."""
        if not self.active:
            return None
        n = x.numel()
        if x.device.type == "cpu":  # compared in numpy too: 0.03 vs 0.24 ms per 1.4 MB
            seed = int(torch.empty((), dtype=torch.int64).random_())
            raw = np.random.SFC64(seed).random_raw(-(-n // 8), output=True)
            return torch.from_numpy(raw.view(np.uint8)[:n] >= self._cut).view(x.shape)
        r = torch.empty(-(-n // 4), dtype=torch.int32, device=x.device).random_(-2 ** 31, 2 ** 31)
        return (r.view(torch.uint8)[:n] >= self._cut).view(x.shape)

    def forward(self, x: Tensor) -> Tensor:
        keep = self.keep_mask(x)
        return x if keep is None else x * keep_as(keep, x.dtype) * self.scale

    def extra_repr(self) -> str:
        return f"p={self.p}"


class EncoderLayer(nn.Module):
    """Pre-norm Transformer encoder layer on ``F.scaled_dot_product_attention``.

    Same parameters as ``nn.TransformerEncoderLayer(batch_first=True, norm_first=True)``
    (GELU), but takes an attention mask that broadcasts to (S, H, L, L) — one (1, H, N, N)
    Graphormer bias serves every set instead of a copy per set — or a (G, 1, H, L, L) mask
    shared by each of G consecutive groups of S / G sets. Dropout acts on the two
    residual branches only: dropout on attention weights or the FFN hidden layer would force
    the unfused attention path and two more CPU random draws per layer.

    The products run in the fused functions of :mod:`stgray.nn.stgp.kernels` (LayerNorm +
    linear and GELU + linear keep their inputs only; attention under autograd and in bf16 is
    :class:`~stgray.nn.stgp.kernels.BiasedAttention`, fp32 inference SDPA's fused kernel),
    and the dropout scale is folded into the residual branch's output weights.
    """

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff1 = nn.Linear(dim, ffn_dim)
        self.ff2 = nn.Linear(ffn_dim, dim)
        self.drop = FastDropout(dropout)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """Runs in x's dtype (parameters are cast on the fly: fp32 master weights, bf16 compute
        when x is bf16; under autocast the products run in the autocast dtype)."""
        s, n, d = x.shape
        h = self.num_heads
        dt = compute_dtype(x)
        n1 = self.norm1
        qkv = LNLinear.apply(x, n1.weight.to(x.dtype), n1.bias.to(x.dtype), n1.eps,
                             self.qkv.weight.to(dt), self.qkv.bias.to(dt))
        qkv = qkv.view(s, n, 3, h, d // h)
        if qkv.dtype == torch.float32 and not (torch.is_grad_enabled() and (
                qkv.requires_grad or (attn_mask is not None and attn_mask.requires_grad))):
            a = sdpa(*qkv.permute(2, 0, 3, 1, 4), attn_mask)  # fp32 inference: SDPA's fused CPU kernel
        else:  # training (faster than SDPA at these sizes, bias gradient), and bf16
            a = BiasedAttention.apply(qkv, attn_mask)
        x = self._residual(x, Linear, self.proj, a.transpose(1, 2).reshape(s, n, d), dt)
        n2 = self.norm2
        u = LNLinear.apply(x, n2.weight.to(x.dtype), n2.bias.to(x.dtype), n2.eps,
                           self.ff1.weight.to(dt), self.ff1.bias.to(dt))
        return self._residual(x, GeluLinear, self.ff2, u, dt)

    def _residual(self, x: Tensor, fn, mod: nn.Linear, inp: Tensor, dt: torch.dtype) -> Tensor:
        """``x + dropout(fn(inp; mod's weights))`` with the dropout scale folded into the
        weights and the mask into the add (one multiply-add, forward and backward)."""
        w, b = mod.weight, mod.bias
        if not self.drop.active:
            return x + fn.apply(inp, w.to(dt), b.to(dt))
        c = self.drop.scale
        y = fn.apply(inp, (w * c).to(dt), (b * c).to(dt))
        return DropoutAdd.apply(x, y, self.drop.keep_mask(y))


@dataclass
class _Packing:
    """Where each visible cell sits in a padded (S, Lmax, d) batch of sequences."""

    seq: Tensor  # (V,) sequence of each cell, in packing order
    pos: Tensor  # (V,) slot within its sequence
    counts: Tensor  # (S,) cells per sequence
    length: int  # Lmax
    order: Tensor | None  # permutation from canonical cell order to packing order (None = identity)
    keys: Tensor  # (S,) the group key of each sequence
    _padded: bool | None = None

    @property
    def padded(self) -> bool:
        if self._padded is None:
            self._padded = bool((self.counts < self.length).any())
        return self._padded

    def pack(self, tokens: Tensor) -> Tensor:
        """(V, d) canonical -> (S, Lmax, d); padding slots are zero. Without padding the
        packing order is the (permuted) canonical order: a view (after the permutation)."""
        if self.order is not None:
            tokens = tokens.index_select(0, self.order)
        if not self.padded:
            return tokens.view(self.counts.shape[0], self.length, tokens.shape[-1])
        out = tokens.new_zeros(self.counts.shape[0], self.length, tokens.shape[-1])
        return out.index_put((self.seq, self.pos), tokens)

    def unpack(self, packed: Tensor) -> Tensor:
        """(S, Lmax, d) -> (V, d) canonical."""
        tokens = packed.reshape(-1, packed.shape[-1]) if not self.padded else packed[self.seq, self.pos]
        if self.order is None:
            return tokens
        inv = torch.empty_like(self.order)
        inv[self.order] = torch.arange(self.order.numel(), device=self.order.device)
        return tokens.index_select(0, inv)

    def key_valid(self) -> Tensor:
        """(S, Lmax) bool: True for real cells, False for padding."""
        return torch.arange(self.length, device=self.counts.device)[None] < self.counts[:, None]


def _packing(group: Tensor, order: Tensor | None) -> _Packing:
    """``group``: (V,) non-decreasing sequence key of each cell in packing order."""
    keys, seq, counts = torch.unique_consecutive(group, return_inverse=True, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(group.numel(), device=group.device) - starts[seq]
    return _Packing(seq, pos, counts, int(counts.max()) if counts.numel() else 0, order, keys)


# --- encoder ----------------------------------------------------------------------------

class STGPEncoder(nn.Module):
    """``forward(x (B,N,T), tod (B,T), dow (B,T), graph, mask (B,N,P)) -> tokens (B,N,P,d)``."""

    def __init__(self, cfg: "STGPModelConfig"):
        super().__init__()
        d, L = cfg.d_model, cfg.patch_len
        self.cfg = cfg
        self.patch_embed = nn.Conv1d(1, d, kernel_size=L, stride=L)
        self.pos_embed = nn.Parameter(torch.empty(cfg.num_patches, d))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.tod_embed = nn.Embedding(cfg.steps_per_day, d)
        self.dow_embed = nn.Embedding(7, d)
        nn.init.normal_(self.tod_embed.weight, std=0.02)
        nn.init.normal_(self.dow_embed.weight, std=0.02)
        self.graph_bias = GraphormerBias(cfg.num_heads, d, cfg.max_degree)
        self.domain_temporal = PromptBank(cfg.domain_prompts, d, cfg.prompt_threshold, cfg.prompt_init_std)
        self.domain_spatial = PromptBank(cfg.domain_prompts, d, cfg.prompt_threshold, cfg.prompt_init_std)
        self.temporal = nn.ModuleList(EncoderLayer(d, cfg.num_heads, cfg.ffn_dim, cfg.dropout)
                                      for _ in range(cfg.temporal_depth))
        self.temporal_norm = nn.LayerNorm(d)
        self.spatial = nn.ModuleList(EncoderLayer(d, cfg.num_heads, cfg.ffn_dim, cfg.dropout)
                                     for _ in range(cfg.spatial_depth))
        self.spatial_norm = nn.LayerNorm(d)
        self.gate = nn.Linear(2 * d, d)  # sigmoid(T Wt + S Ws + b)
        self.mask_token = nn.Parameter(torch.zeros(d))
        nn.init.normal_(self.mask_token, std=0.02)

    def time_embedding(self, tod: Tensor, dow: Tensor, num_patches: int) -> Tensor:
        """(B, P, d) from the time of day / day of week of each patch's first step."""
        L = self.cfg.patch_len
        t = tod[:, ::L][:, :num_patches].long() % self.cfg.steps_per_day
        w = dow[:, ::L][:, :num_patches].long() % 7
        return self.tod_embed(t) + self.dow_embed(w)

    def forward(self, x: Tensor, tod: Tensor, dow: Tensor, graph: STGraph, mask: Tensor) -> Tensor:
        base, cells, fused = self.parts(x, tod, dow, graph, mask)
        B, N, P = mask.shape
        d = base.shape[-1]
        out = base[:, None].expand(B, N, P, d).contiguous().view(B * N * P, d)  # a fresh copy
        if cells.numel():
            out.index_put_((cells,), fused.to(out.dtype))
        return out.view(B, N, P, d)

    def parts(self, x: Tensor, tod: Tensor, dow: Tensor, graph: STGraph, mask: Tensor
              ) -> tuple[Tensor, Tensor, Tensor]:
        """The tokens without materialising them: ``base`` (B, P, d), the token of every
        masked cell of (sample, patch) (mask token + position + time), ``cells`` (V,) the
        visible cells' flat (b, n, p) indices, ascending, and ``fused`` (V, d) their tokens."""
        B, N, T = x.shape
        L, d = self.cfg.patch_len, self.cfg.d_model
        P = T // L
        if T % L or P > self.cfg.num_patches:
            raise ValueError(f"window of {T} steps: needs a multiple of patch_len={L} with at most "
                             f"{self.cfg.num_patches} patches")
        if mask.shape != (B, N, P):
            raise ValueError(f"mask has shape {tuple(mask.shape)}; expected {(B, N, P)}")
        if tod.shape != (B, T) or dow.shape != (B, T):
            raise ValueError(f"tod/dow must be {(B, T)}; got {tuple(tod.shape)}, {tuple(dow.shape)}")
        if graph.num_nodes != N:
            raise ValueError(f"graph has {graph.num_nodes} nodes; x has {N}")

        time = self.time_embedding(tod, dow, P)  # (B, P, d)
        base = (self.mask_token + self.pos_embed[:P])[None] + time  # (B, P, d): masked cells
        vis_flat = (~mask).reshape(-1)
        cells = vis_flat.nonzero().squeeze(1)  # canonical order (b, n, p)
        if cells.numel() == 0:
            return base, cells, base.new_zeros(0, d)
        b, n, p = cells // (N * P), (cells // P) % N, cells % P

        # Patch embedding of visible cells only (Conv1d over the L steps of a patch).
        patches = x.reshape(B * N * P, L).index_select(0, cells)
        e = F.linear(patches, self.patch_embed.weight.view(d, L), self.patch_embed.bias)
        # index_select, not t[idx]: its backward (index_add_) is ~6x faster than index_put's
        te = time.reshape(B * P, d).index_select(0, b * P + p)

        # Temporal branch: per node, its visible patches (already contiguous in canonical order).
        tin = self.domain_temporal(e + self.pos_embed.index_select(0, p) + te)
        tp = _packing(cells // P, None)
        h = tp.pack(tin)
        am = tp.key_valid()[:, None, None, :] if tp.padded else None
        h = h.to(self._dtype)
        for layer in self.temporal:
            h = layer(h, am)
        t_out = tp.unpack(self.temporal_norm(h.float()))

        # Spatial branch: per patch, its visible nodes (Graphormer degree + bias).
        sin = self.domain_spatial(e + self.graph_bias.degree_embedding(graph).index_select(0, n) + te)
        key = (b * P + p) * N + n
        order = torch.argsort(key)
        sp = _packing(key[order] // N, order)
        h = sp.pack(sin)
        am = self._spatial_mask(graph, sp, n[order], P)
        h = h.to(self._dtype)
        for layer in self.spatial:
            h = layer(h, am)
        s_out = sp.unpack(self.spatial_norm(h.float()))

        # Gated fusion at visible cells; mask token (+ position and time) elsewhere.
        w, d_ = self.gate.weight, self.cfg.d_model  # gate = Linear(2d, d) on [T, S], without the cat
        with torch.autocast(x.device.type, enabled=False):
            t_out, s_out = t_out.float(), s_out.float()
            g = torch.addmm(torch.addmm(self.gate.bias, t_out, w[:, :d_].t()), s_out, w[:, d_:].t())
            g = torch.sigmoid(g)
            fused = torch.addcmul(s_out, g, t_out - s_out)  # g * T + (1 - g) * S
        return base, cells, fused

    @property
    def _dtype(self) -> torch.dtype:
        """Compute dtype of the Transformer layers: bf16 with ``cfg.bf16`` (residual stream
        included; fp32 weights, embeddings, final norms and fusion), else fp32."""
        return torch.bfloat16 if self.cfg.bf16 else torch.float32

    def _spatial_mask(self, graph: STGraph, sp: _Packing, nodes: Tensor, num_patches: int) -> Tensor:
        """Float attention mask: the Graphormer bias between the nodes of each set, -inf at
        padding. (1, H, Nv, Nv) when every set has the same nodes (forecasting, kriging),
        (B, 1, H, Nv, Nv) when each sample's sets do (pre-training masks), else (S, H, Lm, Lm)."""
        gb = self.graph_bias
        S, Lm = sp.counts.shape[0], sp.length
        slots = nodes.new_zeros(S, Lm).index_put((sp.seq, sp.pos), nodes)  # node at each slot
        if not sp.padded:
            if bool((slots == slots[:1]).all()):
                idx = slots[0]
                return gb.bias(graph, idx[:, None], idx[None, :])[None]
            per_sample = torch.unique_consecutive(sp.keys // num_patches, return_counts=True)[1]
            k = int(per_sample[0])
            if bool((per_sample == k).all()):
                grouped = slots.view(-1, k, Lm)
                if bool((grouped == grouped[:, :1]).all()):
                    idx = grouped[:, 0]  # (G, Lm)
                    m = gb.bias(graph, idx[:, :, None], idx[:, None, :]).transpose(0, 1)  # (G, H, Lm, Lm)
                    return m[:, None]
        m = gb.bias(graph, slots[:, :, None], slots[:, None, :]).transpose(0, 1)  # (S, H, Lm, Lm)
        if sp.padded:
            pad = torch.zeros(S, Lm, dtype=m.dtype, device=m.device)
            pad = pad.masked_fill(~sp.key_valid(), -math.inf)
            m = m + pad[:, None, None, :]
        return m
