"""STGP pre-training through the system (``run_stgp_pretrain`` on Ray Train) at the
reference sizes on los_loop (207 nodes, 5-minute steps, windows of 25 patches x 12 steps,
d=128, depth 4, heads 4, 50% patches and 50% nodes masked): windows/s and memory for
several layouts of the same machine, Ray Train workers x CPUs (= torch threads) each.

The global batch is the reference's 8 in every layout (``--global-batch``): each of W
workers trains on 8 / W windows per step and DDP averages their gradients, so a step
means the same in every row. Each layout pre-trains ``--epochs`` epochs of ``--steps``
steps into a fresh local store; windows/s is the median over the epochs after the first
(the first warms allocators up), as each epoch's ``windows_per_s`` in the run's history
(training steps only: validation is timed apart). Memory: the workers' own peak RSS
(summed over workers: RSS counts the torch libraries once per process) and the peak PSS
of the whole process tree (driver, Ray's GCS / raylet / dashboard and the workers),
sampled every 0.5 s. The reference (issue #4): 2.45 windows/s, 3.6 GB peak, one process.

    .venv/bin/python -m bench.stgp_scaling [--layouts 1x1 2x1 1x2 2x1:bf16 1x2:bf16] [--steps 12]
        [--epochs 3] [--global-batch 8] [--out PATH]  -> bench/results/stgp_scaling.json

A layout is ``WxC`` (W workers with C CPUs each), ``:bf16`` for bf16 compute
(``STGPModelConfig.bf16``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import TreeSampler, command_line, machine_info, now_iso, start_ray, write_result
from bench.stgp_speed import REFERENCE, TARGETS

REPO = Path(__file__).resolve().parents[1]


def parse_layout(s: str) -> dict:
    """'2x1' -> {workers 2, cpus 1, bf16 False}; '2x1:bf16' -> bf16 True."""
    shape, _, flag = s.partition(":")
    w, _, c = shape.partition("x")
    if not (w.isdigit() and c.isdigit()) or flag not in ("", "bf16"):
        raise SystemExit(f"--layouts: '{s}' is not WxC or WxC:bf16 (e.g. 2x1)")
    return {"name": s, "workers": int(w), "cpus_per_worker": int(c), "bf16": flag == "bf16"}


def measure(store, prepared_id: str, layout: dict, a) -> dict:
    from stgray.engines.stgp import STGPPretrainConfig, run_stgp_pretrain
    from stgray.nn.stgp.model import STGPModelConfig

    w = layout["workers"]
    if a.global_batch % w:
        raise SystemExit(f"--global-batch {a.global_batch} does not split over {w} workers")
    cfg = STGPPretrainConfig(model=STGPModelConfig(bf16=layout["bf16"]), t_in=288, t_out=12,
                             epochs=a.epochs, steps_per_epoch=a.steps, batch_size=a.global_batch // w,
                             val_windows=4, num_workers=w, cpus_per_worker=layout["cpus_per_worker"],
                             max_failures=0)
    sampler = TreeSampler(interval=0.5).start()
    t0 = time.perf_counter()
    try:
        with sampler.phase("pretrain"):
            aid, _ = run_stgp_pretrain(store, cfg, [prepared_id])
    finally:
        sampler.stop()
    history = store.read_json(aid, "history.json")
    later = history[1:] or history
    wps = statistics.median(r["windows_per_s"] for r in later)
    worker_rss = max((r.get("worker_peak_rss_gb") for r in history), key=sum)
    return {**layout, "per_worker_batch": cfg.batch_size, "global_batch": a.global_batch,
            "threads_total": w * layout["cpus_per_worker"], "artifact": aid,
            "windows_per_s": wps, "s_per_step": a.global_batch / wps,
            "windows_per_s_by_epoch": [round(r["windows_per_s"], 3) for r in history],
            "speedup_vs_reference": wps / REFERENCE["pretrain_windows_per_s"],
            "worker_peak_rss_gb": worker_rss, "workers_peak_rss_gb_sum": sum(worker_rss),
            "workers_peak_rss_vs_reference": sum(worker_rss) / REFERENCE["pretrain_peak_gb"],
            "tree_peak_pss_gb": sampler.peaks["pretrain"]["pss_gb"],
            "tree_peak_rss_gb": sampler.peaks["pretrain"]["rss_gb"],
            "val_loss_by_epoch": [round(r["val_loss"], 4) for r in history],
            "wall_s": time.perf_counter() - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layouts", nargs="+", default=["1x1", "2x1", "1x2", "2x1:bf16", "1x2:bf16"])
    ap.add_argument("--steps", type=int, default=12, help="steps per epoch")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--workdir", default=None, help="where the throw-away stores go (default: a temp dir)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "stgp_scaling.json"))
    a = ap.parse_args(argv)
    layouts = [parse_layout(s) for s in a.layouts]
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from stgray.data.ingest import import_city
    from stgray.data.prepare import PrepareConfig, prepare_to_store
    from stgray.store import ArtifactStore

    started, t0 = now_iso(), time.perf_counter()
    machine = machine_info()
    machine["loadavg_start"] = os.getloadavg()
    start_ray(num_cpus=max(l["workers"] * l["cpus_per_worker"] for l in layouts) + 1)
    rows = []
    for layout in layouts:
        root = tempfile.mkdtemp(prefix="stgp-scaling-", dir=a.workdir)
        try:
            store = ArtifactStore(root)
            city_id, _ = import_city(store, "los_loop")[::2]
            pid, _ = prepare_to_store(store, city_id, PrepareConfig(step_s=300), "source")
            print(f"[stgp_scaling] {layout['name']}: {layout['workers']} worker(s) x "
                  f"{layout['cpus_per_worker']} CPU(s){' bf16' if layout['bf16'] else ''} ...", flush=True)
            row = measure(store, pid, layout, a)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        print(f"[stgp_scaling] {layout['name']}: {row['windows_per_s']:.2f} windows/s "
              f"({row['speedup_vs_reference']:.2f}x the reference), workers' peak RSS "
              f"{row['workers_peak_rss_gb_sum']:.2f} GB, tree PSS {row['tree_peak_pss_gb']:.2f} GB", flush=True)
        rows.append(row)
    machine["loadavg_end"] = os.getloadavg()
    fp32 = [r for r in rows if not r["bf16"]]
    best = max(fp32, key=lambda r: r["windows_per_s"]) if fp32 else None
    summary = {}
    if best:
        summary = {"best_fp32_layout": best["name"], "best_fp32_speedup_vs_reference": best["speedup_vs_reference"],
                   "best_fp32_workers_peak_rss_vs_reference": best["workers_peak_rss_vs_reference"],
                   "meets_speed_target": best["speedup_vs_reference"] >= TARGETS["pretrain_speedup"],
                   "meets_memory_target": best["workers_peak_rss_vs_reference"] <= TARGETS["pretrain_peak_gb_ratio"]}
    config = {k: v for k, v in vars(a).items() if k != "out"}
    path = write_result("stgp_scaling", {"machine": machine, "reference": REFERENCE, "targets": TARGETS,
                                         "rows": rows, "summary": summary},
                        mode="full", command=command_line(module="bench.stgp_scaling"), config=config,
                        seeds=[0], started=started, wall_s=time.perf_counter() - t0, out=a.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
