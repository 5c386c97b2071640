"""Representational similarity measures computed from streamed moments, never from activations.

Every measure has the shape ``measure(stats, a, b, **options) -> float``: ``stats`` is a
:class:`~convergent.stats.moments.MomentStats` (the summed moments of K nets' units over the same
probe samples) and ``a``, ``b`` are net indices inside it. The same function therefore compares two
members of an ensemble, two layers of one net, or a permutation-null pair: the caller just builds
different stats. All arithmetic is float64 on the stats' device; the result is a Python float.

Measures (registered, with their declared properties, in `convergent.analysis.builtin.similarity`):

* :func:`linear_cka` - linear CKA (Kornblith et al. 2019), biased (``debiased=False``) or with the
  unbiased HSIC estimator of Song et al. 2012 (``debiased=True``, as Kornblith's
  ``cka(gram_linear(x), gram_linear(y), debiased=True)``). The debiased form needs the per-sample
  norm sums ``qq``/``qx`` (``Moments(..., cka_sums=True)``, the default); nothing else.
* :func:`cca` / :func:`canonical_correlations` - ridge-regularised CCA (mean canonical correlation,
  and the correlations with their directions), :func:`svcca` (Raghu et al. 2017) and :func:`pwcca`
  (Morcos et al. 2018; ``variant="google_svcca"`` reproduces google/svcca's ``compute_pwcca``). With samples <= units they warn with :class:`SampleSizeWarning`: the
  canonical correlations are then all ~1 whatever the nets compute.
* :func:`procrustes` - orthogonal Procrustes similarity of centred, Frobenius-normalised
  activations, ``||C_ab||_* / sqrt(tr C_aa tr C_bb)`` in [0, 1], and :func:`procrustes_distance`.

Degenerate inputs: dead units (zero variance: never-firing ReLUs, constant units; see
``MomentStats.dead``) have their covariance rows set to exactly 0, so rounding noise of a constant
unit never counts as signal. A net whose units are all dead (an all-zero layer) has similarity 0 to
everything (Procrustes distance sqrt(2)); no measure returns NaN or inf.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from convergent.analysis.svcca_compat import google_svcca_pwcca
from convergent.stats.moments import Moments, MomentStats, flatten_samples

__all__ = [
    "DEFAULT_EPSILON",
    "DEFAULT_KEEP",
    "DEFAULT_RANK_TOL",
    "PWCCA_VARIANTS",
    "CCAResult",
    "SampleSizeWarning",
    "canonical_correlations",
    "cca",
    "linear_cka",
    "linear_cka_debiased",
    "procrustes",
    "procrustes_distance",
    "pwcca",
    "pwcca_weights",
    "stats_from_arrays",
    "svcca",
]

#: Ridge of the CCA family, relative: ``epsilon * (mean variance of the net's live units)`` is added
#: to every retained eigenvalue of a net's covariance before whitening. Keeps the whitening bounded
#: on ill-conditioned layers; it shrinks a canonical correlation along a direction of variance
#: lambda by about ``lambda / (lambda + ridge)`` (so CCA(X, X) = 1 - O(epsilon * condition number)).
DEFAULT_EPSILON = 1e-6
#: Eigen-directions of a net's covariance with eigenvalue <= ``rank_tol * largest`` are dropped
#: before CCA (CCA is a comparison of subspaces: duplicated or dead units do not add dimensions).
DEFAULT_RANK_TOL = 1e-10
#: SVCCA: fraction of each net's variance kept by its top principal directions (Raghu et al.).
DEFAULT_KEEP = 0.99


class SampleSizeWarning(UserWarning):
    """Too few samples for the measure to mean anything (CCA with samples <= units, debiased CKA
    with fewer than 4 samples). The returned value is not evidence of similarity."""


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _live_cov(stats: MomentStats, a: int, b: int) -> Tensor:
    """Population covariance [C_a, C_b] with the rows of a's and columns of b's dead units set to 0."""
    return stats.memo(("live_cov", a, b), lambda: _mask_dead(stats, a, b))


def _mask_dead(stats: MomentStats, a: int, b: int) -> Tensor:
    c = stats.cov(a, b)
    live_a = (~stats.dead(a)).to(c.dtype)
    live_b = live_a if a == b else (~stats.dead(b)).to(c.dtype)
    return c * torch.outer(live_a, live_b)


def _total_var(c_aa: Tensor) -> float:
    return float(torch.diagonal(c_aa).clamp_min(0.0).sum())


def _warn_samples(measure: str, n: int, dims: tuple[int, int], what: str, a: int, b: int) -> None:
    warnings.warn(
        f"{measure}(nets {a}, {b}): only {n} samples for {dims[0]} + {dims[1]} {what}. With samples <= "
        "features the canonical correlations are (nearly) all 1 whatever the nets compute, so this score is "
        "MEANINGLESS. Use more probe images (or spatial positions) than units - ideally 10x - or fewer "
        "units (subsample units, lower `keep` for SVCCA, pool spatially).",
        SampleSizeWarning,
        stacklevel=3,
    )


# --------------------------------------------------------------------------------------------------
# CKA
# --------------------------------------------------------------------------------------------------
def linear_cka(stats: MomentStats, a: int, b: int, debiased: bool = False) -> float:
    """Linear CKA of nets ``a`` and ``b``: ``||C_ab||_F^2 / (||C_aa||_F ||C_bb||_F)`` (population
    covariances; equals Kornblith et al.'s ``cka(gram_linear(X), gram_linear(Y))``), in [0, 1].

    ``debiased=True``: the unbiased HSIC estimator (Song et al. 2012) in place of the biased one,
    equal to Kornblith's ``cka(gram_linear(X), gram_linear(Y), debiased=True)``; in [-1, 1], ~0 for
    independent nets even when samples < units (where the biased CKA is large). Needs the ``qq``/``qx``
    sums (``Moments(cka_sums=True)``) and at least 4 samples (else it warns and returns 0). The
    estimator is exactly translation-invariant, so it is evaluated on centred quantities derived from
    the raw sums (the same value as on raw data). Its accuracy is limited by the raw 4th-order sums
    ``qq``/``qx``: relative error ~1e-16 (|mean| / std)^4 per unit (1e-12 at mean = 10 std; measured
    1e-8 at 170 std), fine for post-ReLU activations.

    All-zero / all-dead net: 0.
    """
    if debiased:
        return _debiased_cka(stats, a, b)
    c_aa, c_bb, c_ab = _live_cov(stats, a, a), _live_cov(stats, b, b), _live_cov(stats, a, b)
    ta, tb = _total_var(c_aa), _total_var(c_bb)
    if ta <= 0.0 or tb <= 0.0:
        return 0.0
    # Normalise each net by its total variance first (CKA is scale-invariant): no overflow/underflow.
    c_aa, c_bb, c_ab = c_aa / ta, c_bb / tb, c_ab / (math.sqrt(ta) * math.sqrt(tb))
    den = float(torch.linalg.matrix_norm(c_aa) * torch.linalg.matrix_norm(c_bb))
    if den <= 0.0:
        return 0.0
    return min(max(float(c_ab.square().sum()) / den, 0.0), 1.0)


def linear_cka_debiased(stats: MomentStats, a: int, b: int) -> float:
    """:func:`linear_cka` with ``debiased=True``."""
    return linear_cka(stats, a, b, debiased=True)


def _cka_sums(stats: MomentStats, a: int, b: int) -> tuple[Tensor, Tensor, Tensor]:
    key = (min(a, b), max(a, b))
    if key not in stats.qq or (a, b) not in stats.qx or (b, a) not in stats.qx:
        raise KeyError(
            f"debiased CKA of nets ({a}, {b}) needs the per-sample norm sums qq/qx: accumulate with "
            "Moments(..., cka_sums=True) and keep the pair"
        )
    return stats.qq[key], stats.qx[(a, b)], stats.qx[(b, a)]


def _debiased_hsic(stats: MomentStats, a: int, b: int, sa: float, sb: float) -> float:
    """n(n-3) x the unbiased HSIC (Song et al. 2012) of the linear kernels of nets a and b, with net a
    scaled by ``sa`` and net b by ``sb``. In feature space, for centred data X, Y (n samples) with
    per-sample squared norms q_x, q_y (Kornblith's ``_debiased_dot_product_similarity_helper``):

        ||X^T Y||_F^2 - n/(n-2) sum_s q_x q_y + (sum_s q_x)(sum_s q_y) / ((n-1)(n-2)).

    The centred sums are derived from the raw streamed ones: with means m_x, m_y,
    sum_s |x_s - m_x|^2 |y_s - m_y|^2 = qq - 2 qx_ab.m_y - 2 qx_ba.m_x + 4 m_x^T S_ab m_y
    + |m_y|^2 tr S_aa + |m_x|^2 tr S_bb - 3 n |m_x|^2 |m_y|^2  (S = raw second-moment sums).
    """
    n = stats._n.to(torch.float64)
    qq, qx_ab, qx_ba = _cka_sums(stats, a, b)
    # scale factor by factor (never form sa^2 sb^2 alone: it can overflow where the product won't)
    mx, my = stats.mean(a) * sa, stats.mean(b) * sb
    s_ab = stats.second_moment(a, b) * sa * sb * n
    tr_aa = torch.diagonal(stats.second_moment(a, a)).sum() * sa * sa * n
    tr_bb = torch.diagonal(stats.second_moment(b, b)).sum() * sb * sb * n
    nx, ny = mx.square().sum(), my.square().sum()
    qcc = (
        qq * sa * sa * sb * sb
        - 2 * (qx_ab * sa * sa * sb) @ my
        - 2 * (qx_ba * sb * sb * sa) @ mx
        + 4 * mx @ s_ab @ my
        + ny * tr_aa
        + nx * tr_bb
        - 3 * n * nx * ny
    )
    cov_ab = _live_cov(stats, a, b) * sa * sb
    xty = n * n * cov_ab.square().sum()
    qx_sum = n * (_total_var(_live_cov(stats, a, a)) * sa * sa)
    qy_sum = n * (_total_var(_live_cov(stats, b, b)) * sb * sb)
    hsic = xty - n / (n - 2) * qcc + qx_sum * qy_sum / ((n - 1) * (n - 2))
    return float(hsic)


def _debiased_cka(stats: MomentStats, a: int, b: int) -> float:
    n = stats.n
    if n < 4:
        warnings.warn(
            f"debiased linear CKA(nets {a}, {b}) needs at least 4 samples, got {n}: returning 0. Use more probe images.",
            SampleSizeWarning,
            stacklevel=3,
        )
        return 0.0
    ta, tb = _total_var(_live_cov(stats, a, a)), _total_var(_live_cov(stats, b, b))
    if ta <= 0.0 or tb <= 0.0:
        return 0.0
    sa, sb = 1.0 / math.sqrt(ta), 1.0 / math.sqrt(tb)  # unit total variance: no over/underflow
    # sa, sb follow from a, b: each net's own term is shared by all its pairs (cross-layer tables)
    h_ab = _debiased_hsic(stats, a, b, sa, sb)
    h_aa = stats.memo(("debiased_hsic", a), lambda: _debiased_hsic(stats, a, a, sa, sa))
    h_bb = stats.memo(("debiased_hsic", b), lambda: _debiased_hsic(stats, b, b, sb, sb))
    if not (h_aa > 0.0 and h_bb > 0.0) or not math.isfinite(h_ab):
        return 0.0
    return min(max(h_ab / (math.sqrt(h_aa) * math.sqrt(h_bb)), -1.0), 1.0)


# --------------------------------------------------------------------------------------------------
# CCA family
# --------------------------------------------------------------------------------------------------
@dataclass
class CCAResult:
    """Canonical correlations of nets a and b, strongest first, and their directions.

    ``rho[i]`` is the correlation of the canonical variates ``(x_a - mean_a) @ dirs_a[:, i]`` and
    ``(x_b - mean_b) @ dirs_b[:, i]`` (unit variance, up to the ridge). ``dims`` are the numbers of
    whitened dimensions of each net (rank, or SVCCA's kept principal directions).
    """

    rho: Tensor  # [m]
    dirs_a: Tensor  # [C_a, m]
    dirs_b: Tensor  # [C_b, m]
    mean_a: Tensor  # [C_a]
    mean_b: Tensor  # [C_b]
    dims: tuple[int, int]

    def variates_a(self, x: Tensor) -> Tensor:
        """Canonical variates of net a's activations ([N, C_a] or [N, C_a, H, W]) -> [samples, m]."""
        return (flatten_samples(x).to(self.dirs_a) - self.mean_a) @ self.dirs_a

    def variates_b(self, x: Tensor) -> Tensor:
        return (flatten_samples(x).to(self.dirs_b) - self.mean_b) @ self.dirs_b


def _eigh_descending(c: Tensor) -> tuple[Tensor, Tensor]:
    lam, vec = torch.linalg.eigh(c)
    return lam.flip(0), vec.flip(1)


def _whitener(c: Tensor, eig: tuple[Tensor, Tensor], epsilon: float, rank_tol: float, keep: float | None) -> Tensor:
    """[C, r] matrix W with W^T c W ~ I on c's retained eigen-directions (ridge-regularised);
    `eig`: c's eigendecomposition, descending (`_eigh_descending`)."""
    lam, vec = eig
    lam_max = float(lam[0]) if lam.numel() else 0.0
    if lam_max <= 0.0:
        return c.new_zeros(c.shape[0], 0)
    r = int((lam > rank_tol * lam_max).sum())
    if keep is not None:
        pos = lam.clamp_min(0.0)
        frac = torch.cumsum(pos, 0) / pos.sum()
        # smallest k whose top-k directions explain >= keep of the variance
        k = int((frac < keep - 1e-12).sum()) + 1
        r = max(1, min(r, k))
    lam, vec = lam[:r], vec[:, :r]
    ridge = epsilon * _total_var(c) / max(1, int((torch.diagonal(c) > 0).sum()))
    return vec / (lam + ridge).sqrt()


def canonical_correlations(
    stats: MomentStats,
    a: int,
    b: int,
    epsilon: float = DEFAULT_EPSILON,
    keep: float | None = None,
    rank_tol: float = DEFAULT_RANK_TOL,
    warn: bool = True,
) -> CCAResult:
    """Ridge-regularised CCA of nets a and b from their covariances.

    Each net's covariance (dead units zeroed) is eigendecomposed; directions with eigenvalue
    <= ``rank_tol * largest`` are dropped (or, with ``keep``, all but the top principal directions
    explaining ``keep`` of the variance: SVCCA), and the rest are whitened with
    ``(lambda + epsilon * mean live variance)^(-1/2)``. The canonical correlations are the singular
    values of the whitened cross-covariance, ``m = min(r_a, r_b)`` of them, in [0, 1].

    Warns :class:`SampleSizeWarning` when ``stats.n <= C_a + C_b`` units (SVCCA: kept dimensions
    ``r_a + r_b``). This includes samples <= units of either net, where every canonical correlation
    is ~1 regardless of the data; beyond that, while ``C_a + C_b >= n - 1`` the centred sample space
    cannot hold both subspaces apart, so at least ``C_a + C_b - n + 1`` correlations are exactly 1.
    """
    # Mean CCA and PWCCA of a pair share one result (cached on the stats; treat it as read-only).
    res = stats.memo(
        ("cca", a, b, epsilon, rank_tol, keep), lambda: _canonical_correlations(stats, a, b, epsilon, keep, rank_tol)
    )
    if warn:
        _warn_cca(stats, a, b, keep, res.dims)
    return res


def _warn_cca(stats: MomentStats, a: int, b: int, keep: float | None, dims: tuple[int, int]) -> None:
    if keep is None and stats.n <= stats.sizes[a] + stats.sizes[b]:
        _warn_samples("cca", stats.n, (stats.sizes[a], stats.sizes[b]), "units", a, b)
    elif keep is not None and dims[0] and dims[1] and stats.n <= dims[0] + dims[1]:
        _warn_samples("svcca", stats.n, dims, "kept principal dimensions", a, b)


def _whitened_cross(stats: MomentStats, a: int, b: int, epsilon: float, keep: float | None, rank_tol: float):
    """(whitened cross-covariance [r_a, r_b], w_a, w_b, s_a, s_b) of nets a and b."""
    c_aa, c_bb, c_ab = _live_cov(stats, a, a), _live_cov(stats, b, b), _live_cov(stats, a, b)
    ta, tb = _total_var(c_aa), _total_var(c_bb)
    # Scale-free: unit total variance per net (CCA is scale-invariant; the ridge is relative).
    # Each net on its own (an all-dead net stays 0), so a net's scaled covariance and its cached
    # whitener do not depend on which net it is paired with.
    sa, sb = (math.sqrt(ta) if ta > 0.0 else 1.0), (math.sqrt(tb) if tb > 0.0 else 1.0)
    c_aa, c_bb, c_ab = c_aa / (ta if ta > 0.0 else 1.0), c_bb / (tb if tb > 0.0 else 1.0), c_ab / (sa * sb)

    # Whitening depends on one net only: cached on the stats (cross-layer tables reuse it).
    # So is the eigendecomposition of its scaled live covariance: mean CCA and SVCCA whiten it
    # truncated differently.
    def whitener(net: int, c: Tensor) -> Tensor:
        eig = stats.memo(("scaled_live_eigh", net), lambda: _eigh_descending(c))
        return _whitener(c, eig, epsilon, rank_tol, keep)

    wa = stats.memo(("whitener", a, epsilon, rank_tol, keep), lambda: whitener(a, c_aa))
    wb = stats.memo(("whitener", b, epsilon, rank_tol, keep), lambda: whitener(b, c_bb))
    return wa.T @ c_ab @ wb, wa, wb, sa, sb


def _canonical_correlations(stats: MomentStats, a: int, b: int, epsilon: float, keep: float | None, rank_tol: float) -> CCAResult:
    cross, wa, wb, sa, sb = _whitened_cross(stats, a, b, epsilon, keep, rank_tol)
    dims = (wa.shape[1], wb.shape[1])
    m = min(dims)
    mean_a, mean_b = stats.mean(a), stats.mean(b)
    if m == 0:
        return CCAResult(cross.new_zeros(0), wa.new_zeros(wa.shape[0], 0), wb.new_zeros(wb.shape[0], 0), mean_a, mean_b, dims)
    u, s, vh = torch.linalg.svd(cross, full_matrices=False)
    rho = s[:m].clamp(0.0, 1.0)
    # directions for the unnormalised activations (undo the unit-total-variance scaling)
    dirs_a = wa @ u[:, :m] / sa
    dirs_b = wb @ vh.T[:, :m] / sb
    return CCAResult(rho, dirs_a, dirs_b, mean_a, mean_b, dims)


def cca(stats: MomentStats, a: int, b: int, epsilon: float = DEFAULT_EPSILON, rank_tol: float = DEFAULT_RANK_TOL) -> float:
    """Mean canonical correlation of nets a and b (0 if either net is all dead). Invariant to any
    invertible linear map of either net's units (up to the ridge ``epsilon``)."""
    res = canonical_correlations(stats, a, b, epsilon=epsilon, rank_tol=rank_tol)
    return float(res.rho.mean()) if res.rho.numel() else 0.0


def svcca(
    stats: MomentStats,
    a: int,
    b: int,
    keep: float = DEFAULT_KEEP,
    epsilon: float = DEFAULT_EPSILON,
    rank_tol: float = DEFAULT_RANK_TOL,
) -> float:
    """SVCCA (Raghu et al. 2017): project each net onto its top principal directions explaining
    ``keep`` of its variance, then mean CCA of the projections. Warns when samples <= kept dims."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    # only the correlations: singular values without the vectors (several times cheaper)
    cross = _whitened_cross(stats, a, b, epsilon, keep, rank_tol)[0]
    _warn_cca(stats, a, b, keep, (cross.shape[0], cross.shape[1]))
    return float(torch.linalg.svdvals(cross).clamp(0.0, 1.0).mean()) if min(cross.shape) else 0.0


def pwcca_weights(
    stats: MomentStats, a: int, b: int, epsilon: float = DEFAULT_EPSILON, rank_tol: float = DEFAULT_RANK_TOL
) -> tuple[Tensor, Tensor]:
    """(weights, rho) of PWCCA: ``weights[i]`` proportional to ``sum_j |<h_i, x_j>|`` (sum 1), with
    h_i net a's i-th canonical variate and x_j net a's centred unit j over the samples; from the
    covariances, ``<h_i, x_j> = n (dirs_a^T C_aa)_ij``."""
    res = canonical_correlations(stats, a, b, epsilon=epsilon, rank_tol=rank_tol)
    if not res.rho.numel():
        return res.rho, res.rho
    c_aa = _live_cov(stats, a, a)
    w = (res.dirs_a.T @ c_aa).abs().sum(1)
    total = float(w.sum())
    w = w / total if total > 0 else torch.full_like(w, 1.0 / w.numel())
    return w, res.rho


#: :func:`pwcca` variants: the paper's definition (default) and google/svcca's ``compute_pwcca``
#: (on the centred activations).
PWCCA_VARIANTS = ("morcos2018", "google_svcca")


def pwcca(
    stats: MomentStats,
    a: int,
    b: int,
    epsilon: float | None = None,
    rank_tol: float = DEFAULT_RANK_TOL,
    variant: str = "morcos2018",
) -> float:
    """Projection-weighted CCA (Morcos et al. 2018) of nets ``a`` and ``b``, in [0, 1].

    ``variant="morcos2018"`` (default): the paper's definition, ``sum_i alpha_i rho_i`` with the
    weights of :func:`pwcca_weights` (how much of net ``a``'s centred units each canonical variate
    accounts for). Not symmetric: ``pwcca(s, a, b) != pwcca(s, b, a)`` in general; weights always
    from net ``a``; translation-invariant. ``epsilon`` is our relative ridge (default
    :data:`DEFAULT_EPSILON`), ``rank_tol`` as in :func:`canonical_correlations`.

    ``variant="google_svcca"``: google/svcca's ``compute_pwcca(acts_a - mean_a, acts_b - mean_b,
    epsilon)``, their published code on the centred activations: weights from the net with fewer
    kept units, projections on unwhitened directions; translation-invariant. ``epsilon`` is theirs
    (default 0, as theirs; ``rank_tol`` is unused). On uncentred activations their code's value
    also depends on the arbitrary signs of LAPACK's singular vectors; that mode, and every step,
    is in :mod:`convergent.analysis.svcca_compat` (``google_svcca_pwcca(..., centred=False)``),
    with the cases where their code has no answer (NaN, an exception) and ours returns one.
    """
    if variant not in PWCCA_VARIANTS:
        raise ValueError(f"unknown pwcca variant {variant!r}; choose one of {', '.join(PWCCA_VARIANTS)}")
    if variant == "morcos2018":
        w, rho = pwcca_weights(stats, a, b, epsilon=DEFAULT_EPSILON if epsilon is None else epsilon, rank_tol=rank_tol)
        return min(max(float(w @ rho), 0.0), 1.0) if rho.numel() else 0.0
    if stats.n <= stats.sizes[a] + stats.sizes[b]:
        _warn_samples("pwcca", stats.n, (stats.sizes[a], stats.sizes[b]), "units", a, b)
    res = google_svcca_pwcca(stats, a, b, epsilon=0.0 if epsilon is None else epsilon, centred=True)
    return min(max(res.value, 0.0), 1.0)


# --------------------------------------------------------------------------------------------------
# Procrustes
# --------------------------------------------------------------------------------------------------
def procrustes(stats: MomentStats, a: int, b: int) -> float:
    """Orthogonal Procrustes similarity of the centred, Frobenius-normalised activations:
    ``max_Q <X/||X||, Y Q/||Y||>_F = ||C_ab||_* / sqrt(tr C_aa tr C_bb)``, in [0, 1] (0 if either
    net is all dead). Nets of different widths: Q is a partial isometry (the nuclear norm is the same
    as with the narrower net zero-padded)."""
    c_aa, c_bb, c_ab = _live_cov(stats, a, a), _live_cov(stats, b, b), _live_cov(stats, a, b)
    ta, tb = _total_var(c_aa), _total_var(c_bb)
    if ta <= 0.0 or tb <= 0.0:
        return 0.0
    nuc = float(torch.linalg.svdvals(c_ab / (math.sqrt(ta) * math.sqrt(tb))).sum())
    return min(max(nuc, 0.0), 1.0)


def procrustes_distance(stats: MomentStats, a: int, b: int, squared: bool = False) -> float:
    """Procrustes distance of the centred, Frobenius-normalised activations,
    ``min_Q ||X/||X|| - Y Q/||Y|| ||_F = sqrt(2 - 2 procrustes(stats, a, b))`` in [0, sqrt 2]
    (``squared=True``: ``2 - 2 procrustes``, in [0, 2]). All-dead net: sqrt(2)."""
    d2 = max(0.0, 2.0 - 2.0 * procrustes(stats, a, b))
    return d2 if squared else math.sqrt(d2)


# --------------------------------------------------------------------------------------------------
# convenience
# --------------------------------------------------------------------------------------------------
def stats_from_arrays(*xs: Tensor | np.ndarray, batch_size: int | None = None, cka_sums: bool = True) -> MomentStats:
    """MomentStats of raw activations, one [N, C] or [N, C, H, W] array/tensor per net (same N),
    folded into a :class:`Moments` in batches of ``batch_size`` images (all at once by default), on
    the first array's device."""
    if not xs:
        raise ValueError("stats_from_arrays needs at least one array")
    ts = [torch.as_tensor(x).to(torch.float64) for x in xs]
    moments = Moments([t.shape[1] for t in ts], cka_sums=cka_sums).to(ts[0].device)
    n = ts[0].shape[0]
    step = n if not batch_size else int(batch_size)
    for start in range(0, max(n, 1), max(step, 1)):
        moments.update(*[t[start : start + step] for t in ts])
    return moments.compute()
