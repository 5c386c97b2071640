"""One-to-many alignment: sparse linear prediction of one net's units from another's.

Li et al., "Convergent Learning" (arXiv:1511.07543), section "sparse prediction": for a member pair
(``src -> dst``) and one layer, each unit ``j`` of ``dst`` is predicted by a linear map of all of
``src``'s units, trained with squared error plus an L1 penalty on the weights; sweeping the L1
weight trades prediction error against the number of ``src`` units each ``dst`` unit needs
(one-to-one at strong penalties, many-to-one at weak ones).

Everything is solved from the moments (:class:`~convergent.stats.moments.MomentStats`), never from
stored activations: the fit uses the correlation matrices of the ``fit`` split and the score uses
the first and second moments of the ``held_out`` split (two accumulators over disjoint parts of the
probe set, same nets and blocks). Convolutional layers: every spatial position is a sample, as in
:class:`~convergent.stats.moments.Moments`.

Definitions
-----------
Standardisation
    With the FIT split's mean ``m`` and population standard deviation ``s`` (ddof = 0):
    ``x~ = (x - m_x) / s_x`` for src units, ``y~_j = (y_j - m_j) / s_j`` for dst units.
Objective (per live target ``j``)
    Exactly scikit-learn's ``Lasso(alpha=l1, fit_intercept=True)`` on the standardised fit data::

        (1 / (2 n)) ||y~_j - X~ w_j - b_j||^2 + l1 * ||w_j||_1

    whose intercept is 0 (the standardised fit data are centred), i.e. in Gram form with the fit
    split's correlation matrices ``R_xx = corr(src, src)``, ``r_j = corr(src, dst)[:, j]``::

        0.5 w^T R_xx w - w^T r_j + l1 * ||w||_1          (+ 0.5, a constant).

    The penalty is therefore scaled exactly like sklearn's ``alpha`` and like the paper's Caffe L1
    weight on standardised units (mean squared error / 2 + L1 weight * sum |w|), so the default
    path ``l1 = (0, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)`` is directly comparable with the paper's table.
``l1 = 0`` (dense)
    Least squares: the minimum-norm solution ``w = pinv(R_xx) r_j`` (eigenvalues of ``R_xx`` below
    ``1e-10`` x the largest are treated as 0: exactly collinear source units share the weight),
    which is what ``sklearn.linear_model.LinearRegression`` returns.
Held-out error of target ``j``
    ``E_held[(y_j - yhat_j)^2] / Var_all(y_j)``: the held-out mean squared error of the target
    over its variance on the whole probe set (fit and held-out together), so that predicting the
    mean scores about 1 (the paper scales targets the same way). ``yhat_j`` uses the fit
    standardisation (and therefore the fit means as intercept); computed in closed form from the
    moments. The whole-probe variance keeps units whose activity falls mostly in one half (units
    that fire on a handful of images) from dominating the mean with huge ratios: normalising by
    either half's variance alone can give such a unit an error of hundreds. ``error`` is the mean
    over scored target units.
``nnz``
    Exact number of non-zero weights of a target unit, as produced by the solver (soft
    thresholding and the active-set solve give exact zeros). For ``l1 = 0`` this is the number of
    live source units with a non-zero weight (normally all of them). ``nnz`` is the mean over
    scored target units.
Dead units (zero variance, :meth:`MomentStats.dead`)
    Source units dead in the fit split get weight 0 and are left out of the fit. A target unit is
    *scored* when it is live in both splits; a target dead in the fit split is predicted by its fit
    mean (all weights 0). Unscored targets are excluded from ``error`` and ``nnz`` and reported
    in the per-unit arrays as error 1.0 ("no better than the mean"); their ``nnz_per_unit`` is
    the actual count (0 when dead in the fit split). Nothing is ever NaN or infinite; if no target
    is scored, ``error`` is 1.0 and ``nnz`` is 0 (see ``n_scored``).
``src == dst``
    Allowed as a sanity check: it is trivially perfect (identity weights, error 0 at ``l1 = 0``).

Solver
------
All target units at once, on the device of the statistics, in float64: accelerated proximal
gradient steps on the Gram matrix (FISTA with gradient restart; each step is one [p, p] x [p, t]
product and a soft threshold for all targets at once, so it costs arithmetic, not Python
overhead), combined with active-set (semismooth Newton) steps: predict each target's support and
signs from ``z = w + (r - R w)`` (``|z_k| > l1``) and solve exactly on it,
``w_A = R_AA^{-1} (r_A - l1 s_A)`` (one batched Cholesky solve, systems only as large as the
largest support). Every step is kept per target only where it does not increase the objective,
so the solver is monotone. An active-set step is tried at each warm start and after every
``_STEPS`` gradient steps; converged targets drop out. The path is solved from the largest L1
weight down, each warm-started from the previous solution. It stops when the largest KKT
violation over all targets, ``|r_k - (R w)_k - l1 sign(w_k)|`` on the support and
``max(|r_k - (R w)_k| - l1, 0)`` off it (correlation units), is at most ``tol``, or after
``max_iter`` gradient steps (``RuntimeWarning``).
At convergence the weights agree with sklearn's ``Lasso(tol=1e-10)`` to ~1e-9.

Pure function: torch only (no Lightning, W&B or Hydra).
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from convergent.stats.moments import MomentStats, flatten_samples

DEFAULT_L1 = (0.0, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
# Eigenvalues of R_xx below this fraction of the largest are treated as 0 in the dense (l1 = 0) fit.
PINV_RTOL = 1e-10
# Proximal-gradient steps between two active-set steps. An active-set step pays off once the
# support is nearly settled: the benchmark's 30 conv paths take ~1.6 s with 40 or 80, ~2.2 s
# with 20 (medians of 3 alternated runs; same results within 1e-6).
_STEPS = 40
# Largest batch of active-set systems built at once (elements; 8 bytes each).
_NEWTON_CHUNK_ELEMENTS = 1 << 22


@dataclass
class SparsePrediction:
    """Result of :func:`sparse_prediction` for one (src -> dst) pair; ``L`` L1 weights in the order
    given, ``C_src`` / ``C_dst`` units. All tensors float64 (counts int64, masks bool), on the
    statistics' device.

    Fields:
      src, dst: the net indices.
      l1: [L] the L1 weights.
      error: [L] held-out error, mean over scored target units (~1.0 = predicting the mean).
      error_per_unit: [L, C_dst] held-out error of every target unit (1.0 where unscored).
      nnz: [L] mean number of non-zero weights per scored target unit.
      nnz_per_unit: [L, C_dst] int64 number of non-zero weights of every target unit.
      weights: [L, C_dst, C_src] weights in standardised units (``y~ = weights @ x~``; the
        standardised intercept is 0 by construction).
      raw_weights, intercept: [L, C_dst, C_src], [L, C_dst] the same predictor in the nets' raw
        activation units: ``yhat = x @ raw_weights[l].T + intercept[l]``.
      live_src: [C_src] source units live in the fit split (the others have weight 0).
      scored_dst: [C_dst] target units live in both splits (the ones ``error`` and ``nnz`` average).
      n_scored: number of scored target units.
      iterations: [L] int64 proximal-gradient steps used (0 for l1 = 0, solved directly).
      kkt: [L] largest KKT violation over the fitted target units at the end.
      converged: [L] ``kkt <= tol``.
      n_fit, n_held_out: samples in the two splits.
    """

    src: int
    dst: int
    l1: Tensor
    error: Tensor
    error_per_unit: Tensor
    nnz: Tensor
    nnz_per_unit: Tensor
    weights: Tensor
    raw_weights: Tensor
    intercept: Tensor
    live_src: Tensor
    scored_dst: Tensor
    n_scored: int
    iterations: Tensor
    kkt: Tensor
    converged: Tensor
    n_fit: int
    n_held_out: int

    def predict(self, x_src: Tensor, index: int) -> Tensor:
        """Raw predictions ``[samples, C_dst]`` of the dst units from raw src activations
        (``[N, C_src]`` or ``[N, C_src, H, W]``) with the ``index``-th L1 weight."""
        x = flatten_samples(x_src).to(self.raw_weights)
        return x @ self.raw_weights[index].T + self.intercept[index]


# --- input checks ----------------------------------------------------------------------------
def _check_inputs(
    fit: MomentStats, held_out: MomentStats, src: int, dst: int, l1
) -> tuple[int, int, list[float]]:
    for name, st in (("fit", fit), ("held_out", held_out)):
        if not isinstance(st, MomentStats):
            raise TypeError(f"{name} must be a MomentStats (Moments.compute()), got {type(st).__name__}")
    if fit.sizes != held_out.sizes:
        raise ValueError(
            f"fit and held_out describe different nets (unit counts {fit.sizes} vs {held_out.sizes}); "
            "accumulate both splits with the same Moments configuration"
        )
    idx = []
    for name, i in (("src", src), ("dst", dst)):
        try:
            j = operator.index(i)
        except TypeError:
            j = -1
        if isinstance(i, bool) or not 0 <= j < fit.k:
            raise ValueError(f"{name}={i!r} is not a net index; use an int in 0..{fit.k - 1}")
        idx.append(j)
    src, dst = idx
    for name, st in (("fit", fit), ("held_out", held_out)):
        if not st.has_block(src, dst):
            raise ValueError(
                f"{name} has no joint moments for nets ({src}, {dst}); add the pair to "
                f"Moments(pairs=...) (kept blocks: {st.blocks})"
            )
        if st.n <= 0:
            raise ValueError(f"{name} has no samples; run Moments.update() on that split first")
    if isinstance(l1, (int, float)):
        l1 = [l1]
    elif isinstance(l1, Tensor):
        l1 = l1.detach().reshape(-1).tolist()
    lam = [float(v) for v in l1]
    if not lam:
        raise ValueError("l1 is empty; pass at least one L1 weight, e.g. l1=(0, 1e-3)")
    for v in lam:
        if not v == v or v in (float("inf"), float("-inf")):
            raise ValueError(f"L1 weight {v} is not finite; use finite values >= 0")
        if v < 0:
            raise ValueError(f"L1 weight {v} is negative; L1 weights must be >= 0 (0 = least squares)")
    return src, dst, lam


# --- the batched solver ----------------------------------------------------------------------
def _objective(R: Tensor, B: Tensor, W: Tensor, lam: float) -> Tensor:
    """Per-target objective 0.5 w^T R w - w^T b + lam |w|_1, [t]."""
    return 0.5 * (W * (R @ W)).sum(0) - (B * W).sum(0) + lam * W.abs().sum(0)


def _kkt(G: Tensor, W: Tensor, lam: float) -> Tensor:
    """Per-target largest KKT violation given the negative gradient G = B - R W, [t]."""
    on = W != 0
    viol = torch.where(on, (G - lam * torch.sign(W)).abs(), (G.abs() - lam).clamp_min(0.0))
    return viol.amax(0) if viol.numel() else torch.zeros(W.shape[1], dtype=W.dtype, device=W.device)


def _newton(R: Tensor, B: Tensor, W: Tensor, G: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """Active-set (semismooth Newton) step for every target: predict the support and signs from
    ``z = w + g`` (``|z_k| > l1``; at the optimum exactly the non-zero weights), then solve exactly
    on that support, ``w_A = R_AA^{-1} (b_A - l1 s_A)``, with one batched Cholesky solve (R has unit
    diagonal). Accepted per target only where it does not increase the objective, so the solver
    stays monotone. W [p, t] and G = B - R W are not modified; returns the new W and the
    mask [t] of the targets whose step was taken."""
    z = W + G
    Mb = (z.abs() > lam).T  # [t, p] predicted supports
    t, p = Mb.shape
    k = int(Mb.sum(1).max()) if t else 0
    if k == 0:
        Wc = torch.zeros_like(W)
        info = torch.zeros(t, dtype=torch.int32, device=W.device)
    else:
        # each target's support first (stable order), systems of the largest support's size only,
        # in chunks of targets that keep the [chunk, k, k] systems below _NEWTON_CHUNK_ELEMENTS
        order = torch.argsort((~Mb).to(torch.int8), dim=1, stable=True)[:, :k]  # [t, k]
        valid = torch.gather(Mb, 1, order).to(R.dtype)  # [t, k]
        rhs = valid * torch.gather(B.T - lam * torch.sign(z).T, 1, order)
        sol = torch.empty_like(rhs)
        info = torch.empty(t, dtype=torch.int32, device=W.device)
        step = max(1, _NEWTON_CHUNK_ELEMENTS // (k * k))
        for a in range(0, t, step):
            o, v = order[a : a + step], valid[a : a + step]
            A = R[o.unsqueeze(2), o.unsqueeze(1)]
            A.mul_(v.unsqueeze(2)).mul_(v.unsqueeze(1))
            A.diagonal(dim1=-2, dim2=-1).fill_(1.0)  # padding: w = 0 (R has unit diagonal)
            chol, info[a : a + step] = torch.linalg.cholesky_ex(A)
            sol[a : a + step] = torch.cholesky_solve(rhs[a : a + step].unsqueeze(-1), chol).squeeze(-1)
        sol.mul_(valid)
        Wc = torch.zeros(t, p, dtype=W.dtype, device=W.device).scatter_(1, order, sol).T
    obj, objc = _objective(R, B, W, lam), _objective(R, B, Wc, lam)
    ok = (info == 0) & torch.isfinite(objc) & (objc <= obj + 1e-14 * (1.0 + obj.abs()))
    ok &= (Wc != W).any(0)
    return torch.where(ok.unsqueeze(0), Wc, W), ok


def _pooled_var(fit: MomentStats, held_out: MomentStats, i: int) -> Tensor:
    """Variance of net i's units over both splits together (population), from the sums."""
    n = fit.n + held_out.n
    mean = (fit.sums[i] + held_out.sums[i]) / n
    second = (torch.diagonal(fit.sxx[(i, i)]) + torch.diagonal(held_out.sxx[(i, i)])) / n
    return (second - mean.square()).clamp_min(0.0)


def _fista(R: Tensor, B: Tensor, W: Tensor, lam: float, steps: int, lipschitz: float) -> Tensor:
    """Accelerated proximal gradient (FISTA with gradient restart) on all targets at once: one
    [p, p] x [p, t] product per step, so its cost is arithmetic, not Python overhead (cyclic
    coordinate descent needs p small operations per sweep). Returns the iterate of lower
    objective per target (never worse than W)."""
    step = 1.0 / lipschitz
    x, y, t_k = W.clone(), W.clone(), 1.0
    for _ in range(steps):  # small matrices: few, fused operations (the cost is per operation)
        x_new = F.softshrink(y.add(torch.addmm(B, R, y, alpha=-1.0), alpha=step), lam * step)
        d = x_new - x
        restart = (y.sub_(x_new).mul_(d)).sum(0, keepdim=True) > 0  # momentum points uphill: restart
        t_new = (1.0 + math.sqrt(1.0 + 4.0 * t_k * t_k)) / 2.0
        y = torch.where(restart, x_new, x_new.add(d, alpha=(t_k - 1.0) / t_new))
        x, t_k = x_new, t_new
    better = _objective(R, B, x, lam) <= _objective(R, B, W, lam)
    return torch.where(better.unsqueeze(0), x, W)


def _dense(R: Tensor, B: Tensor) -> Tensor:
    """Minimum-norm least squares pinv(R) B via the eigendecomposition of the symmetric R."""
    evals, evecs = torch.linalg.eigh(R)
    keep = evals > PINV_RTOL * evals.amax().clamp_min(0.0)
    inv = torch.where(keep, 1.0 / torch.where(keep, evals, torch.ones_like(evals)), torch.zeros_like(evals))
    return evecs @ (inv.unsqueeze(1) * (evecs.T @ B))


def lasso_gram_path(
    R: Tensor, B: Tensor, l1: Sequence[float], max_iter: int = 10_000, tol: float = 1e-9
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Solve ``min_w 0.5 w^T R w - w^T b_j + l1 |w|_1`` for every column ``b_j`` of ``B`` [p, t]
    and every L1 weight, with ``R`` [p, p] a correlation matrix (unit diagonal, positive
    semi-definite). Returns ``W`` [L, p, t], gradient steps [L], KKT violation [L], converged [L], in the
    order of ``l1`` (solved from the largest down, warm-started)."""
    p, t = B.shape
    lam_list = [float(v) for v in l1]
    L = len(lam_list)
    out = torch.zeros(L, p, t, dtype=B.dtype, device=B.device)
    iters = torch.zeros(L, dtype=torch.int64)
    kkts = torch.zeros(L, dtype=B.dtype)
    conv = torch.ones(L, dtype=torch.bool)
    if p == 0 or t == 0:
        return out, iters, kkts, conv
    W = torch.zeros(p, t, dtype=B.dtype, device=B.device)
    lipschitz = float(torch.linalg.eigvalsh(R).max().clamp_min(1e-12))
    solved: dict[float, tuple[Tensor, int, float, bool]] = {}
    for lam in sorted(set(lam_list), reverse=True):
        if lam == 0.0:
            W0 = _dense(R, B)
            k = float(_kkt(B - R @ W0, W0, 0.0).max())
            solved[lam] = (W0, 0, k, k <= tol)
            continue
        it, first = 0, True
        kkt = _kkt(B - R @ W, W, lam)
        while True:
            todo = (kkt > tol).nonzero().squeeze(1)
            if todo.numel() == 0 or it >= max_iter:
                break
            # only the targets not yet converged: accelerated proximal-gradient steps, then an
            # active-set step (exact on the predicted support; kept where it lowers the objective)
            Bs, Ws = B[:, todo], W[:, todo].contiguous()
            if not first:
                s = min(_STEPS, max_iter - it)
                Ws = _fista(R, Bs, Ws, lam, s, lipschitz)
                it += s
            first = False
            Ws, _ = _newton(R, Bs, Ws, Bs - R @ Ws, lam)
            W[:, todo] = Ws
            kkt[todo] = _kkt(Bs - R @ Ws, Ws, lam)
        k = float(kkt.max())
        solved[lam] = (W.clone(), it, k, k <= tol)
    for i, lam in enumerate(lam_list):
        Wl, it, k, c = solved[lam]
        out[i], iters[i], kkts[i], conv[i] = Wl, it, k, c
    return out, iters, kkts, conv


# --- the analysis ----------------------------------------------------------------------------
def sparse_prediction(
    fit: MomentStats,
    held_out: MomentStats,
    src: int,
    dst: int,
    l1: Sequence[float] = DEFAULT_L1,
    *,
    max_iter: int = 10_000,
    tol: float = 1e-9,
) -> SparsePrediction:
    """Predict every unit of net ``dst`` from all units of net ``src`` with an L1-penalised linear
    map (one fit per L1 weight), fitted on the ``fit`` moments and scored on ``held_out``.

    See the module docstring for the exact objective, error, ``nnz`` and dead-unit semantics.
    ``max_iter`` caps the proximal-gradient steps per L1 weight; ``tol`` is the KKT tolerance
    (correlation units). Raises ``ValueError`` for negative or non-finite L1 weights, unknown net
    indices, a missing joint block or mismatched splits.
    """
    src, dst, lam = _check_inputs(fit, held_out, src, dst, l1)
    if max_iter < 0 or not tol > 0:
        raise ValueError(f"need max_iter >= 0 and tol > 0, got max_iter={max_iter}, tol={tol}")
    device = fit.sums[src].device
    held_out = held_out.to(device)
    f64 = torch.float64
    P, T = fit.sizes[src], fit.sizes[dst]
    L = len(lam)

    # fit split: standardisation and correlations of the live units
    live_x = ~fit.dead(src)
    live_y = ~fit.dead(dst)
    scored = live_y & ~held_out.dead(dst)
    ix = live_x.nonzero().squeeze(1)
    iy = live_y.nonzero().squeeze(1)
    mx, my = fit.mean(src), fit.mean(dst)
    sx = torch.where(live_x, fit.std(src), torch.ones(P, dtype=f64, device=device))
    sy = torch.where(live_y, fit.std(dst), torch.ones(T, dtype=f64, device=device))
    R = fit.corr(src, src)[ix][:, ix].contiguous()
    B = fit.corr(src, dst)[ix][:, iy].contiguous()

    Wl, iters, kkt, conv = lasso_gram_path(R, B, lam, max_iter=max_iter, tol=tol)
    if not bool(conv.all()):
        bad = [lam[i] for i in range(L) if not conv[i]]
        warnings.warn(
            f"sparse_prediction({src}->{dst}): not converged for l1={bad} after {max_iter} steps "
            f"(max KKT violation {float(kkt.max()):.3g} > tol={tol}); raise max_iter or tol",
            RuntimeWarning,
            stacklevel=2,
        )
    weights = torch.zeros(L, T, P, dtype=f64, device=device)
    weights[:, iy.unsqueeze(1), ix.unsqueeze(0)] = Wl.transpose(1, 2)

    # held-out error in the fit-standardised coordinates
    cxx = held_out.cov(src, src) / torch.outer(sx, sx)
    cxy = held_out.cov(src, dst) / torch.outer(sx, sy)
    vy = held_out.var(dst) / sy.square()
    mux = (held_out.mean(src) - mx) / sx
    muy = (held_out.mean(dst) - my) / sy
    quad = torch.einsum("ltp,pq,ltq->lt", weights, cxx, weights)
    cross = torch.einsum("ltp,pt->lt", weights, cxy)
    bias = muy - weights @ mux
    num = (vy - 2.0 * cross + quad).clamp_min(0.0) + bias.square()
    vy_all = _pooled_var(fit, held_out, dst) / sy.square()  # whole-probe variance, fit-standardised
    err = torch.where(scored, num / torch.where(scored, vy_all, torch.ones_like(vy_all)), torch.ones_like(num))

    nnz_unit = (weights != 0).sum(2)
    n_scored = int(scored.sum())
    if n_scored:
        error = err[:, scored].mean(1)
        nnz = nnz_unit[:, scored].to(f64).mean(1)
    else:
        error = torch.ones(L, dtype=f64, device=device)
        nnz = torch.zeros(L, dtype=f64, device=device)

    raw_w = weights * (sy.unsqueeze(1) / sx.unsqueeze(0))
    intercept = my - raw_w @ mx
    return SparsePrediction(
        src=src,
        dst=dst,
        l1=torch.tensor(lam, dtype=f64, device=device),
        error=error,
        error_per_unit=err,
        nnz=nnz,
        nnz_per_unit=nnz_unit,
        weights=weights,
        raw_weights=raw_w,
        intercept=intercept,
        live_src=live_x,
        scored_dst=scored,
        n_scored=n_scored,
        iterations=iters.to(device),
        kkt=kkt.to(device),
        converged=conv.to(device),
        n_fit=fit.n,
        n_held_out=held_out.n,
    )
