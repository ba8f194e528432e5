"""The README's main command, measured: wall time and peak memory (of the whole
process tree: driver, Ray's GCS/raylet and every worker, sampled every 0.5 s; the
summed PSS is the figure reported, the summed RSS, which counts shared pages once per
process, is kept beside it) of
`stgray run configs/quickstart.yaml` into a fresh store, then of the same command again
(every stage skipped).

    python -m bench.quickstart [--config configs/quickstart.yaml] [--out PATH]   -> bench/results/quickstart.json
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


def _tree_mem(pid: int) -> tuple[int, int]:
    """(summed RSS, summed PSS) in bytes of ``pid`` and all its descendants. RSS counts
    pages shared between processes (torch's libraries, Ray's object store) once per
    process; PSS splits them between the processes that map them, so its sum is the
    memory the run actually occupies."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    rss = pss = 0
    for p in procs:
        try:
            m = p.memory_full_info()
            rss, pss = rss + m.rss, pss + m.pss
        except psutil.Error:
            pass
    return rss, pss


def measure(cmd: list[str]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0, 0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            rss, pss = _tree_mem(proc.pid)
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)
            time.sleep(0.5)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = proc.communicate()
    done.set()
    th.join()
    return {"wall_s": time.perf_counter() - t0, "peak_rss_gb": peak[0] / 1e9, "peak_pss_gb": peak[1] / 1e9,
            "returncode": proc.returncode,
            "tail": out.splitlines()[-30:]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--out", default="bench/results/quickstart.json")
    a = ap.parse_args(argv)
    from bench.common import command_line, machine_info, now_iso, write_result

    started, t0 = now_iso(), time.perf_counter()
    store = tempfile.mkdtemp(prefix="qs-store-")
    cmd = [str(Path(sys.executable).parent / "stgray"), "run", a.config, "--store", store]
    first = measure(cmd)
    second = measure(cmd)
    import yaml

    spec = yaml.safe_load((REPO / a.config).read_text()) if not Path(a.config).is_absolute() else \
        yaml.safe_load(Path(a.config).read_text())
    res = {"machine": machine_info(), "config": a.config,
           "summary": {"first_run_s": first["wall_s"], "first_run_peak_gb": first["peak_pss_gb"],
                       "first_run_peak_rss_sum_gb": first["peak_rss_gb"],
                       "second_run_s": second["wall_s"], "second_run_peak_gb": second["peak_pss_gb"],
                       "ok": first["returncode"] == 0 and second["returncode"] == 0},
           "first_tail": first["tail"], "second_tail": second["tail"]}
    write_result("quickstart", res, mode="full", command=command_line(argv, "bench.quickstart"), config=spec,
                 seeds=list(spec.get("seeds", [0])), started=started, wall_s=time.perf_counter() - t0, out=a.out)
    print(json.dumps(res["summary"], indent=1))
    print("\n".join(first["tail"]))
    return res


if __name__ == "__main__":
    main()
