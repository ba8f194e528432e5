"""Choose the zoo's training recipe on *selection* nodes (not the nodes bench.zoo_speed
reports on): the reference protocol (30 epochs, Adam 1e-4, wd 1e-2, batch 64) against
candidate recipes (higher step size, fewer epochs, constant or cosine schedule), on
nyc_bike cut to 3,624 hourly steps, validation MAE per node.

    .venv/bin/python -m bench.zoo_recipe [--archs stgcn,gwn] [--nodes 3,17,33,50,61,68,24,25]
        -> bench/results/zoo_recipe.json   (archs not re-run keep their earlier results)

A candidate qualifies when every selection node is at least as accurate on validation as
after the reference's 30 epochs; among those, the lowest mean of per-node validation MAE
relative to the reference's wins (scale-free: a raw mean would let the busiest zones decide
alone and ignore the zero-trip zones the selection holds for that reason). Every
candidate's epoch count fits the issue's time target at the measured per-node-epoch cost
(STGCN about 0.15 s, so up to 13 epochs in 2 s; GWN about 1.3-1.9 s, so 6-7 in 12 s).
``bench.zoo_speed`` then times the chosen recipe and checks its accuracy on other nodes.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import command_line, kept_archs, machine_info, now_iso, write_result
from bench.zoo_speed import REFERENCE, STEPS, nyc_bike
from stgray.data.prepare import PrepareConfig, prepare
from stgray.engines.zoo import ZooConfig, train_models
from stgray.nn.gpdiff.pernode import PerNodeArch

REPO = Path(__file__).resolve().parents[1]
# six busy zones, plus (from session 5) two of the 11 zones with no trips at all in these
# 3,624 steps: the report nodes of bench.zoo_speed include such zones (GWN: 18 and 62)
SELECTION_NODES = (3, 17, 33, 50, 61, 68, 24, 25)
# (lr, epochs, schedule)
CANDIDATES = {
    "stgcn": [(3e-3, 5, "constant"), (3e-3, 6, "cosine"), (3e-3, 8, "cosine"), (5e-3, 8, "cosine"),
              (3e-3, 10, "cosine")],
    "gwn": [(2e-3, 6, "constant"), (2e-3, 6, "cosine"), (3e-3, 6, "cosine"), (3e-3, 6, "constant"),
            (4e-3, 6, "cosine")],
}


def relative_mae(row: dict, ref: dict) -> float:
    """Mean over nodes of the candidate's validation MAE / the reference's."""
    return float(np.mean(np.asarray(row["val_mae"]) / np.asarray(ref["val_mae"])))


def choose(rows: list[dict], ref: dict) -> dict | None:
    """The qualifying candidate with the lowest mean relative validation MAE vs ``ref``
    (None: none qualifies)."""
    ok = [r for r in rows if r["qualifies"]]
    best = min(ok, key=lambda r: relative_mae(r, ref)) if ok else None
    return None if best is None else {k: best[k] for k in ("lr", "epochs", "lr_schedule")}


def _run(p, nodes, cfg: ZooConfig) -> dict:
    t0 = time.perf_counter()
    r = train_models(p, nodes, cfg, device="cpu")
    return {"lr": cfg.lr, "epochs": cfg.epochs, "lr_schedule": cfg.lr_schedule,
            "wall_s": time.perf_counter() - t0, "val_mae": r.val_mae.tolist(),
            "val_mae_mean": float(r.val_mae.mean()), "best_epoch": r.best_epoch.tolist()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="stgcn,gwn")
    ap.add_argument("--nodes", default=",".join(map(str, SELECTION_NODES)))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", default=os.environ.get("STGRAY_DATA_DIR", str(REPO.parent / "shared" / "datasets")))
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "zoo_recipe.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    nodes = np.array([int(x) for x in a.nodes.split(",")])
    started, t0 = now_iso(), time.perf_counter()
    p = prepare(nyc_bike(Path(a.data_dir)), PrepareConfig(), "source")
    out: dict = {"machine": machine_info(), "selection_nodes": nodes.tolist(), "archs": {}}
    out["archs"].update(kept_archs(a.out, a.archs.split(",")))  # archs not re-run keep their results
    for arch_name in a.archs.split(","):
        base = ZooConfig(model=PerNodeArch(arch=arch_name), lr=REFERENCE["lr"],
                         weight_decay=REFERENCE["weight_decay"], batch_size=REFERENCE["batch_size"],
                         epochs=REFERENCE["epochs"])
        print(f"[{arch_name}] reference: {base.epochs} epochs at lr {base.lr}", flush=True)
        ref = _run(p, nodes, base)
        rows = []
        for lr, ep, sched in CANDIDATES[arch_name]:
            r = _run(p, nodes, base.model_copy(update={"lr": lr, "epochs": ep, "lr_schedule": sched}))
            r["at_least_as_accurate"] = [c <= b for c, b in zip(r["val_mae"], ref["val_mae"])]
            r["qualifies"] = all(r["at_least_as_accurate"])
            r["mean_relative_mae"] = relative_mae(r, ref)
            rows.append(r)
            print(f"[{arch_name}] lr {lr} x {ep} {sched}: mean val MAE {r['val_mae_mean']:.4f} "
                  f"(reference {ref['val_mae_mean']:.4f}), per node {r['at_least_as_accurate']}", flush=True)
        out["archs"][arch_name] = {"reference": ref, "candidates": rows, "chosen": choose(rows, ref),
                                   "selection_nodes": nodes.tolist()}
        print(f"[{arch_name}] chosen: {out['archs'][arch_name]['chosen']}", flush=True)
    config = {"archs": a.archs, "nodes": nodes.tolist(), "steps": STEPS, "candidates": CANDIDATES,
              "reference": REFERENCE, "threads": a.threads}
    write_result("zoo_recipe", out, mode="full", command=command_line(argv, "bench.zoo_recipe"), config=config,
                 seeds=[0], started=started, wall_s=time.perf_counter() - t0, out=a.out)
    return out


if __name__ == "__main__":
    main()
