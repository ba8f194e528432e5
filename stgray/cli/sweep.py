"""``stgray sweep``: hyper-parameter sweeps of STGP / GPDiff settings (Ray Tune + Optuna TPE
+ ASHA), resumable, with a report."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from stgray.cli.common import StoreOpt, format_table

app = typer.Typer(help="Hyper-parameter sweeps (Ray Tune + Optuna + ASHA) over STGP and GPDiff settings.",
                  no_args_is_help=True)

ConfigArg = typer.Argument(..., help="Sweep config (YAML), e.g. configs/sweep_stgp.yaml.")
DataDirOpt = typer.Option(None, help="Datasets folder (default $STGRAY_DATA_DIR or ../shared/datasets).")

_SHOW = ("trial_id", "status", "val_mae", "iterations")


def _short(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k in _SHOW or k.startswith("param:")} for r in rows]


@app.command("run")
def run(config: Path = ConfigArg, store: StoreOpt = None, data_dir: Optional[str] = DataDirOpt,
        max_concurrent: Optional[int] = typer.Option(None, min=1, help="Trials at once (default: cluster "
                                                     "CPUs // cpus_per_trial)."),
        report: bool = typer.Option(False, "--report/--no-report", help="Also write the report at the end.")) -> None:
    """Run the sweep, or resume it (same config and store: finished trials are kept)."""
    from stgray.sweeps.config import load_sweep
    from stgray.sweeps.driver import run_sweep

    cfg, base = load_sweep(config, {"store": store, "data_dir": data_dir, "max_concurrent": max_concurrent})
    s = run_sweep(cfg, base, say=typer.echo)
    typer.echo("")
    typer.echo(format_table(_short(s["rows"]), title=f"trials of {s['experiment']} (best first; val_mae = "
                                                      f"validation MAE on {base.target})"))
    b = s["best"]
    typer.echo(f"\nbest trial {b['trial_id']}: val_mae {b['val_mae']:.4f} {b['params']}")
    typer.echo(f"{s['terminated']}/{s['num_samples']} trials finished, {s['errors']} errors, "
               f"{s['replayed']} handed back after an interruption; {s['seconds']:.0f} s")
    typer.echo(f"optuna-dashboard {s['optuna_url']}")
    if report:
        _report(config, store, data_dir, None)


def _report(config: Path, store: str | None, data_dir: str | None, out: Path | None) -> None:
    from stgray.store import ArtifactStore
    from stgray.sweeps.config import load_sweep
    from stgray.sweeps.driver import store_for
    from stgray.sweeps.report import write_sweep_report

    cfg, base = load_sweep(config, {"store": store, "data_dir": data_dir})
    r = write_sweep_report(cfg, base, say=typer.echo)
    st: ArtifactStore = store_for(cfg, base)
    w = r["winner"]
    typer.echo(f"report: {st.url}/{r['report']} ({'already in store' if r['skipped'] else 'written'})")
    typer.echo(f"winner {r['best_trial_id']}: val_mae {r['best_val_mae']:.4f}; test " +
               ", ".join(f"{k} {v:.4g}" for k, v in w["test"].items() if isinstance(v, float)))
    if out:
        out.mkdir(parents=True, exist_ok=True)
        for name in st.manifest(r["report"]).files:
            (out / name).write_bytes(st.read_bytes(r["report"], name))
        typer.echo(f"report copied to {out}/report.md")


@app.command("report")
def report(config: Path = ConfigArg, store: StoreOpt = None, data_dir: Optional[str] = DataDirOpt,
           out: Optional[Path] = typer.Option(None, help="Also copy the report files here.")) -> None:
    """Table of trials, plots, and the winner evaluated once on test (a store artefact)."""
    _report(config, store, data_dir, out)


@app.command("status")
def status(config: Path = ConfigArg, store: StoreOpt = None) -> None:
    """The trials so far (read from the store; works while the sweep runs)."""
    from stgray.sweeps.config import experiment_name, load_sweep
    from stgray.sweeps.driver import load_results, saved_trials, store_for, sweep_paths, trial_rows

    cfg, base = load_sweep(config, {"store": store})
    st = store_for(cfg, base)
    paths = sweep_paths(st, experiment_name(cfg, base))
    rows = trial_rows(load_results(st, paths))
    saved = saved_trials(st, paths)
    show = [{**r, "saved": saved.get(r["trial_id"], "-")} for r in _short(rows)]
    typer.echo(format_table(show, title=f"{paths.name}: {len(rows)} of {cfg.num_samples} trials "
                                        "(saved: the status a resume starts from)"))
    typer.echo(f"optuna-dashboard {paths.optuna_url}")
