"""Cross-city transfer accuracy, leave one city out (../shared/docs/benchmark.md section 1):
each of the four flow cities in turn is the target, the other three are its sources, and
every method's row comes from the same pipeline run on the same data and split.

    .venv/bin/python -m bench.loo --mode smoke     # configs/loo-smoke.yaml: one target, tiny
                                                   # sizes, 1 seed (minutes; shape only)
    .venv/bin/python -m bench.loo --mode quick     # configs/loo-quick.yaml: the quick start's
                                                   # sizes, 4 targets x 3 seeds (~2-3 h idle)
    .venv/bin/python -m bench.loo --mode full      # configs/loo.yaml: 4 targets x 3 seeds,
                                                   # whole zoos (many hours)
    .venv/bin/python -m bench.loo --mode quick --targets nyc_bike hangzhou_metro --seeds 0
    .venv/bin/python -m bench.loo --mode quick --stages prepare zoo tokens diffusion gpdiff baselines report

One ``PipelineConfig`` per target (the config file's settings, ``sources`` = the other
cities) is run with ``stgray.pipeline.run_pipeline`` in one process and one Ray; stages
are content-addressed artifacts in ``--store`` (default ``$STGRAY_STORE`` or
./stgray-store), so whatever an earlier run (or another target) already computed -- the
source cities' prepared data and zoo shards, a seed already done -- is reused, and an
interrupted run resumes (quick and full: run the same command again after an
interruption; only the missing stages are computed). Rows: the pipeline's results rows
(test metrics, de-normalised; every choice made on validation), aggregated over seeds
(mean and sample std). Default targets: every city of the config (smoke: the first).
Results go to bench/results/loo.json (quick: loo_quick.json, smoke: loo_smoke.json; the
quick plan of ``bench.run`` passes ``--out bench/results/quick/loo_smoke.json``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import command_line, machine_info, now_iso, start_ray, write_result  # noqa: E402

CONFIGS = {"smoke": "configs/loo-smoke.yaml", "quick": "configs/loo-quick.yaml", "full": "configs/loo.yaml"}
OUT = {"smoke": "loo_smoke", "quick": "loo_quick", "full": "loo"}

#: The rows benchmark.md asks for, and the pipeline's method names that provide them.
EXPECTED_ROWS = [
    ("forecast", "historical average", ["historical average"]),
    ("forecast", "last-value persistence", ["persistence"]),
    ("forecast", "target-only training from scratch", ["target-only per-node (scratch)"]),
    ("forecast", "pooled source model, fine-tuned on the target", ["pooled sources + fine-tune"]),
    ("forecast", "GPDiff zero-shot", ["GPDiff zero-shot"]),
    ("forecast", "GPDiff few-shot", ["GPDiff few-shot"]),
    ("forecast", "STGP (pre-train + domain + task prompts)", ["STGP (domain + task prompts)"]),
    ("forecast", "STGP full fine-tune", ["STGP full fine-tune"]),
    ("kriging", "neighbour mean (baseline)", ["neighbour mean"]),
    ("kriging", "STGP (pre-train + domain + task prompts)", ["STGP (domain + task prompts)"]),
    ("kriging", "STGP full fine-tune", ["STGP full fine-tune"]),
    ("extrapolation", "neighbour historical average (baseline)", ["neighbour historical average"]),
    ("extrapolation", "STGP (pre-train + domain + task prompts)", ["STGP (domain + task prompts)"]),
    ("extrapolation", "STGP full fine-tune", ["STGP full fine-tune"]),
]


def load_loo_config(path: str) -> tuple[list[str], dict]:
    """(cities, the pipeline settings shared by every target) from a LOO config file."""
    from stgray.config import read_config_file
    from stgray.errors import ConfigError

    data = read_config_file(path)
    if not isinstance(data, dict) or not isinstance(data.get("cities"), list) or len(data["cities"]) < 2:
        raise ConfigError("needs 'cities': a list of at least two cities", where=path, field="cities")
    data = dict(data)
    cities = [str(c) for c in data.pop("cities")]
    for k in ("sources", "target"):
        if k in data:
            raise ConfigError("set by the leave-one-out loop; remove it", where=path, field=k)
    return cities, data


def target_config(base: dict, cities: list[str], target: str, *, store: str | None,
                  seeds: list[int] | None, where: str, stages: list[str] | None = None):
    from stgray.pipeline import PipelineConfig

    d = {**base, "name": f"{base.get('name', 'loo')}-{target}", "target": target,
         "sources": [c for c in cities if c != target]}
    if store:
        d["store"] = store
    if seeds is not None:
        d["seeds"] = seeds
    if stages:
        d["stages"] = stages
    return PipelineConfig.from_mapping(d, where=where)


def _test_split(store_url: str, stages: list[dict]) -> dict | None:
    from stgray.store import ArtifactStore

    st = ArtifactStore(store_url)
    for r in stages:
        if r["stage"] == "prepare" and r["what"].endswith("(target)"):
            m = st.manifest(r["artifact"])
            stats = st.read_json(r["artifact"], "stats.json", m)
            return {"splits": stats["splits"], "step_s": stats["step_s"], "start": stats["start"],
                    "unobserved_nodes": len(stats["unobserved"])}
    return None


def coverage(rows: list[dict], targets: list[str]) -> list[dict]:
    """For each expected row (benchmark.md) and target: present or missing."""
    out = []
    for task, label, methods in EXPECTED_ROWS:
        for t in targets:
            have = [r for r in rows if r["target"] == t and r["task"] == task and r["method"] in methods]
            out.append({"target": t, "task": task, "row": label, "present": bool(have),
                        "seeds": len({str(r.get("seed")) for r in have})})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=list(CONFIGS), default="quick")
    ap.add_argument("--config", help="LOO config (default: configs/loo-smoke.yaml / loo-quick.yaml / loo.yaml)")
    ap.add_argument("--targets", nargs="*", help="targets to run (default: smoke the first city, "
                                                 "quick and full all cities)")
    ap.add_argument("--seeds", type=int, nargs="*", help="override the config's seeds")
    ap.add_argument("--stages", nargs="*", help="override the config's stages (e.g. GPDiff only: "
                                                "prepare zoo tokens diffusion gpdiff baselines report)")
    ap.add_argument("--store", default=None, help="store URL (default $STGRAY_STORE or ./stgray-store)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TQDM_DISABLE", "1")
    from stgray.eval.report import aggregate_rows, results_markdown
    from stgray.pipeline import run_pipeline

    path = a.config or CONFIGS[a.mode]
    cities, base = load_loo_config(str(REPO / path) if not os.path.isabs(path) else path)
    targets = a.targets or (cities[:1] if a.mode == "smoke" else cities)
    bad = [t for t in targets if t not in cities]
    if bad:
        ap.error(f"targets {bad} are not among the config's cities {cities}")
    store = a.store or os.environ.get("STGRAY_STORE") or str(REPO / "stgray-store")
    cfgs = {t: target_config(base, cities, t, store=store, seeds=a.seeds, where=path, stages=a.stages)
            for t in targets}
    seeds = list(next(iter(cfgs.values())).seeds)
    machine = machine_info()
    started, t0 = now_iso(), time.perf_counter()
    per_target, rows, failed = {}, [], []
    start_ray()  # run_pipeline's own ensure_ray then finds it running
    for t, cfg in cfgs.items():
        print(f"[loo] target {t} <- sources {cfg.sources}, seeds {cfg.seeds}", flush=True)
        t1, la = time.perf_counter(), os.getloadavg()
        try:
            res = run_pipeline(cfg)
        except Exception as e:  # keep the other targets' rows; say what failed
            failed.append({"target": t, "error": f"{type(e).__name__}: {e}",
                           "traceback": traceback.format_exc().splitlines()[-12:]})
            print(f"[loo] target {t} FAILED: {type(e).__name__}: {e}", flush=True)
            continue
        secs = time.perf_counter() - t1
        rows += res["rows"]
        computed = sum(r["seconds"] for r in res["stages"] if r["status"] == "done")
        per_target[t] = {"sources": cfg.sources, "config_hash": cfg.config_hash(), "wall_s": secs,
                         "computed_s": computed, "loadavg_start": la, "loadavg_end": os.getloadavg(),
                         "report": res.get("report"), "test": _test_split(res["store"], res["stages"]),
                         "stages": res["stages"]}
        print(f"[loo] target {t}: {secs:.0f} s ({computed:.0f} s computed, the rest found in the store)",
              flush=True)
        print(results_markdown(res["rows"]), flush=True)
    agg = aggregate_rows(rows)
    config = {"config_file": path, "base": base, "cities": cities, "targets": targets, "seeds": seeds,
              **({"stages": a.stages} if a.stages else {})}
    out = {"machine": machine, "config": config, "store": store, "targets": per_target, "rows": rows,
           "aggregate": agg, "coverage": coverage(rows, list(per_target)), "failed": failed,
           "load_note": "shared 2-core machine: other sessions ran tests at the same time; "
                        "per-target load averages are recorded",
           "protocol": "target: days 1-3 train, 4-6 validation, test = the next "
                       f"{base.get('prepare', {}).get('target_test_days', 14)} days (cap); sources: "
                       "whole series, 80/20 train/validation; hourly; 12 steps in, 6 out; kriging "
                       "and extrapolation on a fixed seeded 30% of target nodes; metrics on "
                       "de-normalised values, MAPE over non-zero truths; test touched once."}
    p = write_result(OUT[a.mode] if not a.out else Path(a.out).stem, out, mode=a.mode,
                     command=command_line(argv, "bench.loo"), config=config, seeds=seeds,
                     started=started, wall_s=time.perf_counter() - t0, out=a.out)
    print(f"wrote {p}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
