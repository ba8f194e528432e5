"""``stgray sweep report``: the sweep's trials as a table (CSV + Markdown), Optuna's
optimisation history and parameter importances, accuracy vs prompt-bank size (STGP) or
vs diffusion steps with sampling time (GPDiff), and the winner -- Tune's
``get_best_result`` on ``val_mae`` -- re-evaluated on the test split once.

The report is a store artefact (kind ``sweep-report``) keyed on the experiment and its
trials' results, so asking again for the same finished sweep returns the same artefact.
The winner's test evaluation is its own artefact (``sweep-winner``, keyed on the
experiment and the winning trial, holding its checkpoint too): a report of a sweep
that has grown since, with the same winner, reads it instead of evaluating again.
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from stgray.sweeps.config import METRIC, MODE, SweepConfig, experiment_name

REPORT_KIND = "sweep-report"
WINNER_KIND = "sweep-winner"  # the winner's checkpoint and its one test evaluation


def _png(fig) -> bytes:
    from stgray.eval.report import png_bytes

    return png_bytes(fig)


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def optuna_plots(study) -> tuple[dict[str, bytes], list[str]]:
    """Optimisation history and parameter importances (Optuna's matplotlib plots);
    notes for what could not be drawn (e.g. too few finished trials)."""
    import optuna

    plots, notes = {}, []
    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ExperimentalWarning of the matplotlib backend
        from optuna.visualization import matplotlib as ovm

        if done:
            ax = ovm.plot_optimization_history(study)
            plots["optimization_history.png"] = _png(ax.figure)
        else:
            notes.append("optimisation history: no finished trial in the Optuna study")
        try:
            if len(done) < 2:
                raise ValueError(f"{len(done)} finished trial(s); importances need at least 2")
            ax = ovm.plot_param_importances(study)
            plots["param_importances.png"] = _png(ax.figure)
        except Exception as e:  # too few trials, no variation, a single parameter ...
            notes.append(f"parameter importances not computed: {str(e).splitlines()[0][:200]}")
    _plt().close("all")
    return plots, notes


def _scatter(ax, xs, ys, label, logx=False):
    ok = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None and np.isfinite(y)]
    if ok:
        ax.scatter([x for x, _ in ok], [y for _, y in ok], label=label, alpha=0.8)
    if logx and ok and min(x for x, _ in ok) > 0:
        ax.set_xscale("log", base=2)


def _log_y_if_spread(ax, ys) -> None:
    """Log y axis when the values span more than 50x (e.g. a diverged sampler's MAE)."""
    v = [float(y) for y in ys if y is not None and np.isfinite(y) and y > 0]
    if v and max(v) > 50 * min(v):
        ax.set_yscale("log")


def plot_bank_size(rows: list[dict]) -> bytes:
    """Validation MAE vs the task and domain prompt-bank sizes K (0 = no domain stage)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    ok = [r for r in rows if r.get("val_mae") is not None]
    _scatter(ax, [r.get("bank_task") for r in ok], [r["val_mae"] for r in ok], "task bank K", logx=True)
    two = [r for r in ok if r.get("bank_domain")]
    _scatter(ax, [r["bank_domain"] for r in two], [r["val_mae"] for r in two], "domain bank K (two-stage)",
             logx=True)
    _log_y_if_spread(ax, [r["val_mae"] for r in ok])
    ax.set_xlabel("prompt-bank size K")
    ax.set_ylabel("validation MAE (data units)")
    ax.set_title("STGP: accuracy vs prompt-bank size")
    ax.legend()
    return _png(fig)


def plot_diffusion_steps(rows: list[dict]) -> bytes:
    """Validation MAE vs diffusion (training) steps, and sampling time vs sampling steps."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    ok = [r for r in rows if r.get("val_mae") is not None]
    for sampler in sorted({str(r.get("sampler")) for r in ok}):
        sub = [r for r in ok if str(r.get("sampler")) == sampler]
        _scatter(a, [r.get("diffusion_steps") for r in sub], [r["val_mae"] for r in sub], sampler, logx=True)
        _scatter(b, [r.get("sampling_steps") for r in sub], [r.get("sampling_s") for r in sub], sampler, logx=True)
    _log_y_if_spread(a, [r["val_mae"] for r in ok])
    _log_y_if_spread(b, [r.get("sampling_s") for r in ok])
    a.set_xlabel("diffusion steps (training timesteps)")
    a.set_ylabel("validation MAE (data units)")
    a.set_title("GPDiff: accuracy vs diffusion steps")
    b.set_xlabel("sampling steps")
    b.set_ylabel("sampling time for the target nodes (s)")
    b.set_title("GPDiff: sampling time")
    a.legend()
    b.legend()
    return _png(fig)


def evaluate_winner(store, files: dict[str, bytes]) -> dict[str, Any]:
    """The winning trial's checkpoint re-evaluated on the test split (once); for GPDiff
    also on validation, which must reproduce the trial's own figure."""
    from stgray.engines.common import tensors_from_bytes

    meta = json.loads(files["trial.json"])
    if meta["method"] == "stgp":
        from stgray.engines.stgp import evaluate_stgp_test

        st = tensors_from_bytes(files["state.pt"], "winner/state.pt")
        m, _ = evaluate_stgp_test(store, meta["pretrain_id"], meta["target_id"], meta["task"],
                                  task_state=st["task"], domain_state=st.get("domain") or None,
                                  model_overrides=meta["overrides"], seed=meta["prompt"]["seed"])
        return {"task": meta["task"], "test": {k: m[k] for k in ("mae", "rmse", "mape", "n")}}
    from stgray.data.prepare import load_prepared
    from stgray.engines.diffusion import Denoiser
    from stgray.engines.tokens import load_tokens_info
    from stgray.engines.zoo import ZooConfig
    from stgray.gpdiff.diffusion import DiffusionConfig, build_denoiser
    from stgray.sweeps.trial import gpdiff_evaluate

    cfg = DiffusionConfig.model_validate(meta["diffusion"])
    info = load_tokens_info(store, meta["tokens_id"])
    model = build_denoiser(cfg, info.token_layout, info.prompt_dim)
    model.load_state_dict(tensors_from_bytes(files["denoiser.pt"], "winner/denoiser.pt"))
    model.eval()
    den = Denoiser(model, cfg, info.token_layout, info.prompt_dim, meta["tokens_id"])
    p = load_prepared(store, meta["target_id"])
    ev = gpdiff_evaluate(store, p, ZooConfig.model_validate(meta["zoo_cfg"]), meta["tokens_id"], den,
                         np.asarray(meta["nodes"]), meta["samples_per_node"], meta["seed"], ("val", "test"),
                         meta["objective"], meta["finetune_epochs"])
    return {"task": "forecast", "objective": meta["objective"], "val": ev["val"], "test": ev["test"],
            "sampling_s": ev["sampling_s"], "nodes": len(meta["nodes"])}


def _csv(rows: list[dict]) -> bytes:
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return buf.getvalue().encode()


def write_sweep_report(cfg: SweepConfig, base, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Build (or find) the report artefact of the sweep; returns its id, whether it was
    already in the store, the best trial and the winner's test figures."""
    import optuna

    from stgray.cli.common import format_table
    from stgray.sweeps.driver import fetch_optuna, load_results, store_for, sweep_paths, trial_rows
    from stgray.sweeps.trial import read_checkpoint_files

    store = store_for(cfg, base)
    name = experiment_name(cfg, base)
    paths = sweep_paths(store, name)
    results = load_results(store, paths)
    rows = trial_rows(results)
    finished = [r for r in results if not r.error and (r.metrics or {}).get(METRIC) is not None]
    if not finished:
        from stgray.errors import StoreError

        raise StoreError("the sweep has no finished trial yet", where=name)
    best = results.get_best_result(metric=METRIC, mode=MODE, scope="last")
    best_id = best.metrics.get("trial_id")
    if best.checkpoint is None:
        from stgray.errors import StoreError

        raise StoreError(f"best trial {best_id} has no checkpoint", where=name)
    files = read_checkpoint_files(best.checkpoint)
    meta = json.loads(files["trial.json"])
    target_id = meta["target_id"]
    key = {"experiment": name, "trials": sorted([r["trial_id"], r["val_mae"]] for r in rows), "v": 1}
    aid = store.id_for(REPORT_KIND, key, [target_id])
    if store.exists(aid):
        m = store.manifest(aid)
        return {"report": aid, "skipped": True, **m.meta}
    wid = store.id_for(WINNER_KIND, {"experiment": name, "trial": best_id, "v": 1}, [target_id])
    if store.exists(wid):  # a report of an earlier state of the sweep had the same winner
        winner = store.read_json(wid, "winner.json")
        say(f"[sweep report] {name}: {len(rows)} trials; winner {best_id} (test figures in {wid})")
    else:
        say(f"[sweep report] {name}: {len(rows)} trials; winner {best_id} (val MAE "
            f"{best.metrics[METRIC]:.4g}); evaluating it on test once")
        winner = evaluate_winner(store, files)
        with store.writer(WINNER_KIND, {"experiment": name, "trial": best_id, "v": 1}, [target_id],
                          label=f"sweep winner {best_id}", meta=winner) as w:
            w.put_json("winner.json", winner)
            for fname, data in files.items():
                w.put_bytes(f"checkpoint/{fname}", data)
    fetch_optuna(store, paths)
    if not Path(paths.optuna_db).exists():
        from stgray.errors import StoreError

        raise StoreError("the sweep's Optuna study is neither here nor in the store",
                         where=paths.optuna_remote or paths.optuna_db)
    study = optuna.load_study(study_name=name, storage=paths.optuna_url)
    plots, notes = optuna_plots(study)
    if cfg.method == "stgp":
        plots["accuracy_vs_bank_size.png"] = plot_bank_size(rows)
    else:
        plots["accuracy_vs_diffusion_steps.png"] = plot_diffusion_steps(rows)
    show = [{k: v for k, v in r.items() if k not in ("replayed",)} for r in rows]
    table = format_table(show)
    obj = (f"{cfg.stgp.task} task prompting" if cfg.method == "stgp"
           else f"GPDiff {cfg.gpdiff.objective.replace('_', '-')} (sample picked per node on the train days)")
    ex = results._experiment_analysis  # noqa: SLF001 (only for the trial count by status)
    statuses: dict[str, int] = {}
    for t in ex.trials:
        statuses[t.status] = statuses.get(t.status, 0) + 1
    md = [f"# Sweep report: {cfg.name} ({cfg.method})", "",
          f"Experiment `{name}` in `{paths.experiment_uri(store)}`: {len(rows)} trials "
          f"({', '.join(f'{v} {k.lower()}' for k, v in sorted(statuses.items()))}); objective: validation MAE "
          f"on **{base.target}** ({obj}), data units, lower is better. Searcher: Optuna "
          f"{cfg.searcher.sampler.upper()} (seed {cfg.seed}); scheduler: {cfg.scheduler.type.upper()}. "
          "Selection used the validation days only; the winner was evaluated on test once, here.", "",
          "## Winner (Tune `get_best_result`, metric val_mae, mode min)", "",
          f"Trial `{best_id}`: validation MAE {best.metrics[METRIC]:.4f}; parameters "
          f"`{json.dumps(best.config, default=str)}`.", "",
          "Test (" + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                               for k, v in winner["test"].items()) + ")"
          + (f"; validation re-computed {winner['val']['mae']:.4f}" if "val" in winner else "") + ".", "",
          "## Trials (best first)", "", table, ""]
    for fname, title in (("optimization_history.png", "Optimisation history"),
                         ("param_importances.png", "Parameter importances"),
                         ("accuracy_vs_bank_size.png", "Accuracy vs prompt-bank size"),
                         ("accuracy_vs_diffusion_steps.png", "Accuracy and sampling time vs diffusion steps")):
        if fname in plots:
            md += [f"## {title}", "", f"![{title}]({fname})", ""]
    if notes:
        md += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    md += ["## Watch / inspect", "", f"- `optuna-dashboard {paths.optuna_url}` (copy in this report: optuna.db)",
           f"- `tensorboard --logdir {paths.experiment_uri(store)}` (event files per trial)", ""]
    info = {"experiment": name, "best_trial_id": best_id, "best_val_mae": best.metrics[METRIC],
            "best_params": best.config, "table_best_trial_id": rows[0]["trial_id"], "winner": winner,
            "trials": len(rows), "notes": notes}
    from stgray.sweeps.driver import _backup_sqlite

    with store.writer(REPORT_KIND, key, [target_id], label=f"sweep report {cfg.name}", meta=info) as w:
        w.put_bytes("report.md", "\n".join(md).encode())
        w.put_bytes("trials.md", table.encode())
        w.put_bytes("trials.csv", _csv(rows))
        w.put_json("trials.json", {"rows": rows, "best": {"trial_id": best_id, "val_mae": best.metrics[METRIC],
                                                          "params": best.config}})
        w.put_json("winner.json", winner)
        for fname, data in plots.items():
            w.put_bytes(fname, data)
        w.put_bytes("optuna.db", _backup_sqlite(paths.optuna_db))
    return {"report": aid, "skipped": False, **info}
