"""`make bench` / `make bench-quick`: run the benchmarks, one process each, then render
BENCHMARKS.md from the JSON they wrote in bench/results/.

    python -m bench.run --mode quick     # quick sizes: a few minutes per bench
    python -m bench.run --mode full      # everything that fits this machine in about an hour
    python -m bench.run --mode all       # full + the reference-sized zoo runs + the full
                                         # leave-one-city-out table (hours; resumable)
    python -m bench.run --mode quick --only scaling loo     # a subset (names below)
    python -m bench.run --list                               # the plan, with estimates

Estimates are for the 2-core development machine (measured there, shared with other
work). The quick plan leaves out the quick-start measurement (it has one size: ~17 min).
The LOO bench keeps its stages in the store (./stgray-store or $STGRAY_STORE), so a
second run only computes what changed (the quick LOO: ~1 min instead of ~25).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

# name -> (command args after the interpreter, estimated minutes)
PLANS: dict[str, dict[str, tuple[list[str], float]]] = {
    "quick": {
        "stgp_speed": (["-m", "bench.stgp_speed", "--quick"], 4),
        "zoo_speed": (["bench/zoo_speed.py", "--mode", "quick"], 7),
        "token_pipeline": (["bench/token_pipeline.py", "--rows", "2000", "--repeats", "2"], 2),
        "diffusion_sampling": (["bench/diffusion_sampling.py", "--nodes", "16", "--diff-steps", "200"], 4),
        "scaling": (["-m", "bench.scaling", "--mode", "quick"], 6),
        "loo": (["-m", "bench.loo", "--mode", "quick"], 25),
    },
    "full": {
        "stgp_speed": (["-m", "bench.stgp_speed"], 12),
        "zoo_speed": (["bench/zoo_speed.py", "--mode", "quick"], 7),
        "token_pipeline": (["bench/token_pipeline.py"], 3),
        "diffusion_sampling": (["bench/diffusion_sampling.py"], 8),
        "scaling": (["-m", "bench.scaling", "--mode", "full"], 16),
        "loo": (["-m", "bench.loo", "--mode", "quick"], 25),
        "quickstart": (["-m", "bench.quickstart"], 17),
    },
}
PLANS["all"] = {**PLANS["full"],
                "zoo_speed": (["bench/zoo_speed.py", "--mode", "full"], 120),
                "loo": (["-m", "bench.loo", "--mode", "full"], 360)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Run the benchmarks, then render BENCHMARKS.md.")
    ap.add_argument("--mode", choices=list(PLANS), default="quick")
    ap.add_argument("--only", nargs="+", choices=list(PLANS["full"]), help="run only these benches")
    ap.add_argument("--skip", nargs="+", choices=list(PLANS["full"]), default=[], help="leave these out")
    ap.add_argument("--list", action="store_true", help="print the plan and exit")
    a = ap.parse_args(argv)
    plan = {k: v for k, v in PLANS[a.mode].items()
            if (a.only is None or k in a.only) and k not in a.skip}
    if a.list:
        for k, (cmd, est) in plan.items():
            print(f"{k:20s} ~{est:>4.0f} min   .venv/bin/python {' '.join(cmd)}")
        print(f"{'total':20s} ~{sum(e for _, e in plan.values()):>4.0f} min")
        return 0
    failed = []
    t0 = time.perf_counter()
    for name, (cmd, est) in plan.items():
        print(f"$ .venv/bin/python {' '.join(cmd)}   (~{est:.0f} min)", flush=True)
        t = time.perf_counter()
        if subprocess.run([PY, *cmd], cwd=REPO).returncode:
            failed.append(" ".join(cmd))
        print(f"  {name}: {(time.perf_counter() - t) / 60:.1f} min", flush=True)
    subprocess.run([PY, "-m", "bench.render"], cwd=REPO, check=True)
    print(f"all benches: {(time.perf_counter() - t0) / 60:.1f} min")
    if failed:
        print("failed:", *failed, sep="\n  ")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
