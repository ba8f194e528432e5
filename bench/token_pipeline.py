"""Token pipeline: rows/s and MB/s from an S3 store (a real SeaweedFS server on loopback)
through Ray Data ``read_parquet -> select_columns -> iter_torch_batches`` into torch
tensors, against a plain pyarrow read of the same objects from the same server.

    .venv/bin/python bench/token_pipeline.py                 # 5,000 STGCN rows
    .venv/bin/python bench/token_pipeline.py --rows 2000     # quick
    .venv/bin/python bench/token_pipeline.py --rows 500 --repeats 1 --batch 256   # smoke

Steps:
  1. a synthetic zoo of ``--rows`` STGCN-sized models (P = 16,960; parameters drawn with
     the zoo's own initialisation rule) over ``--rows / 500`` synthetic cities of 500
     nodes, written to the store in the zoo's format (streamed, row groups of 256);
  2. the ``tokens`` stage on it (width 64 -> L = 265 tokens, shards of ``--shard-rows``):
     rows/s and peak RSS of this process;
  3. reads of the shards' ``tokens`` + ``prompt`` columns, alternating
     pyarrow / stgray's own path (``engines.diffusion.build_dataset`` + ``token_collate``:
     the legacy datasource and an Arrow collate function; this row is the target's) /
     Ray Data (2.60's default Parquet datasource, default collation) / Ray Data with the
     legacy datasource and default collation, ``--repeats`` times per batch size after one warm-up of each (Ray's first
     run also starts its worker processes). Ray Data builds a new dataset every repeat (a
     new streaming execution from S3, as in every uncached training epoch). Times run
     from the start of the read to the last batch in hand; Ray's time to the first batch
     is recorded too.
Payload MB/s counts the float32 tensors delivered (rows x (L*C + D) x 4 bytes); stored
MB/s counts the (zstd) object bytes. Medians and the Ray/pyarrow ratio of medians.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import command_line, now_iso, write_result  # noqa: E402

from stgray.data.city import CITY_KIND, City, edges_from_dense, write_city  # noqa: E402
from stgray.data.prepare import PrepareConfig, prepare_to_store  # noqa: E402
from stgray.engines.tokens import TokensConfig, load_tokens_info, run_tokens  # noqa: E402
from stgray.nn.gpdiff.pernode import PerNodeArch, init_vectors, make_layout  # noqa: E402
from stgray.store import ArtifactStore  # noqa: E402
from stgray.store.seaweed import SeaweedS3  # noqa: E402

COLUMNS = ("tokens", "prompt")


def synthetic_city(name: str, nodes: int, days: int, seed: int) -> City:
    """Hourly daily-cycle Poisson flows on a ring graph with a few random chords."""
    rng = np.random.default_rng(seed)
    t = np.arange(days * 24)
    base = 5 + 4 * np.sin(2 * np.pi * (t[:, None] % 24) / 24 + rng.uniform(0, 6, nodes))
    series = rng.poisson(np.maximum(base * rng.uniform(0.5, 2, nodes), 0.1)).astype(np.float32)
    adj = np.zeros((nodes, nodes), np.float32)
    for i in range(nodes):
        adj[i, (i + 1) % nodes] = adj[(i + 1) % nodes, i] = 1.0
    for i, j in rng.integers(0, nodes, (nodes // 4, 2)):
        adj[i, j] = 1.0
    e, w = edges_from_dense(adj, drop_self_loops=True)
    return City(name=name, series=series[:, :, None], start=pd.Timestamp("2024-01-01"), step_s=3600,
                features=["flow"], units=["n/h"], aggregation=["sum"], edges=e, weights=w,
                node_ids=[str(i) for i in range(nodes)])


def write_synthetic_zoo(store, rows: int, per_city: int = 500, seed: int = 0) -> str:
    """A ``zoo`` artifact in the zoo engine's format, written in row groups of 256."""
    arch = PerNodeArch()
    layout = make_layout(arch)
    P = layout.n_params
    cities = []
    for c in range(-(-rows // per_city)):
        n = min(per_city, rows - c * per_city)
        city = synthetic_city(f"syn{c:02d}", n, days=14, seed=seed + c)
        with store.writer(CITY_KIND, {"bench-synthetic": city.name, "n": n, "seed": seed + c},
                          label=city.name, meta=city.summary()) as w:
            write_city(w, city)
        pid, _ = prepare_to_store(store, w.id, PrepareConfig(), "source")
        cities.append((city.name, pid, n))
    schema = pa.schema([("city", pa.string()), ("prepared_id", pa.string()), ("node", pa.int64()),
                        ("arch", pa.string()), ("params", pa.list_(pa.float32(), P)),
                        ("val_mae", pa.float64()), ("val_rmse", pa.float64()),
                        ("val_mse", pa.float64()), ("train_loss", pa.float64()),
                        ("best_epoch", pa.int32())])
    lj = json.loads(layout.to_json())
    lj.update(arch_hash=layout.arch_hash, n_params=P)
    with store.writer("zoo", {"bench-synthetic-zoo": rows, "seed": seed, "arch": layout.arch_hash},
                      label=f"synthetic zoo {rows}", meta={"models": rows, "n_params": P}) as w:
        with w.open("zoo.parquet") as f, pq.ParquetWriter(f, schema, compression="zstd") as pw:
            for ci, (name, pid, n) in enumerate(cities):
                for lo in range(0, n, 256):
                    k = min(256, n - lo)
                    vec = init_vectors(arch, [(seed * 1000 + ci) * 100_000 + i for i in range(lo, lo + k)])
                    one = np.ones(k)
                    pw.write_batch(pa.record_batch([
                        pa.array([name] * k), pa.array([pid] * k), pa.array(np.arange(lo, lo + k)),
                        pa.array([layout.arch] * k),
                        pa.FixedSizeListArray.from_arrays(pa.array(vec.numpy().reshape(-1)), P),
                        pa.array(one), pa.array(one), pa.array(one), pa.array(one),
                        pa.array(np.ones(k, np.int32))], schema=schema))
        w.put_bytes("layout.json", json.dumps(lj).encode())
        w.put_json("splits.json", {pid: store.read_json(pid, "stats.json") for _, pid, _ in cities})
    return w.id


def _fixed(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), arr.type.list_size)


def read_pyarrow(fs, paths: list[str], batch: int) -> tuple[int, float]:
    """Plain pyarrow: each shard streamed in record batches -> torch tensors."""
    t0, rows = time.perf_counter(), 0
    for p in paths:
        with fs.open_input_file(p) as f:
            for b in pq.ParquetFile(f).iter_batches(batch_size=batch, columns=list(COLUMNS)):
                tok = torch.from_numpy(_fixed(b.column(0)))
                pr = torch.from_numpy(_fixed(b.column(1)))
                rows += tok.shape[0]
                assert pr.shape[0] == tok.shape[0]
    return rows, time.perf_counter() - t0


def read_ray(fs, paths: list[str], batch: int, v2: bool = True) -> tuple[int, float, float]:
    """Ray Data: a fresh dataset (new streaming execution) -> iter_torch_batches.

    ``v2``: Ray 2.60's default Parquet datasource (ListFiles -> ReadFiles operators);
    False: the legacy one (``DataContext.use_datasource_v2 = False``). Returns rows,
    seconds and seconds to the first batch."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    old = ctx.use_datasource_v2
    ctx.use_datasource_v2 = v2
    try:
        t0, rows, first = time.perf_counter(), 0, None
        ds = ray.data.read_parquet(paths, filesystem=fs).select_columns(list(COLUMNS))
        for b in ds.iter_torch_batches(batch_size=batch, dtypes={c: torch.float32 for c in COLUMNS}):
            if first is None:
                first = time.perf_counter() - t0
            rows += b["tokens"].shape[0]
        return rows, time.perf_counter() - t0, first
    finally:
        ctx.use_datasource_v2 = old


def read_stgray(store, ti, batch: int) -> tuple[int, float, float]:
    """What the diffusion stage does: ``build_dataset`` (legacy Parquet datasource, no
    cache) -> ``iter_torch_batches(collate_fn=token_collate())``."""
    from stgray.engines.diffusion import build_dataset, token_collate

    t0, rows, first = time.perf_counter(), 0, None
    ds = build_dataset(store, ti, cache=False)
    for b in ds.iter_torch_batches(batch_size=batch, collate_fn=token_collate()):
        if first is None:
            first = time.perf_counter() - t0
        rows += b["tokens"].shape[0]
    return rows, time.perf_counter() - t0, first


def peak_rss_mb() -> float:
    """Peak RSS of this process in MiB (ru_maxrss is KiB on Linux; the key says mb for history)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--shard-rows", type=int, default=1024)
    ap.add_argument("--batch", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "token_pipeline.json"))
    args = ap.parse_args()
    started, t_start = now_iso(), time.perf_counter()
    torch.set_num_threads(1)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import pyarrow
    import ray

    out: dict = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                             "cores": os.cpu_count(), "loadavg_start": os.getloadavg(),
                             "versions": {"ray": ray.__version__, "pyarrow": pyarrow.__version__,
                                          "torch": torch.__version__}},
                 "args": vars(args)}
    work = Path(tempfile.mkdtemp(prefix="tokbench"))
    srv = SeaweedS3(work / "seaweed").start()
    os.environ.update(srv.env())
    try:
        store = ArtifactStore(f"s3://{srv.bucket}/bench-{uuid.uuid4().hex[:8]}")
        t0 = time.perf_counter()
        zoo_id = write_synthetic_zoo(store, args.rows)
        zoo_s = time.perf_counter() - t0
        zoo_bytes = store.manifest(zoo_id).files["zoo.parquet"].size
        print(f"zoo: {args.rows} rows, {zoo_bytes / 1e6:.0f} MB in {zoo_s:.1f} s", flush=True)
        gc.collect()
        rss0 = peak_rss_mb()
        info: dict = {}
        t0 = time.perf_counter()
        tid, _ = run_tokens(store, TokensConfig(width=64, rows_per_shard=args.shard_rows), zoo_id,
                            info=info)
        tok_s = time.perf_counter() - t0
        ti = load_tokens_info(store, tid)
        shard_bytes = sum(ti.manifest.files[n].size for n in ti.shards)
        out["tokens_stage"] = {"rows": ti.rows, "P": ti.param_layout.n_params, "L": ti.n_tokens,
                               "C": ti.width, "D": ti.prompt_dim, "shards": len(ti.shards),
                               "zoo_mb": zoo_bytes / 1e6, "shards_mb": shard_bytes / 1e6,
                               "seconds": tok_s, "rows_per_s": ti.rows / tok_s, "phases_s": info,
                               "peak_rss_mb_before": rss0, "peak_rss_mb_after": peak_rss_mb()}
        print(json.dumps(out["tokens_stage"], default=float), flush=True)

        ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False,
                 _temp_dir=str(Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))),
                 logging_level="WARNING")
        ray.data.DataContext.get_current().enable_progress_bars = False
        fs, _ = store.arrow_fs()
        paths = ti.shard_paths
        payload = ti.rows * (ti.n_tokens * ti.width + ti.prompt_dim) * 4
        res = {}
        readers = {"pyarrow": lambda b: (*read_pyarrow(fs, paths, b), None),
                   "stgray": lambda b: read_stgray(store, ti, b),
                   "ray_data": lambda b: read_ray(fs, paths, b, v2=True),
                   "ray_data_legacy_datasource": lambda b: read_ray(fs, paths, b, v2=False)}
        for bs in args.batch:
            for fn in readers.values():  # warm-ups (Ray: starts its worker processes)
                fn(bs)
            times = {k: [] for k in readers}
            firsts = {k: [] for k in readers}
            for _ in range(args.repeats):
                for name, fn in readers.items():
                    n, s, first = fn(bs)
                    assert n == ti.rows, (name, n)
                    times[name].append(s)
                    firsts[name].append(first)
            r = {}
            for name, ts in times.items():
                med = statistics.median(ts)
                r[name] = {"seconds": ts, "median_s": med, "rows_per_s": ti.rows / med,
                           "payload_mb_per_s": payload / med / 1e6,
                           "stored_mb_per_s": shard_bytes / med / 1e6}
                if firsts[name][0] is not None:
                    r[name]["first_batch_s"] = firsts[name]
            for name in readers:
                if name != "pyarrow":
                    r[name]["over_pyarrow"] = r[name]["rows_per_s"] / r["pyarrow"]["rows_per_s"]
            res[str(bs)] = r
            print(f"batch {bs}: " + ", ".join(
                f"{k} {v['rows_per_s']:.0f} rows/s ({v['payload_mb_per_s']:.0f} MB/s"
                + (f", {100 * v['over_pyarrow']:.0f}%" if "over_pyarrow" in v else "") + ")"
                for k, v in r.items()), flush=True)
        out["reads"] = res
        out["payload_mb"] = payload / 1e6
        out["target"] = "Ray Data >= 70% of pyarrow rows/s"
        out["meets_target"] = {bs: r["stgray"]["over_pyarrow"] >= 0.7 for bs, r in res.items()}
        ray.shutdown()
    finally:
        srv.stop()
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    out["machine"]["loadavg_end"] = os.getloadavg()
    config = {k: v for k, v in vars(args).items() if k != "out"}
    mode = "full" if all(v == ap.get_default(k) for k, v in config.items()) else "custom"  # full: the defaults
    path = write_result("token_pipeline", out, mode=mode, command=command_line(), config=config, seeds=[0],
                        started=started, wall_s=time.perf_counter() - t_start, out=args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
