"""Fused autograd functions for the STGP layers (CPU-first, device-agnostic).

Each function computes exactly what the composition of its plain torch ops computes (up to
float rounding) and differs only in what it keeps for the backward pass and in how many
passes over memory it makes:

- :class:`LNLinear`: ``LayerNorm(x) W^T + b``. Keeps x and the LayerNorm statistics, not
  LayerNorm(x) (recomputed in the backward pass: one cheap pass).
- :class:`GeluLinear`: ``gelu(u) W^T + b``. Keeps u, not gelu(u).
- :class:`Linear`: ``x W^T + b``.
- :class:`BiasedAttention`: ``softmax(q k^T / sqrt(dh) + bias) v`` on the packed q, k, v
  projection, with a gradient for the bias (the Graphormer bias, trained in pre-training),
  or without a bias. Keeps q, k, v head-major and the (sets, heads, L, L) probabilities.
- :class:`ReluMLP`: the decoder head ``relu(relu(x) W1^T + b1) W2^T + b2``. Keeps x only.
- :class:`DropoutAdd`: ``x + dropout(y)`` (scale folded upstream). Keeps the bool mask.
- :class:`GatedMix`: the decoder gate ``h = g * gelu(s) + (1 - g) * gelu(t)``,
  ``g = sigmoid(gelu(t) Wt^T + bt + gelu(s) Ws^T)``, then dropout. Keeps the two
  pre-activations and g (gelu recomputed); autograd would keep six (N*B*P, C) tensors.

fp32 products run on MKL, except on an AMD CPU with AVX-512 where MKL is stuck on its AVX2
kernels (:mod:`stgray.nn.mkl_dispatch` off or failed): there the forward and input-gradient
products go through oneDNN (``torch.ops.mkldnn._linear_pointwise``), 10-70% faster than MKL's
AVX2 sgemm on the Transformer layers' shapes. With MKL's AVX-512 kernels MKL is the faster of
the two (fp32 pre-training step, in-process A/Bs: ratios 0.968, 0.975, 0.925 against
oneDNN). Weight gradients always run on MKL. bf16 products go through oneDNN anyway
(``F.linear``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from stgray.nn import mkl_dispatch


def _probe_onednn() -> bool:
    try:
        op = torch.ops.mkldnn._linear_pointwise
        a, w = torch.randn(5, 3), torch.randn(4, 3)
        return bool(torch.backends.mkldnn.is_available()) and \
            torch.allclose(op(a, w, None, "none", [], ""), a @ w.t(), atol=1e-5)
    except Exception:  # pragma: no cover - builds without oneDNN
        return False


_ONEDNN = mkl_dispatch.stuck_on_avx2() and _probe_onednn()


def _use_onednn(t: Tensor) -> bool:
    return _ONEDNN and t.dtype == torch.float32 and t.device.type == "cpu" and t.shape[0] > 0


def mm_fwd(x2: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``x2 @ w.T + b`` for 2-D x2. (oneDNN repacks a non-contiguous weight on every call,
    ~1000x slower for a strided (32, 32) slice: w is made contiguous first.)"""
    if _use_onednn(x2):
        return torch.ops.mkldnn._linear_pointwise(x2.contiguous(), w.contiguous(), b, "none", [], "")
    return F.linear(x2, w, b)


def mm_dx(g2: Tensor, w: Tensor) -> Tensor:
    """``g2 @ w`` (the input gradient of a linear layer) for 2-D g2."""
    if _use_onednn(g2):
        return torch.ops.mkldnn._linear_pointwise(g2.contiguous(), w.t().contiguous(), None, "none", [], "")
    return g2 @ w


def mm_add_(acc: Tensor, x2: Tensor, w: Tensor) -> Tensor:
    """``acc += x2 @ w.T`` in place. With oneDNN a product then an add: on thin products
    ((M, 32) x (32, 32)) faster than MKL's fused addmm on this project's CPUs."""
    if _use_onednn(x2):
        return acc.add_(mm_fwd(x2, w, None))
    return acc.addmm_(x2, w.t())


def mm_dx_add_(acc: Tensor, g2: Tensor, w: Tensor) -> Tensor:
    """``acc += g2 @ w`` in place (accumulates an input gradient)."""
    if _use_onednn(g2):
        return acc.add_(mm_dx(g2, w))
    return acc.addmm_(g2, w)


def mm_dw(g2: Tensor, x2: Tensor) -> Tensor:
    """``g2.T @ x2`` (the weight gradient of a linear layer) for 2-D g2, x2.

    Thin and tall on the CPU (a small weight over many rows: the decoder's (41400, 32) x
    (41400, 32)) as one batched product over a block of rows per thread, then a sum: MKL's
    own product barely uses the second thread there (0.31 vs 0.21 ms at 2 threads)."""
    n, t = g2.shape[0], torch.get_num_threads()
    if t > 1 and g2.device.type == "cpu" and n >= 8192 and g2.shape[1] * x2.shape[1] <= 64 * 64:
        m = n // t * t
        out = torch.bmm(g2[:m].reshape(t, -1, g2.shape[1]).transpose(1, 2), x2[:m].reshape(t, -1, x2.shape[1])).sum(0)
        return out.addmm_(g2[m:].t(), x2[m:]) if m < n else out
    return g2.t() @ x2


def compute_dtype(x: Tensor) -> torch.dtype:
    """x's dtype, or the autocast dtype when autocast is on."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class _NoAutocast:
    """Function bodies run with autocast off (they pick their own dtypes)."""

    def __init__(self, t: Tensor):
        self.ctx = torch.autocast(t.device.type, enabled=False)

    def __enter__(self):
        self.ctx.__enter__()

    def __exit__(self, *a):
        self.ctx.__exit__(*a)


class Linear(torch.autograd.Function):
    """``x W^T + b`` on (..., k) x; w, b in x's dtype."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        with _NoAutocast(x):
            x2 = x.reshape(-1, x.shape[-1])
            y = mm_fwd(x2, w, b)
        ctx.save_for_backward(x2, w)
        ctx.lead = x.shape[:-1]
        return y.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, gy: Tensor):
        x2, w = ctx.saved_tensors
        nx, nw, nb = ctx.needs_input_grad
        with _NoAutocast(gy):
            g2 = gy.reshape(-1, gy.shape[-1]).to(x2.dtype)
            gx = mm_dx(g2, w).view(*ctx.lead, w.shape[1]) if nx else None
            gw = mm_dw(g2, x2) if nw else None
            gb = g2.sum(0) if nb else None
        return gx, gw, gb


class LNLinear(torch.autograd.Function):
    """``LayerNorm(x; ln_w, ln_b, eps) W^T + b`` on (..., k) x.

    The LayerNorm runs in x's dtype (ln_w, ln_b in x's dtype), the product in w's dtype
    (autocast: LayerNorm in fp32, product in the autocast dtype, as autocast would)."""

    @staticmethod
    def forward(ctx, x: Tensor, ln_w: Tensor, ln_b: Tensor, eps: float, w: Tensor, b: Tensor) -> Tensor:
        k = x.shape[-1]
        with _NoAutocast(x):
            xn, mean, rstd = torch.native_layer_norm(x, (k,), ln_w, ln_b, eps)
            y = mm_fwd(xn.reshape(-1, k).to(w.dtype), w, b)
        ctx.save_for_backward(x, mean, rstd, ln_w, ln_b, w)
        ctx.eps = eps
        return y.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, gy: Tensor):
        x, mean, rstd, ln_w, ln_b, w = ctx.saved_tensors
        nx, nlw, nlb, _, nw, nb = ctx.needs_input_grad
        k = x.shape[-1]
        gx = glw = glb = gw = gb = None
        with _NoAutocast(gy):
            g2 = gy.reshape(-1, gy.shape[-1]).to(w.dtype)
            if nw:
                xn = (x - mean) * rstd  # the normalised input, recomputed
                xn = torch.addcmul(ln_b, xn, ln_w) if ln_w is not None else xn
                gw = mm_dw(g2, xn.reshape(-1, k).to(w.dtype))
            if nb:
                gb = g2.sum(0)
            if nx or nlw or nlb:
                gxn = mm_dx(g2, w).view(x.shape).to(x.dtype)
                gx, glw, glb = torch.ops.aten.native_layer_norm_backward(
                    gxn, x, (k,), mean, rstd, ln_w, ln_b, [nx, nlw, nlb])
        return gx, glw, glb, None, gw, gb


class GeluLinear(torch.autograd.Function):
    """``gelu(u) W^T + b`` on (..., k) u; w, b in u's dtype."""

    @staticmethod
    def forward(ctx, u: Tensor, w: Tensor, b: Tensor) -> Tensor:
        with _NoAutocast(u):
            a = F.gelu(u.reshape(-1, u.shape[-1]))
            y = mm_fwd(a, w, b)
        ctx.save_for_backward(u, w)
        return y.view(*u.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, gy: Tensor):
        u, w = ctx.saved_tensors
        nu, nw, nb = ctx.needs_input_grad
        gu = gw = gb = None
        with _NoAutocast(gy):
            u2 = u.reshape(-1, u.shape[-1])
            g2 = gy.reshape(-1, gy.shape[-1]).to(w.dtype)
            if nw:
                gw = mm_dw(g2, F.gelu(u2))
            if nb:
                gb = g2.sum(0)
            if nu:
                gu = torch.ops.aten.gelu_backward(mm_dx(g2, w), u2).view(u.shape)
        return gu, gw, gb


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """``F.scaled_dot_product_attention`` on q, k, v (S, H, L, dh) with a mask that broadcasts
    to (S, H, L, L), or a (G, 1, H, L, L) mask shared by each of G consecutive groups of
    S / G sets: one call per group, the mask broadcast (no (S, H, L, L) copy). The mask is
    detached: SDPA sends a mask that needs grad down its unfused math path."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v)
    mask = mask.detach()
    if mask.dim() != 5:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    g = mask.shape[0]
    qs, ks, vs = (t.unflatten(0, (g, -1)) for t in (q, k, v))
    return torch.cat([F.scaled_dot_product_attention(qs[i], ks[i], vs[i], attn_mask=mask[i]) for i in range(g)])


class BiasedAttention(torch.autograd.Function):
    """``softmax(q k^T * scale + bias) v`` on the packed projection ``qkv`` (S, L, 3, H, dh)
    (q, k, v = qkv[:, :, i] as (S, H, L, dh)), with a bias gradient. Returns (S, H, L, dh).

    ``bias``: None, or float or bool (True = attend), broadcastable to (S, H, L, L), or
    (G, 1, H, L, L): one bias per group of S / G consecutive sets. q, k, v are kept
    head-major (the copies the products need anyway; the projection's output is then freed),
    and the backward pass writes the gradient straight into the projection's layout (no
    stack, no second copy). Up to ``KEEP_PROBS_BYTES`` of (S, H, L, L) probabilities are
    kept too: faster than SDPA's fused kernel, which keeps its output and recomputes them
    (fp32 fwd + bwd, in-process A/B at the reference sizes: temporal sets (824, 4, 13, 32)
    15.1 vs 19.2 ms, keeping 2.2 MB instead of 5.5; spatial sets (104, 4, 103, 32) with a
    grouped bias 20.5 vs 28.2 ms, keeping 17.6 MB). Larger ones (big graphs) are recomputed
    in the backward pass, their forward in SDPA's fused kernel in fp32 (once per group with a
    5-D bias)."""

    KEEP_PROBS_BYTES = 64 << 20

    @staticmethod
    def forward(ctx, qkv: Tensor, bias: Tensor | None) -> Tensor:
        q, k, v = (t.contiguous() for t in qkv.permute(2, 0, 3, 1, 4))  # (S, H, L, dh) each
        if bias is not None and bias.dtype == torch.bool:
            bias = torch.zeros(bias.shape, dtype=q.dtype, device=q.device).masked_fill_(~bias, float("-inf"))
        groups = bias.shape[0] if bias is not None and bias.dim() == 5 else 0
        keep = q.shape[0] * q.shape[1] * q.shape[2] ** 2 * q.element_size() <= BiasedAttention.KEEP_PROBS_BYTES
        with _NoAutocast(q):
            if not keep and q.dtype == torch.float32:
                out = sdpa(q, k, v, None if bias is None else bias.to(q.dtype))
            else:
                p = _probs(q, k, bias, groups)
                out = torch.matmul(p, _grouped(v, groups)).view(q.shape)
        ctx.save_for_backward(q, k, v, p if keep else bias)
        ctx.groups, ctx.keep = groups, keep
        ctx.bias = (bias.shape, bias.dtype) if bias is not None else None
        return out

    @staticmethod
    def backward(ctx, go: Tensor):
        q, k, v, p = ctx.saved_tensors
        nqkv, nb = ctx.needs_input_grad
        scale, groups = q.shape[-1] ** -0.5, ctx.groups
        gqkv = gb = None
        with _NoAutocast(go):
            if not ctx.keep:
                p = _probs(q, k, p, groups)  # p held the bias
            gog, qg, kg, vg = (_grouped(t, groups) for t in (go.to(q.dtype), q, k, v))
            gs = torch._softmax_backward_data(torch.matmul(gog, vg.transpose(-1, -2)), p, -1, p.dtype)
            if nqkv:
                S, H, L, dh = q.shape
                gqkv = q.new_empty(S, L, 3, H, dh)
                out = gqkv.permute(2, 0, 3, 1, 4)  # (3, S, H, L, dh) views of the packed gradient
                out[0].copy_(torch.matmul(gs, kg).mul_(scale).view(q.shape))
                out[1].copy_(torch.matmul(gs.transpose(-1, -2), qg).mul_(scale).view(k.shape))
                out[2].copy_(torch.matmul(p.transpose(-1, -2), gog).view(v.shape))
            gb = gs.sum_to_size(ctx.bias[0]).to(ctx.bias[1]) if nb else None
        return gqkv, gb


def _probs(q: Tensor, k: Tensor, bias: Tensor | None, groups: int) -> Tensor:
    scores = torch.matmul(_grouped(q, groups), _grouped(k, groups).transpose(-1, -2))
    if bias is None:
        return softmax_(scores.mul_(q.shape[-1] ** -0.5))
    return softmax_(torch.add(bias.to(scores.dtype), scores, alpha=q.shape[-1] ** -0.5))


def softmax_(x: Tensor) -> Tensor:
    """Softmax over the last dim, in place when it can. fp32 rows shorter than 16 on the CPU by
    plain ops: torch's kernel is ~4x slower there (the temporal branch's (824, 4, 13, 13)
    scores: 3.9 vs 0.95 ms)."""
    if x.shape[-1] < 16 and x.device.type == "cpu" and x.dtype == torch.float32:
        x = x.sub_(x.amax(-1, keepdim=True)).exp_()
        return x.div_(x.sum(-1, keepdim=True))
    return torch.softmax(x, dim=-1)


def _grouped(t: Tensor, groups: int) -> Tensor:
    """(S, ..) -> (groups, S / groups, ..) (as is for groups = 0)."""
    return t.reshape(groups, t.shape[0] // groups, *t.shape[1:]) if groups else t


class GatedMix(torch.autograd.Function):
    """Decoder gate on (M, C) pre-activations ``tp`` (temporal conv) and ``sp`` (graph conv):
    t, s = gelu(tp), gelu(sp); g = sigmoid(t Wt^T + bt + s Ws^T); h = t + g (s - t);
    h = 0 where ``keep`` (bool (M, C) or None: no dropout) is False. Returns h."""

    @staticmethod
    def forward(ctx, tp: Tensor, sp: Tensor, wt: Tensor, bt: Tensor, ws: Tensor, keep: Tensor | None) -> Tensor:
        with _NoAutocast(tp):
            t, s = F.gelu(tp), F.gelu(sp)
            g = mm_add_(mm_fwd(t, wt, bt), s, ws).sigmoid_()
            h = torch.addcmul(t, g, s.sub_(t))  # s is scratch from here on: s - t
            if keep is not None:
                h.mul_(keep_as(keep, h.dtype))
        ctx.save_for_backward(tp, sp, g, wt, ws, keep)
        return h

    @staticmethod
    def backward(ctx, gh: Tensor):
        tp, sp, g, wt, ws, keep = ctx.saved_tensors
        ntp, nsp, nwt, nbt, nws, _ = ctx.needs_input_grad
        with _NoAutocast(gh):
            gh = gh.to(g.dtype)
            if keep is not None:
                gh = gh * keep_as(keep, gh.dtype)
            t, s = F.gelu(tp), F.gelu(sp)
            # d h / d g = s - t; d g / d a = g (1 - g)
            ga = torch.ops.aten.sigmoid_backward(gh * (s - t), g)
            gwt = mm_dw(ga, t) if nwt else None
            gws = mm_dw(ga, s) if nws else None
            gbt = ga.sum(0) if nbt else None
            gtp = gsp = None
            if ntp or nsp:
                gs_ = gh * g  # d h / d s (direct)
                gt_ = gh - gs_  # d h / d t (direct) = gh (1 - g)
                gt_ = mm_dx_add_(gt_, ga, wt)
                gs_ = mm_dx_add_(gs_, ga, ws)
                gtp = torch.ops.aten.gelu_backward(gt_, tp) if ntp else None
                gsp = torch.ops.aten.gelu_backward(gs_, sp) if nsp else None
        return gtp, gsp, gwt, gbt, gws, None


class ReluMLP(torch.autograd.Function):
    """``relu(relu(x) W1^T + b1) W2^T + b2`` on 2-D x. Keeps x only: the hidden layer (the
    widest tensor of the decoder head) is recomputed in the backward pass."""

    @staticmethod
    def forward(ctx, x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
        with _NoAutocast(x):
            y = mm_fwd(torch.relu(mm_fwd(torch.relu(x), w1, b1)), w2, b2)
        ctx.save_for_backward(x, w1, b1, w2)
        return y

    @staticmethod
    def backward(ctx, g: Tensor):
        x, w1, b1, w2 = ctx.saved_tensors
        nx, nw1, nb1, nw2, nb2 = ctx.needs_input_grad
        gx = gw1 = gb1 = gw2 = gb2 = None
        with _NoAutocast(g):
            g = g.to(x.dtype).contiguous()
            r0 = torch.relu(x)
            a1 = mm_fwd(r0, w1, b1)
            if nw2:
                gw2 = mm_dw(g, torch.relu(a1))
            if nb2:
                gb2 = g.sum(0)
            if nx or nw1 or nb1:
                ga1 = torch.ops.aten.threshold_backward(mm_dx(g, w2), a1, 0)
                del a1
                if nw1:
                    gw1 = mm_dw(ga1, r0)
                if nb1:
                    gb1 = ga1.sum(0)
                if nx:
                    gx = torch.ops.aten.threshold_backward(mm_dx(ga1, w1), x, 0)
        return gx, gw1, gb1, gw2, gb2


def keep_as(keep: Tensor, dtype: torch.dtype) -> Tensor:
    """A bool keep-mask as 0 / 1 in ``dtype`` (via uint8: a vectorised cast, unlike bool's)."""
    return keep.view(torch.uint8).to(dtype)


class DropoutAdd(torch.autograd.Function):
    """``x + y * keep`` for a bool ``keep`` (dropout with its scale already in y: a residual
    add). Keeps the bool mask only; one fused multiply-add instead of a select and an add."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, keep: Tensor) -> Tensor:
        ctx.save_for_backward(keep)
        ctx.dtypes = (x.dtype, y.dtype)
        return torch.addcmul(x, y, keep_as(keep, y.dtype))

    @staticmethod
    def backward(ctx, g: Tensor):
        (keep,) = ctx.saved_tensors
        xd, yd = ctx.dtypes
        gy = g.to(yd) * keep_as(keep, yd) if ctx.needs_input_grad[1] else None
        return (g.to(xd) if ctx.needs_input_grad[0] else None), gy, None
