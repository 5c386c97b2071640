"""Sparse prediction (one-to-many, the paper's analysis 5): each unit of b predicted from all of
a's units by an L1-penalised linear map, fitted on the even probe images, scored on the odd ones
(`convergent.analysis.sparse`). ``sparse/{layer}/error/l1={w}`` is calibrated like every measure
(perfect value 0; the null re-pairs the images of both splits), ``nnz/l1={w}`` is the mean number
of non-zero weights per target unit."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from convergent.analysis.calibration import Calibrated, calibrate
from convergent.analysis.registry import Analysis, Needs, Output, Pair, Result, pair_suffix, register_analysis
from convergent.analysis.sparse import DEFAULT_L1, SparsePrediction, sparse_prediction
from convergent.errors import ConfigError
from convergent.stats.layer import SplitViews


def l1_label(w: float) -> str:
    return "0" if w == 0 else f"{w:g}"


@dataclass
class SparseOptions:
    """Options of sparse prediction (config group `analysis.sparse`)."""

    layers: Any = "conv"  # conv | all | [conv1, conv2] (fc layers: few samples, slow ill-posed paths)
    l1: list[float] = field(default_factory=lambda: list(DEFAULT_L1))  # the L1 path
    tol: float = 1.0e-6  # KKT tolerance of the solver (correlation units)
    max_iter: int = 1000  # solver steps (ADMM + active-set) per L1 weight (not converged: reported, not an error)

    def __post_init__(self) -> None:
        if any(float(w) < 0 for w in self.l1):
            raise ConfigError(f"analysis.sparse.l1={list(self.l1)} has a negative L1 weight; L1 weights must be >= 0")
        if not self.l1:
            raise ConfigError("analysis.sparse.l1 is empty; give at least one L1 weight (e.g. [0])")


@dataclass
class SparseResult(Result):
    layer: str
    l1: list[float]
    fits: dict[Pair, SparsePrediction] = field(default_factory=dict)
    error: dict[str, Calibrated] = field(default_factory=dict)  # by L1 label

    def scalars(self):
        out: dict[str, Any] = {}
        for i, w in enumerate(self.l1):
            label = l1_label(w)
            out[f"sparse/{self.layer}/error/l1={label}"] = self.error[label]
            out[f"sparse/{self.layer}/nnz/l1={label}"] = {p: float(f.nnz[i]) for p, f in self.fits.items()}
        return out

    def arrays(self):
        out: dict[str, np.ndarray] = {}
        for (a, b), fit in self.fits.items():
            tag = pair_suffix(a, b)
            out[f"{self.layer}/sparse_error/{tag}"] = fit.error.cpu().numpy()
            out[f"{self.layer}/sparse_nnz/{tag}"] = fit.nnz.cpu().numpy()
            out[f"{self.layer}/sparse_converged/{tag}"] = fit.converged.cpu().numpy()
        return out


@register_analysis
class Sparse(Analysis):
    name = "sparse"
    heavy = True
    needs = Needs(null=True)
    options = SparseOptions
    description = "sparse (L1) prediction of b's units from a's, held-out error and non-zero weights along the L1 path"

    def layers(self, plan):
        from convergent.analysis.plan import resolve_layers

        return resolve_layers(plan.config.sparse.layers, plan.layers, "analysis.sparse.layers")

    def check(self, plan) -> None:
        self.layers(plan)

    def outputs(self, plan, layer):
        out = []
        for w in plan.config.sparse.l1:
            out += [Output(f"sparse/{layer}/error/l1={l1_label(w)}", "measure"), Output(f"sparse/{layer}/nnz/l1={l1_label(w)}")]
        return out

    def run(self, ctx) -> SparseResult:
        o = ctx.plan.config.sparse
        l1 = [float(w) for w in o.l1]
        labels = [l1_label(w) for w in l1]
        res = SparseResult(ctx.layer, l1)
        # one solve per (view, pair): the view is kept with it, so its id is not reused
        solved: dict[tuple[int, int, int, int], tuple[Any, SparsePrediction]] = {}

        def solve(view, a: int, b: int, warm: SparsePrediction | None = None) -> SparsePrediction:
            fit, held = view
            key = (id(fit), id(held), a, b)
            if key not in solved:
                with warnings.catch_warnings():
                    # not converged to the (strict) KKT tolerance: the errors are stable long before
                    warnings.simplefilter("ignore", RuntimeWarning)
                    fitted = sparse_prediction(fit, held, a, b, l1=l1, tol=o.tol, max_iter=o.max_iter, warm_start=warm)
                solved[key] = (view, fitted)
            return solved[key][1]

        views = SplitViews(ctx.stats, ctx.plan.config.null.draws)
        full = views.full()
        for a, b in ctx.pairs:
            res.fits[(a, b)] = solve(full, a, b)
        null_pairs = ctx.plan.null_pairs_of(ctx.pairs) if ctx.stats.repaired else []

        def errors(view, a: int, b: int) -> dict[str, float]:
            # a replicate (without a group, or re-paired: nets 0, 1 of its own stats) starts from a full
            # fit: the same answer in fewer steps
            warm = res.fits.get((a, b), next(iter(res.fits.values())))
            return dict(zip(labels, solve(view, a, b, warm).error.tolist()))

        res.error = calibrate(errors, views, ctx.pairs, null_pairs, ctx.plan.config.interval.level, perfect=0.0)
        return res
