"""Run a sweep: make (or find) the base artefacts, then a Ray Tune ``Tuner`` with
``OptunaSearch`` (seeded TPE over the define-by-run space, the study in an SQLite Optuna
storage) and ASHA on ``val_mae``; resume the same experiment when it exists.

Where things go (``<root>`` = the store's root)::

    <root>/_ray/<experiment>/          Tune: experiment state, per-trial results, TensorBoard
                                       event files (tensorboardX), checkpoints (best state)
    <root>/_sweeps/<experiment>/       trial records (trial.py), summary.json, optuna.db
                                       (a copy, for S3 stores)

``<experiment>`` is ``sweep-<method>-<hash>`` (config.experiment_name). Running the same
config against the same store restores the experiment: trials that finished are kept,
unfinished ones run again, and the searcher continues from its saved state.

Concurrency: a trial trains in its own process with ``cpus_per_trial`` CPUs (and as many
torch threads) and never starts a Ray Train worker group, so a trial cannot wait for
CPUs held by other trials (the Tune-around-Train deadlock of ray-notes). The base's Ray
Train stages (STGP pre-training, the zoo) run in the driver before the Tuner starts.
At most ``max_concurrent`` trials run at once, by default ``floor(cluster CPUs /
cpus_per_trial)``; on a 2-core laptop the local Ray gets 3 logical CPUs (see
``engines.common.ensure_ray``), so 3 one-CPU trials share the 2 cores.

The Optuna study lives in an SQLite file that ``optuna-dashboard sqlite:///<file>``
opens while the sweep runs: for a local store inside the store, for an S3 store in
``$STGRAY_SWEEP_DIR`` (default ``~/.cache/stgray/sweeps``) and uploaded to the store
after every finished trial (a resume fetches it when the local file is missing; Tune's
saved searcher names the file by its absolute path, so resume on a driver where that
path works, e.g. the same ``STGRAY_SWEEP_DIR``).

Interruptions: Tune saves its experiment state every 2 s (``TUNE_GLOBAL_CHECKPOINT_S``)
and after every trial checkpoint. A trial that finished before the last save is kept;
one that finished after it is handed back from its record (trial.py) when Tune restarts
it, or, if the save predates the trial, is replaced by a new trial. ``stgray sweep
status`` shows the saved status of each trial.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from stgray.config import content_hash
from stgray.errors import ConfigError, StoreError
from stgray.sweeps.config import METRIC, MODE, SweepConfig, experiment_name

SWEEPS_DIR = "_sweeps"  # inside the store root; not an artefact kind, so ``store.ls`` ignores it


@dataclass(frozen=True)
class SweepPaths:
    """Where one experiment's state lives (see the module docstring)."""

    name: str
    storage_path: str          # RunConfig storage_path (no scheme for S3)
    fs: Any                    # pyarrow filesystem for S3, None for a local store
    experiment: str            # storage_path/name
    sweep_dir: str             # store-internal path of the trial records (store.fs)
    optuna_db: str             # local SQLite file
    optuna_remote: str | None  # store-internal copy of it (S3 stores)

    @property
    def optuna_url(self) -> str:
        return f"sqlite:///{self.optuna_db}"

    def experiment_uri(self, store) -> str:
        return self.experiment if self.fs is None else f"{store.location.protocol}://{self.experiment}"


def sweep_paths(store, name: str) -> SweepPaths:
    from stgray.engines.ray_utils import ray_storage

    storage, fs = ray_storage(store)
    sweep_dir = f"{store.location.root}/{SWEEPS_DIR}/{name}"
    if store.location.protocol == "file":
        os.makedirs(sweep_dir, exist_ok=True)
        db, remote = os.path.join(sweep_dir, "optuna.db"), None
    else:
        local = Path(os.environ.get("STGRAY_SWEEP_DIR") or Path.home() / ".cache" / "stgray" / "sweeps")
        folder = local / f"{content_hash(store.url, 8)}-{name}"
        folder.mkdir(parents=True, exist_ok=True)
        db, remote = str(folder / "optuna.db"), f"{sweep_dir}/optuna.db"
    return SweepPaths(name, storage, fs, f"{storage}/{name}", sweep_dir, db, remote)


def store_for(cfg: SweepConfig, base) -> "Any":
    from stgray.store import ArtifactStore

    return ArtifactStore(cfg.store or base.store)


# ------------------------------------------------------------------------------------
# the base artefacts
# ------------------------------------------------------------------------------------
def prepare_base(cfg: SweepConfig, base, store, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Import/prepare the cities and make the artefacts every trial starts from (each
    skipped when already in the store): STGP pre-training, or the zoo and the tokens of
    every token width the space can choose. Returns the artefact ids."""
    from stgray.engines.common import ensure_ray
    from stgray.pipeline import StageLog, import_and_prepare

    data_dir = cfg.data_dir or base.data_dir
    if data_dir:
        os.environ["STGRAY_DATA_DIR"] = str(Path(data_dir).expanduser().resolve())
    log = StageLog()
    prepared = import_and_prepare(store, base, log)
    src_ids = [prepared[n] for n in base.sources]
    out: dict[str, Any] = {"target_id": prepared[base.target], "source_ids": src_ids}
    ensure_ray(cfg.ray_address or base.ray_address)
    if cfg.method == "stgp":
        from stgray.engines.stgp import run_stgp_pretrain

        pre = base.stgp_pretrain_for(cfg.stgp.task, base.seeds[0])
        out["pretrain_id"] = log.run("stgp", f"pre-train seed {base.seeds[0]}",
                                     lambda: run_stgp_pretrain(store, pre, src_ids))
    else:
        from stgray.engines.tokens import run_tokens
        from stgray.engines.zoo import run_zoo

        zid = log.run("zoo", f"{base.zoo.model.arch} per-node models", lambda: run_zoo(store, base.zoo, src_ids))
        spec = cfg.space.get("token_width")
        widths = sorted({int(w) for w in spec.choices}) if spec is not None and spec.type == "categorical" \
            else [base.diffusion.token_width]
        if spec is not None and spec.type != "categorical":
            raise ConfigError("token_width must be categorical (each width needs its own tokens)",
                              field="space.token_width")
        src = {n: prepared[n] for n in base.sources}
        out["zoo_id"] = zid
        out["tokens_ids"] = {str(w): log.run("tokens", f"width {w}", lambda w=w: run_tokens(
            store, base.tokens.model_copy(update={"width": w}), zid, src)) for w in widths}
    return out


def trial_context(cfg: SweepConfig, base, store, paths: SweepPaths, ids: dict) -> dict[str, Any]:
    """What every trial gets besides its parameters (picklable, small)."""
    ctx = {"method": cfg.method, "store": store.url, "sweep_dir": paths.sweep_dir, "threads": cfg.cpus_per_trial,
           "base": base.model_dump(mode="json"), "target_id": ids["target_id"], "max_t": iterations(cfg, base)}
    if cfg.method == "stgp":
        ctx.update(pretrain_id=ids["pretrain_id"], stgp=cfg.stgp.model_dump(mode="json"))
    else:
        ctx.update(zoo_id=ids["zoo_id"], tokens_ids=ids["tokens_ids"], zoo_cfg=base.zoo.model_dump(mode="json"),
                   gpdiff=cfg.gpdiff.model_dump(mode="json"),
                   train_steps=cfg.gpdiff.train_steps or base.diffusion.train_steps)
    return ctx


def iterations(cfg: SweepConfig, base) -> int:
    """Reports per trial: STGP task epochs (the base's), GPDiff evaluation rounds."""
    if cfg.method == "stgp":
        return int(cfg.stgp.task_epochs or base.stgp_prompt.task_epochs)
    return int(cfg.gpdiff.rounds)


def concurrency(cfg: SweepConfig, resources: dict[str, float]) -> int:
    """Trials at once: ``max_concurrent`` or floor(cluster CPUs / cpus_per_trial), at most
    ``num_samples``. A trial that cannot fit on the cluster is a ConfigError, not a hang."""
    cpus = float(resources.get("CPU", 0))
    if cfg.cpus_per_trial > cpus:
        raise ConfigError(f"a trial needs {cfg.cpus_per_trial} CPUs but the Ray cluster has {cpus:g}",
                          field="cpus_per_trial")
    n = cfg.max_concurrent or max(1, int(cpus // cfg.cpus_per_trial))
    return max(1, min(n, cfg.num_samples))


# ------------------------------------------------------------------------------------
# the Optuna storage
# ------------------------------------------------------------------------------------
def _backup_sqlite(src: str) -> bytes:
    """A consistent copy of an SQLite file (its backup API), as bytes."""
    with tempfile.TemporaryDirectory() as d:
        dst = os.path.join(d, "copy.db")
        a, b = sqlite3.connect(src), sqlite3.connect(dst)
        try:
            a.backup(b)
        finally:
            b.close()
            a.close()
        return Path(dst).read_bytes()


def upload_optuna(store, paths: SweepPaths) -> None:
    if paths.optuna_remote and os.path.exists(paths.optuna_db):
        data = _backup_sqlite(paths.optuna_db)
        store._call(lambda: store.fs.pipe_file(paths.optuna_remote, data), paths.optuna_remote)


def fetch_optuna(store, paths: SweepPaths) -> bool:
    """Copy the store's study file to the local path when there is none (S3 stores)."""
    if not paths.optuna_remote or os.path.exists(paths.optuna_db):
        return False
    try:
        data = store._call(lambda: store.fs.cat_file(paths.optuna_remote), paths.optuna_remote)
    except FileNotFoundError:
        return False
    Path(paths.optuna_db).write_bytes(data)
    return True


def close_zombies(url: str, study_name: str) -> int:
    """Mark trials a killed run left RUNNING in the study as FAIL; returns how many."""
    import optuna

    try:
        study = optuna.load_study(study_name=study_name, storage=url)
    except KeyError:
        return 0
    n = 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_system_attr(t._trial_id, "stgray:interrupted", True)
        study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        n += 1
    return n


# ------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------
def run_sweep(cfg: SweepConfig, base, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the sweep; returns the summary (also in ``_sweeps/<name>/summary.json``)."""
    import optuna
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from stgray.sweeps.space import DefineByRun
    from stgray.sweeps.trial import run_trial
    from stgray.sweeps.tune_ext import _TRIALS, OptunaUpload, ResumableOptunaSearch, TrialCount

    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")  # experiment state at most 2 s old
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    store = store_for(cfg, base)
    name = experiment_name(cfg, base)
    paths = sweep_paths(store, name)
    t0 = time.perf_counter()
    say(f"[sweep] {cfg.name} ({cfg.method}): experiment {name}")
    ids = prepare_base(cfg, base, store, say)
    ctx = trial_context(cfg, base, store, paths, ids)
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), {"cpu": cfg.cpus_per_trial})
    restoring = tune.Tuner.can_restore(paths.experiment, storage_filesystem=paths.fs)
    conc = concurrency(cfg, ray.cluster_resources())
    say(f"[sweep] Tune experiment: {paths.experiment_uri(store)} "
        + ("(resuming; concurrency as first set)" if restoring else f"(new; up to {conc} trials at once)"))
    say(f"[sweep] watch: optuna-dashboard {paths.optuna_url}  |  tensorboard --logdir {paths.experiment_uri(store)}")
    if restoring:
        fetch_optuna(store, paths)
        # Unfinished and errored trials run again under their own ids (RESTART would give
        # them new ids); a trial's only checkpoint comes with its last report, so a trial
        # cut off before that starts from scratch, and one that got that far hands back
        # its record (trial.py).
        tuner = tune.Tuner.restore(paths.experiment, trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=paths.fs)
    else:
        storage = optuna.storages.RDBStorage(paths.optuna_url)
        try:  # a study left from an experiment that no longer exists would bias the sampler
            optuna.delete_study(study_name=name, storage=storage)
        except KeyError:
            pass
        sampler = (optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=cfg.searcher.n_startup_trials)
                   if cfg.searcher.sampler == "tpe" else optuna.samplers.RandomSampler(seed=cfg.seed))
        searcher = ResumableOptunaSearch(space=DefineByRun(cfg.space), metric=METRIC, mode=MODE, sampler=sampler,
                                         study_name=name, storage=storage, experiment=name,
                                         num_samples=cfg.num_samples, max_concurrent=conc)
        max_t = iterations(cfg, base)
        sched = ASHAScheduler(time_attr="iteration", metric=METRIC, mode=MODE, max_t=max_t,
                              grace_period=min(cfg.scheduler.grace_period, max_t),
                              reduction_factor=cfg.scheduler.reduction_factor) \
            if cfg.scheduler.type == "asha" else FIFOScheduler()
        callbacks = [TrialCount(name)] + ([OptunaUpload(store, paths)] if paths.optuna_remote else [])
        tuner = tune.Tuner(
            trainable,
            # no limits here: the searcher keeps to num_samples and max_concurrent, counted on
            # Tune's own list of trials (tune_ext)
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=sched, num_samples=-1,
                                        reuse_actors=True,
                                        trial_dirname_creator=trial_dirname),
            run_config=tune.RunConfig(name=name, storage_path=paths.storage_path, storage_filesystem=paths.fs,
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                      failure_config=tune.FailureConfig(max_failures=1),
                                      callbacks=callbacks, verbose=1),
        )
    _TRIALS[name] = (0, 0)  # TrialCount sets Tune's counts before anything is suggested
    results = tuner.fit()
    zombies = close_zombies(paths.optuna_url, name)
    upload_optuna(store, paths)
    summary = summarise(results, cfg, name, store, paths)
    summary.update(seconds=time.perf_counter() - t0, resumed=restoring, optuna_interrupted=zombies,
                   optuna_url=paths.optuna_url, optuna_remote=paths.optuna_remote,
                   experiment_path=paths.experiment_uri(store), base_ids=ids)
    store._call(lambda: store.fs.pipe_file(f"{paths.sweep_dir}/summary.json",
                                           json.dumps(summary, indent=1, default=str).encode()), paths.sweep_dir)
    if summary["terminated"] == 0:
        raise StoreError(f"no trial finished ({summary['errors']} errors; first: {summary.get('first_error')})",
                         where=name)
    return summary


def trial_dirname(trial) -> str:
    """Short trial folder names (Tune's default packs the parameters into S3 keys)."""
    return f"trial_{trial.trial_id}"


# ------------------------------------------------------------------------------------
# results
# ------------------------------------------------------------------------------------
def load_results(store, paths: SweepPaths):
    """The experiment's ``ResultGrid`` read from the storage (no Ray cluster needed)."""
    from ray import tune
    from ray.tune import ExperimentAnalysis, ResultGrid

    if not tune.Tuner.can_restore(paths.experiment, storage_filesystem=paths.fs):
        raise StoreError("no sweep experiment found (run `stgray sweep run` first)",
                         where=paths.experiment_uri(store))
    ea = ExperimentAnalysis(paths.experiment, storage_filesystem=paths.fs, default_metric=METRIC,
                            default_mode=MODE)
    return ResultGrid(ea)


def saved_trials(store, paths: SweepPaths) -> dict[str, str]:
    """Trial id -> status in the newest experiment state Tune saved to the storage: what
    a resume starts from (a trial that finished after that save is handed back from its
    record if Tune restarts it, or replaced by a new trial if the save predates it)."""
    fs = store.fs
    try:
        fs.invalidate_cache(paths.experiment)
        files = sorted(fs.glob(f"{paths.experiment}/experiment_state-*.json"))
    except FileNotFoundError:
        return {}
    if not files:
        return {}
    try:
        state = json.loads(store._call(lambda: fs.cat_file(files[-1]), files[-1]))
    except (FileNotFoundError, ValueError):
        return {}
    out = {}
    for trial_json, _ in state.get("trial_data", []):
        t = json.loads(trial_json)
        out[t["trial_id"]] = t.get("status", "?")
    return out


def trial_rows(results) -> list[dict[str, Any]]:
    """One row per trial (best first): id, status, val_mae, iterations, parameters and
    the method's figures from its last report."""
    keep = ("epoch_val_mae", "round_val_mae", "bank_domain", "bank_task", "prompt_threshold", "prompting",
            "diffusion_steps", "sampling_steps", "sampler", "sampling_s", "train_s", "d_model", "layers",
            "conditioning", "token_width", "denoiser_params", "trial_seconds", "replayed")
    rows = []
    for r in results:
        m = r.metrics or {}
        row = {"trial_id": m.get("trial_id") or Path(r.path).name, "status": "ERROR" if r.error else "TERMINATED",
               "val_mae": m.get(METRIC), "iterations": m.get("iteration")}
        row.update({f"param:{k}": v for k, v in sorted((r.config or {}).items())})
        row.update({k: m[k] for k in keep if k in m})
        rows.append(row)
    big = float("inf")
    rows.sort(key=lambda x: (x["val_mae"] is None, x["val_mae"] if x["val_mae"] is not None else big))
    return rows


def summarise(results, cfg: SweepConfig, name: str, store, paths: SweepPaths) -> dict[str, Any]:
    from stgray.sweeps.trial import TrialRecords

    rows = trial_rows(results)
    ok = [r for r in results if not r.error and (r.metrics or {}).get(METRIC) is not None]
    best = None
    if ok:
        b = results.get_best_result(metric=METRIC, mode=MODE, scope="last")
        best = {"trial_id": b.metrics.get("trial_id"), "val_mae": b.metrics.get(METRIC), "params": b.config,
                "path": b.path}
    errs = [r.error for r in results if r.error]
    return {"experiment": name, "method": cfg.method, "name": cfg.name, "num_samples": cfg.num_samples,
            "trials": len(rows), "terminated": len(ok), "errors": len(errs),
            "first_error": f"{type(errs[0]).__name__}: {errs[0]}"[:500] if errs else None,
            "best": best, "rows": rows,
            "executions": TrialRecords(store, paths.sweep_dir).executions(),
            "replayed": sum(1 for r in rows if r.get("replayed"))}
