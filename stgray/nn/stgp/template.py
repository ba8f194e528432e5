"""STGP's one template for every task: a window of T = P * L steps cut into P patches of L
steps, and a boolean mask (B, N, P) over (node, patch) cells, True = masked (to reconstruct).

Every task is masked reconstruction; tasks differ only in which cells are masked (the model
never sees their values) and which cells are *scored* (loss and metrics):

============== ============================================ ==============================
task           masked (``mask``)                            scored (``score_mask``)
============== ============================================ ==============================
pretrain       ``round(ratio_patch*P)`` random patches of   every masked cell
               every node + ``round(ratio_node*N)`` random
               whole nodes (drawn per sample)
forecast       the last ``horizon_patches`` patches of      every masked cell
               every node
kriging        every patch of the unobserved nodes          every masked cell (all patches
                                                            of the unobserved nodes)
extrapolation  every patch of the unobserved nodes *and*    the last ``horizon_patches``
               the last ``horizon_patches`` of every node   patches of the unobserved nodes
============== ============================================ ==============================

The forecasting horizon must be whole patches: 12 steps in + 6 out with ``patch_len=6`` is
3 patches, the last one masked (:meth:`PatchTemplate.for_forecast`).

``unobserved`` may be node indices (shared by the batch), a bool (N,) node mask, or a bool
(B, N) mask (e.g. pseudo-unobserved observed nodes drawn per sample to train kriging).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

from stgray.errors import ConfigError

Task = Literal["pretrain", "forecast", "kriging", "extrapolation"]
TASKS: tuple[str, ...] = ("pretrain", "forecast", "kriging", "extrapolation")


class STBatch(NamedTuple):
    """Model inputs for a batch of windows: x (B, N, T) normalised, tod / dow (B, T) int64."""

    x: Tensor
    tod: Tensor
    dow: Tensor


@dataclass(frozen=True)
class PatchTemplate:
    """Windows of ``num_patches * patch_len`` steps; the last ``horizon_patches`` are the
    forecasting horizon."""

    patch_len: int = 12
    num_patches: int = 25
    horizon_patches: int = 1

    def __post_init__(self):
        if self.patch_len < 1:
            raise ConfigError("must be >= 1", where="template", field="patch_len")
        if self.num_patches < 2:
            raise ConfigError("must be >= 2", where="template", field="num_patches")
        if not 1 <= self.horizon_patches < self.num_patches:
            raise ConfigError(f"must be in [1, {self.num_patches - 1}] (at least one history patch)",
                              where="template", field="horizon_patches")

    # --- geometry ---------------------------------------------------------------------
    @classmethod
    def for_forecast(cls, t_in: int, t_out: int, patch_len: int | None = None) -> "PatchTemplate":
        """Template whose last patch(es) are exactly the ``t_out`` output steps.

        ``patch_len`` defaults to ``t_out``; both ``t_in`` and ``t_out`` must be multiples of it
        (12 in + 6 out, patch 6 -> 3 patches, the last one the horizon).
        """
        L = t_out if patch_len is None else patch_len
        if L < 1 or t_in % L or t_out % L:
            raise ConfigError(f"t_in={t_in} and t_out={t_out} must both be multiples of patch_len={L}",
                              where="template", field="patch_len")
        return cls(patch_len=L, num_patches=(t_in + t_out) // L, horizon_patches=t_out // L)

    @property
    def window_len(self) -> int:
        return self.num_patches * self.patch_len

    @property
    def horizon_steps(self) -> int:
        return self.horizon_patches * self.patch_len

    @property
    def history_steps(self) -> int:
        return self.window_len - self.horizon_steps

    def patchify(self, x: Tensor) -> Tensor:
        """(..., T) -> (..., P, L)."""
        self._check_len(x.shape[-1])
        return x.reshape(*x.shape[:-1], self.num_patches, self.patch_len)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(..., P, L) -> (..., T)."""
        return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])

    def steps_mask(self, cell_mask: Tensor) -> Tensor:
        """A (..., P) cell mask repeated over each patch's steps: (..., T)."""
        return cell_mask.repeat_interleave(self.patch_len, dim=-1)

    def _check_len(self, t: int) -> None:
        if t != self.window_len:
            raise ValueError(f"window has {t} steps; the template needs {self.num_patches} x "
                             f"{self.patch_len} = {self.window_len}")

    # --- masks ------------------------------------------------------------------------
    def pretrain_mask(self, batch: int, num_nodes: int, ratio_patch: float = 0.5,
                      ratio_node: float = 0.5, generator: torch.Generator | None = None,
                      shared_patches: bool = True, device=None) -> Tensor:
        """Random patches and random whole nodes, drawn independently for every sample.

        Exactly ``round(ratio_patch * P)`` patches and ``round(ratio_node * N)`` nodes are
        masked per sample. ``shared_patches=True`` masks the same patches at every node of a
        sample (the visible cells are then a dense nodes x patches grid, the fastest case);
        False draws the patches per node. At least one cell of each sample stays visible.
        """
        if not (0 <= ratio_patch <= 1 and 0 <= ratio_node <= 1):
            raise ConfigError("mask ratios must be in [0, 1]", where="template", field="ratio")
        P, N, B = self.num_patches, num_nodes, batch
        n_p = min(int(round(ratio_patch * P)), P - 1)
        n_n = min(int(round(ratio_node * N)), N - 1)
        g = generator
        if shared_patches:
            pm = _random_k_of(B, P, n_p, g)[:, None, :]  # (B, 1, P)
        else:
            pm = _random_k_of(B * N, P, n_p, g).view(B, N, P)
        nm = _random_k_of(B, N, n_n, g)[:, :, None]  # (B, N, 1)
        mask = pm | nm
        return mask.to(device) if device is not None else mask

    def forecast_mask(self, batch: int, num_nodes: int, device=None) -> Tensor:
        """The last ``horizon_patches`` patches of every node."""
        m = torch.zeros(batch, num_nodes, self.num_patches, dtype=torch.bool, device=device)
        m[..., self.num_patches - self.horizon_patches:] = True
        return m

    def kriging_mask(self, batch: int, num_nodes: int, unobserved, device=None) -> Tensor:
        """Every patch of the unobserved nodes (and nothing else)."""
        nodes = node_mask(unobserved, batch, num_nodes, device)
        return nodes[:, :, None].expand(batch, num_nodes, self.num_patches).clone()

    def extrapolation_mask(self, batch: int, num_nodes: int, unobserved, device=None) -> Tensor:
        """Every patch of the unobserved nodes plus the horizon patch(es) of every node."""
        return self.kriging_mask(batch, num_nodes, unobserved, device) | \
            self.forecast_mask(batch, num_nodes, device)

    def score_mask(self, task: Task, mask: Tensor, unobserved=None) -> Tensor:
        """Cells scored for ``task`` given its ``mask`` (B, N, P); see the module table."""
        _check_task(task)
        if task != "extrapolation":
            return mask.clone()
        B, N, _ = mask.shape
        nodes = node_mask(unobserved, B, N, mask.device)
        return self.forecast_mask(B, N, mask.device) & nodes[:, :, None]

    def task_masks(self, task: Task, batch: int, num_nodes: int, unobserved=None,
                   generator: torch.Generator | None = None, device=None,
                   **pretrain_kw) -> tuple[Tensor, Tensor]:
        """(mask, score_mask) for ``task``; ``pretrain_kw`` go to :meth:`pretrain_mask`."""
        _check_task(task)
        if task == "pretrain":
            m = self.pretrain_mask(batch, num_nodes, generator=generator, device=device, **pretrain_kw)
        elif task == "forecast":
            m = self.forecast_mask(batch, num_nodes, device)
        elif unobserved is None:
            raise ValueError(f"task '{task}' needs the unobserved nodes")
        elif task == "kriging":
            m = self.kriging_mask(batch, num_nodes, unobserved, device)
        else:
            m = self.extrapolation_mask(batch, num_nodes, unobserved, device)
        return m, self.score_mask(task, m, unobserved)

    # --- data -------------------------------------------------------------------------
    def window_starts(self, prepared, split: str, task: Task = "forecast", stride: int = 1) -> np.ndarray:
        """Starts of windows whose *scored* steps lie inside ``split``.

        Forecast / extrapolation: the horizon is scored, so the history may reach back into
        the previous split. Pretrain / kriging: every step is scored, so the whole window
        lies inside ``split``.
        """
        _check_task(task)
        if task in ("forecast", "extrapolation"):
            return prepared.window_starts(split, self.history_steps, self.horizon_steps, stride)
        lo, hi = prepared.splits[split]
        if hi - lo < self.window_len:
            return np.zeros(0, dtype=np.int64)
        return np.arange(lo, hi - self.window_len + 1, stride, dtype=np.int64)

    def batch(self, prepared, starts, device=None) -> STBatch:
        """Windows of a ``Prepared`` city as model inputs (x from the normalised series)."""
        starts = np.asarray(starts, dtype=np.int64)
        idx = starts[:, None] + np.arange(self.window_len)[None, :]
        x = torch.from_numpy(np.ascontiguousarray(prepared.x[idx].transpose(0, 2, 1)))  # (B, N, T)
        tod = torch.from_numpy(np.ascontiguousarray(prepared.tod[idx]))
        dow = torch.from_numpy(np.ascontiguousarray(prepared.dow[idx]))
        if device is not None:
            x, tod, dow = x.to(device), tod.to(device), dow.to(device)
        return STBatch(x, tod, dow)


def node_mask(nodes, batch: int, num_nodes: int, device=None) -> Tensor:
    """(B, N) bool from node indices, a bool (N,) mask or a bool (B, N) mask."""
    if nodes is None:
        raise ValueError("unobserved nodes required")
    t = torch.as_tensor(np.asarray(nodes) if not isinstance(nodes, Tensor) else nodes)
    if t.dtype == torch.bool:
        if t.shape == (num_nodes,):
            t = t[None].expand(batch, num_nodes)
        elif t.shape != (batch, num_nodes):
            raise ValueError(f"node mask of shape {tuple(t.shape)}; expected ({num_nodes},) "
                             f"or ({batch}, {num_nodes})")
        return t.to(device).clone()
    idx = t.reshape(-1).long()
    if idx.numel() and (idx.min() < 0 or idx.max() >= num_nodes):
        raise ValueError(f"node index out of range [0, {num_nodes})")
    m = torch.zeros(num_nodes, dtype=torch.bool)
    m[idx] = True
    return m[None].expand(batch, num_nodes).to(device).clone()


def _random_k_of(rows: int, n: int, k: int, generator) -> Tensor:
    """(rows, n) bool with exactly ``k`` random True per row."""
    if k <= 0:
        return torch.zeros(rows, n, dtype=torch.bool)
    ranks = torch.rand(rows, n, generator=generator).argsort(dim=1)
    return ranks < k


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ConfigError(f"unknown task '{task}' (expected one of {', '.join(TASKS)})",
                          where="template", field="task")
