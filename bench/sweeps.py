"""What the sweeps find on nyc_bike (the quick start's base: prepared data, STGP
pre-training, source zoo): STGP validation MAE vs prompt-bank size K, and GPDiff
validation MAE and sampling time vs diffusion steps; each sweep's winner evaluated once
on test by its report. Runs the real CLI (`stgray sweep run ... --report`) on
configs/sweep_stgp.yaml and configs/sweep_gpdiff.yaml, scaled down with --quick.

    python -m bench.sweeps [--quick] [--store PATH] [--out PATH]   -> bench/results/sweeps.json

``--store``: reuse a store that already holds the quick start's artefacts (e.g. the one
`stgray run configs/quickstart.yaml` wrote), so only the sweeps are timed; by default a
fresh store is used and the base artefacts are made first (timed separately).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

#: --quick: fewer trials, shorter prompting / denoiser training, fewer target nodes
QUICK = {
    "stgp": {"num_samples": 12, "stgp": {"task": "forecast", "domain_epochs": 2, "task_epochs": 4},
             "scheduler": {"type": "asha", "grace_period": 2, "reduction_factor": 2}},
    "gpdiff": {"num_samples": 8, "gpdiff": {"train_steps": 150, "rounds": 2, "samples_per_node": 2,
                                            "node_limit": 24, "objective": "zero_shot"},
               "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2}},
}


def _config(method: str, quick: bool, folder: Path) -> Path:
    spec = yaml.safe_load((REPO / "configs" / f"sweep_{method}.yaml").read_text())
    spec["base"] = str(REPO / "configs" / spec["base"])
    if quick:
        spec.update(QUICK[method])
        spec["name"] += "-quick"
    p = folder / f"sweep_{method}.yaml"
    p.write_text(yaml.safe_dump(spec, sort_keys=False))
    return p


def _run(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0, r.stdout


def _trial_rows(method: str, summary: dict) -> list[dict]:
    out = []
    for r in summary["rows"]:
        row = {"sweep": method, "trial": r["trial_id"], "val_mae": r["val_mae"], "iterations": r["iterations"]}
        if method == "stgp":
            row.update(task_K=r.get("bank_task"), domain_K=r.get("bank_domain"), prompting=r.get("prompting"),
                       threshold=r.get("prompt_threshold"), lr=r.get("param:lr"))
        else:
            row.update(diffusion_steps=r.get("diffusion_steps"), sampler=r.get("sampler"),
                       sampling_steps=r.get("sampling_steps"), sampling_s=r.get("sampling_s"),
                       width=r.get("d_model"), depth=r.get("layers"), conditioning=r.get("conditioning"),
                       token_width=r.get("token_width"), train_s=r.get("train_s"))
        out.append(row)
    if method == "gpdiff" and out:  # a sampler that blew up: MAE orders of magnitude off
        best = min(r["val_mae"] for r in out)
        for r in out:
            r["diverged"] = bool(r["val_mae"] > 10 * best)
    key = (lambda x: (x["task_K"] or 0, x["val_mae"])) if method == "stgp" else \
        (lambda x: (x["diffusion_steps"] or 0, x["val_mae"]))
    return sorted(out, key=key)


def _corr(xs, ys) -> float | None:
    import numpy as np

    pts = [(float(x), float(y)) for x, y in zip(xs, ys) if x and y is not None]
    if len(pts) < 3:
        return None
    a = np.log([p[0] for p in pts])
    b = np.array([p[1] for p in pts])
    if a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--store", default=None)
    ap.add_argument("--out", default="bench/results/sweeps.json")
    a = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-sweeps-"))
    store = a.store or str(work / "store")
    exe = str(Path(sys.executable).parent / "stgray")
    from bench.common import command_line, machine_info, now_iso, write_result

    machine = machine_info()
    started, t0 = now_iso(), time.perf_counter()
    specs = {}
    rows, summary, runs = [], {}, {}
    for method in ("stgp", "gpdiff"):
        cfg = _config(method, a.quick, work)
        specs[method] = yaml.safe_load(cfg.read_text())
        secs, out = _run([exe, "sweep", "run", str(cfg), "--store", store, "--report"])
        from stgray.store import ArtifactStore
        from stgray.sweeps.config import experiment_name, load_sweep
        from stgray.sweeps.driver import sweep_paths

        sc, base = load_sweep(cfg, {"store": store})
        st = ArtifactStore(store)
        name = experiment_name(sc, base)
        s = json.loads(st.fs.cat_file(f"{sweep_paths(st, name).sweep_dir}/summary.json"))
        rep = next(m for m in st.ls("sweep-report") if m.meta.get("experiment") == name)
        base_s = sum(float(ln.rsplit("(", 1)[1].rstrip("s)")) for ln in out.splitlines()
                     if ln.startswith(("[stgp] pre-train", "[zoo]", "[tokens]")) and ": done ->" in ln)
        runs[method] = {"experiment": name, "wall_s": secs, "base_artefacts_s": base_s, "tune_s": s["seconds"] - base_s,
                        "trials": s["trials"], "errors": s["errors"], "best": s["best"],
                        "winner_test": rep.meta["winner"]["test"], "report": rep.id}
        rows += _trial_rows(method, s)
        tr = [r for r in rows if r["sweep"] == method]
        if method == "stgp":
            summary.update(stgp_trials=s["trials"], stgp_best_val_mae=s["best"]["val_mae"],
                           stgp_best_task_K=next(r["task_K"] for r in tr if r["trial"] == s["best"]["trial_id"]),
                           stgp_winner_test_mae=rep.meta["winner"]["test"]["mae"],
                           stgp_corr_logK_val=_corr([r["task_K"] for r in tr], [r["val_mae"] for r in tr]),
                           stgp_sweep_s=secs - base_s)
        else:
            summary.update(gpdiff_trials=s["trials"], gpdiff_best_val_mae=s["best"]["val_mae"],
                           gpdiff_best_steps=next(r["diffusion_steps"] for r in tr
                                                  if r["trial"] == s["best"]["trial_id"]),
                           gpdiff_winner_test_mae=rep.meta["winner"]["test"]["mae"],
                           gpdiff_corr_logsteps_val=_corr([r["diffusion_steps"] for r in tr],
                                                          [r["val_mae"] for r in tr]),
                           gpdiff_corr_logsamplingsteps_s=_corr([r["sampling_steps"] for r in tr],
                                                                [r["sampling_s"] for r in tr]),
                           gpdiff_diverged_trials=sum(bool(r.get("diverged")) for r in tr),
                           gpdiff_sweep_s=secs - base_s)
        print(json.dumps(runs[method], default=str), flush=True)
    res = {"machine": machine, "target": "nyc_bike", "summary": summary, "runs": runs, "rows": rows}
    # the measurement: each sweep spec (its base config's path aside) and the base config itself
    base_cfg = yaml.safe_load(Path(specs["stgp"]["base"]).read_text())
    write_result("sweeps", res, mode="quick" if a.quick else "full", command=command_line(argv, "bench.sweeps"),
                 config={"sweeps": {k: {kk: vv for kk, vv in v.items() if kk != "base"} for k, v in specs.items()},
                         "base": base_cfg}, seeds=list(base_cfg.get("seeds", [0])), started=started,
                 wall_s=time.perf_counter() - t0, out=a.out)
    print(json.dumps(summary, indent=1))
    return res


if __name__ == "__main__":
    main()
