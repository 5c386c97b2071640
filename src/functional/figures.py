"""Figures of the functional analyses: data in, matplotlib figures out (nothing is saved here).

fig = barrier_figure(result.curves, title="step 1000, m0-m1")
fig = convergence_figure(history, "conv2")   # history: {metric key: [(step, value), ...]}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from convergent.functional.interpolate import Curve
from convergent.monitor.plotting import log_scale

METHOD_STYLE = {
    "naive": ("tab:gray", "naive"),
    "matched": ("tab:blue", "matched (activations)"),
    "repair": ("tab:green", "matched + REPAIR"),
    "weight": ("tab:orange", "weight matching"),
}
# Representational (similarity, up) and functional (cost, down) series of one layer's figure.
REPRESENTATIONAL = ("align/{layer}/semi_match", "cka/{layer}/linear")
FUNCTIONAL = (
    "func/{layer}/stitch_penalty/perm",
    "func/{layer}/stitch_penalty/lstsq",
    "func/barrier/matched",
    "func/barrier/repair",
)


def barrier_figure(curves: Mapping[str, Curve], title: str = "") -> Figure:
    """Loss (left) and accuracy (right) along the interpolation t, one line per method."""
    if not curves:
        raise ValueError("no curves to draw: evaluate at least one interpolation method")
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(8.0, 3.2))
    for method, c in curves.items():
        colour, label = METHOD_STYLE.get(method, (None, method))
        ax_loss.plot(c.t, c.loss, "o-", ms=3, color=colour, label=f"{label} (barrier {c.barrier:.3g})")
        ax_acc.plot(c.t, c.acc, "o-", ms=3, color=colour, label=f"{label} (t=0.5: {c.mid_acc:.3f})")
    ax_loss.set_xlabel("t  ((1 - t) a + t b)")
    ax_loss.set_ylabel("probe loss (mean cross-entropy)")
    ax_acc.set_xlabel("t  ((1 - t) a + t b)")
    ax_acc.set_ylabel("probe accuracy")
    for ax in (ax_loss, ax_acc):
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.15, top=0.88, wspace=0.28)
    return fig


def _series(history: Mapping[str, Sequence[tuple[int, float]]], key: str) -> tuple[np.ndarray, np.ndarray] | None:
    points = sorted(history.get(key) or [])
    if not points:
        return None
    steps = np.array([s for s, _ in points], dtype=float)
    return np.maximum(steps, 0.5), np.array([v for _, v in points], dtype=float)


def convergence_figure(
    history: Mapping[str, Sequence[tuple[int, float]]],
    layer: str,
    representational: Sequence[str] = REPRESENTATIONAL,
    functional: Sequence[str] = FUNCTIONAL,
) -> Figure | None:
    """One layer over training: representational measures (top) and functional ones (bottom) on
    the same global-step axis (log x, step 0 drawn at 0.5, as `plotting.over_training_figure`).
    Keys may contain ``{layer}``. None when no key has data."""
    top = [(k.format(layer=layer), _series(history, k.format(layer=layer))) for k in representational]
    bottom = [(k.format(layer=layer), _series(history, k.format(layer=layer))) for k in functional]
    top, bottom = [(k, s) for k, s in top if s], [(k, s) for k, s in bottom if s]
    if not top and not bottom:
        return None
    fig, (ax_rep, ax_fun) = plt.subplots(2, 1, figsize=(5.5, 5.0), sharex=True)
    for ax, series in ((ax_rep, top), (ax_fun, bottom)):
        for key, (steps, values) in series:
            ax.plot(steps, values, "o-", ms=3, label=key)
        log_scale(ax, "x", minor=False)
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize=6)
    ax_rep.set_ylabel("representational similarity")
    ax_fun.set_ylabel("functional cost\n(accuracy penalty, loss barrier)")
    ax_fun.axhline(0.0, color="black", lw=0.6)
    ax_fun.set_xlabel("global step (step 0 drawn at 0.5)")
    ax_rep.set_title(f"{layer}: representational vs functional convergence over training", fontsize=8)
    fig.subplots_adjust(left=0.14, right=0.97, bottom=0.1, top=0.93, hspace=0.08)
    return fig
