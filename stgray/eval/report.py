"""The shared results table and the run report (Markdown + PNG plots) written to the store."""

from __future__ import annotations

import io
import math
from collections import defaultdict
from typing import Any

import numpy as np

from stgray.eval.metrics import summarise_seeds


def aggregate_rows(rows: list[dict[str, Any]], keys=("target", "task", "method"),
                   metrics=("mae", "rmse", "mape")) -> list[dict[str, Any]]:
    """Mean and std over seeds of rows sharing ``keys``; keeps first-seen order."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[tuple(r.get(k) for k in keys)].append(r)
    out = []
    for gk, rs in groups.items():
        row: dict[str, Any] = dict(zip(keys, gk))
        row["seeds"] = len(rs)
        for m in metrics:
            vals = [r[m] for r in rs if r.get(m) is not None and not math.isnan(r[m])]
            if vals:
                mu, sd = summarise_seeds(vals)
                row[m] = mu
                row[f"{m}_std"] = sd
        out.append(row)
    return out


def results_markdown(rows: list[dict[str, Any]]) -> str:
    from stgray.cli.common import format_table

    agg = aggregate_rows(rows)
    show = []
    for r in agg:
        s = {k: r[k] for k in ("target", "task", "method", "seeds")}
        for m in ("mae", "rmse", "mape"):
            if m in r:
                s[m.upper()] = f"{r[m]:.3f} ± {r[m + '_std']:.3f}" if r["seeds"] > 1 else f"{r[m]:.3f}"
        show.append(s)
    return format_table(show)


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def plot_forecasts(truth: np.ndarray, preds: dict[str, np.ndarray], node_names: list[str],
                   title: str = "forecast vs truth") -> bytes:
    """truth: (T, K) series of K nodes; preds: method -> (T, K) one-step-aligned forecasts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = truth.shape[1]
    fig, axes = plt.subplots(k, 1, figsize=(10, 2.2 * k), sharex=True, squeeze=False)
    for i in range(k):
        ax = axes[i, 0]
        ax.plot(truth[:, i], color="black", lw=1.4, label="truth")
        for name, p in preds.items():
            ax.plot(p[:, i], lw=1.0, label=name)
        ax.set_ylabel(node_names[i], fontsize=8)
    axes[0, 0].legend(fontsize=7, ncol=len(preds) + 1, loc="upper right")
    axes[0, 0].set_title(title)
    axes[-1, 0].set_xlabel("test step")
    return png_bytes(fig)


def plot_param_distributions(trained: np.ndarray, generated: np.ndarray, names: list[str] | None = None,
                             title: str = "parameters: trained zoo vs generated") -> bytes:
    """Histograms of all parameter values, trained (M, P) vs generated (M', P)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    lo, hi = np.percentile(np.concatenate([trained.ravel(), generated.ravel()]), [0.5, 99.5])
    bins = np.linspace(lo, hi, 80)
    axes[0].hist(trained.ravel(), bins=bins, alpha=0.6, density=True, label="trained")
    axes[0].hist(generated.ravel(), bins=bins, alpha=0.6, density=True, label="generated")
    axes[0].set_title("all values")
    axes[0].legend()
    axes[1].scatter(trained.mean(0), generated.mean(0), s=2, alpha=0.4)
    lim = [min(trained.mean(0).min(), generated.mean(0).min()), max(trained.mean(0).max(), generated.mean(0).max())]
    axes[1].plot(lim, lim, color="grey", lw=0.8)
    axes[1].set_xlabel("mean over trained models")
    axes[1].set_ylabel("mean over generated")
    axes[1].set_title("per-position mean")
    fig.suptitle(title)
    return png_bytes(fig)
