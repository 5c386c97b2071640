"""Figure plumbing: the garbage-collection pause around drawing, plain log-axis labels."""

from __future__ import annotations

import gc
import weakref

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from convergent.plotting import OVER_TRAINING, collecting_young_garbage, over_training_figure  # noqa: E402


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
    family, name = OVER_TRAINING[0]
    history = {f"{family}/conv1/{name}": [(s, 0.1 * i) for i, s in enumerate([0, 1, 2, 5, 10, 22, 46, 100, 215])]}
    fig = over_training_figure(history, family, name, ["conv1"])
    try:
        fig.canvas.draw()
        labels = [t.get_text() for t in fig.axes[0].get_xticklabels() if t.get_text()]
        assert labels and not any("$" in t for t in labels), labels  # no mathtext
        assert {"1", "10", "100"} <= set(labels), labels
    finally:
        plt.close(fig)
