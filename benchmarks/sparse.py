"""sparse_speedup: the sparse predictor from the moments against scikit-learn's Lasso path."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from benchmarks.common import (
    Measured,
    Options,
    alternate,
    build_members,
    median,
    probe_batches,
    spread,
    stopwatch,
)


# --- 4. sparse_speedup ---------------------------------------------------------------------------
def standardised(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    return (x - mean) / np.where(std > 0, std, 1.0)


def sklearn_path(xf, yf, xh, yh, l1: Sequence[float]) -> np.ndarray:
    """Held-out mean squared error of one target along the L1 path: LinearRegression for 0, else
    Lasso(alpha=l1) (scikit-learn defaults), fitted on fit-standardised data."""
    from sklearn.linear_model import Lasso, LinearRegression

    errors = []
    for w in l1:
        model = LinearRegression() if w == 0 else Lasso(alpha=w)
        model.fit(xf, yf)
        errors.append(float(np.mean((yh - model.predict(xh)) ** 2)))
    return np.array(errors)


def sparse_speedup(options: Options) -> Measured:
    import sklearn.linear_model  # noqa: F401 - imported before any timing
    from sklearn.exceptions import ConvergenceWarning

    from convergent.analysis.builtin.sparse import SparseOptions
    from convergent.analysis.sparse import sparse_prediction
    from convergent.stats import Moments

    s = SparseOptions()
    n_images, subset = (200, 2) if options.quick else (600, 8)
    members = build_members(2, {"name": "alexnet_small", "width": 0.5})
    batches = probe_batches(n_images)
    with torch.no_grad():
        taps = [[m.eval()(b[0], taps=["conv2"])[1]["conv2"] for m in members] for b in batches]
    evens = [(b[2] % 2) == 0 for b in batches]
    units = members[0].layer_width("conv2")

    def ours():
        fit, held = (Moments([units, units], product_dtype=torch.float32) for _ in range(2))
        for acts, even in zip(taps, evens):
            fit.update(*[a[even] for a in acts])
            held.update(*[a[~even] for a in acts])
        return sparse_prediction(fit.compute(), held.compute(), 0, 1, l1=s.l1, tol=s.tol, max_iter=s.max_iter)

    def samples(i: int, even: bool) -> np.ndarray:
        rows = [a[i][e if even else ~e] for a, e in zip(taps, evens)]
        return torch.cat(rows).movedim(1, -1).reshape(-1, units).double().numpy()

    result = ours()
    targets = result.scored_dst.nonzero().squeeze(1)
    chosen = targets[torch.linspace(0, len(targets) - 1, subset).round().long()].tolist()
    sk_errors: dict[int, np.ndarray] = {}
    caught: list = []

    def sklearn_subset() -> None:
        xf, yf, xh, yh = samples(0, True), samples(1, True), samples(0, False), samples(1, False)
        mx, sx, my, sy = xf.mean(0), xf.std(0), yf.mean(0), yf.std(0)
        xf, xh = standardised(xf, mx, sx), standardised(xh, mx, sx)
        yf, yh = standardised(yf, my, sy), standardised(yh, my, sy)
        var_all = np.concatenate([yf, yh]).var(0)  # sparse_prediction's normaliser: whole-probe variance
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always", ConvergenceWarning)
            for j in chosen:
                sk_errors[j] = sklearn_path(xf, yf[:, j], xh, yh[:, j], s.l1) / var_all[j]
        caught[:] = [x for x in w if issubclass(x.category, ConvergenceWarning)]

    t_ours, t_sk = alternate([stopwatch(ours), stopwatch(sklearn_subset)], options.pick(full=3, quick=1))
    scale = len(targets) / len(chosen)
    speedup = median(t_sk) * scale / median(t_ours)
    ref = np.stack([sk_errors[j] for j in chosen], 1)  # [L, subset]
    mine = result.error_per_unit[:, chosen].cpu().numpy()
    diff_mean = float(np.abs(ref.mean(1) - mine.mean(1)).max())
    diff_unit = float(np.abs(ref - mine).max())
    n_fit, n_held = result.n_fit, result.n_held_out
    return Measured(
        speedup,
        f"conv2 of 2 x alexnet_small 0.5 (random init, {units} units), {n_images} mnist5k images x 13 x 13 positions "
        f"(fit/held: even/odd images, {n_fit}/{n_held} samples), l1 path {list(s.l1)}; scikit-learn "
        f"(LinearRegression / Lasso(alpha), defaults, one target at a time) timed on {len(chosen)} of the "
        f"{len(targets)} scored targets and scaled x{scale:.1f}: {spread(t_sk)} per subset; ours (moments of both "
        f"splits + sparse_prediction of all targets) {spread(t_ours)}; held-out error (MSE over the whole-probe "
        f"variance, fit-standardised, as sparse_prediction defines it), max |difference| over the path: "
        f"{diff_mean:.2g} (mean over the subset), {diff_unit:.2g} (per unit), met needs <= 1e-3 (mean); "
        f"sklearn convergence warnings: {len(caught)}",
        ok=diff_mean <= 1e-3,
    )


