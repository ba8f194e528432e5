"""What one Tune trial runs (a function trainable, in the trial's own process: no Ray Train
worker group inside a trial, so trials cannot deadlock waiting for each other's CPUs).

STGP: domain prompts (two-stage) then task prompts on the base's pre-trained model with
the trial's bank sizes / threshold / learning rate; one report per task epoch.
GPDiff: a denoiser trained on the base's tokens with the trial's diffusion settings,
evaluated ``rounds`` times (generate -> pick per node on the target's train days ->
validation MAE); one report per round.

Each report carries ``val_mae`` = the best validation MAE so far (data units; the model
kept is that epoch's/round's), so ASHA, Optuna and the table all rank on what a trial
would hand over, and ``iteration`` (1-based epoch/round: ASHA's clock; Tune's own
``training_iteration`` keeps counting across a restart). The last report carries the
checkpoint: the best state (STGP: the trained banks; GPDiff: the EMA denoiser). A trial
interrupted before it finished starts again from scratch (same trial id). A trial that
ASHA stopped early is finished for Tune, but if a kill came before Tune saved that, it
runs again.

Trial records live in the store beside Tune's experiment (``<root>/_sweeps/<name>/``):
``executions/`` gets one marker per *training* run of a trial; ``trials/<id>/`` the final
result and best state of a finished trial. A trial that Tune starts again after an
interruption although it had finished hands back that result without training.
"""

from __future__ import annotations

import json
import math
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from stgray.config import content_hash

BIG = 1e9  # stands in for a non-finite objective (Optuna and ASHA need finite numbers)


def _finite(x: float) -> float:
    return float(x) if x is not None and math.isfinite(float(x)) else BIG


# ------------------------------------------------------------------------------------
# trial records in the store
# ------------------------------------------------------------------------------------
class TrialRecords:
    """Per-trial execution markers and finished results under ``<root>/_sweeps/<name>``."""

    def __init__(self, store, sweep_dir: str):
        self.store, self.dir = store, sweep_dir.rstrip("/")

    def _put(self, path: str, data: bytes) -> None:
        self.store._call(lambda: self.store.fs.pipe_file(path, data), path)

    def mark_execution(self, trial_id: str, params: dict) -> None:
        rec = {"trial_id": trial_id, "params": params, "started": time.time(), "host": socket.gethostname(),
               "pid": os.getpid()}
        self._put(f"{self.dir}/executions/{trial_id}-{time.time_ns()}-{os.getpid()}.json",
                  json.dumps(rec, default=str).encode())

    def executions(self) -> dict[str, int]:
        """Trial id -> how many times it trained."""
        fs = self.store.fs
        try:
            fs.invalidate_cache(f"{self.dir}/executions")
            names = fs.ls(f"{self.dir}/executions", detail=False)
        except FileNotFoundError:
            return {}
        out: dict[str, int] = {}
        for n in names:
            tid = n.rstrip("/").rsplit("/", 1)[-1].rsplit("-", 2)[0]
            out[tid] = out.get(tid, 0) + 1
        return out

    def finished(self) -> list[str]:
        fs = self.store.fs
        try:
            fs.invalidate_cache(f"{self.dir}/trials")
            names = fs.ls(f"{self.dir}/trials", detail=False)
        except FileNotFoundError:
            return []
        return sorted(n.rstrip("/").rsplit("/", 1)[-1] for n in names
                      if fs.exists(f"{n.rstrip('/')}/result.json"))

    def save_done(self, trial_id: str, record: dict, files: dict[str, bytes]) -> None:
        """Objects first, ``result.json`` (with their checksums) last: its presence commits."""
        import hashlib

        sums = {}
        for name, data in files.items():
            self._put(f"{self.dir}/trials/{trial_id}/{name}", data)
            sums[name] = hashlib.sha256(data).hexdigest()
        self._put(f"{self.dir}/trials/{trial_id}/result.json",
                  json.dumps({**record, "files": sums}, default=str).encode())

    def load_done(self, trial_id: str) -> tuple[dict, dict[str, bytes]] | None:
        import hashlib

        fs = self.store.fs
        path = f"{self.dir}/trials/{trial_id}/result.json"
        try:
            rec = json.loads(self.store._call(lambda: fs.cat_file(path), path))
        except FileNotFoundError:
            return None
        files = {}
        for name, sha in rec.get("files", {}).items():
            p = f"{self.dir}/trials/{trial_id}/{name}"
            try:
                data = self.store._call(lambda p=p: fs.cat_file(p), p)
            except FileNotFoundError:
                return None
            if hashlib.sha256(data).hexdigest() != sha:
                return None  # damaged: train again
            files[name] = data
        return rec, files


class _Reporter:
    """Reports to Tune; the last report carries the checkpoint (the best state) and is
    preceded by the trial's record in the store (a trial stopped at ``max_t`` never runs
    code after its last report). One checkpoint per trial: a restored trial never points
    at a checkpoint that a newer one replaced."""

    def __init__(self, records: TrialRecords, trial_id: str, params: dict, extra: dict):
        self.records, self.trial_id, self.params, self.extra = records, trial_id, params, extra
        self.history: list[dict] = []
        self.files: dict[str, bytes] | None = None
        self.t0 = time.perf_counter()

    def report(self, metrics: dict, improved: bool, files_fn: Callable[[], dict[str, bytes]] | None,
               final: bool = False) -> None:
        from ray import tune

        m = {**self.extra, **metrics, "trial_seconds": time.perf_counter() - self.t0, "replayed": 0}
        m["val_mae"] = _finite(m["val_mae"])
        self.history.append(m)
        if improved and files_fn is not None:
            self.files = files_fn()
        if final and self.files is not None:
            self.records.save_done(self.trial_id, {"trial_id": self.trial_id, "params": self.params,
                                                   "history": self.history, "final": m,
                                                   "finished": time.time()}, self.files)
            with tempfile.TemporaryDirectory() as d:
                _write_files(d, self.files)
                tune.report(m, checkpoint=tune.Checkpoint.from_directory(d))
        else:
            tune.report(m)


def _write_files(d: str, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (Path(d) / name).write_bytes(data)


def read_checkpoint_files(checkpoint) -> dict[str, bytes]:
    """The files of a trial checkpoint (a ``ray.tune.Checkpoint``, local or on S3)."""
    with checkpoint.as_directory() as d:
        return {p.name: p.read_bytes() for p in Path(d).iterdir() if p.is_file()}


# ------------------------------------------------------------------------------------
# the trainable
# ------------------------------------------------------------------------------------
def run_trial(config: dict, ctx: dict) -> None:
    """Tune function trainable: ``config`` = the sampled parameters, ``ctx`` = the base
    artefact ids and settings from the driver (``tune.with_parameters``)."""
    from ray import tune

    from stgray.store import ArtifactStore

    torch.set_num_threads(max(1, int(ctx["threads"])))
    store = ArtifactStore(ctx["store"])
    records = TrialRecords(store, ctx["sweep_dir"])
    trial_id = tune.get_context().get_trial_id()
    params = {k: v for k, v in config.items()}
    done = records.load_done(trial_id)
    if done is not None:  # finished before an interruption: hand its result back, no training
        rec, files = done
        with tempfile.TemporaryDirectory() as d:
            _write_files(d, files)
            tune.report({**rec["final"], "replayed": 1}, checkpoint=tune.Checkpoint.from_directory(d))
        return
    records.mark_execution(trial_id, params)
    if ctx["method"] == "stgp":
        _stgp_trial(store, ctx, params, records, trial_id)
    else:
        _gpdiff_trial(store, ctx, params, records, trial_id)


def _base(ctx: dict):
    """The parts of the base pipeline config a trial uses (without importing the pipeline
    and every engine into the trial's process)."""
    from types import SimpleNamespace

    b = ctx["base"]
    if ctx["method"] == "stgp":
        from stgray.engines.stgp import STGPPromptConfig
        from stgray.nn.stgp.model import STGPModelConfig

        return SimpleNamespace(seeds=b["seeds"], stgp_prompt=STGPPromptConfig.model_validate(b["stgp_prompt"]),
                               stgp_pretrain=SimpleNamespace(model=STGPModelConfig.model_validate(
                                   b["stgp_pretrain"]["model"])))
    from stgray.gpdiff.diffusion import DiffusionConfig

    return SimpleNamespace(seeds=b["seeds"], diffusion=DiffusionConfig.model_validate(b["diffusion"]))


def _stgp_trial(store, ctx: dict, params: dict, records: TrialRecords, trial_id: str) -> None:
    from stgray.engines.common import tensors_to_bytes
    from stgray.engines.stgp import fit_stgp_task, train_stgp_domain
    from stgray.sweeps.config import STGPSweepOptions
    from stgray.sweeps.space import stgp_settings

    s = stgp_settings(_base(ctx), STGPSweepOptions.model_validate(ctx["stgp"]), params)
    ov, two = s["overrides"], s["prompting"] == "two_stage"
    dom_state, dom_val, dom_s = None, None, 0.0
    if two:
        r = train_stgp_domain(store, s["prompt"], ctx["pretrain_id"], ctx["target_id"], model_overrides=ov)
        dom_state, dom_val, dom_s = r["state"], r["best_val_loss"], r["seconds"]
    extra = {"bank_domain": int(ov["domain_prompts"] or 0) if two else 0, "bank_task": int(ov["task_prompts"]),
             "prompt_threshold": float(ov["prompt_threshold"]), "prompting": s["prompting"],
             "domain_val_loss": dom_val, "domain_seconds": dom_s}
    rep = _Reporter(records, trial_id, params, extra)
    meta = {"method": "stgp", "params": params, "overrides": ov, "prompting": s["prompting"], "task": s["task"],
            "prompt": s["prompt"].model_dump(mode="json"), "pretrain_id": ctx["pretrain_id"],
            "target_id": ctx["target_id"]}

    def on_epoch(rec: dict, best_state: dict) -> None:
        improved = best_state is not None and rec["val_mae"] == rec["best_val_mae"]
        rep.report({"val_mae": rec["best_val_mae"], "epoch_val_mae": _finite(rec["val_mae"]),
                    "iteration": rec["epoch"] + 1}, improved,
                   lambda: {"state.pt": tensors_to_bytes({"task": best_state, "domain": dom_state or {}}),
                            "trial.json": json.dumps(meta, default=str).encode()},
                   final=rec["epoch"] + 1 == epochs)

    epochs = int(ctx["max_t"])
    fit_stgp_task(store, s["prompt"], ctx["pretrain_id"], dom_state, ctx["target_id"], s["task"], "prompt",
                  model_overrides=ov, on_epoch=on_epoch, epochs=epochs)


# --- GPDiff ------------------------------------------------------------------------
def _mae_per_node(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    err = np.abs(pred.astype(np.float64) - truth)
    err[~np.isfinite(err)] = np.inf
    return err.mean((0, 1))


def gpdiff_evaluate(store, p, zoo_cfg, tokens_id: str, denoiser, nodes: np.ndarray, samples: int, seed: int,
                    splits: tuple[str, ...], objective: str = "zero_shot", finetune_epochs: int = 0) -> dict:
    """Generate ``samples`` parameter sets per node of ``nodes``, pick each node's on the
    target's train days (few-shot: then fine-tune it, epoch chosen on train days), and
    score the picks on ``splits``. Returns {split: {mae, rmse, mape}, sampling_s,
    nonfinite (candidates), picked (M, P)}."""
    from stgray.engines.diffusion import generate_params
    from stgray.engines.tokens import prompts_for
    from stgray.engines.zoo import predict_nodes, train_models
    from stgray.eval.metrics import forecast_metrics

    t_in, t_out = zoo_cfg.model.t_in, zoo_cfg.model.t_out

    def truth(starts):
        return p.raw[starts[:, None] + t_in + np.arange(t_out)[None]][:, :, nodes]

    prompts = prompts_for(store, tokens_id, p, "train")[nodes]
    info: dict = {}
    gen = generate_params(store, "sweep-trial", tokens_id, prompts, denoiser.cfg.sampler,
                          denoiser.cfg.n_sampling_steps(), samples, seed,
                          node_keys=[[p.name, int(i)] for i in nodes], denoiser=denoiser, info=info)
    tr = p.window_starts("train", t_in, t_out)
    cand = np.stack([_mae_per_node(predict_nodes(p, gen[:, s], zoo_cfg, nodes, tr), truth(tr))
                     for s in range(gen.shape[1])], 1)  # (M, S) train-days MAE
    picked = gen[np.arange(len(nodes)), cand.argmin(1)]
    if objective == "few_shot" and finetune_epochs > 0:
        picked = train_models(p, nodes, zoo_cfg, init=picked, epochs=finetune_epochs, val_split="train").params
    out: dict[str, Any] = {"sampling_s": info.get("sampling_seconds"), "nonfinite": int((~np.isfinite(cand)).sum()),
                           "picked": picked}
    for split in splits:
        st = p.window_starts(split, t_in, t_out)
        m = forecast_metrics(predict_nodes(p, picked, zoo_cfg, nodes, st), truth(st), per_horizon=False)
        out[split] = {k: float(m[k]) for k in ("mae", "rmse", "mape")}
    return out


def load_token_rows(store, tokens_id: str):
    """All rows of a tokens artefact: tokens (R, L, C), prompts (R, D) float32 tensors."""
    from stgray.engines.tokens import load_tokens_info, read_token_shard

    info = load_tokens_info(store, tokens_id)
    tabs = [read_token_shard(store, tokens_id, n, info.manifest) for n in info.shards]
    toks = torch.from_numpy(np.concatenate([t.tokens for t in tabs]).astype(np.float32))
    prm = torch.from_numpy(np.concatenate([t.prompts for t in tabs]).astype(np.float32))
    return info, toks.reshape(len(toks), info.n_tokens, info.width), prm


def _gpdiff_trial(store, ctx: dict, params: dict, records: TrialRecords, trial_id: str) -> None:
    from stgray.data.prepare import load_prepared
    from stgray.engines.common import tensors_to_bytes
    from stgray.engines.diffusion import Denoiser
    from stgray.engines.zoo import ZooConfig
    from stgray.gpdiff.diffusion import build_denoiser, make_ema, make_optimizer, make_scheduler, train_step
    from stgray.sweeps.config import GPDiffSweepOptions
    from stgray.sweeps.space import gpdiff_config

    base = _base(ctx)
    opts = GPDiffSweepOptions.model_validate(ctx["gpdiff"])
    steps = int(ctx["train_steps"])
    cfg = gpdiff_config(base.diffusion, params, steps)
    tokens_id = ctx["tokens_ids"][str(cfg.token_width)]
    info, toks, prm = load_token_rows(store, tokens_id)
    layout, dim = info.token_layout, info.prompt_dim
    zoo_cfg = ZooConfig.model_validate(ctx["zoo_cfg"])
    p = load_prepared(store, ctx["target_id"])
    nodes = np.arange(min(p.num_nodes, opts.node_limit or p.num_nodes))
    seed = base.seeds[0]
    torch.manual_seed(seed)
    model = build_denoiser(cfg, layout, dim)
    ema = make_ema(model, cfg.ema_decay)
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(cfg)
    gen = torch.Generator().manual_seed(int(content_hash([seed, "sweep-noise"], 15), 16))
    mask = layout.mask
    extra = {"diffusion_steps": cfg.num_train_timesteps, "sampling_steps": cfg.n_sampling_steps(),
             "sampler": cfg.sampler, "d_model": cfg.d_model, "layers": cfg.layers, "heads": cfg.heads,
             "conditioning": cfg.conditioning, "token_width": cfg.token_width,
             "denoiser_params": sum(q.numel() for q in model.parameters())}
    rep = _Reporter(records, trial_id, params, extra)
    meta = {"method": "gpdiff", "params": params, "diffusion": cfg.model_dump(mode="json"), "tokens_id": tokens_id,
            "target_id": ctx["target_id"], "zoo_id": ctx["zoo_id"], "nodes": nodes.tolist(),
            "samples_per_node": opts.samples_per_node, "seed": seed, "objective": opts.objective,
            "finetune_epochs": opts.finetune_epochs, "zoo_cfg": ctx["zoo_cfg"]}
    per_round = [steps // opts.rounds + (1 if r < steps % opts.rounds else 0) for r in range(opts.rounds)]
    best, step, train_s, loss_sum, loss_n = math.inf, 0, 0.0, 0.0, 0
    for r, n_steps in enumerate(per_round):
        t0 = time.perf_counter()
        for _ in range(n_steps):
            idx = torch.randint(len(toks), (min(cfg.batch_size, len(toks)),), generator=gen)
            loss_sum += train_step(model, ema, opt, toks[idx], prm[idx], mask, sched, cfg, generator=gen)
            loss_n += 1
            step += 1
        train_s += time.perf_counter() - t0
        ema.module.eval()
        den = Denoiser(ema.module, cfg, layout, dim, tokens_id)
        ev = gpdiff_evaluate(store, p, zoo_cfg, tokens_id, den, nodes, opts.samples_per_node, seed, ("val",),
                             opts.objective, opts.finetune_epochs)
        val = _finite(ev["val"]["mae"])
        improved = val < best
        best = min(best, val)
        state = {k: v.detach().cpu().clone() for k, v in ema.module.state_dict().items()} if improved else None
        rep.report({"val_mae": best, "round_val_mae": val, "iteration": r + 1, "step": step,
                    "loss": loss_sum / max(loss_n, 1), "train_s": train_s, "sampling_s": ev["sampling_s"],
                    "nonfinite": ev["nonfinite"]}, improved,
                   lambda: {"denoiser.pt": tensors_to_bytes(state),
                            "trial.json": json.dumps(meta, default=str).encode()},
                   final=r + 1 == len(per_round))
        loss_sum, loss_n = 0.0, 0
