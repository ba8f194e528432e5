"""`make bench` / `make bench-quick` / `make bench-all`: run the benchmarks, one process
each, then render the page of figures from the JSON they wrote.

    python -m bench.run --mode quick     # every bench at tiny sizes: ~5-8 min on an idle
                                         # 2-core machine; a check of the figures' shape.
                                         # Writes bench/results/quick/*.json and
                                         # bench/results/quick/BENCHMARKS.md (never the
                                         # measured figures in bench/results/)
    python -m bench.run --mode full      # the measured figures that fit this machine in
                                         # under an hour (~45 min idle) -> bench/results/,
                                         # BENCHMARKS.md
    python -m bench.run --mode all       # full + the reference-sized zoo runs + the
                                         # leave-one-city-out tables: quick sizes (4 targets
                                         # x 3 seeds, ~2-3 h) and full (hours; both resumable)
    python -m bench.run --mode full --only scaling zoo_speed   # a subset (names: --list)
    python -m bench.run --mode quick --list                     # the plan, with estimates

Plans (estimates: minutes on the idle 2-core development machine; under load expect up to
twice as long):
  quick  stgp_speed (4 phases x 2 steps), stgp_scaling (2 workers, 2 epochs x 2 steps),
         zoo_speed --mode smoke, token_pipeline (500 rows, 1 repeat), diffusion_sampling
         (4 nodes, 30 denoiser steps), scaling --mode smoke (60 and 120 nodes),
         bench.loo --mode smoke (one target, configs/loo-smoke.yaml)
  full   stgp_speed, stgp_scaling, zoo_speed --mode quick, token_pipeline, diffusion_sampling,
         scaling --mode full, bench.sweeps --quick, bench.quickstart
  all    full with zoo_speed --mode full, + bench.zoo_recipe (re-chooses the zoo recipe
         that zoo_speed times) + bench.target_recipe (how per-node models train on a target,
         chosen on the LOO targets' validation days) + bench.fewshot_recipe (target step size
         and generated samples per node, same days) + bench.loo --mode quick + --mode full

The LOO benches keep their stages in the store (./stgray-store or $STGRAY_STORE), so a
second run only computes what changed and an interrupted one resumes: run the same
command again. The quick plan's LOO smoke puts its (small) artefacts there too; set
STGRAY_STORE to keep them elsewhere.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
QUICK_DIR = "bench/results/quick"


def _q(name: str) -> list[str]:
    """--out for a quick-plan result: bench/results/quick/<name>.json."""
    return ["--out", f"{QUICK_DIR}/{name}.json"]


# name -> (command args after the interpreter, estimated minutes on the idle 2-core machine)
PLANS: dict[str, dict[str, tuple[list[str], float]]] = {
    "quick": {
        "stgp_speed": (["-m", "bench.stgp_speed", "--quick", "--steps", "2",
                        "--phases", "pretrain,domain,task,finetune", *_q("stgp_speed")], 1.0),
        "stgp_scaling": (["-m", "bench.stgp_scaling", "--layouts", "2x1", "--steps", "2", "--epochs", "2",
                          *_q("stgp_scaling")], 1.5),
        "zoo_speed": (["bench/zoo_speed.py", "--mode", "smoke", *_q("zoo_speed")], 2.0),
        "token_pipeline": (["bench/token_pipeline.py", "--rows", "500", "--repeats", "1", "--batch", "256",
                            *_q("token_pipeline")], 0.5),
        "diffusion_sampling": (["bench/diffusion_sampling.py", "--nodes", "4", "--days", "14",
                                "--zoo-epochs", "1", "--diff-steps", "30", *_q("diffusion_sampling")], 1.0),
        "scaling": (["-m", "bench.scaling", "--mode", "smoke", "--diff-steps", "30", *_q("scaling")], 1.5),
        "loo_smoke": (["-m", "bench.loo", "--mode", "smoke", *_q("loo_smoke")], 1.5),
    },
    "full": {
        "stgp_speed": (["-m", "bench.stgp_speed"], 7),  # 3 rounds of 6 phases
        "stgp_scaling": (["-m", "bench.stgp_scaling"], 8),
        "zoo_speed": (["bench/zoo_speed.py", "--mode", "quick"], 20),
        "token_pipeline": (["bench/token_pipeline.py"], 2.5),
        "diffusion_sampling": (["bench/diffusion_sampling.py"], 8),
        "scaling": (["-m", "bench.scaling", "--mode", "full"], 7.5),
        "sweeps": (["-m", "bench.sweeps", "--quick"], 10),
        "quickstart": (["-m", "bench.quickstart"], 7),
    },
}
PLANS["all"] = {**PLANS["full"],
                # replaces the quick zoo run (same result file, bench/results/zoo_speed.json)
                "zoo_speed": (["bench/zoo_speed.py", "--mode", "full"], 135),
                "zoo_recipe": (["-m", "bench.zoo_recipe"], 12),
                "target_recipe": (["-m", "bench.target_recipe"], 5),
                "fewshot_recipe": (["-m", "bench.fewshot_recipe"], 40),
                "loo_quick": (["-m", "bench.loo", "--mode", "quick"], 140),
                "loo": (["-m", "bench.loo", "--mode", "full"], 360)}
#: where each plan's JSON goes and the page rendered from it
OUTPUTS = {"quick": (QUICK_DIR, f"{QUICK_DIR}/BENCHMARKS.md"),
           "full": ("bench/results", "BENCHMARKS.md"), "all": ("bench/results", "BENCHMARKS.md")}
NAMES = list(dict.fromkeys(k for plan in PLANS.values() for k in plan))


def render_cmd(mode: str) -> list[str]:
    results, page = OUTPUTS[mode]
    if mode == "quick":
        return ["-m", "bench.render", "--results", results, "--out", page]
    return ["-m", "bench.render"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Run the benchmarks, then render BENCHMARKS.md "
                                             "(quick: bench/results/quick/BENCHMARKS.md).")
    ap.add_argument("--mode", choices=list(PLANS), default="quick",
                    help="quick: tiny sizes, ~5-8 min, -> bench/results/quick/; full: under an hour; "
                         "all: full + reference-sized zoo + LOO tables (hours)")
    ap.add_argument("--only", nargs="+", choices=NAMES, help="run only these benches")
    ap.add_argument("--skip", nargs="+", choices=NAMES, default=[], help="leave these out")
    ap.add_argument("--list", action="store_true", help="print the plan and exit")
    a = ap.parse_args(argv)
    plan = {k: v for k, v in PLANS[a.mode].items()
            if (a.only is None or k in a.only) and k not in a.skip}
    results, page = OUTPUTS[a.mode]
    if a.list:
        print(f"plan '{a.mode}': JSON -> {results}/, page -> {page}; "
              "estimates for the idle 2-core machine")
        for k, (cmd, est) in plan.items():
            print(f"{k:20s} ~{est:>5.1f} min   .venv/bin/python {' '.join(cmd)}")
        print(f"{'render':20s}              .venv/bin/python {' '.join(render_cmd(a.mode))}")
        print(f"{'total':20s} ~{sum(e for _, e in plan.values()):>5.1f} min")
        return 0
    if not plan:
        ap.error(f"nothing to run: no bench of plan '{a.mode}' is left by --only/--skip")
    print(f"plan '{a.mode}': {len(plan)} benches, ~{sum(e for _, e in plan.values()):.1f} min estimated "
          f"(idle machine); JSON -> {results}/, page -> {page}", flush=True)
    failed, times = [], {}
    t0 = time.perf_counter()
    for name, (cmd, est) in plan.items():
        print(f"$ .venv/bin/python {' '.join(cmd)}   (~{est:.1f} min)", flush=True)
        t = time.perf_counter()
        if subprocess.run([PY, *cmd], cwd=REPO).returncode:
            failed.append(" ".join(cmd))
        times[name] = (time.perf_counter() - t) / 60
        print(f"  {name}: {times[name]:.1f} min", flush=True)
    subprocess.run([PY, *render_cmd(a.mode)], cwd=REPO, check=True)
    print("minutes per bench: " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))
    print(f"all benches: {(time.perf_counter() - t0) / 60:.1f} min")
    if failed:
        print("failed:", *failed, sep="\n  ")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
