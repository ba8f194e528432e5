"""Hyper-parameter sweeps over the settings the papers fix (prompt-bank size, diffusion
steps, width, ...): Ray Tune + Optuna (TPE, define-by-run spaces) + ASHA, results,
checkpoints and the Optuna study on the store, resumable, with a report.

    config.py   SweepConfig (YAML), its space and the experiment name
    space.py    the search space as an Optuna define-by-run function
    trial.py    the per-trial functions (STGP prompting, GPDiff denoiser) run by Tune
    driver.py   the base artefacts, the Tuner (new or restored), the Optuna storage
    tune_ext.py the searcher and callback classes Tune pickles with the experiment
    report.py   table of trials, plots, the winner re-evaluated once on test
"""

from stgray.sweeps.config import SweepConfig, experiment_name, load_sweep

__all__ = ["SweepConfig", "experiment_name", "load_sweep"]
