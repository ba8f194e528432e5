"""STGP stages on a real city pair through Ray Train and the S3 store."""

from __future__ import annotations

import math
import os

import pytest
import torch

from stgray.data.ingest import import_city
from stgray.data.prepare import PrepareConfig, prepare_to_store
from stgray.engines.stgp import (STGPPretrainConfig, STGPPromptConfig, frozen_fingerprint, hourly_model,
                                 load_pretrained, run_stgp_domain, run_stgp_pretrain, run_stgp_task)
from stgray.engines.common import TRAINING_SPINCOUNT, jemalloc_path, tensors_from_bytes, training_env
from stgray.nn import mkl_dispatch

TINY = hourly_model(d_model=32, ffn_dim=64, temporal_depth=1, spatial_depth=1, decoder_blocks=1,
                    decoder_channels=16, skip_channels=16, head_hidden=32, domain_prompts=4, task_prompts=4)


@pytest.fixture(scope="module")
def prepared_pair(tmp_path_factory):
    """nyc_taxi (source) and nyc_bike (target), prepared once in a local store."""
    from stgray.store import ArtifactStore

    st = ArtifactStore(str(tmp_path_factory.mktemp("stgp") / "store"))
    src, _, _ = import_city(st, "nyc_taxi")
    tgt, _, _ = import_city(st, "nyc_bike")
    ps, _ = prepare_to_store(st, src, PrepareConfig(), "source")
    pt, _ = prepare_to_store(st, tgt, PrepareConfig(), "target")
    return st, ps, pt


def test_pretrain_prompt_all_tasks(ray_session, prepared_pair, s3_store):
    local, ps, pt = prepared_pair
    # copy the prepared artifacts into S3 by preparing there too (content-addressed: same ids)
    src, _, _ = import_city(s3_store, "nyc_taxi")
    tgt, _, _ = import_city(s3_store, "nyc_bike")
    assert prepare_to_store(s3_store, src, PrepareConfig(), "source")[0] == ps
    assert prepare_to_store(s3_store, tgt, PrepareConfig(), "target")[0] == pt

    cfg = STGPPretrainConfig(model=TINY, epochs=2, steps_per_epoch=4, batch_size=4, num_workers=2)
    pid, skipped = run_stgp_pretrain(s3_store, cfg, [ps])
    assert not skipped
    hist = s3_store.read_json(pid, "history.json")
    assert [h["epoch"] for h in hist] == [0, 1] and all(math.isfinite(h["val_loss"]) for h in hist)
    # every worker's own peak memory, gathered per epoch (bench.stgp_scaling sums them)
    assert all(len(h["worker_peak_rss_gb"]) == 2 and all(0.1 < g < 20 for g in h["worker_peak_rss_gb"])
               for h in hist)
    # MKL's AVX-512 dispatch (AMD CPUs with AVX-512) is live in the Ray Train workers too
    amd512 = mkl_dispatch.applies()
    assert all(h["worker_mkl_avx512"] == [amd512, amd512] for h in hist)
    # the workers start with the training environment: Ray's jemalloc, a short OpenMP spin
    env = training_env()
    assert env["GOMP_SPINCOUNT"] == os.environ.get("GOMP_SPINCOUNT", TRAINING_SPINCOUNT)
    alloc = "jemalloc" if "LD_PRELOAD" in env else "system"
    assert alloc == "jemalloc" or not jemalloc_path() or os.environ.get("STGRAY_JEMALLOC") == "0"
    assert all(h["worker_allocator"] == [alloc, alloc] for h in hist)
    assert all(h["worker_gomp_spincount"] == [env["GOMP_SPINCOUNT"]] * 2 for h in hist)
    assert run_stgp_pretrain(s3_store, cfg, [ps]) == (pid, True)

    pcfg = STGPPromptConfig(domain_epochs=2, task_epochs=2, finetune_epochs=1, pseudo_draws=1)
    did, _ = run_stgp_domain(s3_store, pcfg, pid, pt)
    model = load_pretrained(s3_store, pid)
    domain_state = tensors_from_bytes(s3_store.read_bytes(did, "prompts.pt"))
    assert set(domain_state) == {n for n, _ in model.named_parameters_for("domain")}
    # the domain stage changed the banks but not one frozen bit
    assert s3_store.manifest(did).meta["frozen_fingerprint"] == frozen_fingerprint(model, "domain")
    assert any(not torch.equal(domain_state[n], p) for n, p in model.named_parameters_for("domain"))

    rows = {}
    for task in ("forecast", "kriging", "extrapolation"):
        tid, _ = run_stgp_task(s3_store, pcfg, pid, did, pt, task)
        meta = s3_store.manifest(tid).meta
        rows[task] = meta
        assert math.isfinite(meta["test"]["mae"]) and meta["test"]["n"] > 0
        saved = tensors_from_bytes(s3_store.read_bytes(tid, "params.pt"))
        stage = "task_extrapolation" if task == "extrapolation" else "task"
        assert set(saved) == {n for n, _ in model.named_parameters_for(stage)}
        assert meta["trainable_params"] < meta["total_params"] * 0.05
        assert meta["prompts_active"] == {"domain_temporal": True, "domain_spatial": True,
                                          "task_observed": True, "task_masked": True}
    # test metrics score the right cells: kriging every step of the 30% unobserved nodes
    n_un = round(0.3 * 69)
    assert rows["kriging"]["test"]["n"] % n_un == 0
    assert rows["extrapolation"]["test"]["n"] < rows["kriging"]["test"]["n"]
    ft, _ = run_stgp_task(s3_store, pcfg, pid, did, pt, "forecast", variant="finetune")
    assert s3_store.manifest(ft).meta["trainable_params"] > rows["forecast"]["trainable_params"] * 10
    assert not any(s3_store.manifest(ft).meta["prompts_active"].values())


def test_pretrain_resumes_after_worker_killed(ray_session, prepared_pair, tmp_path):
    """A worker SIGKILLed mid-epoch (epoch 1, after its first step): Ray Train restarts it
    from the epoch-0 checkpoint in the store and the run finishes with each epoch once."""
    st, ps, _ = prepared_pair
    cfg = STGPPretrainConfig(model=TINY, epochs=2, steps_per_epoch=3, batch_size=4, num_workers=1,
                             max_failures=1, seed=7)
    pid, skipped = run_stgp_pretrain(st, cfg, [ps], fault={"epoch": 1, "step": 1, "mode": "kill",
                                                          "once_file": str(tmp_path / "fault-fired")})
    assert not skipped
    hist = st.read_json(pid, "history.json")
    assert [h["epoch"] for h in hist] == [0, 1]
    assert (tmp_path / "fault-fired").exists()
    assert hist[0]["resumed"] is False and hist[1]["resumed"] is True


def test_deseasonalised_stgp_forecasts_in_data_units(ray_session, prepared_pair):
    """deseasonalise: every stage models residuals after the train time-of-day means; the
    stored test forecasts have them added back (their MAE against the raw series is the
    recorded one) and the pre-training config names a different artifact."""
    import io

    import numpy as np

    from stgray.data.prepare import load_prepared

    st, ps, pt = prepared_pair
    cfg = STGPPretrainConfig(model=TINY, epochs=1, steps_per_epoch=2, batch_size=4, num_workers=1,
                             deseasonalise=True)
    assert "deseasonalise" not in cfg.model_copy(update={"deseasonalise": False}).hashed_dict()
    pid, _ = run_stgp_pretrain(st, cfg, [ps])
    tid, _ = run_stgp_task(st, STGPPromptConfig(task_epochs=1, finetune_epochs=1), pid, None, pt, "forecast")
    meta = st.manifest(tid).meta
    preds = np.load(io.BytesIO(st.read_bytes(tid, "test_preds.npy")), allow_pickle=False)  # (B, H, N)
    p = load_prepared(st, pt)
    starts = p.window_starts("test", 12, 6)
    truth = p.raw[starts[:, None] + 12 + np.arange(6)[None]]
    assert preds.shape == truth.shape
    # metrics and stored forecasts are against the raw series (residual truths would differ)
    assert float(np.abs(preds - truth).mean()) == pytest.approx(meta["test"]["mae"], rel=1e-4)
    # MAPE over the non-zero truths only: restored zeros are not tiny non-zero truths
    nz = truth != 0
    assert meta["test"]["mape"] == pytest.approx(100 * float(np.mean(np.abs(preds - truth)[nz] / truth[nz])), rel=1e-3)


def test_hidden_nodes_are_taken_relative_to_the_shared_profile(prepared_pair):
    """Deseasonalised target: a node masked in every patch (pseudo-unobserved in kriging)
    is modelled relative to the observed nodes' mean profile, as the real unobserved nodes
    are, never its own (that would carry its level into validation); restoring gives the
    data back either way."""
    import numpy as np

    from stgray.data.prepare import deseasonalise, load_prepared
    from stgray.engines.stgp import _restore, _Target, _template
    from stgray.nn.stgp.model import STGPModel

    st, _, pt = prepared_pair
    raw = load_prepared(st, pt)
    p = deseasonalise(raw)
    tmpl = _template(12, 6, TINY)
    tgt = _Target(p, STGPModel(TINY), tmpl, torch.device("cpu"))
    starts = tmpl.window_starts(p, "val", "kriging")[:4]
    pseudo = int(p.observed[0])
    m = tmpl.kriging_mask(len(starts), p.num_nodes, [pseudo])
    b, xk = tgt.batch(starts, m)
    idx = starts[:, None] + np.arange(tmpl.window_len)[None]
    x = raw.x[idx].transpose(0, 2, 1)  # (B, N, T)
    other = int(p.observed[1])
    np.testing.assert_allclose(b.x[:, pseudo].numpy(), x[:, pseudo] - p.shared_offset[idx], atol=1e-5)
    np.testing.assert_allclose(b.x[:, other].numpy(), x[:, other] - p.offset[idx][:, :, other], atol=1e-5)
    assert not np.allclose(p.offset[idx][:, :, pseudo], p.shared_offset[idx])
    assert torch.isnan(xk[:, p.unobserved]).all()
    np.testing.assert_allclose(_restore(p, tmpl, starts, b.x, m.all(-1)), raw.raw[idx].transpose(0, 2, 1),
                               rtol=1e-4, atol=1e-3)


def test_forecasting_trains_on_every_node(prepared_pair):
    """The kriging split's unobserved nodes are hidden from kriging, not from forecasting:
    forecasting scores them at test and its baselines train on their train days."""
    from stgray.engines.stgp import _load_city

    st, _, pt = prepared_pair
    cfg = STGPPretrainConfig(model=TINY, deseasonalise=True)
    kr, fc = _load_city(st, pt, cfg, "kriging"), _load_city(st, pt, cfg, "forecast")
    assert len(kr.unobserved) == round(0.3 * 69) and len(fc.unobserved) == 0
    un = kr.unobserved
    assert (kr.offset[:, un] == kr.shared_offset[:, None]).all()
    assert not (fc.offset[:, un] == fc.shared_offset[:, None]).all()
