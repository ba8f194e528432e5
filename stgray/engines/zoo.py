"""GPDiff stage 1: the model zoo -- one small forecasting model per node of every source
city, trained as batched tensor programs on Ray Train, stored in the artifact store.

Training of one shard (``train_models``): the shard's per-node models are one program
(stacked parameters, ``stgray.nn.gpdiff.pernode``). Models are sorted by neighbourhood
size and run in chunks padded to the chunk's largest neighbourhood (``chunk_rows`` model
x node rows per chunk): less padding, and activations small enough to stay in cache.
One Adam over the stacked parameters; per-model losses are summed, so each model's
gradient -- and, Adam being elementwise, its update -- is exactly its own. All models
see the same window starts per step (each on its own node). Loss: MSE on de-normalised
values as the reference (``loss="denormalised"``; with Adam the loss scale matters only
through the coupled weight decay, which the reference tuned at this scale), or on
normalised values. After every epoch (and before the first, epoch 0 = the initial
parameters) each model is scored on the **validation** split and keeps its best-epoch
parameters (vectorised); optional per-model early stopping with ``patience``: once a
quarter of the models in the program have stopped, they leave it (smaller program,
same results; a stopped model is not scored any more, its history holds NaN), except
while mid-shard checkpoints are kept.

Mid-shard checkpoints: inside ``run_zoo`` a shard's whole training state (parameters,
Adam moments, best-epoch bookkeeping, histories, RNG states) goes to the store every
``checkpoint_s`` seconds (at an epoch's end) as a scratch object keyed by the shard id
(``_ray/zoo-progress/<key>.pt``, not an artifact). A worker that dies mid-shard -- Ray
Train's ``FailureConfig`` restarting the worker group, or a later call -- resumes the
shard from that epoch, and the result is bit-for-bit that of an uninterrupted run.

The driver (``run_zoo``) is idempotent and resumable: shard i of the pending shards goes
to rank ``i % world_size``; each finished shard is committed at once as its own
``zoo-shard`` artifact, so a restarted worker, a resumed Ray run (run name from the
artifact key, storage inside the store) or a fresh call skips shards already done; the
``zoo`` artifact is assembled from the shard artifacts at the end. Shards are trained
independently and deterministically (seeds from the shard's content, one torch thread per
CPU of a worker), so where a shard runs -- which rank, which node, how many workers --
does not change a bit of the artifacts.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import socket
import time
import zipfile
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Literal, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import Field

from stgray.config import StageConfig, content_hash
from stgray.data.prepare import Prepared, load_prepared, seasonal_baseline
from stgray.engines import ray_utils
from stgray.errors import DataError, StoreError
from stgray.gpdiff.params import ParamLayout
from stgray.nn.gpdiff.pernode import (PerNodeArch, batched_forward, build_neighbourhoods,
                                      gather_inputs, gather_targets, init_vectors, make_layout,
                                      node_features)

ZOO_KIND = "zoo"
SHARD_KIND = "zoo-shard"


class ZooConfig(StageConfig):
    """The ``zoo`` stage. Execution-only fields do not enter the artifact hash."""

    _unhashed: ClassVar[frozenset[str]] = frozenset(
        {"num_workers", "cpus_per_worker", "use_gpu", "device", "progress", "max_failures",
         "chunk_rows", "eval_batch_size", "amp", "placement_strategy", "checkpoint_s"})
    _hashed_unless: ClassVar[dict] = {"select_on": "mse"}

    model: PerNodeArch = Field(default_factory=PerNodeArch)
    epochs: int = Field(30, ge=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(1e-4, gt=0)
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="cosine: the step size decays from lr to 0 over the run's steps")
    weight_decay: float = Field(1e-2, ge=0)
    patience: int | None = Field(None, gt=0, description="early stopping on validation (epochs)")
    select_on: Literal["mse", "mae"] = Field(
        "mse", description="the validation score that picks each model's epoch (and counts "
        "towards patience)")
    loss: Literal["denormalised", "normalised"] = "denormalised"
    nodes_per_shard: int = Field(64, gt=0)
    node_limit: int | None = Field(None, gt=0, description="train only the first n nodes of each city")
    init: Literal["shared", "per_node"] = Field(
        "shared", description="shared: every model starts from one initialisation (seeded by "
        "``seed``), so the zoo's parameters are aligned and the diffusion learns one "
        "distribution, not a mixture over hidden-unit permutations; per_node: one per node")
    seed: int = 0
    # execution only
    num_workers: int = Field(1, gt=0)
    cpus_per_worker: int = Field(1, gt=0)
    use_gpu: bool | Literal["auto"] = "auto"
    device: str | None = None
    amp: bool = Field(True, description="mixed precision (bf16/fp16) on CUDA only")
    progress: bool = False
    max_failures: int = Field(1, ge=-1)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    checkpoint_s: float | None = Field(60.0, ge=0, description="mid-shard checkpoint into the "
                                       "store at most this often (s; 0: every epoch; None: off)")
    chunk_rows: int = Field(32, gt=0, description="model x neighbourhood rows per chunk (speed only)")
    eval_batch_size: int = Field(512, gt=0)


# ------------------------------------------------------------------------------------
# batched training
# ------------------------------------------------------------------------------------
def scheduled_lr(cfg: ZooConfig, epoch: int, step: int, epochs: int, steps_per_epoch: int) -> float:
    """The step size at ``step`` (0-based) of ``epoch`` (1-based) of a run of ``epochs`` under
    ``cfg.lr_schedule``: from (epoch, step) alone, so a resumed run agrees."""
    if cfg.lr_schedule == "cosine":
        frac = ((epoch - 1) * steps_per_epoch + step) / (epochs * steps_per_epoch)
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * frac))
    return cfg.lr


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def node_seeds(seed: int, city: str, nodes) -> list[int]:
    """One init seed per (seed, city, node): a node's initial model never depends on the shard."""
    return [int(content_hash([seed, city, int(n)], 15), 16) for n in nodes]


def init_seeds(cfg: ZooConfig, city: str, nodes) -> list[int]:
    """The init seed of each node's model under ``cfg.init`` (never depends on the shard)."""
    if cfg.init == "shared":
        return [int(content_hash([cfg.seed, "shared-init"], 15), 16)] * len(nodes)
    return node_seeds(cfg.seed, city, nodes)


def fresh_init(cfg: ZooConfig, city: str, nodes) -> torch.Tensor:
    """(M, P) the random initial parameters of each node's model under ``cfg``."""
    return init_vectors(cfg.model, init_seeds(cfg, city, nodes))


def plan_chunks(sizes: np.ndarray, max_rows: int) -> list[tuple[int, int]]:
    """Split ascending ``sizes`` into [lo, hi) runs with (hi - lo) * sizes[hi-1] <= max_rows."""
    out, lo = [], 0
    for i in range(1, len(sizes) + 1):
        if i == len(sizes) or (i + 1 - lo) * int(sizes[i]) > max_rows:
            out.append((lo, i))
            lo = i
    return out


class _Program:
    """M per-node models of one city as chunked batched programs (models in size order)."""

    def __init__(self, p: Prepared, nodes, arch: PerNodeArch, device, chunk_rows: int,
                 like: "_Program | None" = None):
        """``like``: a program of the same city and arch whose input tensors are reused."""
        self.arch, self.device = arch, device
        nodes = np.asarray(nodes, dtype=np.int64)
        nb = build_neighbourhoods(p.adj, nodes, binary=arch.adjacency == "binary", eps=arch.adj_eps)
        self.order = np.argsort(nb.size, kind="stable")
        self.inverse = np.argsort(self.order)
        self.sizes = nb.size
        if like is not None:
            self.feats, self.values, self.base = like.feats, like.values, like.base
        else:
            self.feats = torch.as_tensor(node_features(p, arch.features), device=device)
            self.values = torch.as_tensor(p.x, device=device)
            self.base = None if arch.baseline == "none" else \
                torch.as_tensor(seasonal_baseline(p, arch.baseline), device=device)
        self.chunks = []
        for lo, hi in plan_chunks(nb.size[self.order], chunk_rows):
            sub = nb.select(self.order[lo:hi])
            self.chunks.append((lo, hi, *(torch.as_tensor(a, device=device) for a in
                                          (sub.idx, sub.mask, sub.a_hat, sub.centres))))

    @property
    def padded_rows(self) -> int:
        return sum((hi - lo) * idx.shape[1] for lo, hi, idx, *_ in self.chunks)

    def forward(self, params: dict, starts: torch.Tensor, training: bool):
        """Predictions and targets (M, B, t_out), normalised, models in size order."""
        a = self.arch
        preds, ys = [], []
        for lo, hi, idx, mask, a_hat, centres in self.chunks:
            x = gather_inputs(self.feats, idx, mask, starts, a.t_in)
            pred = batched_forward(a, {k: v[lo:hi] for k, v in params.items()}, x, a_hat,
                                   training=training)
            if self.base is not None:
                pred = pred + params["baseline_weight"][lo:hi, None, :] * \
                    gather_targets(self.base, centres, starts, a.t_in, a.t_out)
            preds.append(pred)
            ys.append(gather_targets(self.values, centres, starts, a.t_in, a.t_out))
        return torch.cat(preds), torch.cat(ys)


@dataclass
class TrainResult:
    """Best-on-validation parameters and per-model metrics (models in the given order)."""

    nodes: np.ndarray          # (M,)
    params: np.ndarray         # (M, P) float32, best epoch
    best_epoch: np.ndarray     # (M,) 0 = initial parameters
    val_mse: np.ndarray        # (M,) de-normalised, at the best epoch
    val_mae: np.ndarray
    val_rmse: np.ndarray
    train_loss: np.ndarray     # (M,) mean training loss of the best epoch (NaN for epoch 0)
    history_val: np.ndarray    # (M, E+1) validation MSE (de-normalised) per epoch
    history_train: np.ndarray  # (M, E+1) training loss per epoch (column 0 NaN)
    epochs_run: int
    seconds: float
    info: dict = field(default_factory=dict)


def _amp_context(device: torch.device, enabled: bool):
    if device.type != "cuda" or not enabled:
        return contextlib.nullcontext(), None
    if torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16), None
    return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")


@torch.no_grad()
def _evaluate(prog: _Program, params: dict, starts: np.ndarray, std: float, batch: int,
              amp_ctx) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-model (sorted order) de-normalised MSE and MAE over all windows ``starts``."""
    m = len(prog.order)
    se = torch.zeros(m, dtype=torch.float64, device=prog.device)
    ae = torch.zeros(m, dtype=torch.float64, device=prog.device)
    n = 0
    for i in range(0, len(starts), batch):
        s = torch.as_tensor(starts[i:i + batch], device=prog.device)
        with amp_ctx:
            pred, y = prog.forward(params, s, training=False)
        err = (pred.float() - y) * std
        se += (err ** 2).sum((1, 2)).double()
        ae += err.abs().sum((1, 2)).double()
        n += err.shape[1] * err.shape[2]
    n = max(n, 1)
    return se / n, ae / n


class ShardProgress:
    """Mid-shard training state of one shard in the store: a scratch object
    ``_ray/zoo-progress/<shard key>.pt`` (torch tensors and plain values only, read back
    with ``weights_only=True``), written whole at most every ``every_s`` seconds."""

    VERSION = 1

    def __init__(self, store, shard_id: str, every_s: float = 60.0):
        self.store, self.every_s = store, float(every_s)
        self.path = ray_utils.scratch_path(store, "zoo-progress", shard_id.split("/", 1)[1] + ".pt")
        self._last = time.monotonic()
        self.saved = 0

    def due(self) -> bool:
        return time.monotonic() - self._last >= self.every_s

    def load(self) -> dict | None:
        data = ray_utils.get_scratch(self.store, self.path)
        if data is None:
            return None
        try:
            st = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception:  # torn or foreign object: not trusted, the shard starts over
            return None
        return st if isinstance(st, dict) and st.get("version") == self.VERSION else None

    def save(self, state: dict) -> None:
        buf = io.BytesIO()
        torch.save({"version": self.VERSION, **state}, buf)
        ray_utils.put_scratch(self.store, self.path, buf.getvalue())
        self._last = time.monotonic()
        self.saved += 1

    def clear(self) -> None:
        ray_utils.rm_scratch(self.store, self.path)


def _cpu(d: dict) -> dict:
    return {k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v for k, v in d.items()}


def _adam(params: dict, cfg: ZooConfig, device: torch.device) -> torch.optim.Adam:
    return torch.optim.Adam(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            fused=device.type in ("cpu", "cuda"))


def _compacted(p: Prepared, prog: "_Program", sorted_nodes: np.ndarray, cfg: ZooConfig,
               params: dict, opt: torch.optim.Optimizer, keep: torch.Tensor):
    """The program, parameters and Adam (moments and step counts) of the models ``keep``
    (bool over ``prog``'s models, which are in size order) alone."""
    new_prog = _Program(p, sorted_nodes, prog.arch, prog.device, cfg.chunk_rows, like=prog)
    assert (new_prog.order == np.arange(len(sorted_nodes))).all()  # size order is kept
    new = {k: v.detach()[keep].clone().requires_grad_(True) for k, v in params.items()}
    sd = opt.state_dict()
    for st in sd["state"].values():
        for name in ("exp_avg", "exp_avg_sq"):
            st[name] = st[name][keep]
    new_opt = _adam(new, cfg, prog.device)
    new_opt.load_state_dict(sd)
    return new_prog, new, new_opt


def train_models(p: Prepared, nodes, cfg: ZooConfig, *, init: np.ndarray | torch.Tensor | None = None,
                 epochs: int | None = None, device: torch.device | str | None = None,
                 train_split: str = "train", val_split: str = "val",
                 log: Callable[[str], None] | None = None,
                 progress: ShardProgress | None = None,
                 _on_step: Callable[[int, int], None] | None = None,
                 _compact: bool = True) -> TrainResult:
    """Train (or fine-tune from ``init`` (M, P)) one model per node of ``nodes`` on ``p``.

    Windows come from ``train_split``; every epoch each model is scored on ``val_split``
    and keeps its best parameters (epoch 0 = ``init`` / the random initialisation).
    ``progress``: resume from, and checkpoint into, a ``ShardProgress`` (the caller keys
    it by everything that defines the result). ``_on_step(epoch, step)``: test hook;
    ``_compact=False`` keeps stopped models in the program (tests compare the two).
    """
    t0 = time.perf_counter()
    arch = cfg.model
    layout = make_layout(arch)
    device = torch.device(device) if device is not None else \
        ray_utils.local_device(cfg.device, cfg.use_gpu)
    epochs = cfg.epochs if epochs is None else int(epochs)
    nodes = np.asarray(nodes, dtype=np.int64)
    m = len(nodes)
    if m == 0:
        raise DataError("no nodes to train", where=p.name)
    if init is None:
        init = fresh_init(cfg, p.name, nodes)
    init = torch.tensor(np.asarray(init, dtype=np.float32))
    if tuple(init.shape) != (m, layout.n_params):
        raise DataError(f"initial parameters have shape {tuple(init.shape)}, want "
                        f"({m}, {layout.n_params}) for '{layout.arch}'", where=p.name)
    tr = p.window_starts(train_split, arch.t_in, arch.t_out)
    va = p.window_starts(val_split, arch.t_in, arch.t_out)
    if len(tr) == 0 or len(va) == 0:
        raise DataError(f"no {train_split if len(tr) == 0 else val_split} windows of "
                        f"{arch.t_in}+{arch.t_out} steps", where=p.name)
    prog = _Program(p, nodes, arch, device, cfg.chunk_rows)
    start = init[prog.order].to(device)
    params = {k: v.clone().contiguous().requires_grad_(True)
              for k, v in layout.unflatten(start).items()}
    opt = _adam(params, cfg, device)
    amp_ctx, scaler = _amp_context(device, cfg.amp)
    scale = float(p.std) ** 2 if cfg.loss == "denormalised" else 1.0
    gen = np.random.default_rng(int(content_hash([cfg.seed, p.name, nodes[:1].tolist(), m], 15), 16))
    torch.manual_seed(gen.integers(2 ** 62))

    state = progress.load() if progress is not None else None
    try:
        if state is not None and not (
                torch.equal(state["nodes"], torch.as_tensor(nodes))
                and torch.equal(state["order"], torch.as_tensor(prog.order))
                and tuple(state["params"].shape) == (m, layout.n_params)
                and state["hist_val"].shape[1] == epochs + 1 and 0 < state["epoch"] < epochs):
            state = None  # not this training's state: start over
    except (KeyError, TypeError, AttributeError, IndexError):
        state = None
    if state is None:
        hist_val = np.full((m, epochs + 1), np.nan)
        hist_train = np.full((m, epochs + 1), np.nan)
        mse, mae = _evaluate(prog, params, va, p.std, cfg.eval_batch_size, amp_ctx)
        best_flat = start.clone()
        best_mse, best_mae = mse.clone(), mae.clone()
        best_epoch = torch.zeros(m, dtype=torch.long, device=device)
        best_train = torch.full((m,), float("nan"), dtype=torch.float64, device=device)
        hist_val[:, 0] = mse.cpu().numpy()
        bad = torch.zeros(m, dtype=torch.long, device=device)
        active = torch.ones(m, dtype=torch.bool, device=device)
        epochs_run = resumed_from = 0
    else:  # resume after the checkpointed epoch: everything as it was, bit for bit
        with torch.no_grad():
            for k, v in layout.unflatten(state["params"].to(device)).items():
                params[k].copy_(v)
        opt.load_state_dict(state["opt"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        hist_val, hist_train = state["hist_val"].numpy().copy(), state["hist_train"].numpy().copy()
        best_flat = state["best_flat"].to(device)
        best_mse, best_mae = state["best_mse"].to(device), state["best_mae"].to(device)
        best_epoch, best_train = state["best_epoch"].to(device), state["best_train"].to(device)
        bad, active = state["bad"].to(device), state["active"].to(device)
        gen.bit_generator.state = json.loads(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        epochs_run = resumed_from = int(state["epoch"])
        if log is not None:
            log(f"{p.name} nodes {int(nodes.min())}..{int(nodes.max())}: resumed after epoch "
                f"{resumed_from}/{epochs} from the store")
    steps_per_epoch = -(-len(tr) // cfg.batch_size)
    live = torch.arange(m, device=device)  # sorted positions of the models in ``prog``
    sorted_nodes, inv = nodes[prog.order], prog.inverse
    shape = {"padded_rows": prog.padded_rows, "real_rows": int(prog.sizes.sum()),
             "chunks": len(prog.chunks)}
    for ep in range(epochs_run + 1, epochs + 1):
        perm = tr[gen.permutation(len(tr))]
        tot = torch.zeros(len(live), dtype=torch.float64, device=device)
        for step, i in enumerate(range(0, len(perm), cfg.batch_size)):
            set_lr(opt, scheduled_lr(cfg, ep, step, epochs, steps_per_epoch))
            s = torch.as_tensor(perm[i:i + cfg.batch_size], device=device)
            with amp_ctx:
                pred, y = prog.forward(params, s, training=True)
            per_model = ((pred.float() - y) ** 2).mean((1, 2)) * scale
            loss = per_model.sum()
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            tot += per_model.detach().double() * len(s)
            if _on_step is not None:
                _on_step(ep, step)
        train_loss = tot / len(perm)
        mse, mae = _evaluate(prog, params, va, p.std, cfg.eval_batch_size, amp_ctx)  # (L,)
        if cfg.select_on == "mae":
            imp = (mae < best_mae[live]) & active[live]
        else:
            imp = (mse < best_mse[live]) & active[live]
        if imp.any():
            flat = layout.flatten({k: v.detach() for k, v in params.items()})
            at = live[imp]
            best_flat[at] = flat[imp]
            best_mse[at], best_mae[at], best_train[at] = mse[imp], mae[imp], train_loss[imp]
            best_epoch[at] = ep
        live_np = live.cpu().numpy()
        hist_val[live_np, ep] = mse.cpu().numpy()
        hist_train[live_np, ep] = train_loss.cpu().numpy()
        epochs_run = ep
        bad[live] = torch.where(imp, torch.zeros_like(imp, dtype=bad.dtype), bad[live] + 1)
        if log is not None:
            log(f"{p.name} nodes {int(nodes.min())}..{int(nodes.max())}: epoch {ep}/{epochs} "
                f"train {float(train_loss.mean()):.4g} val mse {float(mse.mean()):.4g} "
                f"improved {int(imp.sum())}/{len(live)} ({int(active.sum())} of {m} training)")
        if cfg.patience is not None:
            active &= bad < cfg.patience
            if not active.any():
                break
            keep = active[live]
            if _compact and progress is None and int(keep.sum()) <= 0.75 * len(live):
                live = live[keep]
                prog, params, opt = _compacted(p, prog, sorted_nodes[live.cpu().numpy()], cfg,
                                               params, opt, keep)
        if progress is not None and ep < epochs and progress.due():
            osd = opt.state_dict()
            progress.save({
                "nodes": torch.as_tensor(nodes), "order": torch.as_tensor(prog.order), "epoch": ep,
                "params": layout.flatten({k: v.detach() for k, v in params.items()}).cpu().clone(),
                "opt": {"state": {i: _cpu(st) for i, st in osd["state"].items()},
                        "param_groups": osd["param_groups"]},
                "scaler": scaler.state_dict() if scaler is not None else None,
                "hist_val": torch.from_numpy(hist_val.copy()),
                "hist_train": torch.from_numpy(hist_train.copy()),
                "best_flat": best_flat.cpu().clone(), "best_mse": best_mse.cpu().clone(),
                "best_mae": best_mae.cpu().clone(), "best_epoch": best_epoch.cpu().clone(),
                "best_train": best_train.cpu().clone(), "bad": bad.cpu().clone(),
                "active": active.cpu().clone(), "gen": json.dumps(gen.bit_generator.state),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None})
    return TrainResult(
        nodes=nodes, params=best_flat.cpu().numpy()[inv].astype(np.float32),
        best_epoch=best_epoch.cpu().numpy()[inv], val_mse=best_mse.cpu().numpy()[inv],
        val_mae=best_mae.cpu().numpy()[inv], val_rmse=np.sqrt(best_mse.cpu().numpy()[inv]),
        train_loss=best_train.cpu().numpy()[inv], history_val=hist_val[inv],
        history_train=hist_train[inv], epochs_run=epochs_run,
        seconds=time.perf_counter() - t0,
        info={"device": str(device), **shape, "models_at_end": int(len(live)),
              "resumed_from_epoch": resumed_from,
              "checkpoints_saved": progress.saved if progress is not None else 0,
              "train_windows": int(len(tr)), "val_windows": int(len(va))})


# ------------------------------------------------------------------------------------
# inference and fine-tuning (zero-/few-shot evaluation)
# ------------------------------------------------------------------------------------
def _arch_of(arch) -> PerNodeArch:
    return arch.model if isinstance(arch, ZooConfig) else arch


@torch.no_grad()
def predict_nodes(prepared: Prepared, params, arch, node_ids, starts, *,
                  device: str | torch.device = "cpu", batch: int = 512,
                  chunk_rows: int = 32) -> np.ndarray:
    """De-normalised forecasts (B, t_out, M) of model m for node ``node_ids[m]`` at windows
    ``starts`` (inputs ``[s, s + t_in)``). ``arch``: a ``PerNodeArch`` or ``ZooConfig``."""
    a = _arch_of(arch)
    layout = make_layout(a)
    params = torch.tensor(np.asarray(params, dtype=np.float32))  # a copy: inputs may be read-only
    node_ids = np.asarray(node_ids, dtype=np.int64)
    if params.ndim != 2 or params.shape != (len(node_ids), layout.n_params):
        raise DataError(f"params of shape {tuple(params.shape)} do not fit {len(node_ids)} "
                        f"nodes of '{layout.arch}' (P={layout.n_params})", where=prepared.name)
    device = torch.device(device)
    prog = _Program(prepared, node_ids, a, device, chunk_rows)
    state = layout.unflatten(params[prog.order].to(device))
    starts = np.asarray(starts, dtype=np.int64)
    out = []
    for i in range(0, len(starts), batch):
        s = torch.as_tensor(starts[i:i + batch], device=device)
        pred, _ = prog.forward(state, s, training=False)
        out.append(pred[prog.inverse])
    if not out:
        return np.zeros((0, a.t_out, len(node_ids)), np.float32)
    z = torch.cat(out, dim=1).permute(1, 2, 0).cpu().numpy()
    return prepared.denormalise(z).astype(np.float32)


def finetune_nodes(prepared: Prepared, init_params, cfg: ZooConfig, epochs: int, *,
                   node_ids=None, device=None, return_result: bool = False):
    """Few-shot fine-tuning of per-node models (``init_params`` (M, P), model m for node
    ``node_ids[m]``, default all nodes) on ``prepared``'s train split, keeping for each
    model its best epoch on the validation split (epoch 0 = the initial parameters).
    Returns the (M, P) parameters (or the whole ``TrainResult``)."""
    if node_ids is None:
        node_ids = np.arange(prepared.num_nodes)
    res = train_models(prepared, node_ids, cfg, init=init_params, epochs=epochs, device=device)
    return res if return_result else res.params


# ------------------------------------------------------------------------------------
# shards and the driver
# ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardSpec:
    prepared_id: str
    city: str
    lo: int
    hi: int
    id: str

    def to_dict(self) -> dict:
        return {"prepared_id": self.prepared_id, "city": self.city, "lo": self.lo,
                "hi": self.hi, "id": self.id}


def shard_config(cfg: ZooConfig, city: str, lo: int, hi: int) -> dict:
    return {"zoo": cfg.hashed_dict(), "city": city, "nodes": [lo, hi]}


def _prepared_header(store, prepared_id: str) -> tuple[str, int]:
    """(city name, number of nodes) of a prepared artifact without downloading its arrays:
    the name from stats.json, N from the header of ``raw.npy`` inside arrays.npz."""
    import zipfile

    m = store.manifest(prepared_id)
    stats = store.read_json(prepared_id, "stats.json", m)
    path = store.object_path(prepared_id, "arrays.npz", m)
    try:
        with store.fs.open(path, "rb") as f, zipfile.ZipFile(f) as z, z.open("raw.npy") as r:
            major, _ = np.lib.format.read_magic(r)
            read = np.lib.format.read_array_header_1_0 if major == 1 else \
                np.lib.format.read_array_header_2_0
            shape, _, _ = read(r)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise StoreError(f"cannot read the arrays header ({type(e).__name__})",
                         where=prepared_id) from None
    return stats["name"], int(shape[1])


def plan_shards(store, cfg: ZooConfig, prepared_ids: list[str]) -> list[ShardSpec]:
    """(city, node range) chunks of ``nodes_per_shard`` nodes, with their artifact ids."""
    if not prepared_ids:
        raise DataError("the zoo needs at least one prepared source city", where="zoo")
    if len(set(prepared_ids)) != len(prepared_ids):
        raise DataError("prepared ids repeat", where="zoo")
    out = []
    for pid in prepared_ids:
        city, n = _prepared_header(store, pid)
        n = min(n, cfg.node_limit) if cfg.node_limit else n
        for lo in range(0, n, cfg.nodes_per_shard):
            hi = min(n, lo + cfg.nodes_per_shard)
            sid = store.id_for(SHARD_KIND, shard_config(cfg, city, lo, hi), [pid])
            out.append(ShardSpec(pid, city, lo, hi, sid))
    return out


def zoo_config(cfg: ZooConfig, prepared_ids: list[str]) -> dict:
    return {"zoo": cfg.hashed_dict(), "prepared": list(prepared_ids)}


def zoo_id_for(store, cfg: ZooConfig, prepared_ids: list[str],
               shards: list[ShardSpec] | None = None) -> str:
    shards = shards if shards is not None else plan_shards(store, cfg, prepared_ids)
    return store.id_for(ZOO_KIND, zoo_config(cfg, prepared_ids), [s.id for s in shards])


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    """``np.savez`` without its wall-clock zip timestamps: equal arrays, equal bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, a in arrays.items():
            with z.open(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), "w",
                        force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(a), allow_pickle=False)
    return buf.getvalue()


def train_shard(store, cfg: ZooConfig, spec: ShardSpec, *, device=None,
                prepared: Prepared | None = None, log=None, resumable: bool = False,
                meta: dict | None = None, _on_step=None) -> str:
    """Train one shard and commit it as a ``zoo-shard`` artifact (skipped if it exists).

    ``resumable``: checkpoint mid-shard into the store every ``cfg.checkpoint_s`` seconds
    and resume from such a checkpoint (see ``ShardProgress``); removed once committed.
    ``meta``: extra manifest metadata (where it ran)."""
    if store.exists(spec.id):
        return spec.id
    p = prepared if prepared is not None else load_prepared(store, spec.prepared_id)
    progress = ShardProgress(store, spec.id, cfg.checkpoint_s) \
        if resumable and cfg.checkpoint_s is not None else None
    res = train_models(p, np.arange(spec.lo, spec.hi), cfg, device=device, log=log,
                       progress=progress, _on_step=_on_step)
    layout = make_layout(cfg.model)
    data = _npz_bytes(nodes=res.nodes, params=res.params, best_epoch=res.best_epoch,
                      val_mse=res.val_mse, val_mae=res.val_mae, val_rmse=res.val_rmse,
                      train_loss=res.train_loss, history_val=res.history_val,
                      history_train=res.history_train)
    with store.writer(SHARD_KIND, shard_config(cfg, spec.city, spec.lo, spec.hi),
                      [spec.prepared_id], label=f"{spec.city}[{spec.lo}:{spec.hi}]",
                      meta={"seconds": round(res.seconds, 3), "epochs_run": res.epochs_run,
                            "host": socket.gethostname(), **res.info, **(meta or {})}) as w:
        w.put_bytes("shard.npz", data)
        w.put_bytes("layout.json", _layout_json(layout))
    if progress is not None:
        progress.clear()
    return spec.id


def read_shard(store, shard_id: str) -> dict[str, np.ndarray]:
    m = store.manifest(shard_id)
    with np.load(io.BytesIO(store.read_bytes(shard_id, "shard.npz", m)), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _layout_json(layout: ParamLayout) -> bytes:
    d = json.loads(layout.to_json())
    d["arch_hash"] = layout.arch_hash
    d["n_params"] = layout.n_params
    return json.dumps(d, indent=1).encode()


def _fault_hook(fault: dict | None, spec: ShardSpec):
    """Test only: ``fault = {"shard": id, "epoch": e, "step": s, "once_file": path}`` kills
    the worker training shard ``id`` after step s of epoch e, once (``ray_utils.inject_fault``)."""
    if not fault or fault.get("shard") != spec.id:
        return None

    def hook(ep: int, step: int) -> None:
        if ep == fault.get("epoch", 1) and step == fault.get("step", 0):
            ray_utils.inject_fault(fault)
    return hook


def _zoo_train_loop(config: dict) -> None:
    """Ray Train worker: rank r trains pending shards r, r + W, ...; one report per round.
    Shards already in the store are skipped, a shard with a mid-shard checkpoint resumes
    from it, so a restarted worker group (``FailureConfig``) redoes at most the epochs
    since the last checkpoint of the shards that were in flight."""
    import ray
    import ray.train

    store, shards = config["store"], [ShardSpec(**s) for s in config["shards"]]
    cfg = ZooConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    node = ray.get_runtime_context().get_node_id()
    torch.set_num_threads(max(1, cfg.cpus_per_worker))
    device = ray_utils.worker_device(cfg.device, config["use_gpu"])
    log = (lambda s: print(f"[zoo rank {rank}] {s}", flush=True)) if cfg.progress else None
    cache: dict[str, Prepared] = {}
    for r in range(math.ceil(len(shards) / world)):
        i = r * world + rank
        trained = 0
        if i < len(shards):
            spec = shards[i]
            if not store.exists(spec.id):
                if spec.prepared_id not in cache:
                    cache = {spec.prepared_id: load_prepared(store, spec.prepared_id)}
                train_shard(store, cfg, spec, device=device, prepared=cache[spec.prepared_id],
                            log=log, resumable=True, meta={"ray_node": node, "rank": rank},
                            _on_step=_fault_hook(config.get("fault"), spec))
                trained = 1
        ray.train.report({"round": r, "rank": rank, "trained": trained, "node": node})


def run_zoo(store, cfg: ZooConfig, prepared_ids: list[str], *, info: dict | None = None,
            run_name: str | None = None, _fault: dict | None = None) -> tuple[str, bool]:
    """Train (or resume) the zoo of ``prepared_ids`` on Ray Train; returns (zoo id, skipped).

    ``info`` (optional dict) receives shards_total / shards_done_before / shards_trained
    and the Ray run name. ``_fault``: test-only worker kill, see ``_fault_hook``.
    """
    info = info if info is not None else {}
    shards = plan_shards(store, cfg, prepared_ids)
    zid = zoo_id_for(store, cfg, prepared_ids, shards)
    info.update(zoo_id=zid, shards_total=len(shards), shards_trained=0)
    if store.exists(zid):
        info["shards_done_before"] = len(shards)
        return zid, True
    pending = [s for s in shards if not store.exists(s.id)]
    info["shards_done_before"] = len(shards) - len(pending)
    if pending:
        name = run_name or ray_utils.run_name("zoo", zid)
        info["ray_run"] = name
        _fit(store, cfg, pending, name, fault=_fault)
        info["shards_trained"] = sum(store.exists(s.id) for s in pending)
    missing = [s.id for s in shards if not store.exists(s.id)]
    if missing:
        raise StoreError(f"{len(missing)} zoo shards missing after training (first {missing[0]})",
                         where=zid)
    write_zoo(store, cfg, prepared_ids, shards)
    return zid, False


def _fit(store, cfg: ZooConfig, pending: list[ShardSpec], name: str,
         fault: dict | None = None) -> None:
    import ray.train
    from ray.train.torch import TorchTrainer

    use_gpu = ray_utils.resolve_use_gpu(cfg.use_gpu)
    workers = max(1, min(cfg.num_workers, len(pending)))
    res = {"CPU": cfg.cpus_per_worker}
    if use_gpu:
        res["GPU"] = 1
    trainer = TorchTrainer(
        _zoo_train_loop,
        train_loop_config={"store": store, "cfg": cfg.model_dump(mode="json"),
                           "shards": [s.to_dict() for s in pending], "use_gpu": use_gpu,
                           "fault": fault},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                               resources_per_worker=res,
                                               placement_strategy=cfg.placement_strategy),
        run_config=ray_utils.run_config(store, name, max_failures=cfg.max_failures),
    )
    trainer.fit()


def write_zoo(store, cfg: ZooConfig, prepared_ids: list[str], shards: list[ShardSpec]) -> str:
    """Assemble the ``zoo`` artifact from committed shard artifacts."""
    layout = make_layout(cfg.model)
    p_n = layout.n_params
    cols: dict[str, list] = {k: [] for k in ("city", "prepared_id", "node", "val_mae", "val_rmse",
                                             "val_mse", "train_loss", "best_epoch")}
    vecs = []
    for s in shards:
        d = read_shard(store, s.id)
        if d["params"].shape[1] != p_n:
            raise StoreError(f"shard has {d['params'].shape[1]} parameters per model, layout "
                             f"wants {p_n}", where=s.id)
        k = len(d["nodes"])
        cols["city"] += [s.city] * k
        cols["prepared_id"] += [s.prepared_id] * k
        cols["node"] += d["nodes"].tolist()
        for c in ("val_mae", "val_rmse", "val_mse", "train_loss"):
            cols[c] += d[c].astype(np.float64).tolist()
        cols["best_epoch"] += d["best_epoch"].astype(np.int64).tolist()
        vecs.append(d["params"].astype(np.float32))
    params = np.concatenate(vecs) if vecs else np.zeros((0, p_n), np.float32)
    table = pa.table({
        "city": pa.array(cols["city"], pa.string()),
        "prepared_id": pa.array(cols["prepared_id"], pa.string()),
        "node": pa.array(cols["node"], pa.int64()),
        "arch": pa.array([layout.arch] * len(params), pa.string()),
        "params": pa.FixedSizeListArray.from_arrays(pa.array(params.reshape(-1), pa.float32()), p_n),
        "val_mae": pa.array(cols["val_mae"], pa.float64()),
        "val_rmse": pa.array(cols["val_rmse"], pa.float64()),
        "val_mse": pa.array(cols["val_mse"], pa.float64()),
        "train_loss": pa.array(cols["train_loss"], pa.float64()),
        "best_epoch": pa.array(cols["best_epoch"], pa.int32()),
    }).replace_schema_metadata({"stgray.arch_hash": layout.arch_hash, "stgray.arch": layout.arch})
    splits = {pid: store.read_json(pid, "stats.json") for pid in prepared_ids}
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    meta = {"models": int(len(params)), "n_params": p_n, "arch": layout.arch,
            "arch_hash": layout.arch_hash, "shards": len(shards),
            "val_mae_mean": float(np.nanmean(cols["val_mae"])) if cols["val_mae"] else None}
    with store.writer(ZOO_KIND, zoo_config(cfg, prepared_ids), [s.id for s in shards],
                      label=f"{cfg.model.arch} zoo: {len(params)} models", meta=meta) as w:
        w.put_bytes("zoo.parquet", buf.getvalue())
        w.put_bytes("layout.json", _layout_json(layout))
        w.put_json("model.json", cfg.model.model_dump(mode="json"))
        w.put_json("splits.json", splits)
        # the fields that define the zoo: how it ran (workers, placement, ...) is not part of it
        w.put_json("config.json", cfg.hashed_dict())
        w.put_json("shards.json", [s.to_dict() for s in shards])
    return w.id


class ZooData(NamedTuple):
    params: np.ndarray        # (M, P) float32
    layout: ParamLayout
    metrics: pd.DataFrame     # city, prepared_id, node, arch, val_mae, val_rmse, val_mse, train_loss, best_epoch
    model: PerNodeArch        # architecture, for predict_nodes / finetune_nodes
    config: dict
    splits: dict


def load_zoo(store, zoo_id: str) -> ZooData:
    """Read a ``zoo`` artifact (checksummed); the layout's arch hash is verified."""
    m = store.manifest(zoo_id)
    if m.kind != ZOO_KIND:
        raise DataError(f"artifact is a '{m.kind}', not a zoo", where=zoo_id)
    lj = store.read_json(zoo_id, "layout.json", m)
    layout = ParamLayout.from_json(json.dumps(lj))
    model = PerNodeArch.model_validate(store.read_json(zoo_id, "model.json", m))
    if layout.arch_hash != lj.get("arch_hash") or make_layout(model).arch_hash != layout.arch_hash:
        raise DataError("zoo layout does not match its architecture (arch hash)", where=zoo_id)
    t = pq.read_table(io.BytesIO(store.read_bytes(zoo_id, "zoo.parquet", m)))
    col = t.column("params").combine_chunks()
    params = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    params = params.reshape(len(t), layout.n_params)
    metrics = t.drop_columns(["params"]).to_pandas()
    return ZooData(params, layout, metrics, model, store.read_json(zoo_id, "config.json", m),
                   store.read_json(zoo_id, "splits.json", m))
