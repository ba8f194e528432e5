"""The README's main command, measured: wall time and peak memory (summed RSS of the whole
process tree: driver, Ray's GCS/raylet and every worker, sampled every 0.5 s) of
`stgray run configs/quickstart.yaml` into a fresh store, then of the same command again
(every stage skipped).

    python -m bench.quickstart [--config configs/quickstart.yaml]   -> bench/results/quickstart.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]


def _tree_rss(pid: int) -> int:
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def measure(cmd: list[str]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            time.sleep(0.5)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = proc.communicate()
    done.set()
    th.join()
    return {"wall_s": time.perf_counter() - t0, "peak_rss_gb": peak[0] / 1e9, "returncode": proc.returncode,
            "tail": out.splitlines()[-30:]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--out", default="bench/results/quickstart.json")
    a = ap.parse_args(argv)
    store = tempfile.mkdtemp(prefix="qs-store-")
    cmd = [str(Path(sys.executable).parent / "stgray"), "run", a.config, "--store", store]
    first = measure(cmd)
    second = measure(cmd)
    from bench.common import machine_info

    res = {"bench": "quickstart", "mode": "full", "machine": machine_info(), "config": a.config,
           "summary": {"first_run_s": first["wall_s"], "first_run_peak_gb": first["peak_rss_gb"],
                       "second_run_s": second["wall_s"], "second_run_peak_gb": second["peak_rss_gb"],
                       "ok": first["returncode"] == 0 and second["returncode"] == 0},
           "first_tail": first["tail"], "second_tail": second["tail"]}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res["summary"], indent=1))
    print("\n".join(first["tail"]))
    return res


if __name__ == "__main__":
    main()
