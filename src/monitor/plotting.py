"""Figures drawn from a `StepReport` (and the run's history). Data in, matplotlib figures out.

Correlation heatmaps use a diverging colour map fixed to [-1, 1]. Every figure is closed by the
caller after it is written (`sinks`), so long runs and multiruns do not accumulate figures.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import LogFormatter  # noqa: E402

from convergent.pipeline import StepReport, l1_label, pair_suffix  # noqa: E402
from convergent.settings import AnalysisSettings  # noqa: E402

CORR_CMAP = "RdBu_r"


def _tidy(fig: Figure) -> None:
    """Fixed margins: matplotlib's tight_layout costs more than drawing these figures."""
    fig.subplots_adjust(left=0.07, right=0.97, bottom=0.08, top=0.9, wspace=0.3, hspace=0.45)


def _title(ax, text: str, fontsize: int) -> None:
    """An axes title at a fixed height (where matplotlib puts it when no ticks are on top, as
    here): the automatic placement lays out every tick label of the axes once more per draw."""
    ax.set_title(text, fontsize=fontsize, y=1.0)


def _log_scale(ax, axis: str) -> None:
    """Log scale with plain-text tick labels ("1e-06"), labelled as matplotlib's default does
    (minor ticks too on a short range): its mathtext labels ($10^{-6}$) cost more to lay out
    than the rest of a panel."""
    getattr(ax, f"set_{axis}scale")("log")
    ticks = getattr(ax, f"{axis}axis")
    ticks.set_major_formatter(LogFormatter())
    ticks.set_minor_formatter(LogFormatter(labelOnlyBase=False))


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


def correlation_figure(report: StepReport, layers: Sequence[str], a: int, b: int) -> Figure | None:
    """One row per layer: within-net a, within-net b, between-net in original order, between-net
    permuted by the max matching (matched pairs on the diagonal)."""
    from convergent.analysis.matching import permute_to_matching

    tag = pair_suffix(a, b)
    present = [l for l in layers if f"{l}/corr/{tag}" in report.arrays]
    if not present:
        return None
    fig, axes = plt.subplots(len(present), 4, figsize=(8.4, 2.2 * len(present)), squeeze=False)
    for row, layer in zip(axes, present):
        corr = report.arrays[f"{layer}/corr/{tag}"]
        panels = [
            (report.arrays.get(f"{layer}/within/m{a}"), f"{layer} within m{a}"),
            (report.arrays.get(f"{layer}/within/m{b}"), f"{layer} within m{b}"),
            (corr, f"{layer} m{a} x m{b}"),
            (permute_to_matching(corr, report.arrays[f"{layer}/max_index/{tag}"]), f"{layer} max-matched"),
        ]
        for ax, (m, title) in zip(row, panels):
            if m is None:
                ax.axis("off")
            else:
                _heatmap(ax, m, title)
    fig.suptitle(f"correlation (colour scale -1..1), step {report.step}", fontsize=8)
    _tidy(fig)
    return fig


def matching_figure(report: StepReport, layers: Sequence[str], a: int, b: int) -> Figure | None:
    """Per layer: matched correlations sorted, semi-matching vs max matching."""
    tag = pair_suffix(a, b)
    present = [l for l in layers if f"{l}/semi_value/{tag}" in report.arrays]
    if not present:
        return None
    fig, axes = _grid(len(present))
    for ax, layer in zip(axes, present):
        semi = np.sort(report.arrays[f"{layer}/semi_value/{tag}"])[::-1]
        idx = report.arrays[f"{layer}/max_index/{tag}"]
        best = np.sort(report.arrays[f"{layer}/max_value/{tag}"][idx >= 0])[::-1]
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
    tag = pair_suffix(a, b)
    present = [l for l in layers if f"{l}/spectral_order/{tag}" in report.arrays and f"{l}/within/m{a}" in report.arrays]
    if not present:
        return None
    fig, axes = _grid(len(present))
    for ax, layer in zip(axes, present):
        corr = report.arrays[f"{layer}/corr/{tag}"]
        combined = np.block(
            [[report.arrays[f"{layer}/within/m{a}"], corr], [corr.T, report.arrays[f"{layer}/within/m{b}"]]]
        )
        order = report.arrays[f"{layer}/spectral_order/{tag}"]
        _heatmap(ax, combined[np.ix_(order, order)], layer)
        for edge in report.arrays[f"{layer}/spectral_boundaries/{tag}"][1:-1]:
            ax.axhline(edge - 0.5, color="k", lw=0.5)
            ax.axvline(edge - 0.5, color="k", lw=0.5)
    fig.suptitle(f"m{a}+m{b} units by spectral cluster, step {report.step}", fontsize=8)
    _tidy(fig)
    return fig


def dendrogram_figure(report: StepReport, layers: Sequence[str], a: int, b: int) -> Figure | None:
    """Per layer: hierarchical merges of both nets' units; leaves marked by net."""
    from scipy.cluster.hierarchy import dendrogram

    tag = pair_suffix(a, b)
    present = [l for l in layers if f"{l}/linkage/{tag}" in report.arrays]
    if not present:
        return None
    fig, axes = plt.subplots(len(present), 1, figsize=(7, 1.6 * len(present)), squeeze=False)
    for ax, layer in zip(axes[:, 0], present):
        z = report.arrays[f"{layer}/linkage/{tag}"]
        n_a = len(report.arrays[f"{layer}/dead/m{a}"])
        tree = dendrogram(z, ax=ax, no_labels=True, color_threshold=0, above_threshold_color="0.4")
        leaves = np.array(tree["leaves"])
        x = np.arange(5, 10 * len(leaves), 10)
        ax.scatter(x[leaves < n_a], np.zeros((leaves < n_a).sum()), marker="|", color="tab:blue", s=12)
        ax.scatter(x[leaves >= n_a], np.zeros((leaves >= n_a).sum()), marker="|", color="tab:orange", s=12)
        ax.set_ylabel(layer, fontsize=7)
        ax.tick_params(labelsize=6)
    fig.suptitle(f"merges on 1 - correlation: m{a} (blue) and m{b} (orange), step {report.step}", fontsize=8)
    _tidy(fig)
    return fig


def mean_activation_figure(report: StepReport, layers: Sequence[str], k: int) -> Figure | None:
    """Sorted per-unit mean activation per layer, all members overlaid (log scale)."""
    present = [l for l in layers if f"{l}/mean/m0" in report.arrays]
    if not present:
        return None
    fig, axes = _grid(len(present))
    for ax, layer in zip(axes, present):
        for i in range(k):
            means = np.sort(report.arrays[f"{layer}/mean/m{i}"])[::-1]
            ax.plot(np.maximum(means, 1e-8), lw=1, label=f"m{i}")
        _log_scale(ax, "y")
        _title(ax, layer, 8)
    axes[0].legend(fontsize=6)
    fig.suptitle(f"mean activation per unit (sorted), step {report.step}", fontsize=8)
    _tidy(fig)
    return fig


def sparse_figure(report: StepReport, settings: AnalysisSettings) -> Figure | None:
    """Held-out error vs mean non-zero weights along the L1 path, per layer."""
    present = [l for l in settings.layers if f"sparse/{l}/error/l1={l1_label(settings.l1[0])}" in report.scalars]
    if not present:
        return None
    fig, axes = _grid(len(present))
    for ax, layer in zip(axes, present):
        nnz = [report.scalars[f"sparse/{layer}/nnz/l1={l1_label(w)}"] for w in settings.l1]
        err = [report.scalars[f"sparse/{layer}/error/l1={l1_label(w)}"] for w in settings.l1]
        ax.plot(nnz, err, "o-")
        for w, x, y in zip(settings.l1, nnz, err):
            ax.annotate(l1_label(w), (x, y), fontsize=5)
        _title(ax, layer, 8)
        ax.set_xlabel("non-zero weights per unit", fontsize=7)
    axes[0].set_ylabel("held-out error", fontsize=7)
    fig.suptitle(f"sparse prediction, step {report.step}", fontsize=8)
    _tidy(fig)
    return fig


def cross_layer_figure(report: StepReport, layers: Sequence[str], a: int, b: int) -> Figure | None:
    """Layer x layer similarity of m{a} vs m{b} for every measure (image-level features)."""
    tag = pair_suffix(a, b)
    keys = sorted(k for k in report.arrays if k.startswith("cross_layer/") and k.endswith("/" + tag))
    if not keys:
        return None
    fig, axes = _grid(len(keys), size=2.8)
    for ax, key in zip(axes, keys):
        m = report.arrays[key]
        ax.imshow(m, cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(len(layers)), layers, rotation=90, fontsize=5)
        ax.set_yticks(range(len(layers)), layers, fontsize=5)
        _title(ax, key.split("/")[1], 7)
    fig.suptitle(f"cross-layer similarity m{a} (rows) x m{b} (cols), step {report.step}", fontsize=8)
    _tidy(fig)
    return fig


def patch_canvas(report: StepReport, layer: str, a: int, b: int, crop, n_pairs: int = 8):
    """Tiles of input patches for the top and bottom `n_pairs` max-matched pairs of a layer:
    per row a's top patches, a gap, b's top patches. Returns (canvas, rows, geometry) or None.

    `crop(member, unit, rank)` returns the patch [S, S] or [S, S, 3] in [0, 1] (or None)."""
    tag = pair_suffix(a, b)
    idx = report.arrays.get(f"{layer}/max_index/{tag}")
    if idx is None or f"{layer}/top_index/m{a}" not in report.arrays:
        return None
    value = report.arrays[f"{layer}/max_value/{tag}"]
    ranked = [u for u in np.argsort(-value) if idx[u] >= 0]
    chosen = ranked[:n_pairs] + ranked[-n_pairs:] if len(ranked) > 2 * n_pairs else ranked
    shown = min(4, report.arrays[f"{layer}/top_index/m{a}"].shape[1])
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


def patch_figure(report: StepReport, layers: Sequence[str], a: int, b: int, croppers: dict, n_pairs: int = 8) -> Figure | None:
    """The paper's figure, one panel per conv layer: the top and bottom max-matched pairs, each
    unit shown by the input patches (receptive fields) of its top activations, with the pair's
    correlation between them. Patches are tiled into one image per layer (fast to draw)."""
    panels = []
    for layer in layers:
        if layer in croppers:
            made = patch_canvas(report, layer, a, b, croppers[layer], n_pairs)
            if made is not None:
                panels.append((layer, *made))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(2.4 * len(panels), 4.6), squeeze=False)
    for ax, (layer, canvas, rows, (size, pad, shown)) in zip(axes[0], panels):
        ax.imshow(canvas, cmap="gray" if canvas.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
        cell = size + pad
        for r, (u, v, corr) in enumerate(rows):
            y = pad + r * cell + size / 2
            ax.text(pad + shown * cell + size / 2, y, f"{corr:.2f}", ha="center", va="center", fontsize=4)
        _title(ax, layer, 7)
        ax.axis("off")
    fig.suptitle(f"top / bottom max-matched pairs: m{a} patches | corr | m{b} patches, step {report.step}", fontsize=7)
    _tidy(fig)
    return fig


def over_training_figure(history: dict[str, list[tuple[int, float]]], family: str, name: str, layers: Sequence[str]) -> Figure | None:
    """Value vs global step (log x) per layer, with the step-0 value and the null drawn dashed."""
    present = [l for l in layers if history.get(f"{family}/{l}/{name}")]
    if not present:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(present)))
    for colour, layer in zip(colours, present):
        points = sorted(history[f"{family}/{layer}/{name}"])
        steps = np.array([s for s, _ in points], dtype=float)
        values = np.array([v for _, v in points])
        ax.plot(np.maximum(steps, 0.5), values, "o-", ms=3, color=colour, label=layer)
        if steps[0] == 0:
            ax.axhline(values[0], color=colour, lw=0.6, ls=":")
        null = history.get(f"{family}/{layer}/{name}/null")
        if null:
            ns = sorted(null)
            ax.plot(np.maximum([s for s, _ in ns], 0.5), [v for _, v in ns], "--", lw=0.8, color=colour)
    _log_scale(ax, "x")
    ax.set_xlabel("global step (step 0 drawn at 0.5)")
    ax.set_ylabel(f"{family} {name}")
    _title(ax, f"{family}/{name} over training (dotted: step 0, dashed: permutation null)", 8)
    ax.legend(fontsize=6, ncol=2)
    _tidy(fig)
    return fig


# (family, name) of the scalars drawn over training at the end of fit.
OVER_TRAINING = (
    ("align", "semi_match"),
    ("align", "max_match"),
    ("mi", "semi_match"),
    ("cka", "linear"),
    ("cka", "linear_debiased"),
    ("cca", "mean"),
    ("cca", "svcca"),
    ("cca", "pwcca"),
    ("procrustes", "similarity"),
)


def _display(patch) -> np.ndarray:
    """A patch [C, H, W] (normalised input) scaled to [0, 1] for display."""
    p = patch.detach().cpu().float().numpy()
    lo, hi = float(p.min()), float(p.max())
    p = (p - lo) / (hi - lo) if hi > lo else np.zeros_like(p)
    return p[0] if p.shape[0] == 1 else np.transpose(p[:3], (1, 2, 0))


def patch_cropper(report: StepReport, layer: str, members, probe_set):
    """crop(member, unit, rank) for `patch_figure`: the receptive field of the unit's rank-th top
    activation, cut from the probe image."""
    from convergent.models import receptive_field
    from convergent.stats.topk import crop_patch

    field = receptive_field(members[0], layer)

    def crop(member: int, unit: int, rank: int):
        image, y, x = (int(v) for v in report.arrays[f"{layer}/top_index/m{member}"][unit, rank])
        if image < 0:
            return None
        return _display(crop_patch(probe_set[image][0], field, y, x))

    return crop


def step_figures(report: StepReport, settings: AnalysisSettings, members=None, probe_set=None):
    """Yields (key, figure) for every figure of one analysis step, one at a time. A figure that
    cannot be drawn is a failure of the step (in `report.failures`), not a crash: the others follow."""
    for key, draw in _figure_plan(report, settings, members, probe_set):
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


def _figure_plan(report: StepReport, s: AnalysisSettings, members, probe_set):
    """(key, drawing function) for every figure the settings ask for."""
    for a, b in s.plotted_pairs:
        tag = pair_suffix(a, b)
        yield f"corr/{tag}", lambda a=a, b=b: correlation_figure(report, s.layers, a, b)
        yield f"matching/{tag}", lambda a=a, b=b: matching_figure(report, s.layers, a, b)
        if s.on("spectral"):
            yield f"spectral/{tag}", lambda a=a, b=b: spectral_figure(report, s.layers, a, b)
        if s.on("hierarchical"):
            yield f"hier/{tag}", lambda a=a, b=b: dendrogram_figure(report, s.layers, a, b)
        if s.on("patches") and members is not None and probe_set is not None:

            def patches(a=a, b=b):
                croppers = {l: patch_cropper(report, l, members, probe_set) for l in s.conv_layers}
                return patch_figure(report, s.conv_layers, a, b, croppers, s.patch_pairs)

            yield f"patches/{tag}", patches
        if s.on("cross_layer"):
            yield f"cross_layer/{tag}", lambda a=a, b=b: cross_layer_figure(report, s.layers, a, b)
    if s.on("mean_activation"):
        yield "act/mean", lambda: mean_activation_figure(report, s.layers, s.k)
    if s.on("sparse"):
        yield "sparse/error_vs_nnz", lambda: sparse_figure(report, s)
