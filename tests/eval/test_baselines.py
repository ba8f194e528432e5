import numpy as np
import pandas as pd

from stgray.data.city import City
from stgray.data.prepare import PrepareConfig, prepare
from stgray.eval.baselines import historical_average, kriging_neighbour_mean, persistence


def _city(days=10, n=4):
    t = days * 24
    hours = np.arange(t) % 24
    s = np.repeat((hours * 1.0)[:, None], n, 1)[:, :, None].astype(np.float32)  # value = hour of day
    s[:, 1] += 100.0
    edges = np.array([[0, 1], [1, 0], [1, 2], [2, 1], [2, 3], [3, 2]])
    return City(name="toy", series=s, start=pd.Timestamp("2024-01-01"), step_s=3600, features=["inflow"],
                units=["n"], aggregation=["sum"], edges=edges, weights=np.ones(6, np.float32),
                node_ids=list("abcd"))


def test_historical_average_and_persistence_by_hand():
    p = prepare(_city(), PrepareConfig(), "target")
    starts = p.window_starts("test", 12, 6)
    ha = historical_average(p, starts, 12, 6)
    truth = p.raw[starts[:, None] + 12 + np.arange(6)[None]]
    # a pure daily pattern: hour-of-week slots unseen in the 3 train days fall back to hour of day
    np.testing.assert_allclose(ha, truth)
    pe = persistence(p, starts, 12, 6)
    np.testing.assert_allclose(pe[:, 0], p.raw[starts + 11])


def test_kriging_neighbour_mean_uses_observed_neighbours_only():
    p = prepare(_city(), PrepareConfig(unobserved_frac=0.25, split_seed=3), "target")
    (u,) = p.unobserved
    starts = np.array([0, 5])
    est = kriging_neighbour_mean(p, starts, 4)
    nb = [j for j in (u - 1, u + 1) if 0 <= j < 4]
    np.testing.assert_allclose(est[:, :, 0], p.raw[starts[:, None] + np.arange(4)][:, :, nb].mean(-1))
