"""``stgray sweep`` through the real CLI on an S3 store (SeaweedFS): an STGP sweep killed
(SIGKILL, whole process group) once the experiment state it saved shows a finished
trial, then the same command again: it resumes, finishes with every trial, keeps the
finished ones without training them again, and its report's best trial is Tune's.
(A bad sweep config's one-line error: tests/sweeps/test_space.py; the CLI prints any
such error on one line, as tests/cli/test_run.py checks.)"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "tests" / "sweeps" / "data" / "base_tiny.yaml"
SHARED_PREFIX = "sweeps-shared"  # as tests/sweeps/test_driver.py: the prepared cities are made once

SWEEP = {"name": "kill-resume", "method": "stgp", "num_samples": 3, "seed": 0, "max_concurrent": 1,
         "scheduler": {"type": "fifo"},
         "space": {"task_prompts": {"type": "categorical", "choices": [2, 4, 8]},
                   "prompting": {"type": "categorical", "choices": ["two_stage", "one_stage"]},
                   "domain_prompts": {"type": "categorical", "choices": [2, 8], "when": {"prompting": "two_stage"}},
                   "lr": {"type": "loguniform", "low": 1e-3, "high": 1e-2}}}


def _kill_leftovers(marker: str) -> None:
    """SIGKILL processes of the killed run's Ray (found by its own temp folder)."""
    import psutil

    for p in psutil.process_iter(["pid", "cmdline"]):
        if any(marker in c for c in (p.info["cmdline"] or [])):
            try:
                p.kill()
            except psutil.Error:
                pass


def test_sweep_killed_midway_resumes_without_rerunning(s3_server, cli, tmp_path, request):
    from stgray.store import ArtifactStore
    from stgray.sweeps.config import experiment_name, load_sweep
    from stgray.sweeps.driver import saved_trials, sweep_paths
    from stgray.sweeps.trial import TrialRecords

    cfg_path = tmp_path / "sweep.yaml"
    cfg_path.write_text(yaml.safe_dump({**SWEEP, "base": str(BASE), "stgp": {"task_epochs": 4}}))
    store_url = f"s3://{s3_server.bucket}/{SHARED_PREFIX}"
    ray_tmp = tempfile.mkdtemp(prefix="rk", dir="/tmp")  # short: Ray's socket paths have a length limit
    request.addfinalizer(lambda: shutil.rmtree(ray_tmp, ignore_errors=True))
    env = {**os.environ, "STGRAY_SWEEP_DIR": str(tmp_path / "optuna"), "STGRAY_RAY_TMP": ray_tmp}
    name = experiment_name(*load_sweep(cfg_path, {"store": store_url}))
    store = ArtifactStore(store_url)
    paths = sweep_paths(store, name)
    records = TrialRecords(store, paths.sweep_dir)
    exe = Path(sys.executable).parent / "stgray"
    cmd = [str(exe), "sweep", "run", str(cfg_path), "--store", store_url]
    log = (tmp_path / "first.log").open("w")
    try:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                start_new_session=True)
        t0 = time.monotonic()
        # kill once Tune's saved experiment state (what a resume starts from) has a
        # finished trial
        while not any(st == "TERMINATED" for st in saved_trials(store, paths).values()):
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() - t0 < 420, "no trial finished in time"
            time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        log.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        _kill_leftovers(ray_tmp)
    saved = saved_trials(store, paths)
    finished_before = {t for t, st in saved.items() if st == "TERMINATED"}
    runs_before = records.executions()
    assert finished_before and len(records.finished()) < SWEEP["num_samples"]
    assert finished_before <= set(records.finished())
    assert not store.fs.exists(f"{paths.sweep_dir}/summary.json")  # it did not get to the end

    t0 = time.monotonic()
    r = cli("sweep", "run", str(cfg_path), "--store", store_url, "--report", env=env, timeout=600)
    second_s = time.monotonic() - t0
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "(resuming;" in r.stdout
    summary = json.loads(store.fs.cat_file(f"{paths.sweep_dir}/summary.json"))
    assert summary["resumed"] and summary["trials"] == summary["terminated"] == SWEEP["num_samples"], \
        json.dumps({k: summary[k] for k in ("rows", "errors", "first_error", "executions")}, default=str)[:3000]
    ids = {row["trial_id"] for row in summary["rows"]}
    assert finished_before <= ids and len(ids) == SWEEP["num_samples"]
    runs = records.executions()
    for t in finished_before:  # finished trials were not trained again
        assert runs[t] == runs_before[t] == 1, (t, runs_before, runs)
    # every final trial trained (one cut off by the kill trained again, or was dropped
    # with the experiment state it had not reached, and another took its place)
    assert ids <= set(runs)
    for row in summary["rows"]:
        assert ("param:domain_prompts" in row) == (row["param:prompting"] == "two_stage")

    # on the store: Tune's experiment with TensorBoard files, the Optuna study (copy)
    fs = store.fs
    assert len(fs.glob(f"{paths.experiment}/trial_*/events.out.tfevents.*")) >= SWEEP["num_samples"]
    db = tmp_path / "optuna-copy.db"
    db.write_bytes(fs.cat_file(paths.optuna_remote))
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{db}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == SWEEP["num_samples"]
    assert study.best_value == pytest.approx(summary["best"]["val_mae"])

    # the report (--report): files in the store, its table's best trial is Tune's best
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("report: "))
    rid = line.split()[1].rsplit("/", 2)[-2] + "/" + line.split()[1].rsplit("/", 1)[-1]
    files = set(store.manifest(rid).files)
    assert {"report.md", "trials.csv", "trials.json", "winner.json", "optimization_history.png",
            "accuracy_vs_bank_size.png", "optuna.db"} <= files
    table = json.loads(store.read_bytes(rid, "trials.json"))
    assert table["rows"][0]["trial_id"] == table["best"]["trial_id"] == summary["best"]["trial_id"]
    winner = json.loads(store.read_bytes(rid, "winner.json"))
    assert winner["task"] == "forecast" and winner["test"]["mae"] > 0
    print(f"second run {second_s:.1f}s; finished before the kill: {sorted(finished_before)}; runs {runs}")
