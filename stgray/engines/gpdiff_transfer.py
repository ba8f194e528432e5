"""GPDiff transfer to the target: generate per-node parameters from the target's prompts,
pick each node's sample on validation (zero-shot), fine-tune it (or its
``finetune_candidates`` best samples, keeping the best on validation) on the train days
(few-shot), and compare with per-node models trained on the target alone and with the
pooled-source baseline (one model shared by all source nodes, fine-tuned per target node:
``engines/pooled.py``); the test split is evaluated once per method at the end.
"""

from __future__ import annotations

import io
import time
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field

from stgray.config import StageConfig
from stgray.data.prepare import load_prepared
from stgray.engines.diffusion import generate_params
from stgray.engines.tokens import prompts_for
from stgray.engines.zoo import ZooConfig, finetune_nodes, fresh_init, load_zoo, predict_nodes, train_models
from stgray.eval.metrics import forecast_metrics

TRANSFER_KIND = "gpdiff-eval"


class TransferConfig(StageConfig):
    """Generation and adaptation on the target."""

    _unhashed: ClassVar[frozenset[str]] = frozenset({"device"})
    _hashed_unless: ClassVar[dict] = {"patience": None, "select_on": "mse", "init_mix": 1.0,
                                      "finetune_candidates": 1}

    samples_per_node: int = Field(4, gt=0, description="generated candidates per node (picked on validation)")
    sampler: Literal["ddpm", "ddim"] = "ddim"
    sampling_steps: int = Field(50, gt=0)
    finetune_epochs: int = Field(40, ge=0, description="few-shot fine-tuning epochs on the target's "
                                 "train days (each node keeps its best validation epoch)")
    init_mix: float = Field(1.0, gt=0, le=1, description="few-shot fine-tuning starts from "
                            "init_mix x the generated model + (1 - init_mix) x the node's fresh "
                            "initialisation (the scratch model's; 'shrink and perturb', Ash & Adams "
                            "2020); 1: the generated model as is")
    finetune_candidates: int = Field(1, gt=0, description="few-shot: fine-tune each node's this "
                                     "many best samples (by zero-shot validation MAE) and keep the "
                                     "one whose fine-tuned model scores best on validation")
    scratch_epochs: int = Field(60, ge=0, description="epochs of the target-only baseline")
    pooled_epochs: int = Field(20, ge=0, description="epochs of the pooled-source baseline on the "
                               "sources (0: no pooled row); fine-tuned for finetune_epochs")
    batch_size: int = Field(16, gt=0, description="windows per step for every training on the target "
                            "(a few days hold few windows: 3 days at 1 h give 55 of 12+6 steps)")
    lr: float = Field(3e-3, gt=0, description="Adam step size for every training on the target")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="step-size schedule of every training on the target (cosine: "
        "decays to 0 over each run's epochs)")
    patience: int | None = Field(None, gt=0, description="every training on the target: a node's "
                                 "model stops after this many epochs without a better validation "
                                 "score (None: all epochs)")
    select_on: Literal["mse", "mae"] = Field(
        "mse", description="every training on the target: the validation score that picks "
                           "each node's epoch (mae: the benchmark's metric)")
    seed: int = Field(0, description="seeds the scratch initialisations, the pooled model, the "
                      "sampling and the batch order")
    device: str = "cpu"


def target_training(zoo_cfg: ZooConfig, cfg: TransferConfig) -> ZooConfig:
    """The zoo's training settings with the target's batch size, step size, schedule, early
    stopping, selection score and run seed: the zoo's are set for months of source data and
    would give one step per epoch on a few days."""
    return zoo_cfg.model_copy(update={"batch_size": cfg.batch_size, "lr": cfg.lr,
                                      "lr_schedule": cfg.lr_schedule, "patience": cfg.patience,
                                      "select_on": cfg.select_on, "seed": cfg.seed})


def mixed_init(generated: np.ndarray, target_cfg: ZooConfig, city: str, nodes, mix: float) -> np.ndarray:
    """(M, P) few-shot starting points: ``mix`` x generated + (1 - mix) x each node's fresh
    initialisation under ``target_cfg`` (the one its scratch model starts from)."""
    if mix >= 1:
        return generated
    fresh = fresh_init(target_cfg, city, nodes).numpy()
    return (mix * np.asarray(generated, dtype=np.float32) + (1 - mix) * fresh).astype(np.float32)


def finetune_best(p, generated: np.ndarray, cand: np.ndarray, target_cfg: ZooConfig, epochs: int,
                  nodes, mix: float, k: int):
    """Few-shot from each node's ``k`` best samples: ``generated`` (M, S, P) for ``nodes``
    (M,), ``cand`` (M, S) their zero-shot validation MAE. Fine-tunes M x k models (started
    by ``mixed_init``) and keeps per node the one of least validation score (``select_on``)
    -> (M, P) parameters, (M,) index of the kept sample."""
    nodes = np.asarray(nodes)
    m, k = len(nodes), max(1, min(int(k), generated.shape[1]))
    top = np.argsort(cand, 1, kind="stable")[:, :k]  # (M, k)
    rep = np.repeat(nodes, k)
    init = mixed_init(generated[np.arange(m)[:, None], top].reshape(m * k, -1), target_cfg, p.name,
                      rep, mix)
    res = finetune_nodes(p, init, target_cfg, epochs, node_ids=rep, return_result=True)
    score = (res.val_mae if target_cfg.select_on == "mae" else res.val_mse).reshape(m, k)
    score = np.where(np.isfinite(score), score, np.inf)
    best = score.argmin(1)
    return res.params.reshape(m, k, -1)[np.arange(m), best], top[np.arange(m), best]


def _mae_per_node(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    err = np.abs(pred.astype(np.float64) - truth)
    err[~np.isfinite(err)] = np.inf
    return err.mean((0, 1))


def run_gpdiff_transfer(store, cfg: TransferConfig, zoo_cfg: ZooConfig, zoo_id: str, tokens_id: str,
                        diffusion_id: str, target_id: str) -> tuple[str, bool]:
    """Idempotent: (zoo, tokens, diffusion, prepared target) -> ``gpdiff-eval`` artifact whose
    meta holds one results row per method (test metrics) and the validation figures."""
    inputs = [zoo_id, tokens_id, diffusion_id, target_id]
    config = {"transfer": cfg.hashed_dict(), "zoo": zoo_cfg.hashed_dict()}
    aid = store.id_for(TRANSFER_KIND, config, inputs)
    if store.exists(aid):
        return aid, True
    p = load_prepared(store, target_id)
    n = p.num_nodes
    nodes = np.arange(n)
    t_in, t_out = zoo_cfg.model.t_in, zoo_cfg.model.t_out
    prompts = prompts_for(store, tokens_id, p, "train")  # the target's few days + its graph
    info: dict = {}
    gen = generate_params(store, diffusion_id, tokens_id, prompts, cfg.sampler, cfg.sampling_steps,
                          cfg.samples_per_node, cfg.seed, node_keys=[[p.name, int(i)] for i in nodes],
                          device=cfg.device, info=info)  # (N, S, P)
    va = p.window_starts("val", t_in, t_out)
    te = p.window_starts("test", t_in, t_out)

    def truth(starts):
        return p.raw[starts[:, None] + t_in + np.arange(t_out)[None]]

    va_true, te_true = truth(va), truth(te)
    cand = np.stack([_mae_per_node(predict_nodes(p, gen[:, s], zoo_cfg, nodes, va), va_true)
                     for s in range(gen.shape[1])], 1)  # (N, S) validation MAE
    pick = cand.argmin(1)
    zero = gen[nodes, pick]
    t0 = time.perf_counter()
    target_cfg = target_training(zoo_cfg, cfg)
    few, few_pick = finetune_best(p, gen, cand, target_cfg, cfg.finetune_epochs, nodes, cfg.init_mix,
                                  cfg.finetune_candidates) if cfg.finetune_epochs else (zero, pick)
    few_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    scratch = train_models(p, nodes, target_cfg, epochs=cfg.scratch_epochs).params
    scratch_s = time.perf_counter() - t0
    zoo = load_zoo(store, zoo_id)
    methods = [("GPDiff zero-shot", zero, 0.0), ("GPDiff few-shot", few, few_s),
               ("target-only per-node (scratch)", scratch, scratch_s)]
    pooled_info = None
    if cfg.pooled_epochs:
        from stgray.engines.pooled import train_pooled

        t0 = time.perf_counter()
        sources = [load_prepared(store, pid) for pid in zoo.splits]
        vec, pooled_info = train_pooled(sources, zoo_cfg.model_copy(update={"seed": cfg.seed}),
                                        cfg.pooled_epochs, device=cfg.device)
        pooled = finetune_nodes(p, np.repeat(vec[None], n, 0), target_cfg, cfg.finetune_epochs,
                                node_ids=nodes) if cfg.finetune_epochs else np.repeat(vec[None], n, 0)
        methods.append(("pooled sources + fine-tune", pooled, time.perf_counter() - t0))
    rows, preds = [], {}
    for method, params, secs in methods:
        vm = forecast_metrics(predict_nodes(p, params, zoo_cfg, nodes, va), va_true, per_horizon=False)
        pred = predict_nodes(p, params, zoo_cfg, nodes, te)  # the one test evaluation
        m = forecast_metrics(pred, te_true)
        preds[method] = pred
        rows.append({"task": "forecast", "method": method, "val_mae": vm["mae"], "train_s": secs,
                     **{k: m[k] for k in ("mae", "rmse", "mape", "n")}})
    trained = zoo.params
    from stgray.eval.report import plot_param_distributions

    plot = plot_param_distributions(np.asarray(trained), zero, title=f"{p.name}: trained source zoo "
                                    f"({len(trained)} models) vs generated zero-shot ({n})")
    meta = {"rows": rows, "sampling_seconds": info.get("sampling_seconds"), "sampler": cfg.sampler,
            "sampling_steps": cfg.sampling_steps, "val_mae_of_samples_mean": float(np.nanmean(
                np.where(np.isfinite(cand), cand, np.nan))), "nonfinite_samples": int((~np.isfinite(cand)).sum()),
            "few_shot_kept_other_sample": float((few_pick != pick).mean()),
            "pooled": pooled_info}
    with store.writer(TRANSFER_KIND, config, inputs, label=f"{p.name} gpdiff", meta=meta) as w:
        for name, arr in (("zero_shot_params.npy", zero), ("few_shot_params.npy", few),
                          ("test_preds_few_shot.npy", preds["GPDiff few-shot"])):
            buf = io.BytesIO()
            np.save(buf, np.asarray(arr, np.float32), allow_pickle=False)
            w.put_bytes(name, buf.getvalue())
        w.put_bytes("params_trained_vs_generated.png", plot)
    return aid, False
