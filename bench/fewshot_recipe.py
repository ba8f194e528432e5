"""Choose how GPDiff's generated models are fine-tuned on a target, on *validation* only:
for each LOO target (seed 0's stores: the zoo, tokens and denoiser the LOO run trained
for it), generate parameters for a seeded sample of the target's nodes, pick each node's
sample on the validation days (4-6), fine-tune on the train days (1-3) with each
candidate setting, and score on the validation days. Test data is not read. The
target-only scratch models are scored beside them.

Candidates: the step size of every training on the target (``--lrs``, tried on the
scratch models), the number of generated samples per node (``--samples``, fine-tuned
at the config's step size) and how much of the generated model the fine-tuning starts
from (``--mixes``: ``gpdiff.init_mix``, at the config's step size and samples) and how many
of each node's best samples are fine-tuned (``--topk``: ``gpdiff.finetune_candidates``). The rule
(``RULE``) is fixed here.

    .venv/bin/python -m bench.fewshot_recipe [--config configs/loo-quick.yaml] [--nodes 80]
        -> bench/results/fewshot_recipe.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import command_line, machine_info, now_iso, sample_nodes, write_result
from bench.loo import load_loo_config, target_config

REPO = Path(__file__).resolve().parents[1]
RULE = ("step size (shared by every training on the target): a candidate replaces the "
        "config's if the scratch models' validation MAE is lower on >= 3 of the targets, the "
        "lowest mean relative MAE among such; samples per node: the same rule on the few-shot "
        "models at the config's step size; init_mix: the same rule on the few-shot models at the "
        "config's step size and samples; finetune_candidates (each node's k best samples "
        "fine-tuned, the best on validation kept): the same rule at the config's other settings")


def _pick(rows: list[dict], ref: str, names: list[str]) -> tuple[str, dict]:
    """``RULE`` over row keys: (chosen key, {key: wins vs ref, mean relative MAE})."""
    scores = {}
    for k in names:
        rel = [r[k]["val_mae"] / r[ref]["val_mae"] for r in rows]
        scores[k] = {"wins": int(sum(x < 1 for x in rel)), "mean_rel": float(np.mean(rel))}
    ok = [k for k in names if k != ref and scores[k]["wins"] >= min(3, len(rows))]
    return (min(ok, key=lambda k: scores[k]["mean_rel"]) if ok else ref), scores


def decide(rows: list[dict], lr: float, samples: int, mix: float = 1.0, topk: int = 1) -> tuple[dict, dict]:
    keys = [k for k in rows[0] if isinstance(rows[0][k], dict)]
    lr_key, lr_scores = _pick(rows, "scratch", [k for k in keys if k.startswith("scratch")])
    ref = f"samples{samples}_lr{lr:g}"
    s_key, s_scores = _pick(rows, ref, [k for k in keys if k.startswith("samples")])
    m_key, m_scores = _pick(rows, ref, [ref, *[k for k in keys if k.startswith("mix")]])
    k_key, k_scores = _pick(rows, ref, [ref, *[k for k in keys if k.startswith("top")]])
    return ({"lr": rows[0][lr_key]["lr"], "samples_per_node": rows[0][s_key]["samples"],
             "init_mix": rows[0][m_key].get("init_mix", mix),
             "finetune_candidates": rows[0][k_key].get("finetune_candidates", topk)},
            {"lr (scratch models)": lr_scores, "samples (few-shot)": s_scores,
             "init_mix (few-shot)": m_scores, "finetune_candidates (few-shot)": k_scores})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/loo-quick.yaml")
    ap.add_argument("--nodes", type=int, default=80, help="nodes per target (seeded sample)")
    ap.add_argument("--lrs", type=float, nargs="*", default=[3e-3, 3e-2])
    ap.add_argument("--samples", type=int, nargs="*", default=[2],
                    help="samples-per-node candidates beside the config's")
    ap.add_argument("--mixes", type=float, nargs="*", default=[0.5],
                    help="init_mix candidates beside the config's")
    ap.add_argument("--topk", type=int, nargs="*", default=[],
                    help="finetune_candidates candidates beside the config's")
    ap.add_argument("--targets", nargs="*")
    ap.add_argument("--store", default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TQDM_DISABLE", "1")
    from stgray.data.prepare import load_prepared
    from stgray.engines.diffusion import generate_params
    from stgray.engines.gpdiff_transfer import _mae_per_node, finetune_best, target_training
    from stgray.engines.tokens import prompts_for
    from stgray.engines.zoo import predict_nodes, train_models
    from stgray.pipeline import run_pipeline
    from stgray.store import ArtifactStore

    torch.set_num_threads(1)
    cities, base = load_loo_config(str(REPO / a.config))
    store_url = a.store or os.environ.get("STGRAY_STORE") or str(REPO / "stgray-store")
    store = ArtifactStore(store_url)
    started, t0 = now_iso(), time.perf_counter()
    rows = []
    for t in a.targets or cities:
        cfg = target_config(base, cities, t, store=store_url, seeds=[0], where=a.config)
        res = run_pipeline(cfg, until="diffusion")  # found in the store after a LOO run
        ids = {r["stage"]: r["artifact"] for r in res["stages"]}
        tgt = next(r["artifact"] for r in res["stages"] if r["stage"] == "prepare"
                   and r["what"].endswith("(target)"))
        p = load_prepared(store, tgt)
        nodes = sample_nodes(p.num_nodes, a.nodes)
        arch, tc = cfg.zoo.model, cfg.gpdiff
        va = p.window_starts("val", arch.t_in, arch.t_out)
        truth = p.raw[va[:, None] + arch.t_in + np.arange(arch.t_out)[None]][:, :, nodes]
        prompts = prompts_for(store, ids["tokens"], p, "train")[nodes]
        s_max = max([tc.samples_per_node, *a.samples])
        gen = generate_params(store, ids["diffusion"], ids["tokens"], prompts, tc.sampler,
                              tc.sampling_steps, s_max, 0, node_keys=[[p.name, int(i)] for i in nodes])
        local = np.arange(len(nodes))

        cand = np.stack([_mae_per_node(predict_nodes(p, gen[:, s], cfg.zoo, nodes, va), truth)
                         for s in range(s_max)], 1)  # (M, S) validation MAE of each sample
        row = {"target": t, "nodes": len(nodes), "val_windows": len(va)}
        zc = target_training(cfg.zoo, tc)
        for lr in [tc.lr, *a.lrs]:  # step-size candidates, on the scratch models
            t1 = time.perf_counter()
            r = train_models(p, nodes, zc.model_copy(update={"lr": lr}), epochs=tc.scratch_epochs,
                             device="cpu")
            row["scratch" if lr == tc.lr else f"scratch_lr{lr:g}"] = {
                "lr": lr, "val_mae": float(r.val_mae.mean()), "seconds": time.perf_counter() - t1,
                "mean_best_epoch": float(r.best_epoch.mean())}
        s_ref = tc.samples_per_node
        k_ref = tc.finetune_candidates
        zc_cpu = zc.model_copy(update={"device": "cpu"})
        for s, mix, k in [(s_ref, tc.init_mix, k_ref),
                          *[(s, tc.init_mix, k_ref) for s in a.samples if s != s_ref],
                          *[(s_ref, m, k_ref) for m in a.mixes if m != tc.init_mix],
                          *[(s_ref, tc.init_mix, k) for k in a.topk if k != k_ref]]:
            t1 = time.perf_counter()
            few, _ = finetune_best(p, gen[local, :s], cand[:, :s], zc_cpu, tc.finetune_epochs, nodes, mix, k)
            secs = time.perf_counter() - t1
            f_mae = _mae_per_node(predict_nodes(p, few, cfg.zoo, nodes, va), truth)
            key = (f"samples{s}_lr{tc.lr:g}" if (mix, k) == (tc.init_mix, k_ref) else
                   f"mix{mix:g}" if mix != tc.init_mix else f"top{k}")
            row[key] = {"samples": s, "lr": tc.lr, "init_mix": mix, "finetune_candidates": k,
                        "zero_shot_val_mae": float(cand[:, :s].min(1).mean()),
                        "val_mae": float(f_mae.mean()), "seconds": secs}
        rows.append(row)
        print(f"{t}: " + " | ".join(f"{k} {v['val_mae']:.4g}" + (
            f" (zero-shot {v['zero_shot_val_mae']:.4g})" if "samples" in v else "")
            for k, v in row.items() if isinstance(v, dict)), flush=True)
    choice, scores = decide(rows, tc.lr, tc.samples_per_node, tc.init_mix, tc.finetune_candidates)
    out = {"machine": machine_info(), "rows": rows, "scores": scores, "choice": choice,
           "rule": RULE,
           "protocol": "seed 0's zoo/tokens/denoiser per LOO target; targets' train days 1-3, "
                       f"validation days 4-6 (test not read); {a.nodes} seeded nodes; "
                       f"{tc.scratch_epochs} epochs from scratch, {tc.finetune_epochs} from the "
                       "generated sample with least validation MAE; validation picks samples and "
                       "epochs and scores them"}
    config = {"config_file": a.config, "nodes": a.nodes, "lrs": a.lrs, "samples": a.samples,
              "mixes": a.mixes, "topk": a.topk}
    path = write_result("fewshot_recipe" if not a.out else Path(a.out).stem, out, mode="full",
                        command=command_line(argv, "bench.fewshot_recipe"), config=config, seeds=[0],
                        started=started, wall_s=time.perf_counter() - t0, out=a.out)
    print(f"scores: {json.dumps(scores)}\nchoice: {choice}\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
