"""A small GPDiff sweep on nyc_bike with an S3 store on SeaweedFS, in this process's Ray
(2 trials at once): results, checkpoints, TensorBoard files and the
Optuna study on the store, a second run that trains nothing, and the report. The STGP
sweep on the same target and store runs through the CLI, killed midway and resumed
(tests/cli/test_sweep_cli.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import optuna
import pytest
import yaml

from stgray.sweeps.config import load_sweep
from stgray.sweeps.driver import run_sweep, sweep_paths

BASE = Path(__file__).parent / "data" / "base_tiny.yaml"
#: Also used by tests/cli/test_sweep_cli.py: whichever runs first imports and prepares the
#: cities; the other finds them in the store.
SHARED_PREFIX = "sweeps-shared"

GPDIFF = {"name": "test-gpdiff", "method": "gpdiff", "num_samples": 3, "seed": 0, "max_concurrent": 2,
          "gpdiff": {"rounds": 2, "train_steps": 10, "samples_per_node": 2, "node_limit": 6},
          "space": {"num_train_timesteps": {"type": "categorical", "choices": [20, 100]},
                    "sampler": {"type": "categorical", "choices": ["ddpm", "ddim"]},
                    "sampling_steps": {"type": "categorical", "choices": [2, 4], "when": {"sampler": "ddim"}},
                    "conditioning": {"type": "categorical", "choices": ["adaln", "pre_adaptive"]},
                    "prompt_tokens": {"type": "int", "low": 1, "high": 2, "when": {"conditioning": "pre_adaptive"}},
                    "lr": {"type": "loguniform", "low": 5e-4, "high": 5e-3}}}


@pytest.fixture(scope="module")
def shared(s3_server, ray_session, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("STGRAY_SWEEP_DIR", str(tmp_path_factory.mktemp("optuna-local")))
    yield {"store": f"s3://{s3_server.bucket}/{SHARED_PREFIX}", "dir": tmp_path_factory.mktemp("sweep-cfg")}
    mp.undo()


def _run(shared, spec: dict):
    p = shared["dir"] / f"{spec['name']}.yaml"
    p.write_text(yaml.safe_dump({**spec, "base": str(BASE), "store": shared["store"]}))
    cfg, base = load_sweep(p)
    return cfg, base, run_sweep(cfg, base)


@pytest.fixture(scope="module")
def gpdiff_run(shared):
    return _run(shared, GPDIFF)


def _dashboard_get(storage_url: str, path: str) -> dict:
    """GET ``path`` from optuna-dashboard's own app (its WSGI app, no server) on a storage."""
    import io
    import sys

    from optuna_dashboard import wsgi

    status = {}
    env = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": "", "SERVER_NAME": "t", "SERVER_PORT": "80",
           "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.input": io.BytesIO(b""), "wsgi.url_scheme": "http",
           "wsgi.errors": sys.stderr}
    body = b"".join(wsgi(storage_url)(env, lambda st, headers, exc_info=None: status.update(st=st)))
    assert status["st"].startswith("200"), body[:500]
    return json.loads(body)


def _check_store_state(cfg, base, s, tmp_path):
    from stgray.store import ArtifactStore

    store = ArtifactStore(cfg.store)
    paths = sweep_paths(store, s["experiment"])
    assert s["trials"] == cfg.num_samples and s["terminated"] == cfg.num_samples and s["errors"] == 0
    rows = s["rows"]
    assert rows[0]["trial_id"] == s["best"]["trial_id"]
    assert s["best"]["val_mae"] == min(r["val_mae"] for r in rows) and math.isfinite(s["best"]["val_mae"])
    assert s["executions"] == {r["trial_id"]: 1 for r in rows}
    # Tune's experiment, checkpoints and TensorBoard event files are on S3
    assert s["experiment_path"].startswith("s3://")
    fs = store.fs
    assert len(fs.glob(f"{paths.experiment}/trial_*/events.out.tfevents.*")) == cfg.num_samples
    # one checkpoint (the best state, with the last report) per trial that ran to the end;
    # ASHA may have stopped the others early, never the best one
    full = {r["trial_id"] for r in rows if r["iterations"] == cfg.gpdiff.rounds}
    ckpts = fs.glob(f"{paths.experiment}/trial_*/checkpoint_*/trial.json")
    assert s["best"]["trial_id"] in full and {c.split("/trial_")[1].split("/")[0] for c in ckpts} == full
    assert fs.exists(f"{paths.experiment}/tuner.pkl")
    # the Optuna study: local SQLite file and its copy on the store, both open in Optuna
    # (optuna-dashboard reads the same storage)
    copy = tmp_path / "optuna.db"
    copy.write_bytes(fs.cat_file(paths.optuna_remote))
    for url in (paths.optuna_url, f"sqlite:///{copy}"):
        study = optuna.load_study(study_name=s["experiment"], storage=url)
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        assert len(done) == cfg.num_samples
        assert study.best_value == pytest.approx(s["best"]["val_mae"])
        assert study.best_params == s["best"]["params"]
    # optuna-dashboard opens the store's copy and shows the study with its trials
    (summary,) = [x for x in _dashboard_get(f"sqlite:///{copy}", "/api/studies")["study_summaries"]
                  if x["study_name"] == s["experiment"]]
    trials = _dashboard_get(f"sqlite:///{copy}", f"/api/studies/{summary['study_id']}")["trials"]
    assert sum(t["state"] == "Complete" for t in trials) == cfg.num_samples
    return store, paths, rows


def test_gpdiff_sweep_on_s3(gpdiff_run, tmp_path):
    cfg, base, s = gpdiff_run
    _, _, rows = _check_store_state(cfg, base, s, tmp_path)
    assert set(s["base_ids"]["tokens_ids"]) == {"256"}
    for r in rows:
        assert ("param:sampling_steps" in r) == (r["param:sampler"] == "ddim")
        assert ("param:prompt_tokens" in r) == (r["param:conditioning"] == "pre_adaptive")
        assert r["diffusion_steps"] == r["param:num_train_timesteps"] and r["sampling_s"] > 0
        assert 1 <= r["iterations"] <= cfg.gpdiff.rounds
    # running the finished sweep again restores it and trains nothing
    s2 = run_sweep(cfg, base)
    assert s2["resumed"] and s2["executions"] == s["executions"]
    assert s2["best"]["trial_id"] == s["best"]["trial_id"] and s2["terminated"] == cfg.num_samples


def test_report_table_best_is_tunes_best(gpdiff_run, tmp_path):
    from stgray.store import ArtifactStore
    from stgray.sweeps.report import write_sweep_report

    cfg, base, s = gpdiff_run
    r = write_sweep_report(cfg, base, say=lambda _: None)
    assert not r["skipped"]
    store = ArtifactStore(cfg.store)
    files = set(store.manifest(r["report"]).files)
    plot = "accuracy_vs_diffusion_steps.png"
    assert {"report.md", "trials.csv", "trials.md", "trials.json", "winner.json", "optuna.db",
            "optimization_history.png", plot} <= files
    assert "param_importances.png" in files or any("importances" in n for n in r["notes"])
    for name in files:
        if name.endswith(".png"):
            assert store.read_bytes(r["report"], name)[:4] == b"\x89PNG"
    assert r["best_trial_id"] == r["table_best_trial_id"] == s["best"]["trial_id"]
    table = json.loads(store.read_bytes(r["report"], "trials.json"))
    assert table["rows"][0]["trial_id"] == s["best"]["trial_id"]
    csv_first = store.read_bytes(r["report"], "trials.csv").decode().splitlines()[1]
    assert csv_first.startswith(s["best"]["trial_id"] + ",")
    w = r["winner"]
    assert math.isfinite(w["test"]["mae"]) and w["test"]["mae"] > 0
    # the checkpoint reproduces the trial's validation figure exactly
    assert w["val"]["mae"] == pytest.approx(s["best"]["val_mae"], rel=1e-6)
    assert "## Winner" in store.read_bytes(r["report"], "report.md").decode()
    again = write_sweep_report(cfg, base, say=lambda _: None)  # the test split is not touched twice
    assert again["skipped"] and again["report"] == r["report"]
