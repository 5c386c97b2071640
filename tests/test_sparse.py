"""Sparse (one-to-many) prediction from moments: convergent.analysis.sparse."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.linear_model import Lasso, LinearRegression

from convergent.analysis.sparse import DEFAULT_L1, sparse_prediction
from convergent.stats.moments import Moments

f64 = torch.float64


def _stats(xa, xb, n_fit, pairs=None):
    """Fit / held-out MomentStats of two nets from the first n_fit samples and the rest."""
    mf = Moments([xa.shape[1], xb.shape[1]], pairs=pairs)
    mh = Moments([xa.shape[1], xb.shape[1]], pairs=pairs)
    mf.update(xa[:n_fit], xb[:n_fit])
    mh.update(xa[n_fit:], xb[n_fit:])
    return mf.compute(), mh.compute()


def _relu_pair(n=2400, p=12, t=9, seed=0):
    """Two correlated ReLU 'nets' driven by a shared latent."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 8, generator=g, dtype=f64)

    def net(c):
        mix = torch.randn(8, c, generator=g, dtype=f64)
        return torch.relu(z @ mix + 0.4 * torch.randn(n, c, generator=g, dtype=f64))

    xa, xb = net(p), net(t)
    return xa, xb


def _standardise(x, ref):
    """(x - mean(ref)) / std(ref) (population std), numpy."""
    x, ref = np.asarray(x), np.asarray(ref)
    return (x - ref.mean(0)) / ref.std(0)


def _sk_coef(xs, ys, lam):
    if lam == 0:
        return LinearRegression().fit(xs, ys)
    return Lasso(alpha=lam, fit_intercept=True, tol=1e-10, max_iter=100_000).fit(xs, ys)


# 1 ---------------------------------------------------------------------------------------------
def test_matches_sklearn_lasso_and_least_squares():
    xa, xb = _relu_pair()
    n_fit = 1600
    fit, held = _stats(xa, xb, n_fit)
    l1 = (0.0, 1e-4, 1e-3, 1e-2, 5e-2, 0.2)
    res = sparse_prediction(fit, held, 0, 1, l1)
    assert res.converged.all() and (res.kkt <= 1e-9).all()
    xs = _standardise(xa[:n_fit], xa[:n_fit])
    ys = _standardise(xb[:n_fit], xb[:n_fit])
    for i, lam in enumerate(l1):
        sk = _sk_coef(xs, ys, lam)
        np.testing.assert_allclose(res.weights[i].numpy(), sk.coef_, atol=1e-6, rtol=0, err_msg=f"l1={lam}")
        # soft thresholding gives exact zeros: the support is sklearn's
        assert ((res.weights[i] != 0).numpy() == (np.abs(sk.coef_) > 1e-8)).all(), f"l1={lam}"
    assert res.nnz[-1] < res.nnz[0] == 12
    # the path order and duplicates do not matter (warm starts reach the same optimum)
    shuffled = (0.2, 0.0, 1e-2, 1e-3, 0.2)
    res2 = sparse_prediction(fit, held, 0, 1, shuffled)
    for j, lam in enumerate(shuffled):
        torch.testing.assert_close(res2.weights[j], res.weights[l1.index(lam)], atol=1e-9, rtol=0)
    assert torch.equal(res2.l1, torch.tensor(shuffled, dtype=f64))


def test_default_path_and_fields():
    xa, xb = _relu_pair(n=1200, p=6, t=5, seed=3)
    fit, held = _stats(xa, xb, 800)
    res = sparse_prediction(fit, held, 1, 0)  # dst -> src direction works too
    L = len(DEFAULT_L1)
    assert res.l1.tolist() == list(DEFAULT_L1)
    assert res.weights.shape == (L, 6, 5) and res.raw_weights.shape == (L, 6, 5)
    assert res.error.shape == res.nnz.shape == res.iterations.shape == (L,)
    assert res.error_per_unit.shape == res.nnz_per_unit.shape == res.intercept.shape == (L, 6)
    assert res.weights.dtype == f64 and res.nnz_per_unit.dtype == torch.int64
    assert (res.n_fit, res.n_held_out) == (800, 400)
    # error and sparsity both move the right way along the path (on the fit split the error is
    # monotone; held out it need not be, so only the ends are compared)
    assert res.nnz[0] >= res.nnz[-1]
    assert res.error[-1] >= res.error[0] - 1e-3


# 2 ---------------------------------------------------------------------------------------------
def test_planted_sparse_support_is_recovered():
    g = torch.Generator().manual_seed(1)
    n, p = 40_000, 10
    scale = torch.linspace(0.5, 3.0, p, dtype=f64)
    shift = torch.linspace(-2.0, 2.0, p, dtype=f64)
    x = torch.randn(n, p, generator=g, dtype=f64) * scale + shift  # independent, covariance diag(scale^2)
    supports = [(0, 3), (1, 4, 7), (2, 9), (5, 6, 8), (0, 5, 9), (3, 7)]
    coef = torch.zeros(p, len(supports), dtype=f64)
    for j, sup in enumerate(supports):
        for k, sign in zip(sup, (1.0, -1.0, 1.0)):
            coef[k, j] = sign * (0.6 + 0.2 * k) / scale[k]
    sigma = 0.7
    y = x @ coef + 5.0 + sigma * torch.randn(n, len(supports), generator=g, dtype=f64)
    fit, held = _stats(x, y, n // 2)

    res = sparse_prediction(fit, held, 0, 1, (0.0, 1e-3, 3e-2, 10.0))
    # expected noise-level error: noise variance over the target's population variance
    signal_var = (coef.square() * scale.square().unsqueeze(1)).sum(0)
    expected = sigma**2 / (signal_var + sigma**2)
    assert expected.min() > 0.02  # the noise floor is not trivially 0
    torch.testing.assert_close(res.error_per_unit[0], expected, atol=4e-3, rtol=0)
    torch.testing.assert_close(res.error_per_unit[1], expected, atol=4e-3, rtol=0)
    # support recovered exactly at a moderate L1 weight
    planted = coef.T != 0
    assert torch.equal(res.weights[2] != 0, planted)
    assert res.nnz[2] == pytest.approx(sum(len(s) for s in supports) / len(supports))
    assert (res.nnz_per_unit[0] == p).all() and res.nnz[1] > res.nnz[2]
    assert (res.error_per_unit[2] < expected + 0.02).all()  # shrinkage costs little
    # an L1 weight above every correlation zeroes everything: the fit mean is predicted
    assert (res.weights[3] == 0).all() and res.nnz[3] == 0
    yf, yh = y[: n // 2], y[n // 2 :]
    zero = (yh.var(0, correction=0) + (yh.mean(0) - yf.mean(0)) ** 2) / y.var(0, correction=0)
    torch.testing.assert_close(res.error_per_unit[3], zero, atol=1e-9, rtol=0)
    assert (zero - 1).abs().max() < 0.05  # the fit mean scores about 1


# 3 ---------------------------------------------------------------------------------------------
def test_held_out_error_equals_direct_computation():
    xa, xb = _relu_pair(n=3000, p=7, t=5, seed=2)
    xa[2000:] += 0.3  # the held-out split is shifted: the intercept (fit means) matters
    xb[2000:, 1] *= 1.5
    fit, held = _stats(xa, xb, 2000)
    l1 = (0.0, 1e-3, 3e-2, 100.0)
    res = sparse_prediction(fit, held, 0, 1, l1)
    xf, yf = xa[:2000].numpy(), xb[:2000].numpy()
    xh, yh = xa[2000:].numpy(), xb[2000:].numpy()
    xs, ys = _standardise(xf, xf), _standardise(yf, yf)
    for i, lam in enumerate(l1):
        # raw-unit predictor of the result
        pred = xh @ res.raw_weights[i].numpy().T + res.intercept[i].numpy()
        np.testing.assert_allclose(res.predict(xa[2000:], i).numpy(), pred, rtol=1e-12, atol=1e-12)
        yall = np.concatenate([yf, yh])
        direct = ((yh - pred) ** 2).mean(0) / yall.var(0)
        np.testing.assert_allclose(res.error_per_unit[i].numpy(), direct, rtol=1e-9, atol=1e-12)
        assert res.error[i].item() == pytest.approx(direct.mean(), rel=1e-9)
        # and sklearn's own model, fitted on the standardised fit split, scores the same
        sk = _sk_coef(xs, ys, lam)
        yhat = sk.predict(_standardise(xh, xf)) * yf.std(0) + yf.mean(0)
        sk_err = ((yh - yhat) ** 2).mean(0) / yall.var(0)
        np.testing.assert_allclose(res.error_per_unit[i].numpy(), sk_err, rtol=1e-6, atol=1e-8)
    # all weights 0: the fit mean is predicted: error = (held-out variance + mean shift^2) / variance
    expected = (yh.var(0) + (yh.mean(0) - yf.mean(0)) ** 2) / np.concatenate([yf, yh]).var(0)
    np.testing.assert_allclose(res.error_per_unit[3].numpy(), expected, rtol=1e-9)
    same = sparse_prediction(held, held, 0, 1, (100.0,))
    torch.testing.assert_close(same.error_per_unit[0], torch.ones(5, dtype=f64), atol=1e-12, rtol=0)


def test_src_equals_dst_is_trivially_perfect():
    xa, xb = _relu_pair(n=1000, p=5, t=4, seed=5)
    fit, held = _stats(xa, xb, 600)
    res = sparse_prediction(fit, held, 0, 0, (0.0,))
    torch.testing.assert_close(res.weights[0], torch.eye(5, dtype=f64), atol=1e-9, rtol=0)
    assert res.error[0].item() < 1e-12


def test_collinear_sources_converge_and_match_sklearn_predictions():
    xa, xb = _relu_pair(n=1500, p=6, t=4, seed=6)
    xa = torch.cat([xa, xa[:, :2]], dim=1)  # two exact duplicate source units: R_xx is singular
    fit, held = _stats(xa, xb, 1000)
    l1 = (0.0, 1e-3, 1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = sparse_prediction(fit, held, 0, 1, l1)
    assert res.converged.all()
    xf, xh = xa[:1000].numpy(), xa[1000:].numpy()
    yf = xb[:1000].numpy()
    for i, lam in enumerate(l1):
        sk = _sk_coef(_standardise(xf, xf), _standardise(yf, yf), lam)
        ours = _standardise(xh, xf) @ res.weights[i].numpy().T
        np.testing.assert_allclose(ours, sk.predict(_standardise(xh, xf)), atol=1e-6)


# 4 ---------------------------------------------------------------------------------------------
def test_dead_units_give_no_nan():
    xa, xb = _relu_pair(n=2000, p=6, t=5, seed=4)
    n_fit = 1200
    zero, const = torch.zeros(2000, 1, dtype=f64), torch.full((2000, 1), 2.5, dtype=f64)
    xa_d = torch.cat([zero, xa[:, :3], const, xa[:, 3:]], 1)
    xb_d = torch.cat([xb, torch.zeros(2000, 1, dtype=f64), xb[:, :1].clone(), xb[:, 1:2].clone()], 1)
    xb_d[n_fit:, 6] = 1.0  # live in the fit split, dead (constant) in the held-out split
    xb_d[:n_fit, 7] = 0.0  # dead in the fit split, live in the held-out split
    fit, held = _stats(xa_d, xb_d, n_fit)
    res = sparse_prediction(fit, held, 0, 1)
    for name in ("l1", "error", "error_per_unit", "nnz", "weights", "raw_weights", "intercept", "kkt"):
        assert torch.isfinite(getattr(res, name)).all(), name
    assert res.converged.all()
    assert res.live_src.tolist() == [False, True, True, True, False, True, True, True]
    assert res.scored_dst.tolist() == [True] * 5 + [False] * 3
    assert res.n_scored == 5
    assert (res.weights[:, :, [0, 4]] == 0).all()  # dead sources
    assert (res.weights[:, [5, 7]] == 0).all() and (res.nnz_per_unit[:, [5, 7]] == 0).all()  # dead in fit
    assert (res.error_per_unit[:, 5:] == 1.0).all()
    torch.testing.assert_close(res.error, res.error_per_unit[:, :5].mean(1))
    torch.testing.assert_close(res.nnz, res.nnz_per_unit[:, :5].to(f64).mean(1))
    # the live units' results are those of the same data without the dead units
    ref = sparse_prediction(*_stats(xa, xb, n_fit), 0, 1)
    torch.testing.assert_close(res.weights[:, :5][:, :, [1, 2, 3, 5, 6, 7]], ref.weights, atol=1e-9, rtol=0)
    torch.testing.assert_close(res.error, ref.error, atol=1e-9, rtol=0)
    torch.testing.assert_close(res.nnz, ref.nnz)


def test_all_dead_nets_give_no_nan():
    xa, xb = _relu_pair(n=600, p=4, t=3, seed=7)
    fit, held = _stats(torch.zeros(600, 4, dtype=f64), xb, 400)  # no live source
    res = sparse_prediction(fit, held, 0, 1)
    assert (res.weights == 0).all() and (res.nnz == 0).all()
    yf, yh = xb[:400], xb[400:]
    zero = ((yh.var(0, correction=0) + (yh.mean(0) - yf.mean(0)) ** 2) / xb.var(0, correction=0)).mean()
    assert torch.isfinite(res.error).all()
    torch.testing.assert_close(res.error, zero.expand(6), atol=1e-9, rtol=0)  # the fit mean is predicted
    fit, held = _stats(xa, torch.ones(600, 3, dtype=f64), 400)  # no live target
    res = sparse_prediction(fit, held, 0, 1)
    assert res.n_scored == 0 and (res.error == 1.0).all() and (res.nnz == 0).all()
    assert torch.isfinite(res.intercept).all()


# 5 ---------------------------------------------------------------------------------------------
def test_bad_input_errors():
    xa, xb = _relu_pair(n=300, p=3, t=3)
    fit, held = _stats(xa, xb, 200)
    with pytest.raises(ValueError, match=r"L1 weight -0.001 is negative; L1 weights must be >= 0"):
        sparse_prediction(fit, held, 0, 1, (0.0, -1e-3))
    with pytest.raises(ValueError, match="not finite"):
        sparse_prediction(fit, held, 0, 1, (float("nan"),))
    with pytest.raises(ValueError, match="l1 is empty"):
        sparse_prediction(fit, held, 0, 1, ())
    with pytest.raises(ValueError, match=r"dst=2 is not a net index; use an int in 0..1"):
        sparse_prediction(fit, held, 0, 2)
    three = Moments([3, 3, 3], pairs=[(0, 1)])
    three.update(xa, xb, xa)
    st = three.compute()
    msg = r"no joint moments for nets \(0, 2\); add the pair to Moments\(pairs="
    with pytest.raises(ValueError, match=msg):
        sparse_prediction(st, st, 0, 2)
    other = Moments([3, 2])
    other.update(xa, xb[:, :2])
    with pytest.raises(ValueError, match="different nets"):
        sparse_prediction(fit, other.compute(), 0, 1)


def test_not_converged_warns():
    xa, xb = _relu_pair(n=800, p=8, t=4)
    fit, held = _stats(xa, xb, 500)
    with pytest.warns(RuntimeWarning, match="not converged"):
        res = sparse_prediction(fit, held, 0, 1, (1e-3,), max_iter=0)
    assert not res.converged[0] and torch.isfinite(res.error).all()


# 6 ---------------------------------------------------------------------------------------------
def test_conv_shaped_input_every_position_a_sample():
    g = torch.Generator().manual_seed(8)
    n, c, hw = 40, 5, 6
    z = torch.randn(n, 3, hw, hw, generator=g, dtype=f64)
    xa = torch.relu(torch.einsum("nlhw,lc->nchw", z, torch.randn(3, c, generator=g, dtype=f64)) + 0.2)
    xb = torch.relu(torch.einsum("nlhw,lc->nchw", z, torch.randn(3, 4, generator=g, dtype=f64)))
    xb = xb + 0.1 * torch.randn(xb.shape, generator=g, dtype=f64)
    fit, held = _stats(xa, xb, 30)
    assert fit.n == 30 * hw * hw
    l1 = (0.0, 1e-3, 1e-1)
    res = sparse_prediction(fit, held, 0, 1, l1)

    def flat(x):
        return x.movedim(1, -1).reshape(-1, x.shape[1])

    flat_res = sparse_prediction(*_stats(flat(xa), flat(xb), 30 * hw * hw), 0, 1, l1)
    torch.testing.assert_close(res.weights, flat_res.weights, atol=1e-10, rtol=0)
    torch.testing.assert_close(res.error_per_unit, flat_res.error_per_unit, atol=1e-10, rtol=0)
    xf, yf = flat(xa[:30]).numpy(), flat(xb[:30]).numpy()
    sk = _sk_coef(_standardise(xf, xf), _standardise(yf, yf), 1e-3)
    np.testing.assert_allclose(res.weights[1].numpy(), sk.coef_, atol=1e-6)
    assert res.predict(xa[30:], 1).shape == (10 * hw * hw, 4)


@pytest.mark.cuda
def test_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    xa, xb = _relu_pair(n=3000, p=32, t=24, seed=9)
    fit, held = _stats(xa, xb, 2000)
    cpu = sparse_prediction(fit, held, 0, 1)
    gpu = sparse_prediction(fit.to("cuda"), held.to("cuda"), 0, 1)
    assert gpu.weights.device.type == "cuda" and gpu.error.device.type == "cuda"
    torch.testing.assert_close(gpu.weights.cpu(), cpu.weights, atol=1e-8, rtol=0)
    torch.testing.assert_close(gpu.error.cpu(), cpu.error, atol=1e-10, rtol=0)


# 7 ---------------------------------------------------------------------------------------------
def _collinear_pair(n_images=24, positions=25, p=40, t=12, noise=1e-3, seed=10):
    """'Nearly uniform images': every position of an image sees almost the same input, so the
    samples are a few dozen distinct vectors plus tiny noise and the sources are nearly collinear."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n_images, 1, 6, generator=g, dtype=f64).expand(-1, positions, -1)
    z = (z + noise * torch.randn(n_images, positions, 6, generator=g, dtype=f64)).reshape(-1, 6)

    def net(c):
        return torch.relu(z @ torch.randn(6, c, generator=g, dtype=f64) + 0.3)

    return net(p), net(t), (n_images // 2) * positions


def _objective_np(r, b, w, lam):
    return 0.5 * w @ r @ w - b @ w + lam * np.abs(w).sum()


def _violation(r, b, w, lam):
    g = b - r @ w
    return np.where(w != 0, np.abs(g - lam * np.sign(w)), np.maximum(np.abs(g) - lam, 0.0)).max(0)


def test_collinear_activations_converge_and_match_sklearn_where_it_converges():
    from sklearn.exceptions import ConvergenceWarning

    xa, xb, n_fit = _collinear_pair()
    fit, held = _stats(xa, xb, n_fit)
    l1 = DEFAULT_L1
    res = sparse_prediction(fit, held, 0, 1, l1, tol=1e-6, max_iter=3000)
    assert res.condition > 1e6  # genuinely collinear
    assert res.converged.all() and (res.iterations <= 3000).all()
    live = res.live_src
    r, bmat = fit.corr(0, 0)[live][:, live].numpy(), fit.corr(0, 1)[live].numpy()
    xs = _standardise(xa[:n_fit].numpy()[:, live.numpy()], xa[:n_fit].numpy()[:, live.numpy()])
    ys = _standardise(xb[:n_fit], xb[:n_fit])
    compared = exact = 0
    for i, lam in enumerate(l1):
        if lam == 0:
            continue
        w_all = res.weights[i][:, live].numpy().T  # [p_live, t]
        kkt = _violation(r, bmat, w_all, lam)
        for j in range(6):  # sklearn's coordinate descent is slow on collinear data: a few targets
            with warnings.catch_warnings():
                warnings.simplefilter("error", ConvergenceWarning)
                try:
                    sk = Lasso(alpha=lam, fit_intercept=True, tol=1e-12, max_iter=50_000).fit(xs, ys[:, j])
                except ConvergenceWarning:
                    continue
            compared += 1
            w, ws = w_all[:, j], sk.coef_
            f_ours, f_sk = _objective_np(r, bmat[:, j], w, lam), _objective_np(r, bmat[:, j], ws, lam)
            # a KKT violation eps bounds the suboptimality: f(w) - f(w') <= eps |w - w'|_1 for any w'
            assert f_ours <= f_sk + kkt[j] * np.abs(w - ws).sum() + 1e-12, (lam, j)
            if kkt[j] < 1e-12:  # ours exact: sklearn's fitted values are as close as its objective says
                exact += 1
                diff = w - ws
                assert diff @ r @ diff <= 2.0 * max(f_sk - f_ours, 0.0) + 1e-10, (lam, j)
    assert compared >= 15 and exact >= 10


def test_collinear_not_converged_is_reported_honestly():
    xa, xb, n_fit = _collinear_pair()
    fit, held = _stats(xa, xb, n_fit)
    with pytest.warns(RuntimeWarning, match=r"not converged for l1=\[1e-05\] after 300 iterations .*condition number"):
        res = sparse_prediction(fit, held, 0, 1, tol=1e-9, max_iter=300)
    assert (res.iterations <= 300).all() and not res.converged[1] and res.converged[2:].all()
    live = res.live_src
    r, bmat = fit.corr(0, 0)[live][:, live].numpy(), fit.corr(0, 1)[live].numpy()
    for i, lam in enumerate(DEFAULT_L1):  # the reported violation is the returned weights' own
        viol = _violation(r, bmat, res.weights[i][:, live].numpy().T, lam).max()
        assert viol == pytest.approx(float(res.kkt[i]), rel=1e-6, abs=1e-13)
        assert bool(res.converged[i]) == (viol <= 1e-9)


def test_new_solver_agrees_with_the_previous_one():
    from benchmarks.sparse_fista_reference import lasso_gram_path_fista
    from convergent.analysis.sparse import lasso_gram_path

    xa, xb = _relu_pair(n=2000, p=20, t=10, seed=11)
    fit, _ = _stats(xa, xb, 1500)
    R, B = fit.corr(0, 0), fit.corr(0, 1)
    l1 = (0.0, 1e-4, 1e-3, 1e-2, 1e-1)
    new, _, _, conv_new = lasso_gram_path(R, B, l1, tol=1e-11)
    old, _, _, conv_old = lasso_gram_path_fista(R, B, l1, tol=1e-11)
    assert conv_new.all() and conv_old.all()
    torch.testing.assert_close(new, old, atol=1e-8, rtol=0)


def test_warm_start_same_answer_fewer_iterations():
    xa, xb = _relu_pair(n=3000, p=24, t=16, seed=12)
    fit, held = _stats(xa, xb, 2000)
    l1 = (0.0, 1e-4, 1e-3, 1e-2, 1e-1)
    first = sparse_prediction(fit, held, 0, 1, l1, tol=1e-10)
    # the next analysis step: the nets have moved a little
    g = torch.Generator().manual_seed(13)
    xb2 = xb + 0.05 * torch.randn(xb.shape, generator=g, dtype=f64)
    fit2, held2 = _stats(xa, xb2, 2000)
    cold = sparse_prediction(fit2, held2, 0, 1, l1, tol=1e-10)
    warm = sparse_prediction(fit2, held2, 0, 1, l1, tol=1e-10, warm_start=first)
    assert cold.converged.all() and warm.converged.all()
    torch.testing.assert_close(warm.weights, cold.weights, atol=1e-8, rtol=0)
    torch.testing.assert_close(warm.error, cold.error, atol=1e-10, rtol=0)
    assert int(warm.iterations.sum()) < int(cold.iterations.sum())
    # from its own solution: nothing left to do
    again = sparse_prediction(fit2, held2, 0, 1, l1, tol=1e-10, warm_start=warm)
    assert int(again.iterations.sum()) == 0
    torch.testing.assert_close(again.weights, warm.weights, atol=0, rtol=0)
    # a result over other L1 weights warm-starts the ones it shares; the others start cold
    partial = sparse_prediction(fit2, held2, 0, 1, (1e-3, 3e-3), tol=1e-10, warm_start=first)
    torch.testing.assert_close(partial.weights[0], cold.weights[2], atol=1e-8, rtol=0)
    with pytest.raises(ValueError, match="pass the previous result of the same pair and layer"):
        sparse_prediction(fit2, held2, 1, 0, l1, warm_start=first)
    with pytest.raises(TypeError, match="warm_start must be a SparsePrediction"):
        sparse_prediction(fit2, held2, 0, 1, l1, warm_start=first.weights)


def test_budget_cuts_the_solver_short():
    from convergent.analysis.budget import BudgetExceeded, budget

    xa, xb, n_fit = _collinear_pair(seed=14)
    fit, held = _stats(xa, xb, n_fit)
    with pytest.raises(BudgetExceeded, match="sparse conv3 cut short"), budget(0.0, what="sparse conv3"):
        sparse_prediction(fit, held, 0, 1, tol=1e-12)
    with pytest.raises(BudgetExceeded) as info, budget(None, what="sparse conv3", stop=lambda: True):
        sparse_prediction(fit, held, 0, 1, tol=1e-12)
    assert info.value.reason == "stop"
    sparse_prediction(fit, held, 0, 1, (0.0,))  # l = 0 alone is one direct solve: nothing to cut


# 8 ---------------------------------------------------------------------------------------------
def test_line_search_finds_the_best_point_on_the_segment():
    from convergent.analysis.sparse import _line_search, _objective

    g = torch.Generator().manual_seed(15)
    p, t, lam = 12, 40, 0.05
    x = torch.randn(300, p, generator=g, dtype=f64) @ torch.randn(p, p, generator=g, dtype=f64)
    R = torch.corrcoef(x.T)
    B = 0.4 * torch.randn(p, t, generator=g, dtype=f64)
    W = torch.randn(p, t, generator=g, dtype=f64) * (torch.rand(p, t, generator=g) < 0.5)
    target = torch.randn(p, t, generator=g, dtype=f64) * (torch.rand(p, t, generator=g) < 0.5)
    D = target - W
    out, step = _line_search(R, B - R @ W, W, D, lam)
    grid = torch.linspace(0, 1, 4001, dtype=f64)
    values = torch.stack([_objective(R, B, W + s * D, lam) for s in grid])  # [grid, t]
    ours = _objective(R, B, out, lam)
    assert (ours <= values.min(0).values + 1e-12).all()
    assert (ours <= _objective(R, B, W, lam) + 1e-15).all() and ((step >= 0) & (step <= 1)).all()
    assert (step > 0).sum() > t // 4  # most directions here go downhill somewhere


def test_support_solves_direct_and_through_the_inverse_are_exact():
    from convergent.analysis.sparse import _Gram, _support_solve

    g = torch.Generator().manual_seed(16)
    p, t = 30, 24
    R = torch.corrcoef((torch.randn(500, p, generator=g, dtype=f64) @ torch.randn(p, p, generator=g, dtype=f64)).T)
    rhs = torch.randn(p, t, generator=g, dtype=f64)
    sizes = torch.linspace(0, p, t).round().long()  # empty, small, half, near-full and full supports
    mask = torch.zeros(p, t, dtype=torch.bool)
    for j, k in enumerate(sizes.tolist()):
        mask[torch.randperm(p, generator=g)[:k], j] = True
    gram = _Gram.of(R)
    assert gram.inverse is not None
    direct = _Gram(gram.R, gram.evals, gram.evecs, None)  # no inverse: every system on its support
    for which in (gram, direct):
        X, ok = _support_solve(which, rhs, mask)
        assert ok.all()
        for j in range(t):
            a = mask[:, j]
            expected = torch.zeros(p, dtype=f64)
            if a.any():
                expected[a] = torch.linalg.solve(R[a][:, a], rhs[a, j])
            torch.testing.assert_close(X[:, j], expected, atol=1e-10, rtol=0)
