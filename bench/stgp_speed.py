"""STGP compute at the reference sizes on los_loop (207 nodes, 5-minute steps, batch 8,
25 patches x 12 steps, d=128, depth 4, heads 4): pre-training, domain prompting and
task prompting windows/s, peak memory, and prompt tuning vs full fine-tuning.

Each phase runs in its own process so its peak RSS is its own. The reference's figures on
this kind of machine (issue #4): pre-training 2.45 windows/s (3.6 GB), domain prompting
3.4 s/step, forecasting task prompting 1.04 windows/s.

    python -m bench.stgp_speed [--quick]     -> bench/results/stgp_speed.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time
from pathlib import Path

REFERENCE = {"pretrain_windows_per_s": 2.45, "pretrain_peak_gb": 3.6, "domain_s_per_step": 3.4,
             "task_windows_per_s": 1.04}


def _setup(batch: int):
    import numpy as np
    import torch

    from stgray.data.prepare import PrepareConfig, prepare
    from stgray.data.importers import load_city
    from stgray.nn.stgp.model import STGPModel, STGPModelConfig
    from stgray.nn.stgp.template import PatchTemplate

    torch.set_num_threads(2)
    torch.manual_seed(0)
    city = load_city("los_loop")
    p = prepare(city, PrepareConfig(step_s=300, target_train_days=3, target_val_days=1, target_test_days=None),
                "target")
    cfg = STGPModelConfig()  # the reference sizes
    tmpl = PatchTemplate(patch_len=12, num_patches=25, horizon_patches=1)
    model = STGPModel(cfg)
    starts = tmpl.window_starts(p, "train", "pretrain")
    rng = np.random.default_rng(0)
    return p, cfg, tmpl, model, starts, rng


def _phase(name: str, steps: int, batch: int, q: mp.Queue) -> None:
    import torch

    from stgray.nn.stgp.model import count_parameters, masked_mae

    p, cfg, tmpl, model, starts, rng = _setup(batch)
    g = model.graph(p.adj)
    n = p.num_nodes
    stage = {"pretrain": "pretrain", "domain": "domain", "task": "task", "finetune": "finetune"}[name]
    model.set_stage(stage)
    params = model.parameters_for(stage)
    opt = torch.optim.Adam(params, lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    times = []
    cache = None
    if name == "task":  # nothing upstream of the task prompts trains: encode once, reuse
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
        t0 = time.perf_counter()
        if name in ("pretrain", "domain"):
            m = tmpl.pretrain_mask(batch, n, 0.5, 0.5, gen)
            loss = masked_mae(model(b.x, b.tod, b.dow, g, m), b.x, m)
        elif name == "task":
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
    times.sort()
    med = times[len(times) // 2]
    out = {"phase": name, "steps": steps, "batch": batch, "median_s_per_step": med,
           "windows_per_s": batch / med, "trainable_params": sum(x.numel() for x in params),
           "total_params": count_parameters(model),
           "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}
    if name == "task":
        out["encode_once_s"] = encode_s
    q.put(out)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="bench/results/stgp_speed.json")
    a = ap.parse_args(argv)
    steps = 4 if a.quick else 12
    ctx = mp.get_context("spawn")
    rows = []
    for name in ("pretrain", "domain", "task", "finetune"):
        q = ctx.Queue()
        proc = ctx.Process(target=_phase, args=(name, steps, 8, q))
        proc.start()
        rows.append(q.get(timeout=1800))
        proc.join()
        print(json.dumps(rows[-1]), flush=True)
    by = {r["phase"]: r for r in rows}
    summary = {
        "pretrain_speedup_vs_reference": by["pretrain"]["windows_per_s"] / REFERENCE["pretrain_windows_per_s"],
        "pretrain_peak_gb_vs_reference": by["pretrain"]["peak_rss_gb"] / REFERENCE["pretrain_peak_gb"],
        "domain_speedup_vs_reference": REFERENCE["domain_s_per_step"] / by["domain"]["median_s_per_step"],
        "task_speedup_vs_reference": by["task"]["windows_per_s"] / REFERENCE["task_windows_per_s"],
        "prompt_share_of_params": by["task"]["trainable_params"] / by["task"]["total_params"],
        "task_prompt_vs_finetune_step_time": by["task"]["median_s_per_step"] / by["finetune"]["median_s_per_step"],
    }
    from bench.common import machine_info

    res = {"bench": "stgp_speed", "mode": "quick" if a.quick else "full", "machine": machine_info(),
           "reference": REFERENCE, "phases": rows, "summary": summary}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(summary, indent=1))
    return res


if __name__ == "__main__":
    main()
