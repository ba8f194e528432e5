"""The zoo engine: validation-based selection, fine-tuning, a real Ray Train run into S3,
idempotence and resumption from shard artifacts and mid-shard checkpoints, a worker
SIGKILLed mid-epoch. Real data: nyc_bike cut small."""

from __future__ import annotations

import uuid
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from stgray.data.city import City, edges_from_dense, write_city
from stgray.data.prepare import PrepareConfig, load_prepared, prepare, prepare_to_store
from stgray.engines import ray_utils
from stgray.engines.zoo import (SHARD_KIND, ShardProgress, ZooConfig, finetune_nodes, load_zoo,
                                plan_shards, predict_nodes, run_zoo, train_models)
from stgray.eval.metrics import forecast_metrics
from stgray.nn.gpdiff.pernode import PerNodeArch, init_vectors, make_layout


def nyc_bike(datasets_dir, days: int, nodes: int | None = None) -> City:
    d = datasets_dir / "nyc_bike_taxi_zones"
    a = np.load(d / "201901-202012-NYCbike-inoutflow.npz")["arr_0"][: days * 24].astype(np.float32)
    adj = pd.read_csv(d / "W_adj_matrix.csv")
    ids, adj = list(adj.columns), adj.to_numpy(np.float32)
    if nodes:
        a, adj, ids = a[:, :nodes], adj[:nodes, :nodes], ids[:nodes]
    e, w = edges_from_dense(adj)
    return City(name="nyc_bike", series=a, start=pd.Timestamp("2019-01-01"), step_s=3600,
                features=["inflow", "outflow"], units=["trips/h", "trips/h"],
                aggregation=["sum", "sum"], edges=e, weights=w, node_ids=[str(i) for i in ids])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The test machine has 2 shared cores: 2 torch threads next to other work oversubscribe."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def small(datasets_dir):
    return prepare(nyc_bike(datasets_dir, days=30, nodes=8), PrepareConfig(), "source")


def test_selection_uses_validation_and_params_are_the_chosen_epoch(small):
    cfg = ZooConfig(model=PerNodeArch(arch="stgcn"), epochs=4, lr=3e-3, chunk_rows=12)
    nodes = np.array([5, 0, 3, 7, 1])
    res = train_models(small, nodes, cfg, device="cpu")
    assert res.info["chunks"] > 1  # several chunks exercised, results back in input order
    assert res.params.shape == (5, make_layout(cfg.model).n_params)
    np.testing.assert_array_equal(res.best_epoch, np.nanargmin(res.history_val, axis=1))
    np.testing.assert_allclose(res.val_mse, res.history_val[np.arange(5), res.best_epoch], rtol=1e-12)
    assert (res.best_epoch > 0).all() and np.isfinite(res.train_loss).all()
    # the kept parameters are the best epoch's: re-scoring them on validation gives its loss
    starts = small.window_starts("val", 12, 6)
    pred = predict_nodes(small, res.params, cfg.model, nodes, starts)
    _, true = small.windows(starts, 12, 6, normalised=False)
    err = pred - true[:, :, nodes]
    np.testing.assert_allclose((err ** 2).mean((0, 1)), res.val_mse, rtol=2e-4)
    np.testing.assert_allclose(np.abs(err).mean((0, 1)), res.val_mae, rtol=2e-4)
    # selecting on validation MAE instead: each kept epoch is the one of least MAE
    by_mae = train_models(small, nodes, cfg.model_copy(update={"select_on": "mae"}), device="cpu")
    np.testing.assert_array_equal(by_mae.history_val, res.history_val)  # same training
    pred = predict_nodes(small, by_mae.params, cfg.model, nodes, starts)
    np.testing.assert_allclose(np.abs(pred - true[:, :, nodes]).mean((0, 1)), by_mae.val_mae, rtol=2e-4)
    assert (by_mae.val_mae <= res.val_mae + 1e-9).all() and (by_mae.val_mse >= res.val_mse - 1e-9).all()
    # one model's result does not depend on which other models share its program
    alone = train_models(small, nodes[:1], cfg, device="cpu")
    np.testing.assert_allclose(alone.history_val[0, 0], res.history_val[0, 0], rtol=1e-6)


def test_finetune_keeps_init_when_no_epoch_beats_it(small):
    cfg = ZooConfig(model=PerNodeArch(arch="gwn"), epochs=1, lr=1e-3)
    nodes = np.array([2, 6])
    base = train_models(small, nodes, cfg, device="cpu")
    ft = finetune_nodes(small, base.params, cfg.model_copy(update={"lr": 1e-12}), epochs=1,
                        node_ids=nodes, return_result=True)
    # epoch 0 is the initialisation: with lr ~ 0, nothing beats it strictly -> kept as is
    assert (ft.best_epoch == 0).all()
    np.testing.assert_array_equal(ft.params, base.params)
    # and the scores agree with an independent evaluation
    starts = small.window_starts("val", 12, 6)
    pred = predict_nodes(small, ft.params, cfg, nodes, starts)
    _, true = small.windows(starts, 12, 6, normalised=False)
    m = forecast_metrics(pred, true[:, :, nodes], per_horizon=False)
    assert m["mae"] == pytest.approx(float(np.mean(ft.val_mae)), rel=1e-4)


def test_stopped_models_leave_the_program_with_the_same_results(small):
    cfg = ZooConfig(model=PerNodeArch(arch="stgcn"), epochs=8, lr=2e-2, patience=1, chunk_rows=12)
    nodes = np.array([5, 0, 3, 7, 1, 2, 6])
    kept = train_models(small, nodes, cfg, device="cpu", _compact=False)
    left = train_models(small, nodes, cfg, device="cpu")
    assert kept.info["models_at_end"] == 7 and left.info["models_at_end"] < 7  # it did shrink
    np.testing.assert_array_equal(left.best_epoch, kept.best_epoch)
    np.testing.assert_allclose(left.params, kept.params, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(left.val_mse, kept.val_mse, rtol=1e-5)
    # up to its stop every model's history is the same; after it, it is not scored
    stop = left.best_epoch + cfg.patience
    for i in range(len(nodes)):
        n = min(stop[i], left.epochs_run) + 1
        np.testing.assert_allclose(left.history_val[i, :n], kept.history_val[i, :n], rtol=1e-5)


class _Stop(Exception):
    pass


def test_cosine_schedule_changes_training_and_constant_is_the_default(small):
    cfg = ZooConfig(model=PerNodeArch(arch="stgcn"), epochs=2, lr=3e-3)
    assert cfg.lr_schedule == "constant"
    nodes = np.array([0, 3])
    const = train_models(small, nodes, cfg, device="cpu")
    cos = train_models(small, nodes, cfg.model_copy(update={"lr_schedule": "cosine"}), device="cpu")
    assert np.isfinite(cos.params).all() and not np.array_equal(cos.params, const.params)
    assert cos.history_val[:, 0].tolist() == const.history_val[:, 0].tolist()  # same start


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_mid_shard_checkpoint_resumes_bit_for_bit(small, tmp_path, schedule):
    """Training interrupted mid-epoch resumes from the last epoch checkpointed in the store
    (parameters, Adam, best-epoch bookkeeping, RNGs -- GWN's dropout draws too, the step
    size of a schedule) and ends exactly where an uninterrupted run ends; a torn checkpoint
    is not trusted."""
    from stgray.store import ArtifactStore

    st = ArtifactStore(str(tmp_path / "store"))
    cfg = ZooConfig(model=PerNodeArch(arch="gwn"), epochs=2, lr=3e-3, checkpoint_s=0, lr_schedule=schedule)
    nodes = np.array([6, 1, 4])
    ref = train_models(small, nodes, cfg, device="cpu")

    def stop(ep, step):
        if (ep, step) == (2, 2):
            raise _Stop

    with pytest.raises(_Stop):
        train_models(small, nodes, cfg, device="cpu", progress=ShardProgress(st, "zoo-shard/" + "a" * 16, 0),
                     _on_step=stop)
    prog = ShardProgress(st, "zoo-shard/" + "a" * 16, 0)
    assert prog.load()["epoch"] == 1
    res = train_models(small, nodes, cfg, device="cpu", progress=prog)
    assert res.info["resumed_from_epoch"] == 1  # epoch 1 not redone
    for k in ("params", "best_epoch", "val_mse", "train_loss", "history_val", "history_train"):
        np.testing.assert_array_equal(getattr(res, k), getattr(ref, k), err_msg=k)
    st.fs.pipe_file(prog.path, st.fs.cat_file(prog.path)[:200])  # torn: starts over
    assert prog.load() is None


def _import_small(store, datasets_dir) -> str:
    city = nyc_bike(datasets_dir, days=30, nodes=8)
    with store.writer("city", {"test": "nyc_bike 30d 8 nodes"}, label=city.name) as w:
        write_city(w, city)
    return prepare_to_store(store, w.id, PrepareConfig(), "source")[0]


@pytest.fixture(scope="module")
def zoo_run(ray_session, s3_server, datasets_dir):
    """One fault-free zoo run on Ray Train into S3 (2 workers, 2 shards of 4 nodes)."""
    from stgray.store import ArtifactStore

    store = ArtifactStore(f"s3://{s3_server.bucket}/zoo-{uuid.uuid4().hex[:10]}")
    pid = _import_small(store, datasets_dir)
    cfg = ZooConfig(model=PerNodeArch(arch="stgcn"), epochs=2, lr=1e-3, nodes_per_shard=4,
                    num_workers=2, use_gpu="auto", max_failures=1)
    info: dict = {}
    zid, skipped = run_zoo(store, cfg, [pid], info=info)
    return SimpleNamespace(store=store, pid=pid, cfg=cfg, zid=zid, skipped=skipped, info=info,
                           files={k: f.sha256 for k, f in store.manifest(zid).files.items()})


def test_run_zoo_on_ray_into_s3_skips_and_resumes(zoo_run):
    store, pid, cfg, zid, info = zoo_run.store, zoo_run.pid, zoo_run.cfg, zoo_run.zid, zoo_run.info
    shards = plan_shards(store, cfg, [pid])
    assert [(s.lo, s.hi) for s in shards] == [(0, 4), (4, 8)]

    assert not zoo_run.skipped and info["shards_trained"] == 2 and info["shards_done_before"] == 0
    z = load_zoo(store, zid)
    assert z.params.shape == (8, 16_960) and z.params.dtype == np.float32
    assert z.layout.arch_hash == make_layout(cfg.model).arch_hash
    assert z.metrics["node"].tolist() == list(range(8))
    assert set(z.metrics.columns) >= {"city", "node", "arch", "val_mae", "val_rmse", "train_loss",
                                      "best_epoch"}
    assert z.metrics["best_epoch"].between(0, 2).all() and np.isfinite(z.metrics["val_mae"]).all()
    assert z.splits[pid]["splits"]["train"] == [0, 576]
    m = store.manifest(zid)
    assert sorted(m.inputs) == sorted(s.id for s in shards)
    # Ray's run state lives in the store, under the run name derived from the zoo key
    fs, root = store.arrow_fs()
    import pyarrow.fs as pafs
    assert fs.get_file_info(f"{root}/{ray_utils.RAY_DIR}/{info['ray_run']}").type != pafs.FileType.NotFound
    # stored parameters reproduce the stored validation MAE
    p = load_prepared(store, pid)
    starts = p.window_starts("val", 12, 6)
    pred = predict_nodes(p, z.params, z.model, z.metrics["node"].to_numpy(), starts)
    _, true = p.windows(starts, 12, 6, normalised=False)
    np.testing.assert_allclose(np.abs(pred - true).mean((0, 1)), z.metrics["val_mae"], rtol=2e-4)

    # the same call again: skipped, nothing trained
    info2: dict = {}
    assert run_zoo(store, cfg, [pid], info=info2) == (zid, True)
    assert info2["shards_trained"] == 0
    # an execution-only change (workers) names the same artifact
    assert run_zoo(store, cfg.model_copy(update={"num_workers": 1}), [pid]) == (zid, True)

    # resume: the zoo manifest is gone, the shards stay -> no shard retrained
    before = {s.id: store.manifest(s.id) for s in shards}
    store.fs.rm(f"{store._dir(zid)}/MANIFEST.json")
    assert not store.exists(zid)
    info3: dict = {}
    assert run_zoo(store, cfg, [pid], info=info3) == (zid, False)
    assert info3["shards_trained"] == 0 and info3["shards_done_before"] == 2
    for s in shards:
        after = store.manifest(s.id)
        assert after.created == before[s.id].created and after.files == before[s.id].files
    np.testing.assert_array_equal(load_zoo(store, zid).params, z.params)
    assert len(store.ls(SHARD_KIND)) == 2


def test_zoo_worker_killed_mid_epoch_resumes_from_store(zoo_run, s3_server, datasets_dir, tmp_path):
    """Issue 7.1: the worker training the second shard is SIGKILLed mid-epoch 2. Ray Train
    (FailureConfig) restarts the worker group; the first shard, already committed, is not
    retrained and the second resumes after epoch 1 from its checkpoint in S3. The zoo is
    the fault-free run's, bit for bit (same id, same objects)."""
    from stgray.store import ArtifactStore

    store = ArtifactStore(f"s3://{s3_server.bucket}/zoo-fault-{uuid.uuid4().hex[:10]}")
    pid = _import_small(store, datasets_dir)
    assert pid == zoo_run.pid
    # one worker: shard 0 in round 0, shard 1 in round 1; execution-only changes, same zoo id
    cfg = zoo_run.cfg.model_copy(update={"num_workers": 1, "checkpoint_s": 0})
    shards = plan_shards(store, cfg, [pid])
    fired = tmp_path / "fault-fired"
    fault = {"shard": shards[1].id, "epoch": 2, "step": 1, "mode": "kill", "once_file": str(fired)}
    info: dict = {}
    zid, skipped = run_zoo(store, cfg, [pid], info=info, _fault=fault)
    assert fired.exists() and not skipped and zid == zoo_run.zid
    assert info["shards_trained"] == 2

    # resumed, not redone: shard 0 was written once (one attempt folder) before the kill;
    # shard 1 went on after epoch 1 and wrote once; its scratch checkpoint is gone
    metas = [store.manifest(s.id).meta for s in shards]
    assert [m["resumed_from_epoch"] for m in metas] == [0, 1]
    assert [m["epochs_run"] for m in metas] == [2, 2]
    for s in shards:
        attempts = [p for p in store.fs.ls(store._dir(s.id), detail=False)
                    if not p.endswith("MANIFEST.json")]
        assert len(attempts) == 1, attempts
    assert not store.fs.exists(ShardProgress(store, shards[1].id).path)

    # the same artifact as without the fault: every object equal, metrics equal
    assert {k: f.sha256 for k, f in store.manifest(zid).files.items()} == zoo_run.files
    a, b = load_zoo(store, zid), load_zoo(zoo_run.store, zoo_run.zid)
    assert a.params.shape == b.params.shape == (8, 16_960)
    assert a.metrics["node"].tolist() == b.metrics["node"].tolist() == list(range(8))
    np.testing.assert_array_equal(a.params, b.params)
    np.testing.assert_array_equal(a.metrics["val_mae"], b.metrics["val_mae"])
    print(f"val MAE mean with fault {a.metrics['val_mae'].mean():.6f}, "
          f"without {b.metrics['val_mae'].mean():.6f}")


def test_run_configs_carry_no_credentials(s3_store, s3_server):
    """Issue 7.6: what the engines hand Ray Train (run config, runtime env, the pickled
    storage filesystem) holds no key; workers take credentials from their own node."""
    import pickle

    from stgray.engines import common

    for rc in (ray_utils.run_config(s3_store, "zoo-x", max_failures=1),
               common.run_config(s3_store, "stgp-x", 1)):
        assert not (getattr(rc, "worker_runtime_env", None) or {}).get("env_vars")
        blob = pickle.dumps(rc)
        assert s3_server.secret_key.encode() not in blob
        assert s3_server.access_key.encode() not in blob


def test_tod_mean_baseline_is_cross_fitted_and_added_to_the_output(small):
    from stgray.data.prepare import seasonal_baseline

    plain = PerNodeArch(arch="stgcn")
    seasonal = plain.model_copy(update={"baseline": "tod_mean"})
    # an option added later: off, it leaves every existing artefact name as it was
    assert "baseline" not in plain.hashed_dict() and seasonal.layout_name != plain.layout_name
    base = seasonal_baseline(small)
    lo, hi = small.splits["train"]
    t = lo + 5 * small.steps_per_day + 7  # a train step
    same = np.arange(lo, hi)[small.tod[lo:hi] == small.tod[t]]  # train steps at t's time of day
    others = same[same != t]
    assert len(others) >= 2
    np.testing.assert_allclose(base[t], small.x[others].mean(0), rtol=1e-5, atol=1e-6)
    v = small.splits["val"][0] + 3  # outside train: mean of all train days
    at_v = np.arange(lo, hi)[small.tod[lo:hi] == small.tod[v]]
    np.testing.assert_allclose(base[v], small.x[at_v].mean(0), rtol=1e-5, atol=1e-6)
    # the head starts at zero: the untrained model forecasts the baseline itself
    nodes = np.array([1, 4])
    starts = small.window_starts("val", 12, 6)
    init = init_vectors(seasonal, [3, 4])
    layout = make_layout(seasonal)
    assert not layout.unflatten(init)["fully.weight"].any() and init.abs().sum() > 0
    pred = predict_nodes(small, init, seasonal, nodes, starts)
    steps = starts[:, None] + 12 + np.arange(6)[None]
    np.testing.assert_allclose(pred, small.denormalise(base[steps][:, :, nodes]), rtol=1e-5, atol=1e-4)
    # the baseline enters through a learned per-horizon weight (starts at 1)
    w = layout.unflatten(init)["baseline_weight"]
    assert w.shape == (2, 6) and bool((w == 1).all())
    off = next(e.offset for e in layout.entries if e.name == "baseline_weight")
    half = init.clone()
    half[:, off:off + 6] = 0.5
    np.testing.assert_allclose(predict_nodes(small, half, seasonal, nodes, starts),
                               small.denormalise(0.5 * base[steps][:, :, nodes]), rtol=1e-5, atol=1e-4)
    # training scores the same forecasts at epoch 0, and gradients reach the zero head
    res = train_models(small, nodes, ZooConfig(model=seasonal, epochs=1, lr=3e-3), init=init,
                       device="cpu")
    _, true = small.windows(starts, 12, 6, normalised=False)
    np.testing.assert_allclose(res.history_val[:, 0], ((pred - true[:, :, nodes]) ** 2).mean((0, 1)),
                               rtol=1e-4)
    assert np.isfinite(res.history_val).all() and (res.history_val[:, 1] != res.history_val[:, 0]).all()
