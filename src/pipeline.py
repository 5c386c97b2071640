"""One analysis step: every configured analysis on the statistics of one probe pass.

`analyze(probe, settings, step)` returns a `StepReport` of data only (scalars, arrays for the
npz file, tables); figures are drawn from it by `convergent.plotting` and everything is written
by `convergent.sinks`. The live callback and `convergent-analyze` both call this, so they log the
same keys from the same code.

Scalar keys (the public interface; README "Metric keys"): a pair-averaged value `family/layer/name`
and one value per member pair under `family/layer/name/m{a}-m{b}`; permutation-null baselines
under `family/layer/name/null`.
"""

from __future__ import annotations

import time
import traceback
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from convergent.analysis import clustering, matching, measures
from convergent.analysis.mutual_info import mi_semi_match, mutual_information
from convergent.analysis.sparse import sparse_prediction
from convergent.probe import LayerStats, ProbeStats
from convergent.settings import AnalysisSettings
from convergent.stats import MomentStats


def pair_suffix(a: int, b: int) -> str:
    return f"m{a}-m{b}"


def l1_label(w: float) -> str:
    return "0" if w == 0 else f"{w:g}"


@dataclass
class StepReport:
    step: int
    scalars: dict[str, float] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    tables: dict[str, tuple[list[str], list[list]]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    # scalar values per pair before averaging: key -> list of values
    _pending: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    def pair_scalar(self, key: str, a: int, b: int, value: float) -> None:
        """Log `key/m{a}-m{b}` and collect it for the pair average `key`."""
        value = float(value)
        self.scalars[f"{key}/{pair_suffix(a, b)}"] = value
        self._pending[key].append(value)

    def finish(self) -> StepReport:
        for key, values in self._pending.items():
            self.scalars[key] = float(np.mean(values))
        self._pending.clear()
        # Nothing non-finite reaches a dashboard: a failed value is reported as a failure instead.
        bad = [k for k, v in self.scalars.items() if not np.isfinite(v)]
        for key in bad:
            self.failures.append(f"step {self.step}: {key} was not finite and was dropped")
            del self.scalars[key]
        # nor the npz (nor a figure drawn from it): activations that overflowed (a diverging member,
        # fp16) give statistics of inf/NaN
        bad = [k for k, v in self.arrays.items() if v.dtype.kind in "fc" and not np.isfinite(v).all()]
        for key in bad:
            self.failures.append(f"step {self.step}: array {key} was not finite and was dropped")
            del self.arrays[key]
        return self

    def array(self, key: str, value) -> None:
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        self.arrays[key] = np.asarray(value)


# --- analyses ------------------------------------------------------------------------------------
# Each takes (report, layer, stats of the layer, probe, settings) and adds to the report.


def run_correlation(report: StepReport, layer: str, ls: LayerStats, probe: ProbeStats, s: AnalysisSettings) -> None:
    stats = ls.all
    for i in range(probe.k):
        report.array(f"{layer}/dead/m{i}", stats.dead(i))
        report.array(f"{layer}/std/m{i}", stats.std(i))
        if any(i in p for p in s.plotted_pairs):
            report.array(f"{layer}/within/m{i}", stats.corr(i, i))
    within = {i: matching.within_max(stats.corr(i, i)) for i in range(probe.k)}
    for a, b in s.member_pairs:
        corr = stats.corr(a, b)
        semi_i, semi_v = matching.semi_match(corr)
        max_i, max_v = matching.max_match(corr)
        tag = pair_suffix(a, b)
        report.array(f"{layer}/corr/{tag}", corr)
        report.array(f"{layer}/semi_index/{tag}", semi_i)
        report.array(f"{layer}/semi_value/{tag}", semi_v)
        report.array(f"{layer}/max_index/{tag}", max_i)
        report.array(f"{layer}/max_value/{tag}", max_v)
        report.pair_scalar(f"align/{layer}/semi_match", a, b, semi_v.mean())
        report.pair_scalar(f"align/{layer}/max_match", a, b, max_v[max_i >= 0].mean())
        report.pair_scalar(f"align/{layer}/within_max", a, b, within[a].mean())
        report.pair_scalar(f"align/{layer}/same_pair", a, b, matching.same_pair_fraction(semi_i, max_i))
        dead = torch.cat([stats.dead(a), stats.dead(b)]).double().mean()
        report.pair_scalar(f"align/{layer}/dead", a, b, dead)
    null = ls.null
    if null is not None:
        semi, best = [], []
        for a, b in s.baseline_pairs:
            corr = null.corr(probe.null_index[a], probe.null_index[b])
            semi.append(float(matching.semi_match(corr)[1].mean()))
            idx, val = matching.max_match(corr)
            best.append(float(val[idx >= 0].mean()))
        report.scalars[f"align/{layer}/semi_match/null"] = float(np.mean(semi))
        report.scalars[f"align/{layer}/max_match/null"] = float(np.mean(best))


def run_mutual_info(report: StepReport, layer: str, ls: LayerStats, probe: ProbeStats, s: AnalysisSettings) -> None:
    if ls.mi_counts is None:
        return
    for a, b in s.plotted_pairs:
        mi = mutual_information(ls.mi_counts[(a, b)])
        index, value = mi_semi_match(mi)
        tag = pair_suffix(a, b)
        report.array(f"{layer}/mi/{tag}", mi)
        report.array(f"{layer}/mi_semi_index/{tag}", index)
        report.pair_scalar(f"mi/{layer}/semi_match", a, b, value.mean())
        corr_index = report.arrays.get(f"{layer}/semi_index/{tag}")
        if corr_index is not None:
            report.pair_scalar(f"mi/{layer}/same_as_corr", a, b, float(np.mean(index.cpu().numpy() == corr_index)))


def run_sparse(report: StepReport, layer: str, ls: LayerStats, probe: ProbeStats, s: AnalysisSettings) -> None:
    def path(fit: MomentStats, held: MomentStats, a: int, b: int):
        with warnings.catch_warnings():
            # not converged to the (strict) KKT tolerance: the errors are stable long before that
            warnings.simplefilter("ignore", RuntimeWarning)
            return sparse_prediction(fit, held, a, b, l1=s.l1, tol=s.sparse_tol, max_iter=s.sparse_max_iter)

    for a, b in s.plotted_pairs:
        result = path(ls.fit, ls.held, a, b)
        tag = pair_suffix(a, b)
        report.array(f"{layer}/sparse_error/{tag}", result.error)
        report.array(f"{layer}/sparse_nnz/{tag}", result.nnz)
        report.array(f"{layer}/sparse_converged/{tag}", result.converged)
        for w, err, nnz in zip(s.l1, result.error.tolist(), result.nnz.tolist()):
            report.pair_scalar(f"sparse/{layer}/error/l1={l1_label(w)}", a, b, err)
            report.pair_scalar(f"sparse/{layer}/nnz/l1={l1_label(w)}", a, b, nnz)
    if ls.null_fit is not None:
        nx = probe.null_index
        errors = np.mean(
            [path(ls.null_fit, ls.null_held, nx[a], nx[b]).error.cpu().numpy() for a, b in s.baseline_pairs], axis=0
        )
        for w, err in zip(s.l1, errors):
            report.scalars[f"sparse/{layer}/error/l1={l1_label(w)}/null"] = float(err)


def run_spectral(report: StepReport, layer: str, ls: LayerStats, probe: ProbeStats, s: AnalysisSettings) -> None:
    stats = ls.all
    for a, b in s.plotted_pairs:
        n_clusters = min(s.n_clusters, int((~stats.dead(a)).sum() + (~stats.dead(b)).sum()))
        if n_clusters < 2:
            continue
        labels = clustering.spectral_clusters(
            stats, a, b, n_clusters, affinity=s.affinity, seed=s.seed, assign_labels=s.assign_labels
        )
        summary = clustering.spectral_summary(stats, labels, a=a, b=b, seed=s.seed)
        tag = pair_suffix(a, b)
        report.array(f"{layer}/spectral_labels/{tag}", labels)
        report.array(f"{layer}/spectral_order/{tag}", summary["order"])
        report.array(f"{layer}/spectral_boundaries/{tag}", summary["boundaries"])
        report.pair_scalar(f"spectral/{layer}/shared_fraction", a, b, summary["shared_fraction"])
        within = summary["within_cluster_corr"]
        report.pair_scalar(f"spectral/{layer}/within_corr", a, b, 0.0 if not np.isfinite(within) else within)
        chance = summary["random_within_cluster_corr"]  # NaN, like `within`, when no a-b pair shares a cluster
        report.pair_scalar(f"spectral/{layer}/random_corr", a, b, 0.0 if not np.isfinite(chance) else chance)


def run_hierarchical(report: StepReport, layer: str, ls: LayerStats, probe: ProbeStats, s: AnalysisSettings) -> None:
    stats = ls.all
    for a, b in s.plotted_pairs:
        result = clustering.hierarchical_merges(stats, a=a, b=b, method=s.linkage)
        tag = pair_suffix(a, b)
        report.array(f"{layer}/linkage/{tag}", result.Z)
        report.pair_scalar(f"hier/{layer}/first_merges_cross", a, b, result.first_merges_cross)
        report.pair_scalar(f"hier/{layer}/first_merges_same", a, b, result.first_merges_same)
        frac = result.cross_fraction
        report.pair_scalar(f"hier/{layer}/cross_fraction", a, b, 0.0 if not np.isfinite(frac) else frac)


def run_patches(report: StepReport, layer: str, ls: LayerStats, probe: ProbeStats, s: AnalysisSettings) -> None:
    if ls.top is None:
        return
    for i, (values, index) in ls.top.items():
        report.array(f"{layer}/top_value/m{i}", values)
        report.array(f"{layer}/top_index/m{i}", index)


def run_mean_activation(report: StepReport, layer: str, ls: LayerStats, probe: ProbeStats, s: AnalysisSettings) -> None:
    stats = ls.all
    means = torch.stack([stats.mean(i) for i in range(probe.k)])
    report.scalars[f"act/{layer}/mean"] = float(means.mean())
    report.scalars[f"act/{layer}/top_unit_mean"] = float(means.max(dim=1).values.mean())
    for i in range(probe.k):
        report.array(f"{layer}/mean/m{i}", stats.mean(i))


# Similarity measures by family: key suffix -> measure (a function of (stats, a, b)).
def _measure_table(s: AnalysisSettings) -> dict[str, dict[str, Callable]]:
    return {
        "cka": {
            "linear": lambda st, a, b: measures.linear_cka(st, a, b),
            "linear_debiased": lambda st, a, b: measures.linear_cka(st, a, b, debiased=True),
        },
        "cca": {
            "mean": lambda st, a, b: measures.cca(st, a, b, epsilon=s.cca_epsilon),
            "svcca": lambda st, a, b: measures.svcca(st, a, b, keep=s.svcca_keep, epsilon=s.cca_epsilon),
            "pwcca": lambda st, a, b: measures.pwcca(st, a, b, epsilon=s.cca_epsilon),
        },
        "procrustes": {"similarity": lambda st, a, b: measures.procrustes(st, a, b)},
    }


def _run_family(family: str):
    def run(report: StepReport, layer: str, ls: LayerStats, probe: ProbeStats, s: AnalysisSettings) -> None:
        stats, null = ls.all, ls.null
        for name, fn in _measure_table(s)[family].items():
            for a, b in s.member_pairs:
                report.pair_scalar(f"{family}/{layer}/{name}", a, b, fn(stats, a, b))
            if null is not None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", measures.SampleSizeWarning)  # warned once above
                    values = [fn(null, probe.null_index[a], probe.null_index[b]) for a, b in s.baseline_pairs]
                report.scalars[f"{family}/{layer}/{name}/null"] = float(np.mean(values))

    return run


LAYER_ANALYSES: dict[str, Callable] = {
    "correlation": run_correlation,
    "mutual_info": run_mutual_info,
    "sparse": run_sparse,
    "spectral": run_spectral,
    "hierarchical": run_hierarchical,
    "patches": run_patches,
    "mean_activation": run_mean_activation,
    "cka": _run_family("cka"),
    "cca": _run_family("cca"),
    "procrustes": _run_family("procrustes"),
}


def run_cross_layer(report: StepReport, probe: ProbeStats, s: AnalysisSettings) -> None:
    """Layer x layer similarity between members on image-level features, and layer
    identification (Kornblith et al. 2019): the fraction of a's layers whose most similar layer of
    b is the same layer."""
    if probe.pooled is None:
        return
    layers = s.layers
    index = probe.pooled_index
    for family, table in _measure_table(s).items():
        for name, fn in table.items():
            measure_key = f"{family}_{name}"
            for a, b in s.plotted_pairs:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", measures.SampleSizeWarning)
                    m = np.array([[fn(probe.pooled, index[(la, a)], index[(lb, b)]) for lb in layers] for la in layers])
                report.array(f"cross_layer/{measure_key}/{pair_suffix(a, b)}", m)
                identified = float(np.mean(np.argmax(m, axis=1) == np.arange(len(layers))))
                report.pair_scalar(f"layer_id/{measure_key}", a, b, identified)


def analyze(
    probe: ProbeStats, settings: AnalysisSettings, step: int, timings: dict | None = None, full: bool = True
) -> StepReport:
    """Every enabled analysis of every layer (`full=False`: the light ones only); a failing
    analysis is recorded, the rest go on. `timings` (optional) accumulates seconds per analysis."""
    report = StepReport(step=step)
    timings = timings if timings is not None else defaultdict(float)
    with warnings.catch_warnings():
        warnings.simplefilter("once", measures.SampleSizeWarning)
        for layer in settings.layers:
            ls = probe.layers[layer]
            for name, fn in LAYER_ANALYSES.items():
                if not settings.on(name, full) and not (name == "correlation" and _needs_correlation(settings)):
                    continue
                if (name == "patches" and layer not in settings.conv_layers) or not settings.layer_has(name, layer):
                    continue
                t0 = time.perf_counter()
                try:
                    fn(report, layer, ls, probe, settings)
                except Exception as e:  # one analysis failing must not stop the others or training
                    report.failures.append(f"step {step}: {name} on {layer} failed: {type(e).__name__}: {e}")
                    traceback.print_exc()
                timings[name] += time.perf_counter() - t0
        if settings.on("cross_layer", full):
            t0 = time.perf_counter()
            try:
                run_cross_layer(report, probe, settings)
            except Exception as e:
                report.failures.append(f"step {step}: cross_layer failed: {type(e).__name__}: {e}")
                traceback.print_exc()
            timings["cross_layer"] += time.perf_counter() - t0
    matched_pairs_tables(report, settings)
    if settings.on("sparse", full):
        sparse_table(report, settings)
    return report.finish()


def _needs_correlation(s: AnalysisSettings) -> bool:
    """Matching tables, patches and the spectral figure need the correlation arrays."""
    return any(s.on(n) for n in ("mutual_info", "patches", "spectral"))


def matched_pairs_tables(report: StepReport, s: AnalysisSettings) -> None:
    """Per layer: the max-matched pairs of every member pair (unit a, unit b, correlation, MI)."""
    for layer in s.layers:
        rows = []
        for a, b in s.member_pairs:
            tag = pair_suffix(a, b)
            index = report.arrays.get(f"{layer}/max_index/{tag}")
            if index is None:
                continue
            corr = report.arrays[f"{layer}/corr/{tag}"]
            mi = report.arrays.get(f"{layer}/mi/{tag}")
            for u, v in enumerate(index):
                if v < 0:
                    continue
                rows.append([tag, int(u), int(v), float(corr[u, v]), float(mi[u, v]) if mi is not None else None])
        if rows:
            report.tables[f"pairs/{layer}"] = (["pair", "unit_a", "unit_b", "correlation", "mi"], rows)


def sparse_table(report: StepReport, s: AnalysisSettings) -> None:
    """The paper's layout: one row per layer, held-out error and non-zeros per L1 weight."""
    columns = ["layer"]
    for w in s.l1:
        columns += [f"error l1={l1_label(w)}", f"nnz l1={l1_label(w)}"]
    rows = []
    for layer in s.layers:
        row = [layer]
        for w in s.l1:
            row += [
                report.scalars.get(f"sparse/{layer}/error/l1={l1_label(w)}", _pending_mean(report, f"sparse/{layer}/error/l1={l1_label(w)}")),
                report.scalars.get(f"sparse/{layer}/nnz/l1={l1_label(w)}", _pending_mean(report, f"sparse/{layer}/nnz/l1={l1_label(w)}")),
            ]
        rows.append(row)
    report.tables["sparse"] = (columns, rows)


def _pending_mean(report: StepReport, key: str) -> float | None:
    values = report._pending.get(key)
    return float(np.mean(values)) if values else None


def expected_scalar_keys(s: AnalysisSettings, full: bool = True) -> set[str]:
    """Every scalar key a (full or light) analysis step logs under these settings (the public
    interface documented in README "Metric keys"; the tests hold the pipeline to it)."""
    keys: set[str] = set()

    def per_pair(key: str, pairs) -> None:
        keys.add(key)
        keys.update(f"{key}/{pair_suffix(a, b)}" for a, b in pairs)

    for layer in s.layers:
        if s.on("correlation", full) or _needs_correlation(s):
            for name in ("semi_match", "max_match", "within_max", "same_pair", "dead"):
                per_pair(f"align/{layer}/{name}", s.member_pairs)
            if s.null:
                keys.update({f"align/{layer}/semi_match/null", f"align/{layer}/max_match/null"})
        if s.on("mutual_info", full) and s.layer_has("mutual_info", layer):
            per_pair(f"mi/{layer}/semi_match", s.plotted_pairs)
            per_pair(f"mi/{layer}/same_as_corr", s.plotted_pairs)
        if s.on("sparse", full) and s.layer_has("sparse", layer):
            for w in s.l1:
                per_pair(f"sparse/{layer}/error/l1={l1_label(w)}", s.plotted_pairs)
                per_pair(f"sparse/{layer}/nnz/l1={l1_label(w)}", s.plotted_pairs)
                if s.null:
                    keys.add(f"sparse/{layer}/error/l1={l1_label(w)}/null")
        if s.on("spectral", full):
            for name in ("shared_fraction", "within_corr", "random_corr"):
                per_pair(f"spectral/{layer}/{name}", s.plotted_pairs)
        if s.on("hierarchical", full):
            for name in ("first_merges_cross", "first_merges_same", "cross_fraction"):
                per_pair(f"hier/{layer}/{name}", s.plotted_pairs)
        if s.on("mean_activation", full):
            keys.update({f"act/{layer}/mean", f"act/{layer}/top_unit_mean"})
        for family, table in _measure_table(s).items():
            if s.on(family, full):
                for name in table:
                    per_pair(f"{family}/{layer}/{name}", s.member_pairs)
                    if s.null:
                        keys.add(f"{family}/{layer}/{name}/null")
    if s.on("cross_layer", full):
        for family, table in _measure_table(s).items():
            for name in table:
                per_pair(f"layer_id/{family}_{name}", s.plotted_pairs)
    return keys
