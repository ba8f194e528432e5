"""Choose the per-node models' output baseline on *validation*: on each LOO target's
train days (1-3), per-node STGCN models trained from scratch with the zoo recipe, with
no baseline (the reference's models) and over the time-of-day mean
(``PerNodeArch.baseline = "tod_mean"``), scored on the validation days (4-6) beside the
time-of-day mean itself. Test data is not read.

    .venv/bin/python -m bench.pernode_baseline [--config configs/loo-quick.yaml] [--nodes 80]
        [--epochs 30]   -> bench/results/pernode_baseline.json
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import command_line, machine_info, now_iso, write_result
from bench.loo import load_loo_config, target_config

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/loo-quick.yaml")
    ap.add_argument("--nodes", type=int, default=80, help="nodes per target (seeded sample)")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--store", default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    from stgray.data.prepare import load_prepared
    from stgray.engines.zoo import ZooConfig, train_models
    from stgray.nn.gpdiff.pernode import seasonal_baseline
    from stgray.pipeline import StageLog, import_and_prepare
    from stgray.store import ArtifactStore

    torch.set_num_threads(1)
    cities, base = load_loo_config(str(REPO / a.config))
    store_url = a.store or os.environ.get("STGRAY_STORE") or str(REPO / "stgray-store")
    store = ArtifactStore(store_url)
    started, t0 = now_iso(), time.perf_counter()
    rows = []
    for t in cities:
        cfg = target_config(base, cities, t, store=store_url, seeds=None, where=a.config)
        p = load_prepared(store, import_and_prepare(store, cfg, StageLog())[t])
        nodes = np.sort(np.random.default_rng(0).choice(p.num_nodes, min(p.num_nodes, a.nodes),
                                                        replace=False))
        va = p.window_starts("val", cfg.zoo.model.t_in, cfg.zoo.model.t_out)
        steps = va[:, None] + cfg.zoo.model.t_in + np.arange(cfg.zoo.model.t_out)[None]
        true = p.raw[steps][:, :, nodes]
        tod = p.denormalise(seasonal_baseline(p)[steps][:, :, nodes])
        row = {"target": t, "nodes": len(nodes), "val_windows": len(va),
               "tod_mean": {"val_mae": float(np.abs(tod - true).mean()),
                            "val_rmse": float(np.sqrt(((tod - true) ** 2).mean()))}}
        for bl in ("none", "tod_mean"):
            zc = ZooConfig(**{**cfg.zoo.model_dump(), "epochs": a.epochs,
                              "model": cfg.zoo.model.model_copy(update={"baseline": bl})})
            t1 = time.perf_counter()
            r = train_models(p, nodes, zc, device="cpu")
            row[f"model_{bl}"] = {"val_mae": float(r.val_mae.mean()),
                                  "val_rmse": float(np.sqrt(r.val_mse.mean())),
                                  "seconds": time.perf_counter() - t1}
        rows.append(row)
        print(f"{t}: val MAE  tod-mean {row['tod_mean']['val_mae']:.3f} | model, no baseline "
              f"{row['model_none']['val_mae']:.3f} | model over tod-mean "
              f"{row['model_tod_mean']['val_mae']:.3f}", flush=True)
    wins = sum(r["model_tod_mean"]["val_mae"] < r["model_none"]["val_mae"] for r in rows)
    out = {"machine": machine_info(), "rows": rows,
           "summary": f"model over the time-of-day mean beats the plain model on validation MAE "
                      f"on {wins} of {len(rows)} targets",
           "protocol": "targets' train days 1-3, validation days 4-6 (test not read); "
                       f"{a.nodes} seeded nodes per target; {a.epochs} epochs of the config's zoo "
                       "recipe (lr, schedule); each node keeps its best validation-MSE epoch"}
    config = {"config_file": a.config, "nodes": a.nodes, "epochs": a.epochs}
    p = write_result("pernode_baseline" if not a.out else Path(a.out).stem, out, mode="full",
                     command=command_line(argv, "bench.pernode_baseline"), config=config, seeds=[0],
                     started=started, wall_s=time.perf_counter() - t0, out=a.out)
    print(out["summary"])
    print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
