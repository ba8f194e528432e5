"""`make bench` / `make bench-quick`: run every benchmark that fits this machine, one
process each, then render BENCHMARKS.md from the JSON they wrote.

    python -m bench.run --mode quick     # a few minutes' worth of each (extrapolated figures say so)
    python -m bench.run --mode full
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

PLANS = {
    "quick": [
        [PY, "-m", "bench.stgp_speed", "--quick"],
        [PY, "bench/zoo_speed.py", "--mode", "quick"],
        [PY, "bench/token_pipeline.py", "--rows", "2000", "--repeats", "2"],
        [PY, "bench/diffusion_sampling.py", "--nodes", "16", "--diff-steps", "200"],
        [PY, "-m", "bench.quickstart"],
    ],
    "full": [
        [PY, "-m", "bench.stgp_speed"],
        [PY, "bench/zoo_speed.py", "--mode", "full"],
        [PY, "bench/token_pipeline.py"],
        [PY, "bench/diffusion_sampling.py"],
        [PY, "-m", "bench.quickstart"],
    ],
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=list(PLANS), default="quick")
    a = ap.parse_args(argv)
    failed = []
    for cmd in PLANS[a.mode]:
        print("$", " ".join(cmd[1:]), flush=True)
        if subprocess.run(cmd, cwd=REPO).returncode:
            failed.append(" ".join(cmd[1:]))
    subprocess.run([PY, "-m", "bench.render"], cwd=REPO, check=True)
    if failed:
        print("failed:", *failed, sep="\n  ")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
