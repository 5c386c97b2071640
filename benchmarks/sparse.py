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


# --- 4b. sparse_384 (issue 20) ------------------------------------------------------------------
def sparse_384(options: Options) -> Measured:
    """Seconds of `sparse_prediction` at conv3 width (384 units) on collinear activations: conv3 of
    two random-init paper AlexNets (227 px) on nearly uniform images (one colour per image plus
    1e-3 noise, so every position of an image sees almost the same input), fit / held-out split
    on even / odd images as the monitor does, one direction, the default L1 path, tol and max_iter.
    Full runs also time the solver before issue 20 (`benchmarks/sparse_fista_reference.py`) on the same Gram matrices."""
    import warnings as _warnings

    from benchmarks.sparse_fista_reference import lasso_gram_path_fista
    from convergent.analysis.builtin.sparse import SparseOptions
    from convergent.analysis.sparse import sparse_prediction
    from convergent.ensemble import build_member
    from convergent.stats import Moments

    s = SparseOptions()
    n_images = 40  # 20 fit + 20 held-out images: samples > units, nearly collinear (fewer: singular)
    paper = {"name": "alexnet", "width": 1.0, "groups": 1, "lrn": "after_pool", "dropout": 0.5, "batch_norm": False}
    members = [build_member(paper, seed, 1000, 3, 227).eval() for seed in (0, 1)]
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n_images, 3, 1, 1, generator=g) * 2 - 1 + 1e-3 * torch.randn(n_images, 3, 227, 227, generator=g)
    units = members[0].layer_width("conv3")
    fit, held = (Moments([units, units], product_dtype=torch.float32) for _ in range(2))
    with torch.no_grad():
        for start in range(0, n_images, 8):
            x = images[start : start + 8]
            even = (torch.arange(start, start + len(x)) % 2) == 0
            acts = [m(x, taps=["conv3"])[1]["conv3"] for m in members]
            fit.update(*[a[even] for a in acts])
            held.update(*[a[~even] for a in acts])
    fit_s, held_s = fit.compute(), held.compute()
    results = []

    def ours() -> None:
        with _warnings.catch_warnings():
            _warnings.simplefilter("ignore", RuntimeWarning)  # convergence is reported below
            results.append(sparse_prediction(fit_s, held_s, 0, 1, l1=s.l1, tol=s.tol, max_iter=s.max_iter))

    times = [stopwatch(ours)() for _ in range(options.pick(full=3, quick=1))]
    res = results[-1]
    detail = (
        f"conv3 ({units} units, {int(res.live_src.sum())} live) of 2 x paper AlexNet (random init, 227 px), {n_images} "
        f"nearly uniform images x 13 x 13 positions ({res.n_fit}/{res.n_held_out} fit/held-out samples), condition "
        f"number of the sources' correlations {res.condition:.3g}; l1 path {list(s.l1)}, tol {s.tol}, max_iter "
        f"{s.max_iter}: {spread(times)}, converged {int(res.converged.sum())} of {len(s.l1)}, iterations "
        f"{res.iterations.tolist()}"
    )
    if not options.quick:
        live_x, live_y = ~fit_s.dead(0), ~fit_s.dead(1)
        R = fit_s.corr(0, 0)[live_x][:, live_x].contiguous()
        B = fit_s.corr(0, 1)[live_x][:, live_y].contiguous()
        before = stopwatch(lambda: results.append(lasso_gram_path_fista(R, B, s.l1, max_iter=s.max_iter, tol=s.tol)))()
        conv_before = results[-1][3]
        detail += (
            f"; the solver before issue 20 (FISTA + padded Newton steps) on the same matrices: {before:.3g} s, converged "
            f"{int(conv_before.sum())} of {len(s.l1)}: speed-up x{before / median(times):.3g}"
        )
    return Measured(median(times), detail, ok=bool(res.converged.all()))
