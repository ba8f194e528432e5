"""Ray Tune pieces the sweep driver plugs in (module level, so Tune can pickle them into
its experiment state and restore them).

Why a custom searcher: Tune saves the experiment state, the searcher state and the
trial counter as separate files and uploads them together, in parallel; a run killed
during an upload can leave a mix of old and new files (seen on S3: a restored
concurrency limiter waiting forever for a trial the restored experiment did not have).
So Tune runs without its own limits (``num_samples=-1``, no ``max_concurrent_trials``)
and this searcher (1) stops suggesting once Tune's own list of trials (the authoritative
one, seen by ``TrialCount``) holds ``num_samples`` trials, (2) suggests only while fewer
than ``max_concurrent`` of them are pending or running, and (3) accepts results for
trials the restored searcher never asked for, or whose Optuna trial is already closed,
recording them in the study instead of failing.
"""

from __future__ import annotations

import logging

import optuna
from ray import tune
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

logger = logging.getLogger(__name__)

#: experiment name -> (trials in Tune's list, of which pending/running/paused); updated at
#: every controller step and by each suggestion
_TRIALS: dict[str, tuple[int, int]] = {}
_LIVE = ("PENDING", "RUNNING", "PAUSED")


class TrialCount(tune.Callback):
    """Keeps ``_TRIALS[experiment]`` up to date from Tune's list of trials."""

    def __init__(self, experiment: str):
        self.experiment = experiment

    def on_step_begin(self, iteration, trials, **info):
        _TRIALS[self.experiment] = (len(trials), sum(1 for t in trials if t.status in _LIVE))


class ResumableOptunaSearch(OptunaSearch):
    """OptunaSearch that keeps to ``num_samples`` and ``max_concurrent`` on Tune's list
    and tolerates a searcher state that is behind or ahead of Tune's after a kill."""

    def __init__(self, *args, experiment: str, num_samples: int, max_concurrent: int, **kwargs):
        super().__init__(*args, **kwargs)
        self._experiment, self._num_samples = experiment, int(num_samples)
        self._max_concurrent = int(max_concurrent)

    def suggest(self, trial_id: str):
        if trial_id not in self._ot_trials:
            total, live = _TRIALS.get(self._experiment, (0, 0))
            if total >= self._num_samples:
                return Searcher.FINISHED
            if live >= self._max_concurrent:
                return None
            _TRIALS[self._experiment] = (total + 1, live + 1)
        return super().suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id not in self._ot_trials:
            return  # restored by Tune, unknown to this (older) searcher state
        try:
            super().on_trial_result(trial_id, result)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # a finished trial handing its result back after a resume

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._ot_trials:
            return super().on_trial_complete(trial_id, result, error)
        if trial_id in self._completed_trials:
            return
        self._completed_trials.add(trial_id)
        if error or not result or result.get(self.metric) is None or not hasattr(self._space, "specs"):
            return
        from stgray.sweeps.space import distribution

        config = result.get("config") or {k[len("config/"):]: v for k, v in result.items()
                                          if k.startswith("config/")}
        dists = {k: distribution(self._space.specs[k]) for k in config if k in self._space.specs}
        try:
            self._ot_study.add_trial(optuna.trial.create_trial(
                params={k: config[k] for k in dists}, distributions=dists, value=float(result[self.metric]),
                user_attrs={"tune_trial_id": trial_id}))
        except Exception as e:  # the sweep goes on; only the study misses this trial
            logger.warning("could not record trial %s in the Optuna study: %s", trial_id, e)


class OptunaUpload(tune.Callback):
    """Uploads the SQLite study to the store after each finished trial (S3 stores)."""

    def __init__(self, store, paths):
        self.store, self.paths = store, paths

    def on_trial_complete(self, iteration, trials, trial, **info):
        from stgray.sweeps.driver import upload_optuna

        try:
            upload_optuna(self.store, self.paths)
        except Exception as e:  # the sweep goes on; the end of the run uploads again
            print(f"[sweep] could not upload the Optuna study: {type(e).__name__}: {e}", flush=True)
