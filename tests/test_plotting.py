"""Figure plumbing: the garbage-collection pause around drawing, plain log-axis labels."""

from __future__ import annotations

import gc
import weakref

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import PolyCollection  # noqa: E402

from convergent.monitor.plotting import collecting_young_garbage, over_training_figure  # noqa: E402


class Node:
    pass


@pytest.mark.parametrize("enabled_before", [True, False])
def test_gc_pause_frees_cycles_made_inside_and_restores_the_collector(enabled_before):
    (gc.enable if enabled_before else gc.disable)()
    try:
        with collecting_young_garbage():
            assert not gc.isenabled()
            a, b = Node(), Node()
            a.other, b.other = b, a  # a reference cycle: only the collector frees it
            alive = weakref.ref(a)
            del a, b
            assert alive() is not None
        assert gc.isenabled() is enabled_before
        if enabled_before:
            assert alive() is None  # freed by the young collection on the way out
    finally:
        gc.enable()


def test_gc_pause_restores_the_collector_after_an_error():
    with pytest.raises(RuntimeError):
        with collecting_young_garbage():
            raise RuntimeError("drawing failed")
    assert gc.isenabled()


def test_over_training_log_axis_has_plain_labels():
    family, name = "align", "semi_match"
    history = {f"{family}/conv1/{name}": [(s, 0.1 * i) for i, s in enumerate([0, 1, 2, 5, 10, 22, 46, 100, 215])]}
    fig = over_training_figure(history, family, name, ["conv1"])
    try:
        fig.canvas.draw()
        labels = [t.get_text() for t in fig.axes[0].get_xticklabels() if t.get_text()]
        assert labels and not any("$" in t for t in labels), labels  # no mathtext
        assert {"1", "10", "100"} <= set(labels), labels
    finally:
        plt.close(fig)


def test_over_training_draws_the_interval_the_null_band_and_the_score_above_chance():
    steps = [0, 1, 2, 5, 10]
    key = "cka/fc6/linear"
    history = {key: [(s, 0.5 + 0.01 * s) for s in steps]}
    history.update({f"{key}/{suffix}": [(s, v + 0.01 * s) for s in steps] for suffix, v in
                    (("ci_lo", 0.45), ("ci_hi", 0.55), ("null", 0.1), ("null_p95", 0.15), ("above_null", 0.4))})  # fmt: skip
    fig = over_training_figure(history, "cka", "linear", ["fc6"])
    try:
        left, right = fig.axes
        bands = [c for c in left.collections if isinstance(c, PolyCollection)]
        assert len(bands) == 2  # the interval and the null band
        (interval, null_band) = (b.get_paths()[0].vertices for b in bands)
        assert interval[:, 1].min() >= 0.45 - 1e-9 and interval[:, 1].max() <= 0.55 + 0.1 + 1e-9
        assert null_band[:, 1].min() >= 0.1 - 1e-9 and null_band[:, 1].max() <= 0.25 + 1e-9
        assert [tuple(line.get_ydata()) for line in right.get_lines() if len(line.get_ydata()) == 5] == [
            tuple(0.4 + 0.01 * s for s in steps)
        ]
    finally:
        plt.close(fig)
    plain = over_training_figure({key: history[key]}, "cka", "linear", ["fc6"])  # uncalibrated: one panel
    assert len(plain.axes) == 1
    plt.close(plain)
