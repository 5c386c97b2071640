"""The sparse-prediction solver before issue 20 (FISTA + per-target active-set Newton steps), kept
only to measure the new solver against (``convergent-bench``'s ``sparse_384``) and to cross-check it
in the tests. Not used by the analyses: see :func:`convergent.analysis.sparse.lasso_gram_path`.

Accelerated proximal-gradient (FISTA) steps on the Gram matrix for all targets at once, and every
``_STEPS`` steps an active-set (semismooth Newton) step: one Cholesky solve per target on its
predicted support, padded to the largest support, kept where it does not increase the objective.
Its cost grows with targets x (largest support)^3 per Newton step and with the condition number
of R for the gradient steps (issue 20: 59 s and 5 of 6 L1 weights not converged on conv3 of two
AlexNets on nearly uniform images).

Pure function: torch only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from convergent.analysis.sparse import PINV_RTOL, _kkt, _objective, path_outputs

__all__ = ["lasso_gram_path_fista"]

_STEPS = 40
_NEWTON_CHUNK_ELEMENTS = 1 << 22


def _dense(R: Tensor, B: Tensor) -> Tensor:
    evals, evecs = torch.linalg.eigh(R)
    keep = evals > PINV_RTOL * evals.amax().clamp_min(0.0)
    inv = torch.where(keep, 1.0 / torch.where(keep, evals, torch.ones_like(evals)), torch.zeros_like(evals))
    return evecs @ (inv.unsqueeze(1) * (evecs.T @ B))


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


def lasso_gram_path_fista(
    R: Tensor, B: Tensor, l1: Sequence[float], max_iter: int = 10_000, tol: float = 1e-9
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Solve ``min_w 0.5 w^T R w - w^T b_j + l1 |w|_1`` for every column ``b_j`` of ``B`` [p, t]
    and every L1 weight, with ``R`` [p, p] a correlation matrix (unit diagonal, positive
    semi-definite). Returns ``W`` [L, p, t], gradient steps [L], KKT violation [L], converged [L], in the
    order of ``l1`` (solved from the largest down, warm-started)."""
    p, t = B.shape
    lam_list, out, iters, kkts, conv = path_outputs(B, l1)
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
