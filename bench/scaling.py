"""Scale: wall time and peak memory of zoo -> tokens -> generation as the node count grows,
on synthetic cities (``stgray.data.synthetic``) of 100 to 10,000 nodes.

    .venv/bin/python -m bench.scaling --mode quick     # 100, 300, 1000 nodes (minutes)
    .venv/bin/python -m bench.scaling --mode full      # 100 ... 10,000 nodes

Each size runs in its own process (a fresh local Ray and a fresh file store, so its peak
is its own), through the real stages:

  data        a synthetic source city (N nodes, ``--source-days`` hourly days) and a
              synthetic target city (N nodes, 7 days, another seed), imported and prepared;
  zoo         ``run_zoo`` on Ray Train (2 workers, shards of ``--nodes-per-shard``): one
              small STGCN per source node (``--channels``; the point is the shape, not the
              accuracy), ``--zoo-epochs`` epochs;
  tokens      ``run_tokens`` (streams the zoo table in row batches);
  diffusion   ``run_diffusion`` on Ray Train: a small denoiser, a fixed number of steps
              (its cost does not depend on N by design: steps, not epochs);
  generation  ``generate_params`` (DDIM) for every target node in chunks of
              ``--chunk`` nodes, each chunk scored zero-shot on the target's test windows
              (``predict_nodes``) and dropped.

Memory: a thread samples the summed RSS and PSS of the whole process tree (driver, Ray's
GCS/raylet, every Ray worker) every 0.5 s; the peak per stage is kept. Time per node is
reported per stage and overall, with a least-squares fit time = a + b x N (a: fixed costs
such as Ray Train start-up and the fixed-step denoiser training).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import (TreeSampler, command_line, machine_info, now_iso, start_ray,  # noqa: E402
                          write_result)

SIZES = {"quick": [100, 300, 1000], "full": [100, 300, 1000, 3000, 10000], "smoke": [60, 120]}
STAGES = ["data", "ray", "zoo", "tokens", "diffusion", "generation"]


def _configs(a):
    from stgray.data.prepare import PrepareConfig
    from stgray.engines.tokens import TokensConfig
    from stgray.engines.zoo import ZooConfig
    from stgray.gpdiff.diffusion import DiffusionConfig
    from stgray.nn.gpdiff.pernode import PerNodeArch

    arch = PerNodeArch(arch="stgcn", stgcn_channels=a.channels, stgcn_spatial=max(2, a.channels // 4))
    zoo = ZooConfig(model=arch, epochs=a.zoo_epochs, lr=3e-3, batch_size=64,
                    nodes_per_shard=a.nodes_per_shard, num_workers=a.workers, cpus_per_worker=1)
    tokens = TokensConfig(width=a.width)
    diff = DiffusionConfig(token_width=a.width, d_model=64, layers=2, heads=4, train_steps=a.diff_steps,
                           batch_size=64, lr=1e-3, sampler="ddim", sampling_steps=a.ddim_steps)
    prep = PrepareConfig(step_s=3600, feature="inflow", target_test_days=1)
    return prep, zoo, tokens, diff


def run_one(n: int, a) -> dict:
    """All stages for one size in this process; returns its measurements."""
    import torch

    from stgray.data.prepare import load_prepared, prepare_to_store
    from stgray.data.synthetic import SynthConfig, import_synthetic
    from stgray.engines.diffusion import generate_params, load_denoiser, run_diffusion
    from stgray.engines.tokens import prompts_for, run_tokens
    from stgray.engines.zoo import predict_nodes, run_zoo
    from stgray.store import ArtifactStore

    torch.set_num_threads(1)
    prep, zoo_cfg, tok_cfg, diff_cfg = _configs(a)
    sampler = TreeSampler(interval=0.5).start()
    work = Path(tempfile.mkdtemp(prefix=f"scal{n}-", dir=a.workdir))
    store = ArtifactStore(str(work / "store"))
    src = SynthConfig(nodes=n, days=a.source_days, k=a.k, seed=0)
    tgt = SynthConfig(nodes=n, days=7, k=a.k, seed=1)
    out: dict = {"nodes": n, "source": src.name, "target": tgt.name, "stages": {}}
    st = out["stages"]

    def stage(name, fn):
        with sampler.phase(name) as ph:
            res = fn()
        st[name] = {"seconds": ph.seconds, **sampler.peaks.get(name, {})}
        return res

    def data():
        sid = import_synthetic(store, src)[0]
        tid = import_synthetic(store, tgt)[0]
        return prepare_to_store(store, sid, prep, "source")[0], prepare_to_store(store, tid, prep, "target")[0]

    src_pid, tgt_pid = stage("data", data)
    out["ray_start_attempts"] = stage("ray", lambda: start_ray(num_cpus=3))
    zinfo: dict = {}
    zid = stage("zoo", lambda: run_zoo(store, zoo_cfg, [src_pid], info=zinfo)[0])
    tinfo: dict = {}
    tid = stage("tokens", lambda: run_tokens(store, tok_cfg, zid, {src.name: src_pid}, info=tinfo)[0])
    dinfo: dict = {}
    did = stage("diffusion", lambda: run_diffusion(store, diff_cfg, tid, 1, info=dinfo,
                                                   checkpoint_every=a.diff_steps)[0])

    def generation():
        p = load_prepared(store, tgt_pid)
        prompts = prompts_for(store, tid, p, "train")
        den = load_denoiser(store, did)
        t_in, t_out = zoo_cfg.model.t_in, zoo_cfg.model.t_out
        te = p.window_starts("test", t_in, t_out)
        truth = p.raw[te[:, None] + t_in + np.arange(t_out)[None]]  # (B, H, N)
        abs_err, cells, nonfinite, sample_s = 0.0, 0, 0, 0.0
        for lo in range(0, n, a.chunk):
            nodes = np.arange(lo, min(n, lo + a.chunk))
            info: dict = {}
            gen = generate_params(store, did, tid, prompts[nodes], samples_per_node=1, seed=0,
                                  node_keys=[[p.name, int(i)] for i in nodes], denoiser=den, info=info)
            sample_s += info["sampling_seconds"]
            params = gen[:, 0]
            ok = np.isfinite(params).all(1)
            nonfinite += int((~ok).sum())
            if ok.any():
                pred = predict_nodes(p, params[ok], zoo_cfg, nodes[ok], te)
                err = np.abs(pred - truth[:, :, nodes[ok]])
                abs_err += float(np.nansum(err))
                cells += int(np.isfinite(err).sum())
            del gen, params
        return {"sampling_seconds": sample_s, "sampling_ms_per_node": 1e3 * sample_s / n,
                "nonfinite_models": nonfinite,
                "zero_shot_test_mae": abs_err / max(cells, 1), "test_windows": int(len(te))}

    gen_info = stage("generation", generation)
    sampler.stop()
    # diagnostics outside the measured stages: the prepared data's (sparse) adjacency and
    # how long one shard's neighbourhood extraction takes from it
    from stgray.nn.gpdiff.pernode import build_neighbourhoods

    p = load_prepared(store, src_pid)
    t = time.perf_counter()
    build_neighbourhoods(p.adj, np.arange(min(n, zoo_cfg.nodes_per_shard)))
    out["diagnostics"] = {"adjacency_mb": (p.adj.data.nbytes + p.adj.indices.nbytes
                                           + p.adj.indptr.nbytes) / 1e6, "edges": int(p.adj.nnz),
                          "neighbourhoods_s_per_shard": time.perf_counter() - t}
    del p
    m_zoo = store.manifest(zid).meta
    shard_s = [store.manifest(x["id"]).meta["seconds"] for x in store.read_json(zid, "shards.json")]
    m_tok = store.manifest(tid).meta
    out.update({
        "zoo": {"models": m_zoo["models"], "n_params": m_zoo["n_params"], "shards": m_zoo["shards"],
                "val_mae_mean": m_zoo["val_mae_mean"], "shards_total": zinfo["shards_total"],
                "train_seconds_in_shards": float(sum(shard_s)),
                "train_ms_per_node_epoch": 1e3 * float(sum(shard_s)) / (n * zoo_cfg.epochs)},
        "tokens": {"rows": m_tok["rows"], "L": m_tok["L"], "C": m_tok["C"], "D": m_tok["D"],
                   "rows_per_s": n / max(st["tokens"]["seconds"], 1e-9)},
        "diffusion": {k: dinfo.get(k) for k in ("tokens_per_s", "train_seconds", "final_loss")},
        "generation": gen_info,
        "total_s": sum(v["seconds"] for k, v in st.items()),
        "pipeline_s": sum(st[k]["seconds"] for k in ("zoo", "tokens", "diffusion", "generation")),
        "peak_rss_gb": sampler.peak("rss_gb"), "peak_pss_gb": sampler.peak("pss_gb"),
        "samples": sampler.samples[:: max(1, len(sampler.samples) // 400)],
        "store_mb": round(sum(f.stat().st_size for f in (work / "store").rglob("*") if f.is_file()) / 1e6, 1),
    })
    import ray

    ray.shutdown()
    if not a.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return out


def _fit(ns, ts) -> dict:
    """Least squares t = a + b n; b in ms per node, R^2."""
    x, y = np.asarray(ns, float), np.asarray(ts, float)
    if len(x) < 2:
        return {}
    b, a0 = np.polyfit(x, y, 1)
    pred = a0 + b * x
    ss = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float(((y - pred) ** 2).sum()) / ss if ss > 0 else float("nan")
    return {"intercept_s": float(a0), "ms_per_node": float(b * 1e3), "r2": r2}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=list(SIZES), default="quick")
    ap.add_argument("--sizes", type=int, nargs="*", help="override the mode's node counts")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one size here
    ap.add_argument("--one-out", help=argparse.SUPPRESS)
    ap.add_argument("--source-days", type=float, default=10.0)
    ap.add_argument("--k", type=int, default=5, help="neighbours per node of the synthetic graph")
    ap.add_argument("--channels", type=int, default=8, help="STGCN channels of the per-node models")
    ap.add_argument("--zoo-epochs", type=int, default=2)
    ap.add_argument("--nodes-per-shard", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--width", type=int, default=64, help="token width")
    ap.add_argument("--diff-steps", type=int, default=100)
    ap.add_argument("--ddim-steps", type=int, default=10)
    ap.add_argument("--chunk", type=int, default=512, help="target nodes generated per chunk")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per size")
    ap.add_argument("--workdir", default=None, help="where stores go (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep each size's store")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    if a.one is not None:
        res = run_one(a.one, a)
        Path(a.one_out).write_text(json.dumps(res, default=float))
        return 0

    sizes = a.sizes or SIZES[a.mode]
    machine = machine_info()
    started, t0 = now_iso(), time.perf_counter()
    load = [os.getloadavg()]
    rows, failed = [], []
    for n in sizes:
        fd, tmp = tempfile.mkstemp(suffix=".json")
        os.close(fd)
        # the child gets the same options but one size ("--mode/--sizes/--out" dropped)
        child = [sys.executable, "-m", "bench.scaling", "--one", str(n), "--one-out", tmp,
                 *_strip(list(argv if argv is not None else sys.argv[1:]))]
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
               "STGRAY_RAY_TMP": tempfile.mkdtemp(prefix="rs", dir="/tmp"), "TQDM_DISABLE": "1"}
        print(f"[scaling] {n} nodes ...", flush=True)
        t = time.perf_counter()
        try:
            r = subprocess.run(child, cwd=REPO, env=env, timeout=a.timeout, capture_output=True, text=True)
            ok = r.returncode == 0
            tail = (r.stdout + r.stderr).splitlines()[-15:]
        except subprocess.TimeoutExpired:
            ok, tail = False, [f"timed out after {a.timeout} s"]
        load.append(os.getloadavg())
        if ok:
            row = json.loads(Path(tmp).read_text())
            row["loadavg_after"] = load[-1]
            rows.append(row)
            print(f"[scaling] {n} nodes: {row['pipeline_s']:.1f} s (zoo..generation), peak RSS "
                  f"{row['peak_rss_gb']:.2f} GB, PSS {row['peak_pss_gb']:.2f} GB "
                  f"({time.perf_counter() - t:.0f} s in all)", flush=True)
        else:
            failed.append({"nodes": n, "tail": tail})
            print(f"[scaling] {n} nodes FAILED:\n  " + "\n  ".join(tail), flush=True)
        Path(tmp).unlink(missing_ok=True)

    ns = [r["nodes"] for r in rows]
    summary = {"sizes": ns,
               "fit_pipeline": _fit(ns, [r["pipeline_s"] for r in rows]),
               # the stages whose work grows with N (the denoiser trains a fixed number of steps)
               "fit_node_stages": _fit(ns, [sum(r["stages"][s]["seconds"] for s in ("zoo", "tokens", "generation"))
                                            for r in rows]),
               "fit_per_stage": {s: _fit(ns, [r["stages"][s]["seconds"] for r in rows])
                                 for s in ("zoo", "tokens", "diffusion", "generation")},
               "peak_rss_gb": {str(r["nodes"]): r["peak_rss_gb"] for r in rows},
               "peak_pss_gb": {str(r["nodes"]): r["peak_pss_gb"] for r in rows}}
    if len(rows) >= 2:
        lo, hi = rows[0], rows[-1]
        summary["nodes_ratio"] = hi["nodes"] / lo["nodes"]
        summary["pipeline_time_ratio"] = hi["pipeline_s"] / lo["pipeline_s"]
        summary["peak_rss_ratio"] = hi["peak_rss_gb"] / lo["peak_rss_gb"]
        summary["peak_pss_ratio"] = hi["peak_pss_gb"] / lo["peak_pss_gb"]
    config = {k: v for k, v in vars(a).items() if k not in ("one", "one_out", "out", "workdir", "keep",
                                                           "timeout")}
    config["sizes"] = sizes
    res = {"machine": machine, "config": config, "rows": rows, "failed": failed, "summary": summary,
           "loadavg_during": load,
           "load_note": "shared 2-core machine: other sessions ran tests at the same time (see "
                        "loadavg_during, one entry before the first size and after each size)",
           "reference": {"zoo_ram_gb": 16, "note": "the reference holds its whole zoo in RAM: about "
                                                   "16 GB for 1,683 models x 30 repeats"}}
    path = write_result("scaling", res, mode=a.mode if not a.sizes else "custom",
                        command=command_line(argv, "bench.scaling"), config=config, seeds=[0, 1],
                        started=started, wall_s=time.perf_counter() - t0, out=a.out)
    print(f"wrote {path}")
    return 1 if failed else 0


def _strip(cmd: list[str]) -> list[str]:
    out, skip = [], False
    for i, x in enumerate(cmd):
        if skip:
            if x.startswith("--"):
                skip = False
            else:
                continue
        if x in ("--sizes", "--mode", "--out"):
            skip = True
            continue
        out.append(x)
    return out


if __name__ == "__main__":
    sys.exit(main())
