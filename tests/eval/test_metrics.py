import numpy as np

from stgray.eval.metrics import forecast_metrics


def test_metrics_by_hand():
    true = np.array([[[0.0, 2.0], [4.0, 1.0]]])  # (B=1, H=2, N=2)
    pred = np.array([[[1.0, 2.0], [2.0, 2.0]]])
    m = forecast_metrics(pred, true)
    assert m["mae"] == 1.0
    assert np.isclose(m["rmse"], np.sqrt((1 + 0 + 4 + 1) / 4))
    assert np.isclose(m["mape"], 100 * np.mean([0.0, 0.5, 1.0]))  # zero truth excluded
    assert m["horizon"][0]["mae"] == 0.5 and m["horizon"][1]["mae"] == 1.5
