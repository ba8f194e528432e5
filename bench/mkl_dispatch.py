"""What MKL's AVX-512 dispatch on AMD (:mod:`stgray.nn.mkl_dispatch`) is worth: the same work
in two processes, one with it and one without (``STGRAY_MKL_AVX512=0``), taking turns step by
step so that a shared machine's changing load falls on both alike.

Work per turn: one sgemm of each shape in ``SHAPES`` (GFLOP/s) and one STGP pre-training step
at the reference sizes on los_loop (batch 8, as bench.stgp_speed). Reports the median of the
per-turn ratios (off / on: > 1 means the dispatch is faster).

    python -m bench.mkl_dispatch [--turns 12] [--threads 2] [--out PATH]
        -> bench/results/mkl_dispatch.json
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time

SHAPES = ((2048, 2048, 2048), (10712, 128, 384), (384, 10712, 128), (41400, 32, 32))


def _worker(enabled: bool, threads: int, conn) -> None:
    os.environ["STGRAY_MKL_AVX512"] = "1" if enabled else "0"
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    from bench.stgp_speed import _setup
    from stgray.nn import mkl_dispatch
    from stgray.nn.stgp.model import masked_mae

    p, cfg, tmpl, model, starts, rng = _setup(8, threads)
    g = model.graph(p.dense_adj())
    model.set_stage("pretrain")
    opt = torch.optim.Adam(model.parameters_for("pretrain"), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    mats = [(torch.randn(m, k), torch.randn(k, n)) for m, k, n in SHAPES]
    model.train()

    def turn() -> dict:
        out = {}
        for (m, k, n), (a, b) in zip(SHAPES, mats):
            t0 = time.perf_counter()
            for _ in range(3):
                a @ b
            out[f"gemm_{m}x{k}x{n}_gflops"] = 3 * 2 * m * k * n / (time.perf_counter() - t0) / 1e9
        b = tmpl.batch(p, rng.choice(starts, 8))
        mask = tmpl.pretrain_mask(8, p.num_nodes, 0.5, 0.5, gen)
        t0 = time.perf_counter()
        loss = masked_mae(model(b.x, b.tod, b.dow, g, mask), b.x, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        out["pretrain_s_per_step"] = time.perf_counter() - t0
        return out

    turn()  # warm-up
    conn.send({"enabled": mkl_dispatch.status()["enabled"]})
    while conn.recv():
        conn.send(turn())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--turns", type=int, default=12, help="timed turns per process")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/mkl_dispatch.json")
    a = ap.parse_args(argv)
    from bench.common import command_line, now_iso, write_result

    ctx = mp.get_context("spawn")
    started, t0 = now_iso(), time.perf_counter()
    procs, conns, state = [], [], []
    for on in (True, False):
        here, there = ctx.Pipe()
        pr = ctx.Process(target=_worker, args=(on, a.threads, there))
        pr.start()
        procs.append(pr)
        conns.append(here)
    for c in conns:  # both set up before the first timed turn
        state.append(c.recv()["enabled"])
    turns = {True: [], False: []}
    for i in range(a.turns):
        for c, on in zip(conns, (True, False)) if i % 2 == 0 else zip(conns[::-1], (False, True)):
            c.send(True)
            turns[on].append(c.recv())
    for c, pr in zip(conns, procs):
        c.send(False)
        pr.join()
    keys = list(turns[True][0])
    ratio = {}
    for k in keys:
        per = [(off[k] / on[k]) if k.endswith("s_per_step") else (on[k] / off[k])
               for on, off in zip(turns[True], turns[False])]
        ratio[k] = statistics.median(per)
    summary = {"dispatch_enabled_in_on_process": state[0], "dispatch_enabled_in_off_process": state[1],
               "on_median": {k: statistics.median(t[k] for t in turns[True]) for k in keys},
               "off_median": {k: statistics.median(t[k] for t in turns[False]) for k in keys},
               "speedup_median_of_turn_ratios": ratio}
    config = {"turns": a.turns, "threads": a.threads, "shapes": SHAPES, "batch": 8}
    res = {"config": config, "summary": summary, "turns": {"on": turns[True], "off": turns[False]}}
    write_result("mkl_dispatch", res, mode="full", command=command_line(argv, "bench.mkl_dispatch"),
                 config=config, seeds=[0], started=started, wall_s=time.perf_counter() - t0, out=a.out)
    for k in keys:
        print(f"{k:36s} on {summary['on_median'][k]:9.3f}  off {summary['off_median'][k]:9.3f}  "
              f"speed-up {ratio[k]:.2f}x", flush=True)
    return res


if __name__ == "__main__":
    main()
