"""Figures drawn from a `StepReport`'s typed results (and the run's history). Data in, matplotlib
figures out.

Correlation heatmaps use a diverging colour map fixed to [-1, 1]. Every figure is closed by the
caller after it is written (`sinks`), so long runs and multiruns do not accumulate figures.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import LogFormatter, NullLocator  # noqa: E402

from convergent.analysis.builtin.sparse import l1_label  # noqa: E402
from convergent.analysis.registry import pair_suffix  # noqa: E402
from convergent.monitor.step import StepReport  # noqa: E402

CORR_CMAP = "RdBu_r"


def _tidy(fig: Figure, bottom: float = 0.08) -> None:
    """Fixed margins: matplotlib's tight_layout costs more than drawing these figures. `bottom`:
    a single row of panels needs more room than 0.08 of its height for tick labels and x label."""
    fig.subplots_adjust(left=0.07, right=0.97, bottom=bottom, top=0.9, wspace=0.3, hspace=0.45)


def _title(ax, text: str, fontsize: int) -> None:
    """An axes title at a fixed height (where matplotlib puts it when no ticks are on top, as
    here): the automatic placement lays out every tick label of the axes once more per draw."""
    ax.set_title(text, fontsize=fontsize, y=1.0)


def log_scale(ax, axis: str, minor: bool = True) -> None:
    """Log scale with plain-text tick labels ("1e-06"), labelled as matplotlib's default does
    (minor ticks too on a short range): its mathtext labels ($10^{-6}$) cost more to lay out
    than the rest of a panel. `minor=False`: no minor ticks (on a step axis of several decades
    they are unlabelled, and their ~30 tick objects are half of a panel's drawing time)."""
    getattr(ax, f"set_{axis}scale")("log")
    ticks = getattr(ax, f"{axis}axis")
    ticks.set_major_formatter(LogFormatter())
    if minor:
        ticks.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    else:
        ticks.set_minor_locator(NullLocator())


@contextlib.contextmanager
def collecting_young_garbage():
    """Automatic garbage collection paused while figures are drawn and written, then one
    collection of the young generation. A matplotlib figure is a graph of reference cycles:
    while eight of them are drawn the collector promotes their objects and runs full
    collections over the whole training process (~0.4 s each at ~700k objects). Paused, the
    closed figures are still young and one young collection frees them (what older garbage
    still points to, ~20k objects a step, waits for the next full collection). The collector's
    previous state is restored."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
            gc.collect(0)


def _heatmap(ax, m: np.ndarray, title: str) -> None:
    ax.imshow(np.nan_to_num(m), cmap=CORR_CMAP, vmin=-1, vmax=1, interpolation="nearest")
    _title(ax, title, 8)
    ax.set_xticks([])
    ax.set_yticks([])


def _grid(n: int, size: float = 2.6) -> tuple[Figure, np.ndarray]:
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, axes.flat


def _results(report: StepReport, name: str, layers: Sequence[str]) -> list[tuple[str, Any]]:
    """(layer, result) of analysis `name` for the layers it ran on, in layer order."""
    per_layer = report.results.get(name, {})
    return [(layer, per_layer[layer]) for layer in layers if layer in per_layer]


def correlation_figure(report: StepReport, layers: Sequence[str], a: int, b: int) -> Figure | None:
    """One row per layer: within-net a, within-net b, between-net in original order, between-net
    permuted by the max matching (matched pairs on the diagonal)."""
    from convergent.analysis.matching import permute_to_matching

    present = [(l, r) for l, r in _results(report, "correlation", layers) if (a, b) in r.corr]
    if not present:
        return None
    fig, axes = plt.subplots(len(present), 4, figsize=(8.4, 2.2 * len(present)), squeeze=False)
    for row, (layer, r) in zip(axes, present):
        corr = r.corr[(a, b)].cpu().numpy()
        panels = [
            (r.within.get(a), f"{layer} within m{a}"),
            (r.within.get(b), f"{layer} within m{b}"),
            (corr, f"{layer} m{a} x m{b}"),
            (permute_to_matching(corr, r.best[(a, b)][0].cpu().numpy()), f"{layer} max-matched"),
        ]
        for ax, (m, title) in zip(row, panels):
            if m is None:
                ax.axis("off")
            else:
                _heatmap(ax, np.asarray(m.cpu() if hasattr(m, "cpu") else m), title)
    fig.suptitle(f"correlation (colour scale -1..1), step {report.step}", fontsize=8)
    _tidy(fig)
    return fig


def matching_figure(report: StepReport, layers: Sequence[str], a: int, b: int) -> Figure | None:
    """Per layer: matched correlations sorted, semi-matching vs max matching."""
    present = [(l, r) for l, r in _results(report, "correlation", layers) if (a, b) in r.semi]
    if not present:
        return None
    fig, axes = _grid(len(present))
    for ax, (layer, r) in zip(axes, present):
        semi = np.sort(r.semi[(a, b)][1].cpu().numpy())[::-1]
        idx, value = (t.cpu().numpy() for t in r.best[(a, b)])
        best = np.sort(value[idx >= 0])[::-1]
        ax.plot(semi, label="semi-matching")
        ax.plot(best, label="max matching")
        ax.set_ylim(-0.05, 1.0)
        _title(ax, layer, 8)
        ax.set_xlabel("unit (sorted)", fontsize=7)
    axes[0].set_ylabel("correlation", fontsize=7)
    axes[0].legend(fontsize=6)
    fig.suptitle(f"matched correlations m{a} x m{b}, step {report.step}", fontsize=8)
    _tidy(fig)
    return fig


def spectral_figure(report: StepReport, layers: Sequence[str], a: int, b: int) -> Figure | None:
    """Per layer: the combined [[C_aa, C_ab], [C_ba, C_bb]] matrix permuted by spectral cluster,
    cluster blocks outlined."""
    corr = report.results.get("correlation", {})
    present = [
        (l, r, corr[l])
        for l, r in _results(report, "spectral", layers)
        if (a, b) in r.order and l in corr and a in corr[l].within and b in corr[l].within
    ]
    if not present:
        return None
    fig, axes = _grid(len(present))
    for ax, (layer, r, c) in zip(axes, present):
        cab = c.corr[(a, b)].cpu().numpy()
        combined = np.block([[c.within[a].cpu().numpy(), cab], [cab.T, c.within[b].cpu().numpy()]])
        order = r.order[(a, b)]
        _heatmap(ax, combined[np.ix_(order, order)], layer)
        for edge in r.boundaries[(a, b)][1:-1]:
            ax.axhline(edge - 0.5, color="k", lw=0.5)
            ax.axvline(edge - 0.5, color="k", lw=0.5)
    fig.suptitle(f"m{a}+m{b} units by spectral cluster, step {report.step}", fontsize=8)
    _tidy(fig)
    return fig


def dendrogram_figure(report: StepReport, layers: Sequence[str], a: int, b: int) -> Figure | None:
    """Per layer: hierarchical merges of both nets' units; leaves marked by net."""
    from scipy.cluster.hierarchy import dendrogram

    present = [(l, r) for l, r in _results(report, "hierarchical", layers) if (a, b) in r.linkage]
    if not present:
        return None
    fig, axes = plt.subplots(len(present), 1, figsize=(7, 1.6 * len(present)), squeeze=False)
    for ax, (layer, r) in zip(axes[:, 0], present):
        n_a = r.n_a[(a, b)]
        tree = dendrogram(r.linkage[(a, b)], ax=ax, no_labels=True, color_threshold=0, above_threshold_color="0.4")
        leaves = np.array(tree["leaves"])
        x = np.arange(5, 10 * len(leaves), 10)
        ax.scatter(x[leaves < n_a], np.zeros((leaves < n_a).sum()), marker="|", color="tab:blue", s=12)
        ax.scatter(x[leaves >= n_a], np.zeros((leaves >= n_a).sum()), marker="|", color="tab:orange", s=12)
        ax.set_ylabel(layer, fontsize=7)
        ax.tick_params(labelsize=6)
    fig.suptitle(f"merges on 1 - correlation: m{a} (blue) and m{b} (orange), step {report.step}", fontsize=8)
    _tidy(fig)
    return fig


def mean_activation_figure(report: StepReport, layers: Sequence[str]) -> Figure | None:
    """Sorted per-unit mean activation per layer, all members overlaid (log scale)."""
    present = _results(report, "mean_activation", layers)
    if not present:
        return None
    fig, axes = _grid(len(present))
    for ax, (layer, r) in zip(axes, present):
        for i, means in r.means.items():
            ax.plot(np.maximum(np.sort(means.cpu().numpy())[::-1], 1e-8), lw=1, label=f"m{i}")
        log_scale(ax, "y")
        _title(ax, layer, 8)
    axes[0].legend(fontsize=6)
    fig.suptitle(f"mean activation per unit (sorted), step {report.step}", fontsize=8)
    _tidy(fig)
    return fig


def sparse_figure(report: StepReport, layers: Sequence[str]) -> Figure | None:
    """Held-out error vs mean non-zero weights along the L1 path, per layer (pair averages)."""
    present = [(l, r) for l, r in _results(report, "sparse", layers) if r.fits]
    if not present:
        return None
    fig, axes = _grid(len(present))
    for ax, (layer, r) in zip(axes, present):
        labels = [l1_label(w) for w in r.l1]
        err = [r.error[label].value for label in labels]
        nnz = [float(np.mean([float(f.nnz[i]) for f in r.fits.values()])) for i in range(len(labels))]
        ax.plot(nnz, err, "o-")
        for label, x, y in zip(labels, nnz, err):
            ax.annotate(label, (x, y), fontsize=5)
        _title(ax, layer, 8)
        ax.set_xlabel("non-zero weights per unit", fontsize=7)
    axes[0].set_ylabel("held-out error", fontsize=7)
    fig.suptitle(f"sparse prediction, step {report.step}", fontsize=8)
    _tidy(fig)
    return fig


def cross_layer_figure(report: StepReport, layers: Sequence[str], a: int, b: int) -> Figure | None:
    """Layer x layer similarity of m{a} vs m{b} for every measure (image-level features)."""
    r = report.result("cross_layer")
    panels = [] if r is None else [(label, m[(a, b)]) for label, m in sorted(r.matrices.items()) if (a, b) in m]
    if not panels:
        return None
    fig, axes = _grid(len(panels), size=2.8)
    for ax, (label, m) in zip(axes, panels):
        ax.imshow(m, cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(len(r.layers)), r.layers, rotation=90, fontsize=5)
        ax.set_yticks(range(len(r.layers)), r.layers, fontsize=5)
        _title(ax, label, 7)
    fig.suptitle(f"cross-layer similarity m{a} (rows) x m{b} (cols), step {report.step}", fontsize=8)
    _tidy(fig)
    return fig


def patch_canvas(best: tuple[np.ndarray, np.ndarray], tops: dict, a: int, b: int, crop, n_pairs: int = 8):
    """Tiles of input patches for the top and bottom `n_pairs` max-matched pairs of a layer:
    per row a's top patches, a gap, b's top patches. `best`: (partner index, correlation) of a's
    units; `tops[m]`: member m's top (values, (image, y, x)). Returns (canvas, rows, geometry) or None.

    `crop(member, unit, rank)` returns the patch [S, S] or [S, S, 3] in [0, 1] (or None)."""
    idx, value = best
    if a not in tops or b not in tops:
        return None
    ranked = [u for u in np.argsort(-value) if idx[u] >= 0]
    chosen = ranked[:n_pairs] + ranked[-n_pairs:] if len(ranked) > 2 * n_pairs else ranked
    shown = min(4, tops[a][1].shape[1])
    sample = next((p for u in chosen for p in [crop(a, int(u), 0)] if p is not None), None)
    if sample is None:
        return None
    size, pad = sample.shape[0], max(1, sample.shape[0] // 8)
    cell = size + pad
    cols = 2 * shown + 1
    canvas = np.ones((len(chosen) * cell + pad, cols * cell + pad) + sample.shape[2:])
    for r, u in enumerate(chosen):
        for c in range(shown):
            for col, (member, unit) in ((c, (a, int(u))), (shown + 1 + c, (b, int(idx[u])))):
                patch = crop(member, unit, c)
                if patch is not None:
                    y, x = pad + r * cell, pad + col * cell
                    canvas[y : y + size, x : x + size] = patch
    rows = [(int(u), int(idx[u]), float(value[u])) for u in chosen]
    return canvas, rows, (size, pad, shown)


def patch_figure(
    report: StepReport, layers: Sequence[str], a: int, b: int, fields: dict, probe_set, n_pairs: int = 8
) -> Figure | None:
    """The paper's figure, one panel per conv layer: the top and bottom max-matched pairs, each
    unit shown by the input patches (receptive fields) of its top activations, with the pair's
    correlation between them. Patches are tiled into one image per layer (fast to draw)."""
    corr = report.results.get("correlation", {})
    panels = []
    for layer, r in _results(report, "patches", layers):
        if layer not in fields or layer not in corr or (a, b) not in corr[layer].best:
            continue
        tops = {m: (v.cpu().numpy(), i.cpu().numpy()) for m, (v, i) in r.top.items()}
        best = tuple(t.cpu().numpy() for t in corr[layer].best[(a, b)])
        made = patch_canvas(best, tops, a, b, patch_cropper(tops, fields[layer], probe_set), n_pairs)
        if made is not None:
            panels.append((layer, *made))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(2.4 * len(panels), 4.6), squeeze=False)
    for ax, (layer, canvas, rows, (size, pad, shown)) in zip(axes[0], panels):
        ax.imshow(canvas, cmap="gray" if canvas.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
        cell = size + pad
        for r, (_u, _v, corr_value) in enumerate(rows):
            y = pad + r * cell + size / 2
            ax.text(pad + shown * cell + size / 2, y, f"{corr_value:.2f}", ha="center", va="center", fontsize=4)
        _title(ax, layer, 7)
        ax.axis("off")
    fig.suptitle(f"top / bottom max-matched pairs: m{a} patches | corr | m{b} patches, step {report.step}", fontsize=7)
    _tidy(fig)
    return fig


def over_training_figure(
    history: dict[str, list[tuple[int, float]]], family: str, name: str, layers: Sequence[str]
) -> Figure | None:
    """Left: the value vs global step (log x) per layer, its interval shaded, the null band
    (null mean to its 95th percentile) shaded grey and the step-0 (random init) value dotted.
    Right: the score above chance, (value - null) / (perfect - null), when there is a null."""
    key = lambda layer, suffix="": f"{family}/{layer}/{name}" + (f"/{suffix}" if suffix else "")  # noqa: E731
    present = [l for l in layers if history.get(key(l))]
    if not present:
        return None
    calibrated = any(history.get(key(l, "above_null")) for l in present)
    fig, axes = plt.subplots(1, 2 if calibrated else 1, figsize=(10 if calibrated else 5.5, 3.6), squeeze=False)
    ax = axes[0, 0]
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(present)))

    def series(k: str) -> tuple[np.ndarray, np.ndarray]:
        points = sorted(history.get(k, []))
        return np.maximum(np.array([s for s, _ in points], dtype=float), 0.5), np.array([v for _, v in points])

    for colour, layer in zip(colours, present):
        steps, values = series(key(layer))
        ax.plot(steps, values, "o-", ms=3, color=colour, label=layer)
        if steps[0] == 0.5:
            ax.axhline(values[0], color=colour, lw=0.6, ls=":")
        lo, hi = series(key(layer, "ci_lo")), series(key(layer, "ci_hi"))
        if len(lo[0]) and len(lo[0]) == len(hi[0]):
            ax.fill_between(lo[0], lo[1], hi[1], color=colour, alpha=0.2, lw=0)
        null, p95 = series(key(layer, "null")), series(key(layer, "null_p95"))
        if len(null[0]):
            ax.plot(null[0], null[1], "--", lw=0.8, color=colour)
            if len(p95[0]) == len(null[0]):
                ax.fill_between(null[0], null[1], p95[1], color="0.5", alpha=0.15, lw=0)
        if calibrated:
            above = series(key(layer, "above_null"))
            axes[0, 1].plot(above[0], above[1], "o-", ms=3, color=colour, label=layer)
    log_scale(ax, "x", minor=False)
    ax.set_xlabel("global step (step 0 drawn at 0.5)")
    ax.set_ylabel(f"{family} {name}")
    _title(ax, f"{family}/{name}: band = 95 % interval; dashed + grey: null (mean to p95); dotted: step 0", 7)
    ax.legend(fontsize=6, ncol=2)
    if calibrated:
        right = axes[0, 1]
        right.axhline(0.0, color="0.5", lw=0.6)
        log_scale(right, "x", minor=False)
        right.set_xlabel("global step (step 0 drawn at 0.5)")
        right.set_ylabel("above null")
        _title(right, f"{family}/{name} above chance: (value - null) / (perfect - null)", 7)
    _tidy(fig, bottom=0.16)  # one row 3.6 in high: the x label was cut off at 0.08
    return fig


def end_figures(history: dict, plan):
    """(key, drawing function) of the figures drawn once, at the end of fit, from the history: a
    measure over training for every calibrated measure, and with the functional analyses one
    figure per layer with both kinds of convergence on one step axis."""
    for family, name in over_training_keys(plan):
        yield (
            f"over_training/{family}_{name}",
            lambda family=family, name=name: over_training_figure(history, family, name, plan.layers),
        )
    if plan.on("functional"):
        from convergent.functional.figures import convergence_figure

        for layer in plan.layers:
            yield f"over_training/convergence_{layer}", lambda layer=layer: convergence_figure(history, layer)


def over_training_keys(plan) -> list[tuple[str, str]]:
    """(family, name) of every calibrated measure drawn over training at the end of fit: the
    registered measures and mutual information's semi-matching (the sparse path is not drawn)."""
    out = [(m.family, m.short) for m in plan.measures]
    if plan.on("mutual_info"):
        out.append(("mi", "semi_match"))
    return out


def _display(patch) -> np.ndarray:
    """A patch [C, H, W] (normalised input) scaled to [0, 1] for display."""
    p = patch.detach().cpu().float().numpy()
    lo, hi = float(p.min()), float(p.max())
    p = (p - lo) / (hi - lo) if hi > lo else np.zeros_like(p)
    return p[0] if p.shape[0] == 1 else np.transpose(p[:3], (1, 2, 0))


def barrier_figure_of(report: StepReport, a: int, b: int) -> Figure | None:
    """Loss and accuracy along the interpolation of members a and b, one line per method."""
    from convergent.functional.figures import barrier_figure

    result = report.result("functional")
    if result is None or (a, b) not in result.results:
        return None
    return barrier_figure(result.results[(a, b)].curves, title=f"interpolating m{a} -> m{b}, step {report.step}")


def patch_cropper(tops: dict, field, probe_set):
    """crop(member, unit, rank) for `patch_canvas`: the receptive field of the unit's rank-th top
    activation, cut from the probe image."""
    from convergent.stats.topk import crop_patch

    def crop(member: int, unit: int, rank: int):
        image, y, x = (int(v) for v in tops[member][1][unit, rank])
        if image < 0:
            return None
        return _display(crop_patch(probe_set[image][0], field, y, x))

    return crop


def step_figures(report: StepReport, plan, fields: dict | None = None, probe_set=None):
    """Yields (key, figure) for every figure of one analysis step, one at a time. A figure that
    cannot be drawn is a failure of the step (in `report.failures`), not a crash: the others follow.
    `fields`: receptive field of every conv layer (patches); `probe_set`: the probe images."""
    for key, draw in _figure_plan(report, plan, fields, probe_set):
        before = set(plt.get_fignums())
        try:
            fig = draw()
        except Exception as e:
            report.failures.append(f"step {report.step}: figure {key} failed: {type(e).__name__}: {e}")
            for number in set(plt.get_fignums()) - before:  # left open by the failed drawing
                plt.close(number)
            continue
        if fig is not None:
            yield key, fig


def _figure_plan(report: StepReport, plan, fields, probe_set):
    """(key, drawing function) for every figure the plan asks for."""
    layers = plan.layers
    for a, b in plan.heavy_pairs:
        tag = pair_suffix(a, b)
        yield f"corr/{tag}", lambda a=a, b=b: correlation_figure(report, layers, a, b)
        yield f"matching/{tag}", lambda a=a, b=b: matching_figure(report, layers, a, b)
        if plan.on("spectral"):
            yield f"spectral/{tag}", lambda a=a, b=b: spectral_figure(report, layers, a, b)
        if plan.on("hierarchical"):
            yield f"hier/{tag}", lambda a=a, b=b: dendrogram_figure(report, layers, a, b)
        if plan.on("patches") and fields and probe_set is not None:
            n = plan.config.patches.pairs
            yield f"patches/{tag}", lambda a=a, b=b, n=n: patch_figure(report, plan.conv_layers, a, b, fields, probe_set, n)
        if plan.on("cross_layer"):
            yield f"cross_layer/{tag}", lambda a=a, b=b: cross_layer_figure(report, layers, a, b)
        if plan.on("functional"):
            yield f"functional/{tag}", lambda a=a, b=b: barrier_figure_of(report, a, b)
    if plan.on("mean_activation"):
        yield "act/mean", lambda: mean_activation_figure(report, layers)
    if plan.on("sparse"):
        yield "sparse/error_vs_nnz", lambda: sparse_figure(report, layers)
