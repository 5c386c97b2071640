"""google/svcca's ``compute_pwcca`` (pwcca.py on top of cca_core.get_cca_similarity), from moments.

Published PWCCA numbers (Morcos, Raghu & Bengio 2018, and most papers since) come from that code,
which differs from the paper's definition (:func:`convergent.analysis.measures.pwcca`, default
``variant="morcos2018"``). This module reproduces the code, step for step, from a
:class:`~convergent.stats.moments.MomentStats` alone (means, covariances, sample count): no
activations. Their steps, for activations ``acts1`` [C_1, n], ``acts2`` [C_2, n]:

1. ``np.cov`` of both nets (ddof = 1; the ddof cancels in step 2).
2. Each net's covariance divided by its largest absolute entry ``xmax`` (the largest variance),
   the cross-covariance by ``sqrt(xmax * ymax)``.
3. ``remove_small``: units whose rescaled variance is ``< epsilon`` are dropped (``epsilon = 0``,
   their default, drops nothing, not even constant units).
4. ``epsilon * I`` added to each rescaled covariance; inverse square roots via ``pinv`` (cut-off
   ``1e-15 x`` the largest singular value) and an eigendecomposition.
5. ``u, s, v = svd(invsqrt_xx @ sigma_xy @ invsqrt_yy)``; ``s`` (descending) are the coefficients,
   all ``min(C_1', C_2')`` of them (no 0.98 truncation: that only touches ``get_cca_similarity``'s
   ``"mean"``).
6. The net with fewer kept units gives the weights (net 1 on a tie). Its "directions" are
   ``coef @ (acts - mean) + mean``, with ``coef = u.T`` (net 1) or ``v`` (net 2): the canonical
   directions of the *whitened* space applied to the *unwhitened* centred activations
   (``invsqrt_xx`` is not applied), and each row ``i`` gets unit ``i``'s mean added back.
7. ``P = qr(dirns.T)`` (Gram-Schmidt of the directions, strongest first); ``weights_i =
   sum_j |<P_i, acts_j>|`` over the kept units ``j`` of the *raw* (uncentred) activations,
   normalised to sum 1; the result is ``sum_i weights_i s_i``.

From moments: all of this lives in the span V of the centred units and the constant vector, with
an orthonormal basis given by the eigenvectors of the centred Gram ``S = n C`` and ``1 / sqrt(n)``.
In those coordinates ``X^T = [Lambda^(1/2) E^T ; sqrt(n) mu^T]`` and ``dirns^T = [Lambda^(1/2) E^T U ;
sqrt(n) mu^T]``, so the QR and every inner product of step 7 are exact functions of ``C``, ``mu``,
``n``.

Centred (the default, and ``pwcca(..., variant="google_svcca")``): their code run on the centred
activations (``mu = 0``; the constant row drops out). Translation-invariant and well defined.

Raw (``centred=False``): their code on the activations as accumulated, means included. Step 6 then
adds ``mu_i`` to ``+-u_i^T (x - mu)``, and the sign of a singular vector is arbitrary (whatever LAPACK
returns), so the value depends on the SVD routine's sign choices, not only on the activations
(0.571-0.679 vs 0.683 on one test case from other sign patterns; README "Measures and analyses", PWCCA both ways). To reproduce a number
their code printed, this mode takes the singular vectors from ``numpy.linalg.svd`` (their routine)
on the CPU; another numpy/LAPACK build may choose other signs. Use it to compare with published
numbers, never as a measure.

Where their code has no well-defined answer we return one and say so:
* exactly collinear units (duplicates, dead units) with ``epsilon`` 0 or tiny: their ``pinv`` of a
  near-singular matrix is not symmetric and its "square root" takes ``sqrt`` of negative
  eigenvalues (NaN; the SVD then raises ``LinAlgError``). We use the symmetric eigendecomposition
  and treat eigenvalues below the cut-off as 0 (their ``pinv`` semantics).
* a direction that is (numerically) a combination of earlier ones: their QR returns an arbitrary
  unit vector there. When the earlier directions already span V (the usual case: null directions
  of duplicated or dead units come last, with coefficient ~0) it is orthogonal to every unit and its
  weight is ~0; elsewhere it depends on rounding in the sample space. Ours gives it weight 0.
* an all-constant net (``xmax = 0``: they divide by 0) or no unit kept (they raise ``KeyError``): 0.
* ``pwcca.py`` at google/svcca master uses ``acts1[y_idxs]`` where it means ``acts2[y_idxs]`` in the
  branch where net 2 gives the weights (IndexError when the widths differ: google/svcca PR #9); we
  follow the evident intent (net 2's activations), as the fixed version does.
* dead units (``MomentStats.dead``) enter with exactly zero variance (as an all-zero ReLU unit does
  in their ``np.cov``), so the rounding noise of a constant unit's moments never counts.

Pure function: torch only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from convergent.stats.moments import MomentStats

__all__ = ["GooglePWCCA", "google_svcca_pwcca"]

#: numpy.linalg.pinv's default cut-off (rcond), relative to the largest singular value.
PINV_RCOND = 1e-15
#: Eigenvalues of the centred Gram ``n C`` below this fraction of the largest span no sample-space
#: direction (duplicated units, dead units): those coordinates are dropped.
GRAM_RANK_TOL = 1e-12
#: A QR pivot below this fraction of its column's norm marks a direction dependent on earlier ones.
DEPENDENT_TOL = 1e-10


@dataclass
class GooglePWCCA:
    """google/svcca's ``compute_pwcca`` result: ``value`` (their first return value), ``weights``
    and ``coefs`` (their second and third; both of length ``min`` kept units), ``net`` (the index,
    ``a`` or ``b``, of the net whose activations gave the weights), ``kept_a`` / ``kept_b`` (units
    that passed ``remove_small``)."""

    value: float
    weights: Tensor
    coefs: Tensor
    net: int
    kept_a: Tensor
    kept_b: Tensor


def _live_cov(stats: MomentStats, i: int, j: int) -> Tensor:
    c = stats.cov(i, j)
    return c * torch.outer((~stats.dead(i)).to(c.dtype), (~stats.dead(j)).to(c.dtype))


def _inv_sqrt(c: Tensor) -> Tensor:
    """pinv(c)^(1/2) for symmetric c, their cut-off; negative/cut eigenvalues count as 0."""
    lam, vec = torch.linalg.eigh(c)
    cut = PINV_RCOND * float(lam.abs().max()) if lam.numel() else 0.0
    ok = lam > cut
    inv = torch.where(ok, lam, torch.ones_like(lam)).rsqrt() * ok.to(lam.dtype)
    return (vec * inv) @ vec.T


def google_svcca_pwcca(stats: MomentStats, a: int, b: int, epsilon: float = 0.0, centred: bool = True) -> GooglePWCCA:
    """``compute_pwcca(acts_a, acts_b, epsilon)`` of google/svcca from the moments of nets a, b
    (see the module docstring for each step). ``centred=True``: their code on the centred
    activations (well defined); ``centred=False``: on the activations the moments were accumulated
    from, means included, with numpy's singular-vector signs (the module docstring says why the
    value then depends on them). ``epsilon`` is theirs (relative to each net's largest variance:
    the ``remove_small`` threshold and the ridge), default 0 like theirs."""
    if not epsilon >= 0.0 or not math.isfinite(epsilon):
        raise ValueError(f"epsilon must be finite and >= 0, got {epsilon}")
    c_aa, c_bb, c_ab = _live_cov(stats, a, a), _live_cov(stats, b, b), _live_cov(stats, a, b)
    empty = c_ab.new_zeros(0)
    xmax, ymax = float(c_aa.abs().max()), float(c_bb.abs().max())
    if not (xmax > 0.0 and ymax > 0.0):
        none = torch.zeros(0, dtype=torch.bool, device=c_ab.device)
        return GooglePWCCA(0.0, empty, empty, a, none, none)
    sxx, syy, sxy = c_aa / xmax, c_bb / ymax, c_ab / math.sqrt(xmax * ymax)
    kx = torch.diagonal(sxx).abs() >= epsilon  # remove_small
    ky = torch.diagonal(syy).abs() >= epsilon
    if not (bool(kx.any()) and bool(ky.any())):
        return GooglePWCCA(0.0, empty, empty, a, kx, ky)
    ix, iy = kx.nonzero().squeeze(1), ky.nonzero().squeeze(1)
    sxx, syy, sxy = sxx[ix][:, ix], syy[iy][:, iy], sxy[ix][:, iy]
    eye_x = torch.eye(len(ix), dtype=sxx.dtype, device=sxx.device)
    eye_y = torch.eye(len(iy), dtype=syy.dtype, device=syy.device)
    arr = _inv_sqrt(sxx + epsilon * eye_x) @ sxy @ _inv_sqrt(syy + epsilon * eye_y)
    if centred:  # signs of the singular vectors do not matter
        u, s, vh = torch.linalg.svd(arr)
    else:  # they do (the means are added to signed directions): numpy's, as their code gets
        u, s, vh = (torch.from_numpy(t).to(arr) for t in np.linalg.svd(arr.cpu().numpy()))
    if len(ix) <= len(iy):  # the net with fewer kept units gives the weights (net a on a tie)
        net, idx, rot, cov = a, ix, u, c_aa[ix][:, ix]
    else:
        net, idx, rot, cov = b, iy, vh.T, c_bb[iy][:, iy]
    k = len(idx)
    mu = stats.mean(net)[idx]
    n = float(stats.n)
    # coordinates in an orthonormal basis of span(centred units, constant vector)
    lam, vec = torch.linalg.eigh(n * cov)
    top = lam > GRAM_RANK_TOL * max(float(lam.max()), 0.0) if float(lam.max()) > 0.0 else torch.zeros_like(lam, dtype=torch.bool)
    x_coord = lam[top].sqrt().unsqueeze(1) * vec[:, top].T  # [d, k]: coordinates of the centred units
    d_coord = x_coord @ rot  # coordinates of the directions u_i^T (x - mu)
    if not centred:
        const = math.sqrt(n) * mu.unsqueeze(0)  # x = (x - mu) + mu 1; dirns row i gets mu_i 1
        x_coord = torch.cat([x_coord, const])
        d_coord = torch.cat([d_coord, const])
    q, r = torch.linalg.qr(d_coord)  # [d, m], m = min(d, k)
    m = q.shape[1]
    col_norm = d_coord[:, :m].norm(dim=0)
    independent = r.diagonal().abs() > DEPENDENT_TOL * col_norm.clamp_min(torch.finfo(r.dtype).tiny)
    weights = s.new_zeros(k)
    weights[:m] = (q.T @ x_coord).abs().sum(1) * independent.to(s.dtype)
    total = float(weights.sum())
    weights = weights / total if total > 0 else torch.full_like(weights, 1.0 / k)
    coefs = s[:k]
    return GooglePWCCA(float(weights @ coefs), weights, coefs, net, kx, ky)
