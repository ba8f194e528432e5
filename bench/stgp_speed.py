"""STGP compute at the reference sizes on los_loop (207 nodes, 5-minute steps, batch 8,
25 patches x 12 steps, d=128, depth 4, heads 4): pre-training, domain prompting and
task prompting windows/s, peak memory, and prompt tuning vs full fine-tuning.

Each phase runs in its own process so its peak RSS is its own. The reference's figures on
this kind of machine (issue #4): pre-training 2.45 windows/s (3.3 s/step, 3.6 GB), domain
prompting 3.4 s/step, forecasting task prompting 1.04 windows/s. Targets: pre-training
>= 5x the reference's windows/s with <= half its peak memory, task prompting >= 10x,
domain prompting >= 3x, prompt tuning < 1% of the parameters and faster per step than full
fine-tuning.

The fp32 phases use the model's defaults; ``pretrain_bf16`` / ``domain_bf16`` repeat the
two encoder-heavy phases with ``bf16=True`` (bf16 products, fp32 master weights; fast on
CPUs with AVX512-BF16 / AMX). Each phase records the median wall time per step, the median
process CPU time per step (on a loaded machine the less noisy of the two) and the load
average around it: figures taken under load are pessimistic.

OpenMP threads spin while they wait by default; on a shared machine that turns a 3 s
pre-training step into 10-17 s (load ~5 on 2 cores). The phases run with
``OMP_WAIT_POLICY=PASSIVE`` unless told otherwise (recorded in the results).

The pre-training phases run in the environment of the stage's Ray Train workers
(``stgray.engines.common.training_env``: Ray's jemalloc preloaded, a short OpenMP spin before
threads sleep); ``--system-env`` runs them like the other phases (glibc malloc, no spin).
The prompt stages run in the pipeline's driver process: their phases never get it. Each
phase records its allocator and ``GOMP_SPINCOUNT``.

Repeats: the development machine is a shared VM whose speed drifts by up to 50% within an
hour, invisibly to its load average (other tenants' memory traffic). The full run measures
every phase ``--repeats`` times (default 3), in rounds (all phases, then all again), so a
phase's repeats lie minutes apart. A phase's figures are its fastest repeat (median s/step
within it), as ``timeit`` reports the minimum: other tenants only ever add time. Every
repeat's median is recorded (``repeats``), with the median over repeats
(``median_s_per_step_over_repeats``); the peak RSS reported is the largest of all repeats.

    python -m bench.stgp_speed [--quick] [--steps N] [--repeats R] [--threads 2]
        [--phases pretrain,domain,...] [--omp-wait-policy PASSIVE] [--system-env] [--out PATH]
        -> bench/results/stgp_speed.json

``--quick``: 4 timed steps per phase instead of 12, one repeat; ``--steps`` sets the count
directly (the quick plan of ``bench.run`` uses ``--quick --steps 2`` on four phases: a smoke
check).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from unittest import mock

REFERENCE = {"pretrain_windows_per_s": 2.45, "pretrain_s_per_step": 3.3, "pretrain_peak_gb": 3.6,
             "domain_s_per_step": 3.4, "task_windows_per_s": 1.04, "task_s_per_step": 7.7}
TARGETS = {"pretrain_speedup": 5.0, "pretrain_peak_gb_ratio": 0.5, "task_speedup": 10.0,
           "domain_speedup": 3.0, "prompt_share_of_params": 0.01, "task_prompt_vs_finetune_step_time": 1.0}
PHASES = ("pretrain", "domain", "task", "finetune", "pretrain_bf16", "domain_bf16")


def _setup(batch: int, threads: int = 2, bf16: bool = False):
    import numpy as np
    import torch

    from stgray.data.importers import load_city
    from stgray.data.prepare import PrepareConfig, prepare
    from stgray.engines.common import keep_freed_memory
    from stgray.nn.stgp.model import STGPModel, STGPModelConfig
    from stgray.nn.stgp.template import PatchTemplate

    torch.set_num_threads(threads)
    keep_freed_memory()  # as the pre-training workers do
    torch.manual_seed(0)
    city = load_city("los_loop")
    p = prepare(city, PrepareConfig(step_s=300, target_train_days=3, target_val_days=1, target_test_days=None),
                "target")
    cfg = STGPModelConfig(bf16=bf16)  # the reference sizes
    tmpl = PatchTemplate(patch_len=12, num_patches=25, horizon_patches=1)
    model = STGPModel(cfg)
    starts = tmpl.window_starts(p, "train", "pretrain")
    rng = np.random.default_rng(0)
    return p, cfg, tmpl, model, starts, rng


def _phase(name: str, steps: int, batch: int, threads: int, q: mp.Queue) -> None:
    import torch

    from stgray.engines.common import allocator, peak_rss_gb
    from stgray.nn import mkl_dispatch
    from stgray.nn.stgp.model import count_parameters, masked_mae

    load0 = os.getloadavg()
    bf16 = name.endswith("_bf16")
    kind = name.removesuffix("_bf16")
    p, cfg, tmpl, model, starts, rng = _setup(batch, threads, bf16)
    g = model.graph(p.dense_adj())
    n = p.num_nodes
    model.set_stage(kind)
    params = model.parameters_for(kind)
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4, fused=True) if kind == "pretrain" \
        else torch.optim.Adam(params, lr=1e-3)  # as stgray.engines.stgp's stages
    gen = torch.Generator().manual_seed(0)
    times, cpu = [], []
    cache = None
    if kind == "task":  # nothing upstream of the task prompts trains: encode once, reuse
        b = tmpl.batch(p, rng.choice(starts, batch))
        m = tmpl.forecast_mask(batch, n)
        t0 = time.perf_counter()
        with torch.no_grad():
            model.eval()
            cache = (model.encode(b.x, b.tod, b.dow, g, m), m, b.x)
        encode_s = time.perf_counter() - t0
    model.train()
    for i in range(steps + 1):
        b = tmpl.batch(p, rng.choice(starts, batch))
        t0, c0 = time.perf_counter(), time.process_time()
        if kind in ("pretrain", "domain"):
            m = tmpl.pretrain_mask(batch, n, 0.5, 0.5, gen)
            loss = masked_mae(model(b.x, b.tod, b.dow, g, m), b.x, m)
        elif kind == "task":
            tok, m, x = cache
            loss = masked_mae(model.decode(tok, m, g), x, m)
        else:
            m = tmpl.forecast_mask(batch, n)
            loss = masked_mae(model(b.x, b.tod, b.dow, g, m), b.x, m)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    med = sorted(times)[len(times) // 2]
    out = {"phase": name, "stage": kind, "bf16": bf16, "steps": steps, "batch": batch, "threads": threads,
           "median_s_per_step": med, "windows_per_s": batch / med,
           "median_cpu_s_per_step": sorted(cpu)[len(cpu) // 2],
           "s_per_step": [round(t, 3) for t in times], "cpu_s_per_step": [round(t, 3) for t in cpu],
           "trainable_params": sum(x.numel() for x in params), "total_params": count_parameters(model),
           "peak_rss_gb": peak_rss_gb(),
           "loadavg_start": load0, "loadavg_end": os.getloadavg(),
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
           "mkl_avx512_dispatch": mkl_dispatch.status()["enabled"],
           "allocator": allocator(), "gomp_spincount": os.environ.get("GOMP_SPINCOUNT")}
    if kind == "task":
        out["encode_once_s"] = encode_s
    q.put(out)


def best_of(runs: list[dict]) -> dict:
    """A phase's runs -> the fastest (lowest median s/step), with every run's median and
    peak (``repeats``), the median over runs, and the largest peak RSS of all."""
    best = dict(min(runs, key=lambda r: r["median_s_per_step"]))
    meds = sorted(r["median_s_per_step"] for r in runs)
    best["repeats"] = [{"repeat": r["repeat"], "finished": r["finished"], "median_s_per_step": r["median_s_per_step"],
                        "median_cpu_s_per_step": r["median_cpu_s_per_step"], "peak_rss_gb": r["peak_rss_gb"]}
                       for r in runs]
    best["median_s_per_step_over_repeats"] = meds[len(meds) // 2]
    best["peak_rss_gb"] = max(r["peak_rss_gb"] for r in runs)
    return best


def summarise(by: dict) -> tuple[dict, dict]:
    """Ratios to the reference of whatever phases ran (flat: bench/render.py tabulates it)
    and whether each meets its target."""
    s: dict = {}
    if "pretrain" in by:
        s["pretrain_speedup_vs_reference"] = by["pretrain"]["windows_per_s"] / REFERENCE["pretrain_windows_per_s"]
        s["pretrain_peak_gb_vs_reference"] = by["pretrain"]["peak_rss_gb"] / REFERENCE["pretrain_peak_gb"]
    if "pretrain_bf16" in by:
        s["pretrain_bf16_speedup_vs_reference"] = \
            by["pretrain_bf16"]["windows_per_s"] / REFERENCE["pretrain_windows_per_s"]
        s["pretrain_bf16_peak_gb_vs_reference"] = by["pretrain_bf16"]["peak_rss_gb"] / REFERENCE["pretrain_peak_gb"]
    if "domain" in by:
        s["domain_speedup_vs_reference"] = REFERENCE["domain_s_per_step"] / by["domain"]["median_s_per_step"]
    if "domain_bf16" in by:
        s["domain_bf16_speedup_vs_reference"] = REFERENCE["domain_s_per_step"] / by["domain_bf16"]["median_s_per_step"]
    if "domain" in by and "pretrain" in by:  # cpu time: the less load-sensitive of the two
        s["domain_vs_pretrain_cpu_per_step"] = \
            by["domain"]["median_cpu_s_per_step"] / by["pretrain"]["median_cpu_s_per_step"]
    if "task" in by:
        s["task_speedup_vs_reference"] = by["task"]["windows_per_s"] / REFERENCE["task_windows_per_s"]
        s["prompt_share_of_params"] = by["task"]["trainable_params"] / by["task"]["total_params"]
    if "task" in by and "finetune" in by:
        s["task_prompt_vs_finetune_step_time"] = \
            by["task"]["median_s_per_step"] / by["finetune"]["median_s_per_step"]
    met = {}
    for key, target in (("pretrain_speedup_vs_reference", TARGETS["pretrain_speedup"]),
                        ("task_speedup_vs_reference", TARGETS["task_speedup"]),
                        ("domain_speedup_vs_reference", TARGETS["domain_speedup"]),
                        ("pretrain_bf16_speedup_vs_reference", TARGETS["pretrain_speedup"]),
                        ("domain_bf16_speedup_vs_reference", TARGETS["domain_speedup"])):
        if key in s:
            met[key] = s[key] >= target
    for key, target in (("pretrain_peak_gb_vs_reference", TARGETS["pretrain_peak_gb_ratio"]),
                        ("pretrain_bf16_peak_gb_vs_reference", TARGETS["pretrain_peak_gb_ratio"]),
                        ("prompt_share_of_params", TARGETS["prompt_share_of_params"])):
        if key in s:
            met[key] = s[key] <= target
    if "task_prompt_vs_finetune_step_time" in s:
        met["task_prompt_vs_finetune_step_time"] = s["task_prompt_vs_finetune_step_time"] < 1.0
    return s, met


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="4 timed steps per phase (default 12)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per phase (overrides --quick)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="runs of each phase, in rounds; a phase reports its fastest (default 3, --quick 1)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per phase (reference machine: 2 cores)")
    ap.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset of " + ", ".join(PHASES))
    ap.add_argument("--omp-wait-policy", default="PASSIVE",
                    help="OMP_WAIT_POLICY of the phase processes ('' = leave as is). libgomp's default "
                         "spin-wait makes 2-thread steps 3-5x slower (and erratic) when other jobs load the "
                         "machine; PASSIVE costs little on an idle one")
    ap.add_argument("--system-env", action="store_true",
                    help="pre-training phases without the training workers' environment (jemalloc, OpenMP spin)")
    ap.add_argument("--out", default="bench/results/stgp_speed.json")
    a = ap.parse_args(argv)
    steps = a.steps or (4 if a.quick else 12)
    repeats = a.repeats or (1 if a.quick or a.steps else 3)
    if repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    names = [x for x in a.phases.split(",") if x]
    if unknown := set(names) - set(PHASES):
        raise SystemExit(f"unknown phases {sorted(unknown)}")
    if a.omp_wait_policy:  # read by the OpenMP runtime at start-up: set before spawning
        os.environ["OMP_WAIT_POLICY"] = a.omp_wait_policy
    from bench.common import command_line, machine_info, now_iso, write_result
    from stgray.engines.common import training_env

    ctx = mp.get_context("spawn")
    runs: dict[str, list[dict]] = {name: [] for name in names}
    load0 = os.getloadavg()
    started, t0 = now_iso(), time.perf_counter()
    for r in range(repeats):
        for name in names:
            q = ctx.Queue()
            proc = ctx.Process(target=_phase, args=(name, steps, 8, a.threads, q))
            extra = training_env() if name.startswith("pretrain") and not a.system_env else {}
            with mock.patch.dict(os.environ, extra):  # read when the child starts (spawn)
                proc.start()
            row = q.get(timeout=1800)
            proc.join()
            row.update(repeat=r, finished=now_iso())
            runs[name].append(row)
            print(json.dumps({k: row[k] for k in ("phase", "repeat", "median_s_per_step", "peak_rss_gb")}),
                  flush=True)
    rows = [best_of(runs[name]) for name in names]
    summary, met = summarise({r["phase"]: r for r in rows})
    mode = "quick" if a.quick or a.steps else "full"
    config = {"steps": steps, "repeats": repeats, "batch": 8, "threads": a.threads, "phases": names,
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "pretrain_worker_env": not a.system_env}
    res = {"machine": machine_info(), "config": config,
           "loadavg_start": load0, "loadavg_end": os.getloadavg(),
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "reference": REFERENCE, "targets": TARGETS,
           "phases": rows, "summary": summary, "meets_target": met}
    write_result("stgp_speed", res, mode=mode, command=command_line(argv, "bench.stgp_speed"), config=config,
                 seeds=[0], started=started, wall_s=time.perf_counter() - t0, out=a.out)
    print(json.dumps({"summary": summary, "meets_target": met}, indent=1))
    return res


if __name__ == "__main__":
    main()
