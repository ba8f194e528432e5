"""STGP engines: masked-reconstruction pre-training on Ray Train, then domain prompting and
task prompting (forecast, kriging, extrapolation) on the target with frozen weights.

Stages (each idempotent, store artifacts in -> store artifact out):
    stgp-pretrain  <- prepared source cities        (Ray Train, data-parallel, resumable)
    stgp-domain    <- stgp-pretrain + prepared target (domain banks only)
    stgp-task      <- stgp-pretrain [+ stgp-domain] + prepared target, per task
                      (task banks only; "finetune" variant: all weights but prompts)

Target-side rules: the target's unobserved nodes (kriging split) are never shown to the
domain stage or to kriging/extrapolation, which train and validate on *pseudo*-unobserved
observed nodes and meet the real unobserved nodes only in the one test evaluation.
Forecasting scores every node, so its task stage trains on every node's train days, as
the forecasting baselines do.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field

from stgray.config import StageConfig
from stgray.data.prepare import Prepared, deseasonalise, load_prepared
from stgray.engines import ray_utils
from stgray.engines.common import (allocator, amp_enabled, keep_freed_memory, peak_rss_gb, resolve_device, run_config,
                                   scaling, tensors_from_bytes, tensors_to_bytes, training_env)
from stgray.eval.metrics import forecast_metrics
from stgray.nn import mkl_dispatch
from stgray.nn.stgp.model import STGPModel, STGPModelConfig, count_parameters, masked_mae
from stgray.nn.stgp.template import PatchTemplate, node_mask

PRETRAIN_KIND, DOMAIN_KIND, TASK_KIND = "stgp-pretrain", "stgp-domain", "stgp-task"
Variant = Literal["prompt", "finetune"]
TaskName = Literal["forecast", "kriging", "extrapolation"]


def hourly_model(**kw) -> STGPModelConfig:
    """Model sizes for hourly data and 12-in/6-out windows (3 patches of 6 steps)."""
    base = dict(patch_len=6, num_patches=3, steps_per_day=24, d_model=64, num_heads=4, ffn_dim=128,
                temporal_depth=2, spatial_depth=2, decoder_channels=32, skip_channels=64,
                head_hidden=64, domain_prompts=25, task_prompts=25, dropout=0.1)
    base.update(kw)
    return STGPModelConfig(**base)


class STGPPretrainConfig(StageConfig):
    """Pre-training on source cities. Windows of t_in + t_out steps in patches of the model's
    patch_len; 50% patches and 50% nodes masked at random."""

    # num_workers is hashed: data-parallel workers change the global batch. Where the
    # workers run (placement, one node or many) and on what device is not.
    _unhashed: ClassVar[frozenset[str]] = frozenset({"use_gpu", "max_failures", "placement_strategy",
                                                     "cpus_per_worker"})
    _hashed_unless: ClassVar[dict[str, Any]] = {"deseasonalise": False}

    model: STGPModelConfig = Field(default_factory=hourly_model)
    t_in: int = Field(12, gt=0)
    t_out: int = Field(6, gt=0)
    epochs: int = Field(4, gt=0)
    steps_per_epoch: int = Field(40, gt=0, description="optimizer steps per epoch (per worker)")
    batch_size: int = Field(8, gt=0)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    mask_patch: float = Field(0.5, ge=0, le=1)
    mask_node: float = Field(0.5, ge=0, le=1)
    deseasonalise: bool = Field(False, description="every stage (pre-training, prompting, "
                                "evaluation) models each node's residual after its time-of-day "
                                "mean over the city's train split, added back for metrics")
    val_windows: int = Field(32, gt=0, description="fixed validation windows per source city")
    seed: int = 0
    num_workers: int = Field(2, gt=0)
    cpus_per_worker: int = Field(1, gt=0, description="CPUs reserved per worker = its torch threads")
    use_gpu: str | bool = "auto"
    max_failures: int = Field(2, ge=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"


class STGPPromptConfig(StageConfig):
    """Domain and task prompting (and the full fine-tuning comparison) on the target."""

    domain_epochs: int = Field(10, gt=0)
    task_epochs: int = Field(20, gt=0)
    finetune_epochs: int = Field(20, gt=0)
    batch_size: int = Field(8, gt=0)
    lr: float = Field(5e-3, gt=0, description="prompt learning rate")
    finetune_lr: float = Field(3e-4, gt=0)
    pseudo_unobserved: float = Field(0.3, gt=0, lt=1, description="share of observed nodes hidden "
                                     "per window to train/validate kriging and extrapolation")
    pseudo_draws: int = Field(3, gt=0, description="fixed pseudo-unobserved draws per window")
    seed: int = 0
    device: str = "auto"
    amp: bool = True

    _unhashed: ClassVar[frozenset[str]] = frozenset({"device", "amp"})


# --- pre-training ----------------------------------------------------------------------

def _template(t_in: int, t_out: int, m: STGPModelConfig) -> PatchTemplate:
    return PatchTemplate.for_forecast(t_in, t_out, m.patch_len)


def _load_city(store, prepared_id: str, cfg: STGPPretrainConfig, task: str | None = None) -> Prepared:
    """A prepared city in the pre-training's data space. For ``task='forecast'`` every node
    counts as observed: the kriging split's unobserved nodes are forecast from their own
    history at test, and every forecasting baseline trains on their train days too."""
    p = load_prepared(store, prepared_id)
    if task == "forecast":
        p = replace(p, unobserved=np.zeros(0, dtype=np.int64))
    return deseasonalise(p) if cfg.deseasonalise else p


def _window_idx(tmpl: PatchTemplate, starts) -> np.ndarray:
    """(B, T) step indices of windows ``starts``."""
    return np.asarray(starts, dtype=np.int64)[:, None] + np.arange(tmpl.window_len)[None, :]


def _offsets(p: Prepared, tmpl: PatchTemplate, starts, hidden: torch.Tensor | None) -> np.ndarray:
    """(B, N, T) seasonal offsets of windows ``starts``; nodes ``hidden`` (B, N) in a window
    get the shared profile, as the unobserved nodes do (their own would leak their level)."""
    idx = _window_idx(tmpl, starts)
    off = p.offset[idx].transpose(0, 2, 1)
    if hidden is not None:
        off = np.where(hidden.cpu().numpy()[:, :, None], p.shared_offset[idx][:, None, :], off)
    return off


def _raw(p: Prepared, tmpl: PatchTemplate, starts) -> np.ndarray:
    """(B, N, T) data of windows ``starts`` as recorded (exact zeros stay zeros for MAPE)."""
    return p.raw[_window_idx(tmpl, starts)].transpose(0, 2, 1)


def _restore(p: Prepared, tmpl: PatchTemplate, starts, z: torch.Tensor,
             hidden: torch.Tensor | None = None) -> np.ndarray:
    """Model-space values z (B, N, T) of windows ``starts`` in data units (seasonal part
    added back; ``hidden`` as in ``_offsets``)."""
    z = z.detach().float().cpu().numpy()
    if p.offset is not None:
        z = z + _offsets(p, tmpl, starts, hidden)
    return p.denormalise(z)


def _pretrain_loop(c: dict[str, Any]) -> None:
    """Ray Train per-worker loop: DDP over ranks, each rank samples its own windows."""
    import ray.train
    import ray.train.torch

    from stgray.store import ArtifactStore

    cfg = STGPPretrainConfig.model_validate(c["cfg"])
    store = ArtifactStore(c["store"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cities = [_load_city(store, i, cfg) for i in c["prepared"]]
    tmpl = _template(cfg.t_in, cfg.t_out, cfg.model)
    device = ray.train.torch.get_device()
    torch.set_num_threads(cfg.cpus_per_worker)
    keep_freed_memory()
    torch.manual_seed(cfg.seed)
    core = STGPModel(cfg.model).to(device)
    core.set_stage("pretrain")
    graphs = [core.graph(p.dense_adj()) for p in cities]
    # fused: one kernel over all parameters (CPU too): 33 -> 19 ms per step at the reference sizes
    opt = torch.optim.AdamW(core.parameters_for("pretrain"), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            fused=device.type in ("cpu", "cuda"))
    start_epoch, best_val, best_state, history = 0, math.inf, None, []
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            st = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)
        core.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        start_epoch, best_val, best_state, history = st["epoch"] + 1, st["best_val"], st["best_state"], st["history"]
    # DDP's defaults: no search for unused parameters (a pass over the autograd graph per step);
    # every parameter gets a gradient at every step, since a pre-training mask leaves a cell visible
    model = ray.train.torch.prepare_model(core) if world > 1 else core
    nodes = _gathered(ray.get_runtime_context().get_node_id(), world)
    train_starts = [tmpl.window_starts(p, "train", "pretrain") for p in cities]
    val_sets = []
    g = torch.Generator().manual_seed(12345)
    for p in cities:
        s = tmpl.window_starts(p, "val", "pretrain")
        s = s[np.linspace(0, len(s) - 1, min(cfg.val_windows, len(s))).astype(int)] if len(s) else s
        val_sets.append((s, tmpl.pretrain_mask(len(s), p.num_nodes, cfg.mask_patch, cfg.mask_node, g)))
    fault = c.get("fault") or {}
    for epoch in range(start_epoch, cfg.epochs):
        rng = np.random.default_rng([cfg.seed, epoch, rank])
        gen = torch.Generator().manual_seed(int(rng.integers(2 ** 31)))
        model.train()
        t0, n_win, tot = time.perf_counter(), 0, 0.0
        for step in range(cfg.steps_per_epoch):
            if fault.get("epoch") == epoch and fault.get("step", 0) == step and rank == fault.get("rank", 0):
                # delay: the previous report reaches the controller first
                ray_utils.inject_fault({"delay_s": 2.0, **fault})
            ci = (step * world + rank) % len(cities)
            p, starts = cities[ci], rng.choice(train_starts[ci], cfg.batch_size)
            b = tmpl.batch(p, starts, device)
            mask = tmpl.pretrain_mask(len(starts), p.num_nodes, cfg.mask_patch, cfg.mask_node, gen).to(device)
            loss = masked_mae(model(b.x, b.tod, b.dow, graphs[ci], mask), b.x, mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(loss.detach())
            n_win += len(starts)
        train_s = time.perf_counter() - t0
        val = _pretrain_val(core, tmpl, cities, graphs, val_sets, device)
        improved = val < best_val
        if improved:
            best_val = val
            best_state = {k: v.detach().cpu().clone() for k, v in core.state_dict().items()}
        rec = {"epoch": epoch, "train_loss": tot / cfg.steps_per_epoch, "val_loss": val,
               "resumed": bool(ckpt), "worker_nodes": nodes,
               "windows_per_s": n_win * world / train_s, "train_seconds": train_s,
               "worker_peak_rss_gb": _gathered(peak_rss_gb(), world),
               "worker_mkl_avx512": _gathered(mkl_dispatch.status()["enabled"], world),
               "worker_allocator": _gathered(allocator(), world),
               "worker_gomp_spincount": _gathered(os.environ.get("GOMP_SPINCOUNT"), world)}
        history.append(rec)
        if rank == 0:
            with tempfile.TemporaryDirectory() as d:
                torch.save({"model": core.state_dict(), "opt": opt.state_dict(), "epoch": epoch,
                            "best_val": best_val, "best_state": best_state, "history": history},
                           Path(d) / "state.pt")
                ray.train.report(rec, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(rec)


def _gathered(value, world: int) -> list:
    """``value`` of every rank, in rank order (all ranks must call)."""
    if world == 1:
        return [value]
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, value)
    return out


@torch.no_grad()
def _pretrain_val(core, tmpl, cities, graphs, val_sets, device) -> float:
    core.eval()
    losses = []
    for p, gr, (starts, mask) in zip(cities, graphs, val_sets):
        for i in range(0, len(starts), 16):
            b = tmpl.batch(p, starts[i:i + 16], device)
            m = mask[i:i + 16].to(device)
            losses.append(float(masked_mae(core(b.x, b.tod, b.dow, gr, m), b.x, m)))
    core.train()
    return float(np.mean(losses)) if losses else math.nan


def run_stgp_pretrain(store, cfg: STGPPretrainConfig, prepared_ids: list[str],
                      fault: dict | None = None) -> tuple[str, bool]:
    """Pre-train on the source cities with Ray Train; artifact = best-on-validation weights.

    ``fault`` (tests only): ``{"epoch": e, "step": s, "mode": "kill"|"raise"}`` kills rank 0 before
    step s (default 0) of epoch e on the first attempt; the run must resume from its last checkpoint."""
    from ray.train.torch import TorchTrainer

    aid = store.id_for(PRETRAIN_KIND, cfg.hashed_dict(), prepared_ids)
    if store.exists(aid):
        return aid, True
    trainer = TorchTrainer(
        _pretrain_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "store": store.url, "prepared": prepared_ids,
                           "fault": fault},
        scaling_config=scaling(cfg.num_workers, cfg.use_gpu, cfg.placement_strategy, cfg.cpus_per_worker),
        run_config=run_config(store, f"stgp-pretrain-{aid.split('/')[1]}", cfg.max_failures,
                              worker_env=training_env()),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"pre-training produced no checkpoint ({result.error})")
    with result.checkpoint.as_directory() as d:
        st = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)
    history = st["history"]
    best = min(history, key=lambda r: r["val_loss"])
    n_params = count_parameters(STGPModel(cfg.model))
    with store.writer(PRETRAIN_KIND, cfg.hashed_dict(), prepared_ids, label="stgp pre-train",
                      meta={"best_epoch": best["epoch"], "best_val_loss": best["val_loss"],
                            "params": n_params, "workers": cfg.num_workers}) as w:
        w.put_bytes("model.pt", tensors_to_bytes(st["best_state"]))
        w.put_json("history.json", history)
        w.put_json("model_config.json", cfg.model.model_dump(mode="json"))
    return aid, False


#: STGPModelConfig fields a prompt stage may change on a pre-trained model (sweeps):
#: the banks are never trained in pre-training, so a bank of another size starts fresh.
PROMPT_OVERRIDES = frozenset({"domain_prompts", "task_prompts", "prompt_threshold", "prompt_init_std"})


def load_pretrained(store, pretrain_id: str, model_overrides: dict[str, Any] | None = None,
                    init_seed: int = 0) -> STGPModel:
    """The pre-trained model. ``model_overrides`` (keys in ``PROMPT_OVERRIDES``, e.g. a
    sweep's bank size K or threshold) rebuild the model with those prompt settings: every
    pre-trained weight is loaded, and a bank whose shape changed keeps its fresh
    initialisation (seeded by ``init_seed``, without touching the global torch RNG)."""
    m = store.manifest(pretrain_id)
    mcfg = STGPModelConfig.model_validate(store.read_json(pretrain_id, "model_config.json", m))
    state = tensors_from_bytes(store.read_bytes(pretrain_id, "model.pt", m), f"{pretrain_id}/model.pt")
    if not model_overrides:
        model = STGPModel(mcfg)
        model.load_state_dict(state)
        return model
    bad = sorted(set(model_overrides) - PROMPT_OVERRIDES)
    if bad:
        from stgray.errors import ConfigError

        raise ConfigError(f"cannot override {bad} of a pre-trained model (only "
                          f"{sorted(PROMPT_OVERRIDES)})", field="model_overrides")
    mcfg = STGPModelConfig.model_validate({**mcfg.model_dump(mode="json"), **model_overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        model = STGPModel(mcfg)
    own = model.state_dict()
    keep = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = [k for k in state if k not in keep]
    if any(not k.endswith(".prompts") for k in skipped):
        raise RuntimeError(f"pre-trained weights do not fit: {skipped}")
    missing = model.load_state_dict(keep, strict=False).missing_keys
    if any(not k.endswith(".prompts") for k in missing):
        raise RuntimeError(f"pre-trained weights miss {missing}")
    return model


# --- target side -----------------------------------------------------------------------

class _Target:
    """The target city on a device, with its template and hidden (unobserved) nodes."""

    def __init__(self, p: Prepared, model: STGPModel, tmpl: PatchTemplate, device):
        self.p, self.tmpl, self.device = p, tmpl, device
        self.graph = model.graph(p.dense_adj())
        self.hidden = torch.as_tensor(node_mask(p.unobserved, 1, p.num_nodes)[0], device=device)  # (N,)

    def batch(self, starts, mask: torch.Tensor | None = None):
        """Inputs and known values of windows ``starts``. Deseasonalised data with a task
        ``mask`` (B, N, P): a node masked in every patch is a (pseudo-)unobserved node, so
        its values are taken relative to the shared profile (see ``_offsets``)."""
        b = self.tmpl.batch(self.p, starts, self.device)
        if mask is not None and self.p.offset is not None:
            delta = _offsets(self.p, self.tmpl, starts, None) - _offsets(self.p, self.tmpl, starts, mask.all(-1))
            b = b._replace(x=b.x + torch.as_tensor(delta, device=b.x.device, dtype=b.x.dtype))
        # unobserved nodes' values are unknown to every stage but the final test
        x_known = b.x.masked_fill(self.hidden[None, :, None], float("nan"))
        return b, x_known


def _loader(n: int, batch: int, rng: np.random.Generator):
    idx = rng.permutation(n)
    return [idx[i:i + batch] for i in range(0, n, batch)]


def run_stgp_domain(store, cfg: STGPPromptConfig, pretrain_id: str, target_id: str) -> tuple[str, bool]:
    """Train the two domain prompt banks on the target's train days with the pre-training
    objective (all other weights frozen); select the epoch on the validation days."""
    aid = store.id_for(DOMAIN_KIND, cfg.hashed_dict(), [pretrain_id, target_id])
    if store.exists(aid):
        return aid, True
    r = train_stgp_domain(store, cfg, pretrain_id, target_id)
    with store.writer(DOMAIN_KIND, cfg.hashed_dict(), [pretrain_id, target_id], label=f"{r['name']} domain prompts",
                      meta={"best_val_loss": r["best_val_loss"], "seconds": r["seconds"],
                            "frozen_fingerprint": r["frozen_fingerprint"],
                            "trainable_params": r["trainable_params"]}) as w:
        w.put_bytes("prompts.pt", tensors_to_bytes(r["state"]))
        w.put_json("history.json", r["history"])
    return aid, False


def train_stgp_domain(store, cfg: STGPPromptConfig, pretrain_id: str, target_id: str, *,
                      model_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Domain prompting without writing anything: returns ``state`` (the best epoch's bank
    tensors), ``best_val_loss`` (masked-reconstruction MAE, normalised units), ``history``,
    ``seconds``, ``trainable_params``, ``frozen_fingerprint`` and the target's ``name``.
    ``model_overrides``: prompt settings of the model (see ``load_pretrained``)."""
    pre_m = store.manifest(pretrain_id)
    pcfg = STGPPretrainConfig.model_validate(pre_m.config)
    device = resolve_device(cfg.device)
    model = load_pretrained(store, pretrain_id, model_overrides, cfg.seed).to(device)
    model.set_stage("domain")
    p = _load_city(store, target_id, pcfg)
    tmpl = _template(pcfg.t_in, pcfg.t_out, model.cfg)
    tgt = _Target(p, model, tmpl, device)
    tr, va = tmpl.window_starts(p, "train", "pretrain"), tmpl.window_starts(p, "val", "pretrain")
    g = torch.Generator().manual_seed(cfg.seed)
    va_mask = tmpl.pretrain_mask(len(va), p.num_nodes, pcfg.mask_patch, pcfg.mask_node, g).to(device)
    params = model.parameters_for("domain")
    frozen_before = frozen_fingerprint(model, "domain")
    opt = torch.optim.Adam(params, lr=cfg.lr)
    rng = np.random.default_rng(cfg.seed)
    best, best_state, hist = math.inf, None, []
    t0 = time.perf_counter()
    for epoch in range(cfg.domain_epochs):
        model.train()
        for idx in _loader(len(tr), cfg.batch_size, rng):
            b, xk = tgt.batch(tr[idx])
            m = tmpl.pretrain_mask(len(idx), p.num_nodes, pcfg.mask_patch, pcfg.mask_node, g).to(device)
            m = m | tgt.hidden[None, :, None]
            loss = masked_mae(model(xk, b.tod, b.dow, tgt.graph, m), xk, m)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        val = _recon_loss(model, tgt, va, va_mask)
        hist.append({"epoch": epoch, "val_loss": val})
        if val < best:
            best, best_state = val, _bank_state(model, "domain")
    secs = time.perf_counter() - t0
    _check_frozen(model, "domain", frozen_before)
    return {"state": best_state, "best_val_loss": best, "history": hist, "seconds": secs,
            "frozen_fingerprint": frozen_before, "trainable_params": sum(q.numel() for q in params),
            "name": p.name}


@torch.no_grad()
def _recon_loss(model, tgt: _Target, starts, masks) -> float:
    model.eval()
    out = []
    for i in range(0, len(starts), 16):
        b, xk = tgt.batch(starts[i:i + 16])
        m = masks[i:i + 16] | tgt.hidden[None, :, None]
        out.append(float(masked_mae(model(xk, b.tod, b.dow, tgt.graph, m), xk, m)))
    return float(np.mean(out)) if out else math.nan


def frozen_fingerprint(model: STGPModel, stage: str) -> str:
    """SHA-256 over every parameter ``stage`` does not train (bit-level)."""
    import hashlib

    train = {id(p) for p in model.parameters_for(stage)}
    h = hashlib.sha256()
    for n, p in model.named_parameters():
        if id(p) not in train:
            h.update(n.encode())
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _check_frozen(model: STGPModel, stage: str, before: str) -> None:
    if frozen_fingerprint(model, stage) != before:
        raise RuntimeError(f"frozen weights changed during the '{stage}' stage")


def _bank_state(model: STGPModel, stage: str) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters_for(stage)}


def _load_bank_state(model: STGPModel, state: dict[str, torch.Tensor]) -> None:
    missing = model.load_state_dict(state, strict=False)
    if missing.unexpected_keys:
        raise RuntimeError(f"unexpected prompt keys {missing.unexpected_keys}")


def _task_windows(tmpl, p, task: str, split: str):
    return tmpl.window_starts(p, split, task)


def _masks_for(tmpl, task: str, n: int, num_nodes: int, hidden: torch.Tensor, pseudo: torch.Tensor | None):
    """(mask, score) for windows during training/validation on the target.

    pseudo: (n, N) bool pseudo-unobserved observed nodes (kriging/extrapolation)."""
    if task == "forecast":
        m = tmpl.forecast_mask(n, num_nodes, hidden.device)
        return m | hidden[None, :, None], m & ~hidden[None, :, None]
    nodes = pseudo | hidden[None]
    m, _ = tmpl.task_masks(task, n, num_nodes, unobserved=nodes, device=hidden.device)
    _, score = tmpl.task_masks(task, n, num_nodes, unobserved=pseudo, device=hidden.device)
    return m, score & m & ~hidden[None, :, None]


def run_stgp_task(store, cfg: STGPPromptConfig, pretrain_id: str, domain_id: str | None, target_id: str,
                  task: TaskName, variant: Variant = "prompt") -> tuple[str, bool]:
    """Train task prompts (or fine-tune everything, ``variant='finetune'``) for ``task``;
    select the epoch on validation; evaluate once on test. Artifact holds the trained
    parameters, the validation history and the test metrics."""
    inputs = [pretrain_id, target_id] + ([domain_id] if domain_id else [])
    config = {"prompt": cfg.hashed_dict(), "task": task, "variant": variant}
    if store.manifest(pretrain_id).config.get("deseasonalise"):
        # the handling of deseasonalised data (hidden nodes on the shared profile, raw
        # truths); artefacts of an earlier handling are not reused
        config["deseasonalised"] = 2
    if task == "forecast":
        config["forecast_nodes"] = "all"  # see _load_city
    aid = store.id_for(TASK_KIND, config, inputs)
    if store.exists(aid):
        return aid, True
    dom = tensors_from_bytes(store.read_bytes(domain_id, "prompts.pt"), domain_id) if domain_id else None
    fit = fit_stgp_task(store, cfg, pretrain_id, dom, target_id, task, variant)
    model, tgt, p, params, stage = fit.model, fit.tgt, fit.tgt.p, fit.params, fit.stage
    best_state, hist, secs, frozen_before = fit.best_state, fit.history, fit.seconds, fit.frozen_fingerprint
    model.load_state_dict(best_state, strict=False)
    # the one test evaluation: real unobserved nodes, test period
    te = _task_windows(tgt.tmpl, p, task, "test")
    test_metrics, test_preds = _test(model, tgt, task, te)
    meta = {"task": task, "variant": variant, "domain": bool(domain_id), "val_mae": fit.best_val_mae,
            "best_epoch": int(np.argmin([h["val_mae"] for h in hist])), "train_seconds": secs,
            "trainable_params": sum(q.numel() for q in params), "total_params": count_parameters(model),
            "frozen_fingerprint": frozen_before, "prompts_active": model.prompts_active(),
            "test": {k: v for k, v in test_metrics.items() if k != "horizon"}}
    with store.writer(TASK_KIND, config, inputs, label=f"{p.name} {task} {variant}", meta=meta) as w:
        w.put_bytes("params.pt", tensors_to_bytes(best_state))
        w.put_json("history.json", hist)
        w.put_json("metrics.json", test_metrics)
        buf = io.BytesIO()
        np.save(buf, test_preds, allow_pickle=False)
        w.put_bytes("test_preds.npy", buf.getvalue())  # (windows, steps, scored nodes), data units
    return aid, False


@dataclass
class TaskFit:
    """What ``fit_stgp_task`` hands back (nothing written, test split untouched)."""

    model: STGPModel                    # on its device, weights of the *last* epoch
    tgt: "_Target"
    stage: str
    params: list                        # the trained parameters
    best_state: dict[str, torch.Tensor]  # best-on-validation trained tensors (CPU)
    best_val_mae: float                 # data units
    history: list[dict[str, Any]]       # [{"epoch", "val_mae"}]
    seconds: float
    frozen_fingerprint: str


def fit_stgp_task(store, cfg: STGPPromptConfig, pretrain_id: str, domain_state: dict[str, torch.Tensor] | None,
                  target_id: str, task: TaskName, variant: Variant = "prompt", *,
                  model_overrides: dict[str, Any] | None = None,
                  on_epoch: Callable[[dict[str, Any], dict[str, torch.Tensor]], None] | None = None,
                  epochs: int | None = None) -> TaskFit:
    """Task prompting (or full fine-tuning) with epoch selection on validation; writes
    nothing and never touches the test split. ``domain_state``: trained domain banks (or
    None: one-stage). ``model_overrides``: prompt settings (see ``load_pretrained``).
    ``on_epoch(record, best_state)`` after each epoch's validation (record: epoch,
    val_mae, best_val_mae in data units), e.g. to report to Ray Tune. ``epochs``: override
    the config's epoch count."""
    pcfg = STGPPretrainConfig.model_validate(store.manifest(pretrain_id).config)
    device = resolve_device(cfg.device)
    model = load_pretrained(store, pretrain_id, model_overrides, cfg.seed).to(device)
    if domain_state:
        _load_bank_state(model, domain_state)
    stage = "finetune" if variant == "finetune" else ("task_extrapolation" if task == "extrapolation" else "task")
    model.set_stage(stage)
    if domain_state and variant == "prompt":
        model.set_prompts(domain=True)  # the trained domain banks stay on (frozen) under the task banks
    params = model.parameters_for(stage)
    frozen_before = frozen_fingerprint(model, stage)
    p = _load_city(store, target_id, pcfg, task)
    tmpl = _template(pcfg.t_in, pcfg.t_out, model.cfg)
    tgt = _Target(p, model, tmpl, device)
    N = p.num_nodes
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)

    def draws(starts: np.ndarray, k: int):
        """k fixed (mask, score) draws per window: pseudo-unobserved observed nodes."""
        if task == "forecast":
            m, s = _masks_for(tmpl, task, len(starts), N, tgt.hidden, None)
            return [(starts, m, s)]
        obs = np.flatnonzero(~tgt.hidden.cpu().numpy())
        n_ps = max(1, int(round(cfg.pseudo_unobserved * len(obs))))
        out = []
        for _ in range(k):
            pseudo = torch.zeros(len(starts), N, dtype=torch.bool)
            for i in range(len(starts)):
                pseudo[i, rng.choice(obs, n_ps, replace=False)] = True
            m, s = _masks_for(tmpl, task, len(starts), N, tgt.hidden, pseudo.to(device))
            out.append((starts, m, s))
        return out

    train_sets = draws(_task_windows(tmpl, p, task, "train"), cfg.pseudo_draws)
    val_sets = draws(_task_windows(tmpl, p, task, "val"), 1)
    cache = variant == "prompt"
    enc_cache: dict[int, torch.Tensor] = {}
    if cache:  # nothing upstream of the task prompts trains: encode once
        model.eval()
        with torch.no_grad():
            for j, (st, m, _) in enumerate(train_sets + val_sets):
                enc_cache[j] = torch.cat([_encode(model, tgt, st[i:i + 32], m[i:i + 32])
                                          for i in range(0, len(st), 32)])
    lr = cfg.finetune_lr if variant == "finetune" else cfg.lr
    if epochs is None:
        epochs = cfg.finetune_epochs if variant == "finetune" else cfg.task_epochs
    opt = torch.optim.Adam(params, lr=lr)
    use_amp = amp_enabled(device, cfg.amp)
    best, best_state, hist = math.inf, None, []
    t0 = time.perf_counter()
    n_sets = len(train_sets)
    for epoch in range(epochs):
        model.train()
        for j, (st, m, s) in enumerate(train_sets):
            for idx in _loader(len(st), cfg.batch_size, rng):
                ii = torch.as_tensor(idx, device=device)
                b, xk = tgt.batch(st[idx], m[ii])
                with torch.autocast(device.type, enabled=use_amp):
                    if cache:
                        recon = model.decode(enc_cache[j][ii], m[ii], tgt.graph)
                    else:
                        recon = model(xk, b.tod, b.dow, tgt.graph, m[ii])
                    loss = masked_mae(recon.float(), xk, s[ii])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        val = _evaluate(model, tgt, task, val_sets, enc_cache if cache else None, n_sets)["mae"]
        hist.append({"epoch": epoch, "val_mae": val})
        if val < best:
            best = val
            best_state = {n: q.detach().cpu().clone() for n, q in model.named_parameters_for(stage)}
        if on_epoch is not None:
            on_epoch({"epoch": epoch, "val_mae": val, "best_val_mae": best}, best_state)
    secs = time.perf_counter() - t0
    _check_frozen(model, stage, frozen_before)
    return TaskFit(model, tgt, stage, params, best_state, best, hist, secs, frozen_before)


def evaluate_stgp_test(store, pretrain_id: str, target_id: str, task: TaskName, *,
                       task_state: dict[str, torch.Tensor], domain_state: dict[str, torch.Tensor] | None = None,
                       variant: Variant = "prompt", model_overrides: dict[str, Any] | None = None,
                       device: str = "auto", seed: int = 0) -> tuple[dict, np.ndarray]:
    """Test metrics and predictions of trained prompts (e.g. a sweep's winner): the one
    test evaluation, with the real unobserved nodes. States as ``fit_stgp_task`` /
    ``train_stgp_domain`` return them."""
    pcfg = STGPPretrainConfig.model_validate(store.manifest(pretrain_id).config)
    dev = resolve_device(device)
    model = load_pretrained(store, pretrain_id, model_overrides, seed).to(dev)
    if domain_state:
        _load_bank_state(model, domain_state)
    stage = "finetune" if variant == "finetune" else ("task_extrapolation" if task == "extrapolation" else "task")
    model.set_stage(stage)
    if domain_state and variant == "prompt":
        model.set_prompts(domain=True)
    _load_bank_state(model, task_state)
    p = _load_city(store, target_id, pcfg, task)
    tmpl = _template(pcfg.t_in, pcfg.t_out, model.cfg)
    tgt = _Target(p, model, tmpl, dev)
    return _test(model, tgt, task, _task_windows(tmpl, p, task, "test"))


def _encode(model, tgt: _Target, starts, mask):
    b, xk = tgt.batch(starts, mask)
    return model.encode(xk, b.tod, b.dow, tgt.graph, mask)


@torch.no_grad()
def _evaluate(model, tgt: _Target, task: str, sets, enc_cache, offset: int) -> dict:
    """Validation MAE (data units) over fixed (starts, mask, score) sets."""
    model.eval()
    preds, trues, scores = [], [], []
    for j, (st, m, s) in enumerate(sets):
        for i in range(0, len(st), 32):
            mm = m[i:i + 32]
            b, xk = tgt.batch(st[i:i + 32], mm)
            recon = model.decode(enc_cache[offset + j][i:i + 32], mm, tgt.graph) if enc_cache is not None \
                else model(xk, b.tod, b.dow, tgt.graph, mm)
            sm = tgt.tmpl.steps_mask(s[i:i + 32]).cpu().numpy()
            full = mm.all(-1)
            preds.append(_restore(tgt.p, tgt.tmpl, st[i:i + 32], recon, full)[sm])
            trues.append(_raw(tgt.p, tgt.tmpl, st[i:i + 32])[sm])
    pred, true = np.concatenate(preds), np.concatenate(trues)
    return forecast_metrics(pred[None, None], true[None, None], per_horizon=False)


@torch.no_grad()
def _test(model, tgt: _Target, task: str, starts: np.ndarray) -> dict:
    """Test metrics and predictions (B, steps, scored nodes) with the real task masks
    (the unobserved nodes are the real held-out ones)."""
    model.eval()
    p, tmpl = tgt.p, tgt.tmpl
    n_nodes = p.num_nodes
    preds, trues = [], []
    for i in range(0, len(starts), 32):
        st = starts[i:i + 32]
        b = tmpl.batch(p, st, tgt.device)
        if task == "forecast":
            m = tmpl.forecast_mask(len(st), n_nodes, tgt.device)
        elif task == "kriging":
            m = tmpl.kriging_mask(len(st), n_nodes, p.unobserved, tgt.device)
        else:
            m = tmpl.extrapolation_mask(len(st), n_nodes, p.unobserved, tgt.device)
        xin = b.x.masked_fill(tmpl.steps_mask(m), float("nan"))  # masked values never reach the model
        recon = model(xin, b.tod, b.dow, tgt.graph, m)
        preds.append(_restore(p, tmpl, st, recon))
        trues.append(_raw(p, tmpl, st))
    pred, true = np.concatenate(preds), np.concatenate(trues)  # (B, N, T)
    H = tmpl.horizon_steps
    if task == "forecast":
        out = pred[:, :, -H:].transpose(0, 2, 1)
        return forecast_metrics(out, true[:, :, -H:].transpose(0, 2, 1)), out.astype(np.float32)
    un = p.unobserved
    if task == "kriging":
        out = pred[:, un].transpose(0, 2, 1)
        return forecast_metrics(out, true[:, un].transpose(0, 2, 1)), out.astype(np.float32)
    out = pred[:, un, -H:].transpose(0, 2, 1)
    return forecast_metrics(out, true[:, un, -H:].transpose(0, 2, 1)), out.astype(np.float32)
