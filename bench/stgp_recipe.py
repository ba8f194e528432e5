"""Choose STGP's pre-training settings on *validation* only: on each leave-one-city-out
target, STGP pre-trained on the other cities with the config's ``stgp_pretrain`` and with
a candidate change of it (default: ``deseasonalise``, each node's train time-of-day mean
taken out of every stage's data and added back for metrics), then domain prompts and, per
task, task prompts (the config's two-stage recipe), scored by the task stage's best
validation MAE (target days 4-6, data units). Test data is not read; nothing but the
pre-trained models (store artefacts the LOO run reuses) is written.

Rule, fixed before the run: per task, the candidate is kept if its validation MAE is
lower on at least 3 of the 4 targets.

    .venv/bin/python -m bench.stgp_recipe [--config configs/loo-quick.yaml] [--targets ...]
        [--tasks forecast kriging] [--seed 0]   -> bench/results/stgp_recipe.json
    .venv/bin/python -m bench.stgp_recipe --base '{"deseasonalise": true}' \
        --candidate '{"epochs": 16}' --out bench/results/stgp_recipe_epochs.json
    .venv/bin/python -m bench.stgp_recipe --base '{"deseasonalise": true}' --candidate '{}' \
        --candidate-prompt '{"task_epochs": 60}' --out bench/results/stgp_recipe_task_epochs.json

``--candidate-prompt``: changes to the config's ``stgp_prompt`` for the candidate row.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from bench.common import command_line, machine_info, now_iso, start_ray, write_result
from bench.loo import load_loo_config, target_config

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/loo-quick.yaml")
    ap.add_argument("--targets", nargs="*", help="default: every city of the config")
    ap.add_argument("--tasks", nargs="*", default=["forecast", "kriging"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base", type=json.loads, default={}, help="JSON: changes to the config's "
                    "stgp_pretrain for the base row")
    ap.add_argument("--candidate", type=json.loads, default={"deseasonalise": True},
                    help="JSON: changes to the base for the candidate row")
    ap.add_argument("--candidate-prompt", type=json.loads, default={},
                    help="JSON: changes to the config's stgp_prompt for the candidate row")
    ap.add_argument("--store", default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from stgray.engines.stgp import fit_stgp_task, run_stgp_pretrain, train_stgp_domain
    from stgray.pipeline import StageLog, import_and_prepare
    from stgray.store import ArtifactStore

    cities, base = load_loo_config(str(REPO / a.config))
    targets = a.targets or cities
    store_url = a.store or os.environ.get("STGRAY_STORE") or str(REPO / "stgray-store")
    store = ArtifactStore(store_url)
    started, t0 = now_iso(), time.perf_counter()
    start_ray()
    names = ("as is", "deseasonalised") if not a.base and a.candidate == {"deseasonalise": True} \
        and not a.candidate_prompt else ("base", "candidate")
    variants = {names[0]: dict(a.base), names[1]: {**a.base, **a.candidate}}
    prompt_changes = {names[0]: {}, names[1]: dict(a.candidate_prompt)}
    rows = []
    for t in targets:
        cfg = target_config(base, cities, t, store=store_url, seeds=[a.seed], where=a.config)
        prepared = import_and_prepare(store, cfg, StageLog())
        src = [prepared[c] for c in cfg.sources]
        row = {"target": t, "sources": cfg.sources}
        for name, change in variants.items():
            pr = type(cfg.stgp_prompt).model_validate(
                {**cfg.stgp_prompt.model_dump(mode="json"), **prompt_changes[name], "seed": a.seed})
            pre = type(cfg.stgp_pretrain).model_validate(
                {**cfg.stgp_pretrain.model_dump(mode="json"), **change, "seed": a.seed})
            t1 = time.perf_counter()
            pid, skipped = run_stgp_pretrain(store, pre, src)
            r = {"pretrain": pid, "pretrain_s": None if skipped else time.perf_counter() - t1}
            dom = train_stgp_domain(store, pr, pid, prepared[t])
            r["domain_val_loss"], r["domain_s"] = dom["best_val_loss"], dom["seconds"]
            for task in a.tasks:
                fit = fit_stgp_task(store, pr, pid, dom["state"], prepared[t], task)
                r[task] = {"val_mae": fit.best_val_mae, "seconds": fit.seconds}
            row[name] = r
            print(f"{t} {name}: " + " | ".join(f"{k} val MAE {r[k]['val_mae']:.4g}" for k in a.tasks)
                  + f" ({time.perf_counter() - t1:.0f} s)", flush=True)
        rows.append(row)
    choice = {k: sum(r[names[1]][k]["val_mae"] < r[names[0]][k]["val_mae"] for r in rows) >= 3
              for k in a.tasks} if len(rows) >= 4 else None
    out = {"machine": machine_info(), "rows": rows, "variants": variants, "prompt_changes": prompt_changes,
           "choice": choice,
           "rule": f"per task: '{names[1]}' kept if its validation MAE is lower on >= 3 of the 4 targets",
           "protocol": f"seed {a.seed}; the config's STGP sizes (pre-training "
                       f"{cfg.stgp_pretrain.epochs} x {cfg.stgp_pretrain.steps_per_epoch} steps, "
                       f"domain {cfg.stgp_prompt.domain_epochs} and task {cfg.stgp_prompt.task_epochs} "
                       "epochs); best validation MAE of the task stage (data units), test not read"}
    config = {"config_file": a.config, "targets": targets, "tasks": a.tasks, "seed": a.seed,
              "variants": variants, **({"prompt_changes": prompt_changes} if a.candidate_prompt else {})}
    path = write_result("stgp_recipe" if not a.out else Path(a.out).stem, out, mode="full",
                        command=command_line(argv, "bench.stgp_recipe"), config=config, seeds=[a.seed],
                        started=started, wall_s=time.perf_counter() - t0, out=a.out)
    print(f"'{names[1]}' kept, per task: {choice}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
