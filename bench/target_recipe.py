"""Choose how per-node models train on a target, on *validation* only: on each LOO
target's train days (1-3), per-node STGCN models from scratch with the config's target
settings (``gpdiff``: batch size, step size, ``scratch_epochs``), scored on the
validation days (4-6). Test data is not read. Three choices, in order, each keeping the
previous winner:

1. output baseline: none (the reference's models) vs the time-of-day mean
   (``zoo.model.baseline: tod_mean``) -- kept if its validation MAE is lower on at least
   3 of the 4 targets;
2. the score that picks each node's epoch: validation MSE (the training loss) vs MAE
   (the benchmark's metric; ``gpdiff.select_on``) -- same rule;
3. early stopping (``gpdiff.patience``), which saves time: kept if the validation MAE
   stays within 1% of no stopping on every target.

    .venv/bin/python -m bench.target_recipe [--config configs/loo-quick.yaml] [--nodes 80]
        [--patience 20]   -> bench/results/target_recipe.json
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import command_line, machine_info, now_iso, sample_nodes, write_result
from bench.loo import load_loo_config, target_config

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/loo-quick.yaml")
    ap.add_argument("--nodes", type=int, default=80, help="nodes per target (seeded sample)")
    ap.add_argument("--patience", type=int, default=20)
    ap.add_argument("--store", default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    from stgray.data.prepare import load_prepared, seasonal_baseline
    from stgray.engines.gpdiff_transfer import target_training
    from stgray.engines.zoo import train_models
    from stgray.pipeline import StageLog, import_and_prepare
    from stgray.store import ArtifactStore

    torch.set_num_threads(1)
    cities, base = load_loo_config(str(REPO / a.config))
    store_url = a.store or os.environ.get("STGRAY_STORE") or str(REPO / "stgray-store")
    store = ArtifactStore(store_url)
    started, t0 = now_iso(), time.perf_counter()
    variants = {  # name -> (baseline, select_on, patience)
        "plain": ("none", "mse", None), "tod_mean": ("tod_mean", "mse", None),
        "tod_mean+mae": ("tod_mean", "mae", None),
        f"tod_mean+mae+patience{a.patience}": ("tod_mean", "mae", a.patience)}
    rows = []
    for t in cities:
        cfg = target_config(base, cities, t, store=store_url, seeds=None, where=a.config)
        p = load_prepared(store, import_and_prepare(store, cfg, StageLog())[t])
        nodes = sample_nodes(p.num_nodes, a.nodes)
        arch = cfg.zoo.model
        va = p.window_starts("val", arch.t_in, arch.t_out)
        steps = va[:, None] + arch.t_in + np.arange(arch.t_out)[None]
        tod = p.denormalise(seasonal_baseline(p)[steps][:, :, nodes])
        row = {"target": t, "nodes": len(nodes), "val_windows": len(va),
               "tod_mean_alone": float(np.abs(tod - p.raw[steps][:, :, nodes]).mean())}
        for name, (bl, sel, pat) in variants.items():
            tc = cfg.gpdiff.model_copy(update={"select_on": sel, "patience": pat})
            zc = target_training(cfg.zoo, tc).model_copy(
                update={"model": arch.model_copy(update={"baseline": bl})})
            t1 = time.perf_counter()
            r = train_models(p, nodes, zc, epochs=cfg.gpdiff.scratch_epochs, device="cpu")
            row[name] = {"val_mae": float(r.val_mae.mean()), "val_rmse": float(np.sqrt(r.val_mse.mean())),
                         "seconds": time.perf_counter() - t1, "epochs_run": r.epochs_run,
                         "mean_best_epoch": float(r.best_epoch.mean())}
        rows.append(row)
        print(f"{t}: val MAE " + " | ".join(f"{k} {row[k]['val_mae']:.4g} ({row[k]['seconds']:.0f} s)"
                                            for k in variants), flush=True)
    names = list(variants)
    better = lambda x, y: sum(r[x]["val_mae"] < r[y]["val_mae"] for r in rows)  # noqa: E731
    choice = {"baseline": "tod_mean" if better(names[1], names[0]) >= 3 else "none"}
    if choice["baseline"] == "tod_mean":
        choice["select_on"] = "mae" if better(names[2], names[1]) >= 3 else "mse"
        ref = names[2] if choice["select_on"] == "mae" else names[1]
        within = all(r[names[3]]["val_mae"] <= 1.01 * r[ref]["val_mae"] for r in rows)
        choice["patience"] = a.patience if within and choice["select_on"] == "mae" else None
    out = {"machine": machine_info(), "rows": rows, "variants": variants, "choice": choice,
           "rules": "baseline, then selection score: kept if lower validation MAE on >= 3 of the "
                    "targets; patience: kept if validation MAE within 1% of none on every target",
           "protocol": "targets' train days 1-3, validation days 4-6 (test not read); "
                       f"{a.nodes} seeded nodes per target; the config's target training "
                       f"(batch {cfg.gpdiff.batch_size}, lr {cfg.gpdiff.lr}, "
                       f"{cfg.gpdiff.scratch_epochs} epochs) from scratch"}
    config = {"config_file": a.config, "nodes": a.nodes, "patience": a.patience}
    path = write_result("target_recipe" if not a.out else Path(a.out).stem, out, mode="full",
                        command=command_line(argv, "bench.target_recipe"), config=config, seeds=[0],
                        started=started, wall_s=time.perf_counter() - t0, out=a.out)
    print(f"choice: {choice}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
