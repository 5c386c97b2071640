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
All target units at once, on the device of the statistics, in float64, from R's one
eigendecomposition (shared by the dense fit, every ADMM step size and the exact solves):

* ADMM on ``w = z`` (Boyd et al. 2011; over-relaxed, step size rebalanced between the primal and
  dual residuals): each step is one [p, p] x [p, t] product with (R + rho I)^-1 and a soft
  threshold. Unlike gradient steps (the solver before issue 20, FISTA), its progress does not
  collapse when R is ill-conditioned (collinear sources: nearly uniform inputs, duplicated units).
* Every ``_ADMM_STEPS`` steps, an active-set step: predict each target's support and signs from
  ``z + (r - R z)`` (``|.| > l1``), solve exactly on it, ``w_A = R_AA^{-1} (r_A - l1 s_A)``, and
  take the best point on the segment towards that solution (an exact line search: the objective
  is convex and piecewise quadratic along it). Systems are batched by size; a target's system is
  solved by Cholesky on its support when the support is the smaller side, and through R^-1 on
  its complement otherwise (near-full supports at small L1 weights cost a small system each).
  ADMM restarts from that point (at most ``_MAX_RESTARTS`` times per target and L1 weight, then it
  runs undisturbed: no cycling).
* Converged targets drop out; the path is solved from the largest L1 weight down, each
  warm-started from the previous solution, or from ``warm_start`` (a previous result, e.g. the
  previous analysis step's), where an active-set step is tried first.

It stops when the largest KKT violation over all targets, ``|r_k - (R w)_k - l1 sign(w_k)|`` on
the support and ``max(|r_k - (R w)_k| - l1, 0)`` off it (correlation units), is at most ``tol``,
or after ``max_iter`` iterations per L1 weight (ADMM steps + active-set steps; ``RuntimeWarning``
with R's condition number). The reported ``kkt`` is always the returned weights' own. Inside a
:func:`convergent.analysis.budget.budget`, every block of steps calls
:func:`~convergent.analysis.budget.check`, so a time budget or a stop request (SIGTERM) ends it
within one ADMM step or one batch of exact solves (measured: under 0.1 s late at 384 units).
At convergence the weights agree with sklearn's
``Lasso(tol=1e-10)`` to ~1e-9.

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

from convergent.analysis.budget import check
from convergent.stats.moments import MomentStats, flatten_samples

DEFAULT_L1 = (0.0, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
# Eigenvalues of R_xx below this fraction of the largest are treated as 0 in the dense (l1 = 0) fit.
PINV_RTOL = 1e-10
# ADMM steps between two active-set steps, and ADMM's over-relaxation (Boyd et al. 2011, 3.4.3).
_ADMM_STEPS = 20
_RELAX = 1.5
# ADMM restarts from an active-set step's point at most this many times per target and L1 weight;
# beyond, ADMM runs undisturbed (it converges on its own) and active-set steps only finish targets.
_MAX_RESTARTS = 25
# Solves on large supports go through R^-1 (systems of the support's complement's size); where R's
# condition number exceeds this, through (R + shift I)^-1 with the shift that brings it down to it.
_SCHUR_MAX_CONDITION = 1e10
# Largest batch of support systems built at once (elements; 8 bytes each).
_CHUNK_ELEMENTS = 1 << 22


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
      iterations: [L] int64 solver iterations used (ADMM steps + active-set steps; 0 for l1 = 0,
        solved directly, and where the start already met the tolerance).
      kkt: [L] largest KKT violation over the fitted target units at the end.
      converged: [L] ``kkt <= tol``.
      n_fit, n_held_out: samples in the two splits.
      condition: condition number of the live sources' correlation matrix R_xx (inf when
        singular: duplicated units). Above ~1e6 (collinear sources, e.g. nearly uniform inputs)
        the weights at small L1 weights are poorly determined by the samples (a KKT violation
        ``tol`` leaves them uncertain by ~``tol`` / smallest eigenvalue), however exactly solved.
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
    condition: float = math.nan

    def predict(self, x_src: Tensor, index: int) -> Tensor:
        """Raw predictions ``[samples, C_dst]`` of the dst units from raw src activations
        (``[N, C_src]`` or ``[N, C_src, H, W]``) with the ``index``-th L1 weight."""
        x = flatten_samples(x_src).to(self.raw_weights)
        return x @ self.raw_weights[index].T + self.intercept[index]


# --- input checks ----------------------------------------------------------------------------
def _check_inputs(fit: MomentStats, held_out: MomentStats, src: int, dst: int, l1) -> tuple[int, int, list[float]]:
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
        if not math.isfinite(v):
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


def _pooled_var(fit: MomentStats, held_out: MomentStats, i: int) -> Tensor:
    """Variance of net i's units over both splits together (population), from the sums."""
    n = fit.n + held_out.n
    mean = (fit.sums[i] + held_out.sums[i]) / n
    second = (torch.diagonal(fit.sxx[(i, i)]) + torch.diagonal(held_out.sxx[(i, i)])) / n
    return (second - mean.square()).clamp_min(0.0)


@dataclass
class _Gram:
    """R's eigendecomposition, shared by the dense fit, every ADMM step size and the exact solves."""

    R: Tensor
    evals: Tensor
    evecs: Tensor
    inverse: Tensor | None  # (R + shift I)^-1, shift >= 0 the least that bounds its condition number

    @classmethod
    def of(cls, R: Tensor) -> _Gram:
        evals, evecs = torch.linalg.eigh(R)
        top = float(evals.max()) if evals.numel() else 0.0
        inverse = None
        if top > 0.0:
            # singular or nearly (duplicated units, samples < units): a ridge just large enough that
            # the solves through it stay accurate; their steps then solve (R_AA + shift I) x = r,
            # which the line search and the KKT check judge by the true objective
            shift = max(0.0, top / _SCHUR_MAX_CONDITION - float(evals.min()))
            inverse = (evecs / (evals + shift)) @ evecs.T
        return cls(R, evals, evecs, inverse)

    @property
    def condition(self) -> float:
        if not self.evals.numel():
            return 1.0
        low = float(self.evals.min())
        return float(self.evals.max()) / low if low > 0 else math.inf

    def admm_operator(self, rho: float) -> Tensor:
        """(R + rho I)^-1."""
        return (self.evecs / (self.evals + rho)) @ self.evecs.T


def _dense(gram: _Gram, B: Tensor) -> Tensor:
    """Minimum-norm least squares pinv(R) B via the eigendecomposition of the symmetric R."""
    evals, evecs = gram.evals, gram.evecs
    keep = evals > PINV_RTOL * evals.amax().clamp_min(0.0)
    inv = torch.where(keep, 1.0 / torch.where(keep, evals, torch.ones_like(evals)), torch.zeros_like(evals))
    return evecs @ (inv.unsqueeze(1) * (evecs.T @ B))


def _buckets(sizes: Tensor) -> list[tuple[Tensor, int]]:
    """Targets grouped by system size (ascending, each group within ~15 % of its smallest), so that
    padding every system of a group to the group's largest wastes little: [(indices, size)]."""
    order = torch.argsort(sizes)
    sorted_sizes = sizes[order].tolist()
    groups, i = [], 0
    while i < len(sorted_sizes):
        limit = int(sorted_sizes[i] * 1.15) + 2
        j = i
        while j < len(sorted_sizes) and sorted_sizes[j] <= limit:
            j += 1
        groups.append((order[i:j], sorted_sizes[j - 1]))
        i = j
    return groups


def _gather_systems(M: Tensor, mask_t: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Each target's principal submatrix of M on its masked indices, padded to ``size`` with the
    identity: (systems [n, size, size], index [n, size], valid [n, size] as 0/1)."""
    index = torch.argsort((~mask_t).to(torch.int8), dim=1, stable=True)[:, :size]
    valid = torch.gather(mask_t, 1, index).to(M.dtype)
    A = M[index.unsqueeze(2), index.unsqueeze(1)]
    A.mul_(valid.unsqueeze(2)).mul_(valid.unsqueeze(1))
    A.diagonal(dim1=-2, dim2=-1).add_(1.0 - valid)  # padding rows: identity, solution 0
    return A, index, valid


def _support_solve(gram: _Gram, rhs: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """X with X_A = R_AA^-1 rhs_A on each target's support A (mask [p, t]) and 0 elsewhere, and
    ok [t] (the system was positive definite). Each target's system is solved directly, by Cholesky
    on its support (support smaller than its complement E), or through M = R^-1:
    x_A = y_A - M_AE (M_EE)^-1 y_E with y = M rhs_A, a system of the complement's size (near-full
    supports; exact for M = (R + shift I)^-1 as well, with R_AA + shift I in place of R_AA). Systems
    of similar size are batched together."""
    p, t = mask.shape
    X = torch.zeros_like(rhs)
    ok = torch.ones(t, dtype=torch.bool, device=rhs.device)
    k = mask.sum(0)
    schur = (p - k < k) if gram.inverse is not None else torch.zeros_like(mask[0])
    direct = (~schur).nonzero().squeeze(1)
    for group, size in _buckets(k[direct]):
        if size == 0:
            continue
        targets = direct[group]
        step = max(1, _CHUNK_ELEMENTS // (size * size))
        for a in range(0, len(targets), step):
            check()
            tg = targets[a : a + step]
            A, index, valid = _gather_systems(gram.R, mask[:, tg].T, size)
            chol, info = torch.linalg.cholesky_ex(A)
            r = torch.gather(rhs[:, tg].T, 1, index) * valid
            sol = torch.cholesky_solve(r.unsqueeze(-1), chol).squeeze(-1) * valid
            X[:, tg] = torch.zeros(len(tg), p, dtype=rhs.dtype, device=rhs.device).scatter_(1, index, sol).T
            ok[tg] = info == 0
    via = schur.nonzero().squeeze(1)
    if via.numel():
        M = gram.inverse
        assert M is not None  # schur is all False without an inverse
        y = M @ (rhs[:, via] * mask[:, via])
        C = torch.zeros(len(via), p, dtype=rhs.dtype, device=rhs.device)
        e = p - k[via]
        for group, size in _buckets(e):
            if size == 0:
                continue
            step = max(1, _CHUNK_ELEMENTS // (size * size))
            for a in range(0, len(group), step):
                check()
                g = group[a : a + step]
                A, index, valid = _gather_systems(M, ~mask[:, via[g]].T, size)
                chol, info = torch.linalg.cholesky_ex(A)
                c = torch.cholesky_solve((torch.gather(y[:, g].T, 1, index) * valid).unsqueeze(-1), chol).squeeze(-1)
                C[g] = torch.zeros_like(C[g]).scatter_(1, index, c * valid)
                ok[via[g]] = info == 0
        X[:, via] = (y - M @ C.T) * mask[:, via]
    return X, ok


def _line_search(R: Tensor, G: Tensor, W: Tensor, D: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """Exact minimiser over t in [0, 1] of the objective along W + t D, per target (it is convex and
    piecewise quadratic in t, with a kink where a weight crosses 0): returns (W + t D with the weight
    that stops the step at a kink set to exactly 0, t [n]). G = B - R W. Never increases the objective."""
    n = W.shape[1]
    slope = -(D * G).sum(0)  # derivative of the smooth part at t = 0
    curv = (D * (R @ D)).sum(0)
    sign0 = torch.where(W != 0, torch.sign(W), torch.sign(D))
    d0 = slope + lam * (D * sign0).sum(0)  # right derivative of the objective at t = 0
    cross = (W != 0) & (W * D < 0)
    tau = torch.where(cross, -W / torch.where(cross, D, torch.ones_like(D)), torch.ones_like(D))
    cross &= tau < 1.0
    tau = torch.where(cross, tau, torch.ones_like(tau))
    jump = torch.where(cross, 2.0 * lam * D.abs(), torch.zeros_like(D))  # derivative jumps at the kinks
    tau_s, order = torch.sort(tau, dim=0, stable=True)
    jump_s = torch.gather(jump, 0, order)
    total = torch.cumsum(jump_s, 0)
    before_jumps = torch.cat([total - jump_s, total[-1:]])  # jumps before each kink; t = 1 ends the segment
    tau_s = torch.cat([tau_s, torch.ones(1, n, dtype=W.dtype, device=W.device)])
    before = d0 + curv * tau_s + before_jumps  # derivative just before each kink
    after = before + torch.cat([jump_s, jump_s.new_full((1, n), math.inf)])
    i = (after >= 0).to(torch.int8).argmax(0, keepdim=True)  # the first kink it is >= 0 after (t = 1 at last)
    t_i = tau_s.gather(0, i).squeeze(0)
    prev = torch.where(i > 0, tau_s.gather(0, (i - 1).clamp_min(0)), torch.zeros_like(t_i.unsqueeze(0))).squeeze(0)
    inside = before.gather(0, i).squeeze(0) >= 0  # the root lies before that kink
    root = -(d0 + before_jumps.gather(0, i).squeeze(0)) / torch.where(curv > 0, curv, torch.ones_like(curv))
    t = torch.where(inside, torch.minimum(torch.maximum(root, prev), t_i), t_i)
    t = torch.where(d0 >= 0, torch.zeros_like(t), t)
    out = W + t * D
    out = torch.where(cross & (tau == t), torch.zeros_like(out), out)
    return out, t


def _active_set_step(
    gram: _Gram, B: Tensor, G: Tensor, Z: Tensor, support: Tensor, signs: Tensor, lam: float
) -> tuple[Tensor, Tensor]:
    """The exact minimiser on ``support`` with ``signs`` (``w_A = R_AA^-1 (b_A - lam s_A)``), then
    the best point on the segment from Z towards it: (new Z, step length [n])."""
    X, ok = _support_solve(gram, B - lam * signs * support, support)
    D = torch.where(ok.unsqueeze(0), X - Z, torch.zeros_like(Z))
    return _line_search(gram.R, G, Z, D, lam)


def _dual_of(G: Tensor, Z: Tensor, lam: float) -> Tensor:
    """The subgradient closest to the gradient at Z: lam sign(z) on the support, G clipped to
    [-lam, lam] off it (ADMM's scaled dual times rho at a solution)."""
    return torch.where(Z != 0, lam * torch.sign(Z), G.clamp(-lam, lam))


def _solve_one(
    gram: _Gram, B: Tensor, W: Tensor, lam: float, max_iter: int, tol: float, polish_first: bool, rho: float
) -> tuple[Tensor, Tensor, int, float]:
    """Lasso at one L1 weight for all targets from W: (W, kkt [t], iterations, final rho).

    Over-relaxed ADMM on w = z (Boyd et al. 2011) for all targets at once: each step is one product
    with the shared (R + rho I)^-1 and a soft threshold, and its progress depends far less on R's
    conditioning than gradient steps do; rho is rebalanced between the primal and dual residuals.
    Every ``_ADMM_STEPS`` steps, an active-set step from ADMM's iterate: the exact solution on the
    support and signs predicted from z + gradient (``|z_k + g_k| > l1``), and the best point on the
    segment towards it (exact line search: the objective never increases). ADMM restarts from that
    point (with its dual), which on ill-conditioned R is what makes it fast; after
    ``_MAX_RESTARTS`` restarts of a target it runs on undisturbed, so it cannot cycle. The KKT
    violation of each target's best active-set point decides convergence; that point is returned."""
    R = gram.R
    G = B - R @ W
    kkt = _kkt(G, W, lam)
    Z, U = W.clone(), _dual_of(G, W, lam) / rho
    restarts = torch.full((W.shape[1],), _MAX_RESTARTS, dtype=torch.int64, device=W.device)
    P = gram.admm_operator(rho)
    it = 0
    polish = polish_first  # from a warm start, an active-set step first
    while it < max_iter:
        todo = (kkt > tol).nonzero().squeeze(1)
        if todo.numel() == 0:
            break
        check()  # a time budget or a stop request ends the analysis here
        Bt, Zt, Ut = B[:, todo], Z[:, todo], U[:, todo]
        balance = None
        if not polish:
            steps = min(_ADMM_STEPS, max_iter - it - 1)  # and the active-set step: max_iter in all
            for i in range(steps):
                check()
                Wh = torch.addmm(Zt, P, Bt + rho * (Zt - Ut), alpha=_RELAX, beta=1.0 - _RELAX)
                Zn = F.softshrink(Wh + Ut, lam / rho)
                Ut = Ut + Wh - Zn
                if i == steps - 1:
                    balance = (float((Wh - Zn).norm()), rho * float((Zn - Zt).norm()))  # primal, dual residuals
                Zt = Zn
            it += steps
        polish = False
        Gz = Bt - R @ Zt
        zg = Zt + Gz
        Sn, _ = _active_set_step(gram, Bt, Gz, Zt, zg.abs() > lam, torch.sign(zg), lam)
        Gn = Bt - R @ Sn
        kkt_n = _kkt(Gn, Sn, lam)
        restart = (Sn != Zt).any(0) & (restarts[todo] > 0)
        restarts[todo] -= restart.to(restarts.dtype)
        Z[:, todo] = torch.where(restart.unsqueeze(0), Sn, Zt)
        U[:, todo] = torch.where(restart.unsqueeze(0), _dual_of(Gn, Sn, lam) / rho, Ut)
        keep = restart | (kkt_n < kkt[todo])
        W[:, todo] = torch.where(keep.unsqueeze(0), Sn, W[:, todo])
        kkt[todo] = torch.where(keep, kkt_n, kkt[todo])
        it += 1
        if balance is not None and (balance[0] > 10.0 * balance[1] or balance[1] > 10.0 * balance[0]):
            # residual balancing (Boyd et al. 2011, 3.4.1): keep the two residuals within 10x
            factor = 2.0 if balance[0] > balance[1] else 0.5
            rho *= factor
            U /= factor
            P = gram.admm_operator(rho)
    return W, kkt, it, rho


def path_outputs(B: Tensor, l1: Sequence[float]) -> tuple[list[float], Tensor, Tensor, Tensor, Tensor]:
    """A path solver's L1 weights and its zeroed outputs: weights [L, p, t], iterations [L], KKT
    violations [L] and converged [L] (true until a weight fails)."""
    p, t = B.shape
    lam_list = [float(v) for v in l1]
    L = len(lam_list)
    out = torch.zeros(L, p, t, dtype=B.dtype, device=B.device)
    return lam_list, out, torch.zeros(L, dtype=torch.int64), torch.zeros(L, dtype=B.dtype), torch.ones(L, dtype=torch.bool)


def lasso_gram_path(
    R: Tensor,
    B: Tensor,
    l1: Sequence[float],
    max_iter: int = 10_000,
    tol: float = 1e-9,
    warm_start: Sequence[Tensor | None] | Tensor | None = None,
    *,
    gram: _Gram | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Solve ``min_w 0.5 w^T R w - w^T b_j + l1 |w|_1`` for every column ``b_j`` of ``B`` [p, t]
    and every L1 weight, with ``R`` [p, p] a correlation matrix (unit diagonal, positive
    semi-definite). Returns ``W`` [L, p, t], iterations [L], KKT violation [L], converged [L], in
    the order of ``l1`` (solved from the largest down, each warm-started from the previous one).
    ``warm_start``: starting weights [p, t] per L1 weight (same order as ``l1``; ``None`` entries:
    the path's own warm start), e.g. the previous analysis step's solution; an active-set step is
    tried from it first."""
    p, t = B.shape
    lam_list, out, iters, kkts, conv = path_outputs(B, l1)
    L = len(lam_list)
    if p == 0 or t == 0:
        return out, iters, kkts, conv
    warm = list(warm_start) if warm_start is not None else [None] * L
    if len(warm) != L or any(w is not None and tuple(w.shape) != (p, t) for w in warm):
        shapes = [None if w is None else tuple(w.shape) for w in warm]
        raise ValueError(f"warm_start must give one [sources, targets] = {[p, t]} tensor (or None) per L1 weight, got {shapes}")
    gram = gram if gram is not None else _Gram.of(R)
    W = torch.zeros(p, t, dtype=B.dtype, device=B.device)
    solved: dict[float, tuple[Tensor, int, float, bool]] = {}
    for lam in sorted(set(lam_list), reverse=True):
        if lam == 0.0:
            W0 = _dense(gram, B)
            k = float(_kkt(B - R @ W0, W0, 0.0).max())
            solved[lam] = (W0, 0, k, k <= tol)
            continue
        start = next((w for w, v in zip(warm, lam_list) if v == lam and w is not None), None)
        if start is not None:
            W = start.to(B).clone()
        W, kkt, it, _ = _solve_one(gram, B, W, lam, max_iter, tol, polish_first=start is not None, rho=1.0)
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
    warm_start: SparsePrediction | None = None,
) -> SparsePrediction:
    """Predict every unit of net ``dst`` from all units of net ``src`` with an L1-penalised linear
    map (one fit per L1 weight), fitted on the ``fit`` moments and scored on ``held_out``.

    See the module docstring for the exact objective, error, ``nnz`` and dead-unit semantics.
    ``max_iter`` caps the solver iterations per L1 weight; ``tol`` is the KKT tolerance
    (correlation units). ``warm_start``: a previous result for the same nets (e.g. the previous
    analysis step's, same pair and layer): the solver starts from its weights at every L1 weight
    both share (the same answer, usually in far fewer iterations). Inside a
    :func:`convergent.analysis.budget.budget`, the solver stops with ``BudgetExceeded`` once the
    budget is spent. Raises ``ValueError`` for negative or non-finite L1 weights, unknown net
    indices, a missing joint block, mismatched splits or a warm start of other nets.
    """
    src, dst, lam = _check_inputs(fit, held_out, src, dst, l1)
    if max_iter < 0 or not tol > 0:
        raise ValueError(f"need max_iter >= 0 and tol > 0, got max_iter={max_iter}, tol={tol}")
    if warm_start is not None:
        if not isinstance(warm_start, SparsePrediction):
            raise TypeError(f"warm_start must be a SparsePrediction (a previous result), got {type(warm_start).__name__}")
        if tuple(warm_start.weights.shape[1:]) != (fit.sizes[dst], fit.sizes[src]):
            raise ValueError(
                f"warm_start predicts {warm_start.weights.shape[1]} units from {warm_start.weights.shape[2]}; these "
                f"nets have {fit.sizes[dst]} and {fit.sizes[src]}: pass the previous result of the same pair and layer"
            )
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

    gram = _Gram.of(R)
    starts = None
    if warm_start is not None:  # the previous weights at the shared L1 weights, on today's live units
        prev = {float(v): i for i, v in enumerate(warm_start.l1.tolist())}
        w_prev = warm_start.weights.to(device)
        starts = [w_prev[prev[v]][iy][:, ix].T.contiguous() if v in prev else None for v in lam]
    Wl, iters, kkt, conv = lasso_gram_path(R, B, lam, max_iter=max_iter, tol=tol, warm_start=starts, gram=gram)
    if not bool(conv.all()):
        bad = [lam[i] for i in range(L) if not conv[i]]
        warnings.warn(
            f"sparse_prediction({src}->{dst}): not converged for l1={bad} after {max_iter} iterations "
            f"(max KKT violation {float(kkt.max()):.3g} > tol={tol}; condition number of the sources' "
            f"correlations {gram.condition:.3g}); raise max_iter or tol",
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
        condition=gram.condition,
    )
