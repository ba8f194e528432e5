"""Diffusion sampling: DDPM (500 steps) vs DDIM (50 steps) on a small trained denoiser --
sampling time for M target nodes and what each sampler's parameters are worth.

    .venv/bin/python bench/diffusion_sampling.py             # quick sizes (minutes)
    .venv/bin/python bench/diffusion_sampling.py --nodes 64 --diff-steps 2000
    .venv/bin/python bench/diffusion_sampling.py --nodes 8 --days 14 --zoo-epochs 1 --diff-steps 30  # smoke

Pipeline (all through the real stages, in a local store):
  source  nyc_bike, the first ``--nodes`` zones, ``--days`` days (80/20 train/val);
  zoo     one STGCN per source node (``stgray.engines.zoo.train_shard``/``write_zoo``,
          no Ray: the bench is about sampling), ``--zoo-epochs`` at lr 3e-3;
  tokens  width 64 (P = 16,960 -> L = 265), prompts from the source train split;
  diffusion  ``run_diffusion`` on Ray Train (1 worker), a small adaLN denoiser,
          ``--diff-steps`` steps, 500 training timesteps;
  target  nyc_taxi, the same zones (days 1-3 train, 4-6 val, test capped at 14 days):
          prompts from its 3 train days, parameters generated for every target node with
          DDPM (500 steps) and DDIM (50 steps, eta 0), same seeds.
Measured: sampling seconds (median of ``--repeats``) and per node; accuracy of each
sampler's parameters as zero-shot forecasters on the target (``zoo.predict_nodes``, MAE/RMSE
on validation and test, de-normalised; best of S samples chosen on validation);
parameter-space distances in standardised units (per-position zoo std): DDPM vs DDIM with
the same seeds, two DDPM seeds (the spread of the model's own samples), and each sampler
to the zoo mean. Baselines: the zoo's mean parameters, and the same-zone bike model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import command_line, now_iso, write_result  # noqa: E402

from stgray.data.city import CITY_KIND, City, edges_from_dense, write_city  # noqa: E402
from stgray.data.prepare import PrepareConfig, load_prepared, prepare_to_store  # noqa: E402
from stgray.engines.diffusion import generate_params, load_denoiser, run_diffusion  # noqa: E402
from stgray.engines.tokens import TokensConfig, load_tokens_info, prompts_for, run_tokens  # noqa: E402
from stgray.eval.metrics import forecast_metrics  # noqa: E402
from stgray.gpdiff.diffusion import DiffusionConfig  # noqa: E402
from stgray.store import ArtifactStore  # noqa: E402

DATA = Path(os.environ.get("STGRAY_DATA_DIR", REPO.parent / "shared" / "datasets"))


def nyc_city(kind: str, days: int, nodes: int) -> City:
    d = DATA / "nyc_bike_taxi_zones"
    a = np.load(d / f"201901-202012-NYC{kind}-inoutflow.npz")["arr_0"][: days * 24, :nodes]
    adj = pd.read_csv(d / "W_adj_matrix.csv")
    ids, adj = list(adj.columns)[:nodes], adj.to_numpy(np.float32)[:nodes, :nodes]
    e, w = edges_from_dense(adj)
    return City(name=f"nyc_{kind}", series=a.astype(np.float32), start=pd.Timestamp("2019-01-01"),
                step_s=3600, features=["inflow", "outflow"], units=["n/h", "n/h"],
                aggregation=["sum", "sum"], edges=e, weights=w, node_ids=[str(i) for i in ids])


def put_city(store, city: City, role: str) -> str:
    with store.writer(CITY_KIND, {"bench": city.name, "shape": list(city.series.shape)},
                      label=city.name, meta=city.summary()) as w:
        write_city(w, city)
    pid, _ = prepare_to_store(store, w.id, PrepareConfig(), role)
    return pid


def scores(target, params: np.ndarray, arch, nodes: np.ndarray, split: str) -> dict:
    from stgray.engines.zoo import predict_nodes

    starts = target.window_starts(split, arch.t_in, arch.t_out)
    pred = predict_nodes(target, params, arch, nodes, starts)
    _, true = target.windows(starts, arch.t_in, arch.t_out, normalised=False)
    m = forecast_metrics(pred, true[:, :, nodes], per_horizon=False)
    return {"mae": m["mae"], "rmse": m["rmse"]}


def per_node_mae(target, params, arch, nodes, split) -> np.ndarray:
    from stgray.engines.zoo import predict_nodes

    starts = target.window_starts(split, arch.t_in, arch.t_out)
    pred = predict_nodes(target, params, arch, nodes, starts)
    _, true = target.windows(starts, arch.t_in, arch.t_out, normalised=False)
    return np.abs(pred - true[:, :, nodes]).mean((0, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=32, help="source zones = target zones (M)")
    ap.add_argument("--days", type=int, default=60)
    ap.add_argument("--zoo-epochs", type=int, default=5)
    ap.add_argument("--diff-steps", type=int, default=400)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--samples", type=int, default=2, help="samples per node (S)")
    ap.add_argument("--ddpm-steps", type=int, default=500)
    ap.add_argument("--ddim-steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=1, help="timed sampling runs per sampler")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "diffusion_sampling.json"))
    args = ap.parse_args()
    started, t_start = now_iso(), time.perf_counter()
    torch.set_num_threads(1)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from stgray.engines.zoo import ZooConfig, load_zoo, plan_shards, train_shard, write_zoo
    from stgray.nn.gpdiff.pernode import PerNodeArch

    out: dict = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                             "cores": os.cpu_count(), "loadavg_start": os.getloadavg(),
                             "torch_threads": 1,
                             "versions": {"ray": ray.__version__, "torch": torch.__version__}},
                 "args": vars(args)}
    store = ArtifactStore(tempfile.mkdtemp(prefix="diffbench") + "/store")
    t0 = time.perf_counter()
    src = put_city(store, nyc_city("bike", args.days, args.nodes), "source")
    tgt_id = put_city(store, nyc_city("taxi", 30, args.nodes), "target")
    zcfg = ZooConfig(model=PerNodeArch(arch="stgcn"), epochs=args.zoo_epochs, lr=3e-3,
                     nodes_per_shard=args.nodes, device="cpu")
    shards = plan_shards(store, zcfg, [src])
    for s in shards:
        train_shard(store, zcfg, s, device="cpu")
    zoo_id = write_zoo(store, zcfg, [src], shards)
    zoo = load_zoo(store, zoo_id)
    out["zoo"] = {"models": int(len(zoo.params)), "P": int(zoo.params.shape[1]),
                  "val_mae_mean": float(zoo.metrics["val_mae"].mean()),
                  "seconds": time.perf_counter() - t0}
    print("zoo", out["zoo"], flush=True)

    tid, _ = run_tokens(store, TokensConfig(width=64), zoo_id)
    ti = load_tokens_info(store, tid)
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, logging_level="WARNING",
             _temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    dcfg = DiffusionConfig(token_width=64, d_model=args.d_model, layers=args.layers, heads=4,
                           batch_size=32, lr=1e-3, ema_decay=0.99, train_steps=args.diff_steps)
    info: dict = {}
    did, _ = run_diffusion(store, dcfg, tid, 1, use_gpu=False, checkpoint_every=args.diff_steps,
                           log_every=max(1, args.diff_steps // 20), info=info)
    ray.shutdown()
    hist = store.read_json(did, "history.json")
    out["diffusion"] = {"L": ti.n_tokens, "C": ti.width, "D": ti.prompt_dim,
                        "denoiser_params": store.manifest(did).meta["denoiser_params"],
                        "train_steps": args.diff_steps, "tokens_per_s": info["tokens_per_s"],
                        "train_seconds": info["train_seconds"], "fit_seconds": info["fit_seconds"],
                        "loss_first": hist[0]["loss"], "loss_last": hist[-1]["loss"]}
    print("diffusion", out["diffusion"], flush=True)

    target = load_prepared(store, tgt_id)
    nodes = np.arange(target.num_nodes)
    prompts = prompts_for(store, tid, target)[nodes]
    den = load_denoiser(store, did)
    arch = zoo.model
    M, S = len(nodes), args.samples
    gen, timing = {}, {}
    for name, sampler, steps in (("ddpm", "ddpm", args.ddpm_steps), ("ddim", "ddim", args.ddim_steps)):
        secs = []
        for _ in range(args.repeats):
            gi: dict = {}
            gen[name] = generate_params(store, did, tid, prompts, sampler, steps, S, seed=0,
                                        denoiser=den, info=gi)
            secs.append(gi["sampling_seconds"])
        med = statistics.median(secs)
        timing[name] = {"steps": steps, "samples": M * S, "seconds": secs, "median_s": med,
                        "ms_per_sample": 1000 * med / (M * S), "decode_s": gi["decode_seconds"]}
        print(name, timing[name], flush=True)
    ddpm_seed1 = generate_params(store, did, tid, prompts, "ddpm", args.ddpm_steps, S, seed=1,
                                 denoiser=den)
    timing["ddim_speedup"] = timing["ddpm"]["median_s"] / timing["ddim"]["median_s"]
    out["sampling"] = timing

    std, mean = ti.stats.std, ti.stats.mean

    def dist(a, b):  # RMS distance in standardised units, per sample
        return float(np.sqrt((((a - b) / std) ** 2).mean()))

    out["param_distance_std_units"] = {
        "ddpm_vs_ddim_same_seed": dist(gen["ddpm"], gen["ddim"]),
        "ddpm_seed0_vs_seed1": dist(gen["ddpm"], ddpm_seed1),
        "ddpm_to_zoo_mean": dist(gen["ddpm"], mean),
        "ddim_to_zoo_mean": dist(gen["ddim"], mean),
        "zoo_models_to_zoo_mean": dist(zoo.params, mean),
    }
    # zero-shot accuracy on the target: best of S samples per node chosen on validation
    acc = {}
    for name, g in gen.items():
        val = np.stack([per_node_mae(target, g[:, s], arch, nodes, "val") for s in range(S)])
        best = g[np.arange(M), val.argmin(0)]
        acc[name] = {"val": scores(target, best, arch, nodes, "val"),
                     "test": scores(target, best, arch, nodes, "test"),
                     "test_sample0": scores(target, g[:, 0], arch, nodes, "test")}
    zmean = np.repeat(mean.astype(np.float32)[None], M, 0)
    acc["zoo_mean_params"] = {"val": scores(target, zmean, arch, nodes, "val"),
                              "test": scores(target, zmean, arch, nodes, "test")}
    same = zoo.params[np.argsort(np.asarray(zoo.metrics["node"]))][:M]  # zone m's bike model
    acc["same_zone_source_model"] = {"val": scores(target, same, arch, nodes, "val"),
                                     "test": scores(target, same, arch, nodes, "test")}
    out["zero_shot_target"] = acc
    out["notes"] = ("Tiny zoo and a denoiser trained for few steps on a busy 2-core machine: "
                    "the accuracy rows compare the two samplers on the same model, not GPDiff's "
                    "attainable accuracy.")
    print(json.dumps({k: out[k] for k in ("param_distance_std_units", "zero_shot_target")},
                     indent=1, default=float), flush=True)
    out["machine"]["loadavg_end"] = os.getloadavg()
    config = {k: v for k, v in vars(args).items() if k not in ("out", "repeats")}
    mode = "full" if all(v == ap.get_default(k) for k, v in config.items()) else "custom"  # full: the defaults
    path = write_result("diffusion_sampling", out, mode=mode, command=command_line(), config=config,
                        seeds=[0, 1], started=started, wall_s=time.perf_counter() - t_start, out=args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
