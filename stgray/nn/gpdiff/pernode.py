"""Per-node forecasting models of the GPDiff model zoo, single and batched.

Each model sees one node's 1-hop neighbourhood (the node, then its in- and out-neighbours
in ascending index order; the *centre* is always position 0) and forecasts the centre.
Its adjacency is the neighbourhood's sub-adjacency normalised ``D^-1/2 (A + I) D^-1/2``
(row sums, floored at ``eps``).

Two architectures, as in the reference (tsinghua-fib-lab/GPD):

``stgcn`` -- bias-free STGCN: TimeBlock(c_in->32, k=4), Theta 32x8 graph conv,
TimeBlock(8->32), TimeBlock(32->32), Linear((t_in-9)*32 -> t_out). 16,960 parameters
at c_in=2 (768 + 256 + 3,072 + 12,288 + 576). A TimeBlock is three bias-free (1, k)
convolutions; ``gate="mul"`` (default) is the reference's ``relu((c1 + c2) * sigmoid(c3))``,
``gate="add"`` the STGCN-PyTorch form ``relu(c1 + sigmoid(c2) + c3)`` (same parameters).

``gwn`` -- Graph WaveNet variant, bias-free: start 1x1 conv, ``blocks x layers`` gated
dilated temporal convs (kernel 2, dilations 1, 2, ... per block), order-2 diffusion graph
conv over ``[A, A^T]`` (no adaptive adjacency), skip 1x1 convs, a normalisation after the
residual add, end convs. Parameter count at reference sizes (c_in=2, 32 channels, 4x2,
t_out=6): **78,528**. The reference reports 91,904; the difference is exactly
  * 8 residual 1x1 convs, 8 x 32 x 32 = 8,192: built but never called (the graph conv
    replaces them when ``gcn_bool``) -- dropped;
  * the last layer's graph conv (160 x 32 = 5,120) and normalisation (64): their output
    is discarded (the head reads only the skip sum), so they never get a gradient --
    dropped;
  91,904 - 8,192 - 5,120 - 64 = 78,528 (``reference_gwn_param_count`` reproduces 91,904).
  The reference normalises with BatchNorm2d(32). Its running statistics are buffers that
  a flat parameter vector (``model.parameters()``) does not carry, so a generated vector
  would run with statistics it was never trained with. We use LayerNorm over channels
  instead (``norm="layer"``: the same 2 x 32 affine parameters per layer, no state, no
  dependence on the batch or on padded nodes); ``norm="none"`` drops it.

"Compute only what the loss needs": the batched programs slice the centre as early as
the graph allows. STGCN: after the first TimeBlock only the centre row of the graph
conv is computed; TimeBlock 2, 3 and the head run on the centre only. GWN: all layers
but the last two run on the whole neighbourhood; the second-to-last layer computes its
graph conv's centre row only, the last layer runs on the centre only, and skip convs
read the centre's last time step only.

Batched form: every tensor of M models is stacked on a leading model dim with the same
names and per-model shapes as the single ``nn.Module`` (``ParamLayout`` of
``stgray.gpdiff.params`` describes them); temporal convolutions are im2col + ``bmm``,
graph convolutions ``bmm`` with each model's own adjacency. Neighbourhoods are padded to
the shard's largest with zero input and zero adjacency rows/columns, so padding never
reaches the centre. Activations are laid out ``(M, K, B, T, C)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from stgray.config import StageConfig, content_hash
from stgray.gpdiff.params import ParamLayout

Arch = Literal["stgcn", "gwn"]
FEATURES = ("value", "tod", "dow")


class PerNodeArch(StageConfig):
    """Architecture and sizes of the per-node models (defaults: the reference's)."""

    _unhashed: ClassVar[frozenset[str]] = frozenset()
    _hashed_unless: ClassVar[dict] = {"baseline": "none"}

    arch: Arch = "stgcn"
    features: tuple[Literal["value", "tod", "dow"], ...] = Field(
        ("value", "tod"), min_length=1,
        description="input channels: normalised value, time of day / steps per day, "
                    "day of week / 7")
    t_in: int = Field(12, gt=0)
    t_out: int = Field(6, gt=0)
    baseline: Literal["none", "tod_mean"] = Field(
        "none", description="tod_mean: the node's time-of-day mean over the train split "
                            "(seasonal_baseline), times a learned per-horizon weight "
                            "(starts at 1), is added to the model's output")
    adjacency: Literal["binary", "weighted"] = Field(
        "binary", description="binary: any non-zero weight is an edge of weight 1")
    adj_eps: float = Field(1e-5, gt=0, description="floor of the degree in D^-1/2 (A+I) D^-1/2")
    # stgcn
    stgcn_channels: int = Field(32, gt=0)
    stgcn_spatial: int = Field(8, gt=0)
    stgcn_kernel: int = Field(4, gt=0)
    stgcn_gate: Literal["mul", "add"] = "mul"
    # gwn
    gwn_channels: int = Field(32, gt=0, description="residual = dilation channels")
    gwn_skip: int = Field(32, gt=0)
    gwn_end: int = Field(32, gt=0)
    gwn_blocks: int = Field(4, gt=0)
    gwn_layers: int = Field(2, gt=0)
    gwn_kernel: int = Field(2, gt=1)
    gwn_order: int = Field(2, gt=0)
    gwn_norm: Literal["layer", "none"] = "layer"
    gwn_dropout: float = Field(0.2, ge=0, lt=1)

    @model_validator(mode="after")
    def _check(self) -> "PerNodeArch":
        if len(set(self.features)) != len(self.features):
            raise ValueError("features must not repeat")
        if self.arch == "stgcn" and self.t_in - 3 * (self.stgcn_kernel - 1) < 1:
            raise ValueError(f"t_in={self.t_in} too short for three TimeBlocks of kernel "
                             f"{self.stgcn_kernel}")
        if self.arch == "gwn" and self.gwn_blocks * self.gwn_layers < 2:
            raise ValueError("gwn needs at least 2 layers")
        return self

    @property
    def c_in(self) -> int:
        return len(self.features)

    @property
    def layout_name(self) -> str:
        """``arch/<hash of the fields that define this arch>``: the ``ParamLayout.arch`` string
        (inputs, adjacency and the sizes of this architecture; not the other arch's sizes,
        not dropout)."""
        other = "gwn_" if self.arch == "stgcn" else "stgcn_"
        spec = {k: v for k, v in self.hashed_dict().items()
                if not k.startswith(other) and k != "gwn_dropout"}  # dropout: training only
        return f"{self.arch}/{content_hash(spec, 12)}"

    @property
    def dilations(self) -> list[int]:
        """Per layer: 1, 2, 4, ... within each block (as the reference)."""
        return [2 ** i for _ in range(self.gwn_blocks) for i in range(self.gwn_layers)]

    @property
    def receptive_field(self) -> int:
        return 1 + sum((self.gwn_kernel - 1) * d for d in self.dilations)


# ------------------------------------------------------------------------------------
# neighbourhoods
# ------------------------------------------------------------------------------------
@dataclass
class Neighbourhoods:
    """M padded neighbourhoods: ``idx[m, 0]`` is centre m; ``mask`` marks real slots."""

    centres: np.ndarray  # (M,) int64
    idx: np.ndarray      # (M, K) int64 (padding repeats the centre; masked)
    mask: np.ndarray     # (M, K) bool
    a_hat: np.ndarray    # (M, K, K) float32, zero rows/columns at padding

    @property
    def size(self) -> np.ndarray:
        return self.mask.sum(1)

    def select(self, rows) -> "Neighbourhoods":
        rows = np.asarray(rows)
        k = int(self.mask[rows].sum(1).max()) if len(rows) else 1
        return Neighbourhoods(self.centres[rows], self.idx[rows, :k], self.mask[rows, :k],
                              self.a_hat[rows, :k, :k])


def neighbour_lists(adj, centres) -> list[np.ndarray]:
    """For each centre: [centre, sorted in- and out-neighbours (self excluded)].

    ``adj``: (N, N) dense array or scipy sparse matrix/array, ``adj[i, j]`` = i -> j."""
    a = sp.csr_array(adj, copy=True)
    a.eliminate_zeros()
    at = a.T.tocsr()
    out = []
    for c in np.asarray(centres, dtype=np.int64):
        nb = np.union1d(a.indices[a.indptr[c]:a.indptr[c + 1]], at.indices[at.indptr[c]:at.indptr[c + 1]])
        nb = nb[nb != c]
        out.append(np.concatenate([[c], nb]).astype(np.int64))
    return out


def normalised_adjacency(sub: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """``D^-1/2 (A + I) D^-1/2`` with D the row sums of A + I, floored at ``eps``."""
    a = np.asarray(sub, dtype=np.float64) + np.eye(sub.shape[0])
    d = np.maximum(a.sum(1), eps)
    r = 1.0 / np.sqrt(d)
    return (r[:, None] * a * r[None, :]).astype(np.float32)


def build_neighbourhoods(adj, centres, *, binary: bool = True, eps: float = 1e-5,
                         pad_to: int | None = None) -> Neighbourhoods:
    """Padded neighbourhoods of ``centres`` in the (N, N) adjacency ``adj[i, j]`` = i -> j
    (dense or scipy sparse; only the neighbourhoods' sub-matrices are made dense)."""
    centres = np.asarray(centres, dtype=np.int64)
    a = sp.csr_array(adj, dtype=np.float64, copy=True)
    a.eliminate_zeros()
    lists = neighbour_lists(a, centres)
    k = max([len(x) for x in lists] + [pad_to or 1])
    m = len(lists)
    idx = np.repeat(centres[:, None], k, 1) if m else np.zeros((0, k), np.int64)
    mask = np.zeros((m, k), bool)
    a_hat = np.zeros((m, k, k), np.float32)
    if (a.data < 0).any():
        raise ValueError("adjacency weights must be >= 0")
    if binary:
        a.data[:] = 1.0
    for i, nb in enumerate(lists):
        n = len(nb)
        idx[i, :n] = nb
        mask[i, :n] = True
        a_hat[i, :n, :n] = normalised_adjacency(a[nb][:, nb].toarray(), eps)
    return Neighbourhoods(centres, idx, mask, a_hat)


def node_features(p, features=("value", "tod")) -> np.ndarray:
    """(T, N, C) float32 input channels of a ``Prepared`` city."""
    t, n = p.x.shape
    chans = []
    for f in features:
        if f == "value":
            chans.append(p.x)
        elif f == "tod":
            chans.append(np.broadcast_to((p.tod / p.steps_per_day)[:, None], (t, n)))
        elif f == "dow":
            chans.append(np.broadcast_to((p.dow / 7.0)[:, None], (t, n)))
        else:
            raise ValueError(f"unknown feature '{f}' (known: {FEATURES})")
    return np.ascontiguousarray(np.stack(chans, -1), dtype=np.float32)


def gather_inputs(feats: torch.Tensor, idx: torch.Tensor, mask: torch.Tensor,
                  starts: torch.Tensor, t_in: int) -> torch.Tensor:
    """(T, N, C) features -> (M, K, B, t_in, C) windows, zero at padded slots."""
    steps = starts[:, None] + torch.arange(t_in, device=starts.device)[None, :]  # (B, t_in)
    x = feats[steps[None, None], idx[:, :, None, None]]  # (M, K, B, t_in, C)
    return x * mask[:, :, None, None, None].to(x.dtype)


def gather_targets(values: torch.Tensor, centres: torch.Tensor, starts: torch.Tensor,
                   t_in: int, t_out: int) -> torch.Tensor:
    """(T, N) values -> (M, B, t_out) targets of each centre."""
    steps = starts[:, None] + t_in + torch.arange(t_out, device=starts.device)[None, :]
    return values[steps[None], centres[:, None, None]]


# ------------------------------------------------------------------------------------
# single-model modules (reference-like, whole neighbourhood)
# ------------------------------------------------------------------------------------
class TimeBlock(nn.Module):
    """Gated temporal convolution of STGCN without biases; input/output (B, K, T, C)."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 4, gate: str = "mul"):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, (1, kernel), bias=False)
        self.conv2 = nn.Conv2d(c_in, c_out, (1, kernel), bias=False)
        self.conv3 = nn.Conv2d(c_in, c_out, (1, kernel), bias=False)
        self.gate = gate

    def forward(self, x):
        x = x.permute(0, 3, 1, 2)
        a, b, c = self.conv1(x), self.conv2(x), self.conv3(x)
        out = F.relu((a + b) * torch.sigmoid(c)) if self.gate == "mul" \
            else F.relu(a + torch.sigmoid(b) + c)
        return out.permute(0, 2, 3, 1)


class STGCNBlock(nn.Module):
    def __init__(self, c_in: int, spatial: int, c_out: int, kernel: int, gate: str):
        super().__init__()
        self.temporal1 = TimeBlock(c_in, c_out, kernel, gate)
        self.Theta1 = nn.Parameter(torch.empty(c_out, spatial))
        self.temporal2 = TimeBlock(spatial, c_out, kernel, gate)

    def forward(self, x, a_hat):
        t = self.temporal1(x)
        lfs = torch.einsum("ij,jklm->kilm", a_hat, t.permute(1, 0, 2, 3))
        t2 = F.relu(torch.einsum("ijkl,lp->ijkp", lfs, self.Theta1))
        return self.temporal2(t2)


def _add_baseline_weight(module: nn.Module, arch: PerNodeArch) -> None:
    """Models over a baseline own a per-horizon weight of it (t_out,), applied by the
    caller, which holds the baseline: forecast = output + baseline_weight * baseline."""
    if arch.baseline != "none":
        module.baseline_weight = nn.Parameter(torch.ones(arch.t_out))


class STGCNNode(nn.Module):
    """Bias-free STGCN over one neighbourhood: (B, K, t_in, c_in), (K, K) -> (B, K, t_out)."""

    def __init__(self, arch: PerNodeArch):
        super().__init__()
        c, k = arch.stgcn_channels, arch.stgcn_kernel
        self.block1 = STGCNBlock(arch.c_in, arch.stgcn_spatial, c, k, arch.stgcn_gate)
        self.last_temporal = TimeBlock(c, c, k, arch.stgcn_gate)
        self.fully = nn.Linear((arch.t_in - 3 * (k - 1)) * c, arch.t_out, bias=False)
        self.arch = arch
        _add_baseline_weight(self, arch)
        load_vector(self, init_vectors(arch, [0])[0])

    def forward(self, x, a_hat):
        out = self.last_temporal(self.block1(x, a_hat))
        return self.fully(out.reshape(out.shape[0], out.shape[1], -1))


class _GConv(nn.Module):
    def __init__(self, c_in: int, c_out: int, supports: int, order: int, dropout: float):
        super().__init__()
        self.mlp = nn.Conv2d((order * supports + 1) * c_in, c_out, (1, 1), bias=False)
        self.order, self.dropout = order, dropout

    def forward(self, x, supports):  # x (B, C, K, T)
        out = [x]
        for a in supports:
            x1 = torch.einsum("ncvl,vw->ncwl", x, a)
            out.append(x1)
            for _ in range(2, self.order + 1):
                x1 = torch.einsum("ncvl,vw->ncwl", x1, a)
                out.append(x1)
        h = self.mlp(torch.cat(out, dim=1))
        return F.dropout(h, self.dropout, training=self.training)


class _ChannelNorm(nn.Module):
    """LayerNorm over channels of a (B, C, K, T) tensor."""

    def __init__(self, c: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))

    def forward(self, x):
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias)
        return y.permute(0, 3, 1, 2)


class GWNNode(nn.Module):
    """Graph WaveNet variant over one neighbourhood: (B, K, t_in, c_in), (K, K) -> (B, K, t_out).

    Bias-free like the reference; no residual 1x1 convs and no last-layer graph conv /
    norm (see the module docstring for why and for the parameter arithmetic).
    """

    def __init__(self, arch: PerNodeArch):
        super().__init__()
        c, s, e, k = arch.gwn_channels, arch.gwn_skip, arch.gwn_end, arch.gwn_kernel
        n_layers = arch.gwn_blocks * arch.gwn_layers
        self.arch = arch
        self.dilations = arch.dilations
        self.receptive_field = arch.receptive_field
        self.filter_convs = nn.ModuleList(
            nn.Conv2d(c, c, (1, k), dilation=d, bias=False) for d in self.dilations)
        self.gate_convs = nn.ModuleList(
            nn.Conv2d(c, c, (1, k), dilation=d, bias=False) for d in self.dilations)
        self.skip_convs = nn.ModuleList(nn.Conv2d(c, s, (1, 1), bias=False) for _ in range(n_layers))
        if arch.gwn_norm == "layer":
            self.norm = nn.ModuleList(_ChannelNorm(c) for _ in range(n_layers - 1))
        self.gconv = nn.ModuleList(_GConv(c, c, 2, arch.gwn_order, arch.gwn_dropout)
                                   for _ in range(n_layers - 1))
        self.start_conv = nn.Conv2d(arch.c_in, c, (1, 1), bias=False)
        self.end_conv_1 = nn.Conv2d(s, e, (1, 1), bias=False)
        self.end_conv_2 = nn.Conv2d(e, arch.t_out, (1, 1), bias=False)
        _add_baseline_weight(self, arch)
        load_vector(self, init_vectors(arch, [0])[0])

    def forward(self, x, a_hat):
        x = x.permute(0, 3, 1, 2)  # (B, C, K, T)
        if x.shape[3] < self.receptive_field:
            x = F.pad(x, (self.receptive_field - x.shape[3], 0, 0, 0))
        x = self.start_conv(x)
        supports = [a_hat, a_hat.t()]
        skip = 0
        n_layers = len(self.dilations)
        for i in range(n_layers):
            residual = x
            x = torch.tanh(self.filter_convs[i](residual)) * torch.sigmoid(self.gate_convs[i](residual))
            s = self.skip_convs[i](x[..., -1:])
            skip = s + skip
            if i == n_layers - 1:
                break
            x = self.gconv[i](x, supports)
            x = x + residual[..., -x.shape[3]:]
            if self.arch.gwn_norm == "layer":
                x = self.norm[i](x)
        x = F.relu(skip)
        x = F.relu(self.end_conv_1(x))
        x = self.end_conv_2(x)  # (B, t_out, K, 1)
        return x[..., -1].permute(0, 2, 1)


def single_model(arch: PerNodeArch) -> nn.Module:
    return STGCNNode(arch) if arch.arch == "stgcn" else GWNNode(arch)


def reference_gwn_param_count(arch: PerNodeArch) -> int:
    """Parameters of the reference's ``v_GWN`` at these sizes (BatchNorm affine included,
    residual convs and last graph conv included): 91,904 at reference sizes."""
    c, s, e, k = arch.gwn_channels, arch.gwn_skip, arch.gwn_end, arch.gwn_kernel
    n = arch.gwn_blocks * arch.gwn_layers
    per_layer = 2 * c * c * k + c * c + c * s + 2 * c + (arch.gwn_order * 2 + 1) * c * c
    return arch.c_in * c + n * per_layer + s * e + e * arch.t_out


# ------------------------------------------------------------------------------------
# layout, init, flat vectors
# ------------------------------------------------------------------------------------
_LAYOUTS: dict[str, ParamLayout] = {}


def make_layout(arch: PerNodeArch) -> ParamLayout:
    """The ``ParamLayout`` (names, shapes, offsets, dtype, arch hash) of ``arch``."""
    key = arch.layout_name
    if key not in _LAYOUTS:
        _LAYOUTS[key] = ParamLayout.from_shapes(key, _shapes(arch))
    return _LAYOUTS[key]


def _shapes(arch: PerNodeArch) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, dtype) in ``named_parameters()`` order of the single module."""
    f = "float32"
    if arch.arch == "stgcn":
        c, s, k, ci = arch.stgcn_channels, arch.stgcn_spatial, arch.stgcn_kernel, arch.c_in
        out = [("block1.Theta1", (c, s), f)]
        out += [(f"block1.temporal1.conv{j}.weight", (c, ci, 1, k), f) for j in (1, 2, 3)]
        out += [(f"block1.temporal2.conv{j}.weight", (c, s, 1, k), f) for j in (1, 2, 3)]
        out += [(f"last_temporal.conv{j}.weight", (c, c, 1, k), f) for j in (1, 2, 3)]
        out += [("fully.weight", (arch.t_out, (arch.t_in - 3 * (k - 1)) * c), f)]
        return _baseline_shapes(arch) + out
    c, s, e, k = arch.gwn_channels, arch.gwn_skip, arch.gwn_end, arch.gwn_kernel
    n = arch.gwn_blocks * arch.gwn_layers
    out = [(f"filter_convs.{i}.weight", (c, c, 1, k), f) for i in range(n)]
    out += [(f"gate_convs.{i}.weight", (c, c, 1, k), f) for i in range(n)]
    out += [(f"skip_convs.{i}.weight", (s, c, 1, 1), f) for i in range(n)]
    if arch.gwn_norm == "layer":
        for i in range(n - 1):
            out += [(f"norm.{i}.weight", (c,), f), (f"norm.{i}.bias", (c,), f)]
    out += [(f"gconv.{i}.mlp.weight", (c, (arch.gwn_order * 2 + 1) * c, 1, 1), f)
            for i in range(n - 1)]
    out += [("start_conv.weight", (c, arch.c_in, 1, 1), f),
            ("end_conv_1.weight", (e, s, 1, 1), f),
            ("end_conv_2.weight", (arch.t_out, e, 1, 1), f)]
    return _baseline_shapes(arch) + out


def _baseline_shapes(arch: PerNodeArch) -> list[tuple[str, tuple[int, ...], str]]:
    """The root module's own parameter, first in ``named_parameters()``."""
    return [("baseline_weight", (arch.t_out,), "float32")] if arch.baseline != "none" else []


HEADS = ("fully.weight", "end_conv_2.weight")  # the last layer of each architecture


def _init_rule(name: str, shape: tuple[int, ...], zero_head: bool = False) -> tuple[float, float]:
    """(uniform half-width, constant) of one tensor's initialisation.

    Convolutions: PyTorch's default kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in));
    Theta: U(+-1/sqrt(spatial)) as STGCN; the head: Xavier uniform as the reference,
    zero when ``zero_head`` (a model over a baseline then starts as the baseline itself);
    norm weight 1, bias 0.
    """
    if zero_head and name in HEADS:
        return 0.0, 0.0
    if name == "baseline_weight":
        return 0.0, 1.0
    if name.endswith("Theta1"):
        return 1.0 / math.sqrt(shape[1]), 0.0
    if name == "fully.weight":
        return math.sqrt(6.0 / (shape[0] + shape[1])), 0.0
    if name.startswith("norm."):
        return 0.0, 1.0 if name.endswith("weight") else 0.0
    return 1.0 / math.sqrt(math.prod(shape[1:])), 0.0


def init_vectors(arch: PerNodeArch, seeds) -> torch.Tensor:
    """(M, P) float32 initial parameter vectors, model m drawn from ``seeds[m]`` alone.
    With a baseline the head starts at zero: epoch 0 forecasts the baseline."""
    layout = make_layout(arch)
    half = torch.empty(layout.n_params)
    const = torch.empty(layout.n_params)
    for e in layout.entries:
        h, c = _init_rule(e.name, e.shape, zero_head=arch.baseline != "none")
        half[e.offset:e.offset + e.numel] = h
        const[e.offset:e.offset + e.numel] = c
    out = torch.empty(len(seeds), layout.n_params)
    for m, s in enumerate(seeds):
        g = torch.Generator().manual_seed(int(s) % (2 ** 63))
        out[m] = (torch.rand(layout.n_params, generator=g) * 2 - 1) * half + const
    return out


def load_vector(module: nn.Module, vec: torch.Tensor) -> None:
    """Copy a (P,) vector into a single module's parameters (names must match)."""
    layout = make_layout(module.arch)
    state = layout.unflatten(vec.detach().to(torch.float32).cpu())
    params = dict(module.named_parameters())
    if set(params) != set(state):
        raise ValueError(f"module parameters {sorted(set(params) ^ set(state))[:4]} "
                         "differ from the layout")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state[k])


def module_vector(module: nn.Module) -> torch.Tensor:
    return make_layout(module.arch).flatten(dict(module.named_parameters()))


# ------------------------------------------------------------------------------------
# batched programs
# ------------------------------------------------------------------------------------
def _tconv(x: torch.Tensor, ws: list[torch.Tensor], dilation: int = 1) -> torch.Tensor:
    """Temporal conv of (M, ..., T, Cin) with the (M, Cout, Cin, 1, k) weights ``ws``
    (outputs concatenated on the channel axis): im2col (tap-major) + one ``bmm``."""
    m = x.shape[0]
    k = ws[0].shape[-1]
    cin = x.shape[-1]
    w = torch.cat(ws, dim=1) if len(ws) > 1 else ws[0]
    cout = w.shape[1]
    wm = w[:, :, :, 0, :].permute(0, 3, 2, 1).reshape(m, k * cin, cout)  # (M, k*Cin, Cout): j*Cin + c
    t_out = x.shape[-2] - (k - 1) * dilation
    if k == 1:
        cols = x
    elif k == 2:  # two slices + cat: faster than unfold's backward at GWN sizes
        cols = torch.cat([x[..., :t_out, :], x[..., dilation:dilation + t_out, :]], dim=-1)
    else:
        span = (k - 1) * dilation + 1
        cols = x.unfold(-2, span, 1)  # (M, ..., T', Cin, span)
        if dilation > 1:
            cols = cols[..., ::dilation]
        cols = cols.transpose(-1, -2)  # (M, ..., T', k, Cin): tap-major like the cat
    lead = cols.shape[:-2] if k > 2 else cols.shape[:-1]
    out = torch.bmm(cols.reshape(m, -1, cin * k), wm)
    return out.reshape(*lead, cout)


def _lin(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(M, ..., Cin) @ W(M, Cout, Cin[, 1, 1])^T."""
    m = x.shape[0]
    w = w.reshape(m, w.shape[1], -1)
    lead = x.shape[:-1]
    return torch.bmm(x.reshape(m, -1, x.shape[-1]), w.transpose(1, 2)).reshape(*lead, w.shape[1])


def _timeblock(x, p, prefix: str, gate: str, c: int):
    """Batched TimeBlock. conv1 and conv2 ("mul") / conv1 and conv3 ("add") enter only as
    a sum, so they are applied as one conv with summed weights: two convs instead of three,
    the same function and the same gradients (each summed weight gets the sum's gradient)."""
    w1, w2, w3 = (p[f"{prefix}.conv{j}.weight"] for j in (1, 2, 3))
    if gate == "mul":
        lin, gw = w1 + w2, w3
    else:
        lin, gw = w1 + w3, w2
    a, g = _tconv(x, [lin, gw]).unflatten(-1, (2, c)).unbind(-2)
    if gate == "mul":
        return F.relu(a * torch.sigmoid(g))
    return F.relu(a + torch.sigmoid(g))


def stgcn_batched(arch: PerNodeArch, p: dict, x: torch.Tensor, a_hat: torch.Tensor) -> torch.Tensor:
    """M STGCNs: x (M, K, B, t_in, c_in), a_hat (M, K, K) -> centre forecasts (M, B, t_out)."""
    c, gate = arch.stgcn_channels, arch.stgcn_gate
    m, k_, b = x.shape[:3]
    t1 = _timeblock(x, p, "block1.temporal1", gate, c)  # (M, K, B, T1, C)
    t_1 = t1.shape[3]
    # graph conv, centre row only: sum_j A[0, j] t1[j]
    lfs = torch.bmm(a_hat[:, :1, :], t1.reshape(m, k_, -1)).reshape(m, b, t_1, c)
    t2 = F.relu(torch.bmm(lfs.reshape(m, -1, c), p["block1.Theta1"]).reshape(m, b, t_1, -1))
    t3 = _timeblock(t2, p, "block1.temporal2", gate, c)
    t4 = _timeblock(t3, p, "last_temporal", gate, c)  # (M, B, T3, C)
    return torch.bmm(t4.reshape(m, b, -1), p["fully.weight"].transpose(1, 2))


def gwn_batched(arch: PerNodeArch, p: dict, x: torch.Tensor, a_hat: torch.Tensor,
                training: bool = False) -> torch.Tensor:
    """M Graph WaveNets: x (M, K, B, t_in, c_in), a_hat (M, K, K) -> (M, B, t_out)."""
    m = x.shape[0]
    c = arch.gwn_channels
    dil = arch.dilations
    n = len(dil)
    rf = arch.receptive_field
    if x.shape[3] < rf:
        x = F.pad(x, (0, 0, rf - x.shape[3], 0))
    h = _lin(x, p["start_conv.weight"])  # (M, K, B, T, C)
    # nconv(x, A)[w] = sum_v x[v] A[v, w]: propagation A^T for support A, A for A^T
    props = [a_hat.transpose(1, 2), a_hat]
    skip = 0
    for i, d in enumerate(dil):
        res = h
        fg = _tconv(h, [p[f"filter_convs.{i}.weight"], p[f"gate_convs.{i}.weight"]], d)
        f, g = fg.unflatten(-1, (2, c)).unbind(-2)
        h = torch.tanh(f) * torch.sigmoid(g)  # (M, K', B, T', C)
        skip = skip + _lin(h[:, 0, :, -1, :], p[f"skip_convs.{i}.weight"])  # (M, B, S)
        if i == n - 1:
            break
        kk, bb, tt = h.shape[1:4]
        flat = h.reshape(m, kk, -1)
        centre_only = i == n - 2
        parts = [flat[:, :1] if centre_only else flat]
        for pr in props:
            y = flat
            for o in range(arch.gwn_order):
                last_hop = o == arch.gwn_order - 1
                if centre_only and last_hop:
                    y = torch.bmm(pr[:, :1, :], y)
                else:
                    y = torch.bmm(pr, y)
                parts.append(y[:, :1] if centre_only and not last_hop else y)
        kc = 1 if centre_only else kk
        cat = torch.cat([q.reshape(m, kc, bb, tt, c) for q in parts], dim=-1)
        g = _lin(cat, p[f"gconv.{i}.mlp.weight"])
        if training and arch.gwn_dropout > 0:  # inverted dropout; a uniform draw is cheaper
            keep = torch.rand_like(g) >= arch.gwn_dropout  # than bernoulli_ on CPU
            g = g * keep / (1.0 - arch.gwn_dropout)
        h = g + (res[:, :1] if centre_only else res)[..., -tt:, :]
        if arch.gwn_norm == "layer":
            h = F.layer_norm(h, (c,)) * p[f"norm.{i}.weight"][:, None, None, None, :] \
                + p[f"norm.{i}.bias"][:, None, None, None, :]
    out = F.relu(_lin(F.relu(skip), p["end_conv_1.weight"]))
    return _lin(out, p["end_conv_2.weight"])  # (M, B, t_out)


def batched_forward(arch: PerNodeArch, params: dict, x: torch.Tensor, a_hat: torch.Tensor,
                    training: bool = False) -> torch.Tensor:
    """Centre forecasts (M, B, t_out) of M models with stacked ``params`` {name: (M, *shape)}."""
    if arch.arch == "stgcn":
        return stgcn_batched(arch, params, x, a_hat)
    return gwn_batched(arch, params, x, a_hat, training=training)


def flops_per_sample(arch: PerNodeArch, k: int | float) -> float:
    """Analytic forward FLOPs (2 x multiply-adds) of one window for one batched model with
    a neighbourhood of ``k`` slots (padding included), counting matmuls only."""
    mac = 0.0
    if arch.arch == "stgcn":
        c, s, kk, ci = arch.stgcn_channels, arch.stgcn_spatial, arch.stgcn_kernel, arch.c_in
        t1 = arch.t_in - (kk - 1)
        t2, t3 = t1 - (kk - 1), t1 - 2 * (kk - 1)
        mac += k * t1 * 3 * c * ci * kk          # TimeBlock 1, whole neighbourhood
        mac += t1 * k * c + t1 * c * s           # centre row of the graph conv + Theta
        mac += t2 * 3 * c * s * kk + t3 * 3 * c * c * kk  # TimeBlocks 2, 3 (centre)
        mac += t3 * c * arch.t_out
        return 2 * mac
    c, s, e, kk = arch.gwn_channels, arch.gwn_skip, arch.gwn_end, arch.gwn_kernel
    t = max(arch.t_in, arch.receptive_field)
    mac += k * t * arch.c_in * c
    n = len(arch.dilations)
    for i, d in enumerate(arch.dilations):
        kn = 1 if i == n - 1 else k
        t -= (kk - 1) * d
        mac += kn * t * 2 * c * c * kk + c * s  # filter + gate, skip (centre, last step)
        if i < n - 1:
            hops = 2 * arch.gwn_order
            mac += hops * k * k * t * c          # diffusion (upper bound at the penultimate)
            mac += (1 if i == n - 2 else k) * t * (hops + 1) * c * c
    mac += s * e + e * arch.t_out
    return 2 * mac
