"""Streaming moments: exact against float64 numpy, across batch splits, processes and dtypes."""

import numpy as np
import pytest
import torch

from convergent.stats import Moments, estimate_state_bytes


def flat(x: torch.Tensor) -> np.ndarray:
    x = x.double()
    return (x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]) if x.dim() == 4 else x).numpy()


def reference(batches, k):
    cols = [np.concatenate([flat(b[i]) for b in batches]) for i in range(k)]
    x = np.concatenate(cols, 1)
    return x, np.cov(x.T, bias=True), x.mean(0)


def make(shape, k=3, seed=0, scale=3.0, offset=2.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.relu(torch.randn(shape, generator=g) * scale + offset) for _ in range(k)]


@pytest.mark.parametrize("product_dtype", [torch.float64, torch.float32])
# (8, 3, 17, 17): products per image (>= BMM_MIN_SAMPLES positions); (300, 4, 6, 6): products over
# all samples, split into runs of PRODUCT_SAMPLES.
@pytest.mark.parametrize("shape", [(40, 5, 6, 6), (300, 7), (20, 4, 13, 13), (8, 3, 17, 17), (300, 4, 6, 6)])
@pytest.mark.parametrize("splits", [[1], [3, 7], [1, 1, 2, 4, 8, 16, 8]])
def test_matches_float64_numpy(shape, splits, product_dtype):
    sizes = [shape[1]] * 3
    full = make(shape)
    total = sum(splits)
    edges = np.cumsum([0] + [int(round(s / total * shape[0])) for s in splits])
    edges[-1] = shape[0]
    batches = [[a[lo:hi] for a in full] for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]
    m = Moments(sizes, product_dtype=product_dtype)
    for b in batches:
        m.update(*b)
    st = m.compute()
    x, cov, mean = reference(batches, 3)
    corr = np.corrcoef(x.T)
    assert st.n == x.shape[0]
    c = shape[1]
    # float64 products: exact to rounding (the bar is 1e-6); float32 products: ~1e-7 relative
    tol = 1e-9 if product_dtype == torch.float64 else 1e-6
    scale = np.abs(cov).max()
    for i in range(3):
        np.testing.assert_allclose(st.mean(i).numpy(), mean[i * c : (i + 1) * c], atol=tol * np.abs(mean).max(), rtol=0)
        for j in range(3):
            block = (slice(i * c, (i + 1) * c), slice(j * c, (j + 1) * c))
            np.testing.assert_allclose(st.cov(i, j).numpy(), cov[block], atol=tol * scale, rtol=0)
            np.testing.assert_allclose(st.corr(i, j).numpy(), corr[block], atol=max(tol, 1e-12), rtol=0)
    # the debiased CKA's sums: sum_p |x_i,p|^2 |x_j,p|^2 and sum_p |x_a,p|^2 x_b,p
    norms = [(x[:, i * c : (i + 1) * c] ** 2).sum(1) for i in range(3)]
    for (i, j), value in st.qq.items():
        np.testing.assert_allclose(value.item(), norms[i] @ norms[j], rtol=tol, atol=0)
    for (a, b), value in st.qx.items():
        np.testing.assert_allclose(value.numpy(), norms[a] @ x[:, b * c : (b + 1) * c], rtol=tol, atol=0)


def test_large_offset_stays_within_the_bar():
    """A mean 1e4 times the spread: float64 sums lose ~(mean/std)^2 * 1e-16, still far inside 1e-6."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2000, 4, generator=g, dtype=torch.float64) + 1e4
    b = a @ torch.randn(4, 3, generator=g, dtype=torch.float64)
    m = Moments([4, 3])
    for lo in range(0, 2000, 300):
        m.update(a[lo : lo + 300], b[lo : lo + 300])
    st = m.compute()
    ref = np.cov(np.concatenate([a.numpy(), b.numpy()], 1).T, bias=True)
    np.testing.assert_allclose(st.cov(0, 1).numpy(), ref[:4, 4:], rtol=0, atol=1e-6)
    np.testing.assert_allclose(st.corr(0, 0).numpy(), np.corrcoef(a.numpy().T), rtol=0, atol=1e-6)


def test_dead_and_constant_units_give_zero_correlation_not_nan():
    acts = make((30, 6), k=2)
    acts[0][:, 2] = 0.0  # never fires
    acts[1][:, 4] = 3.5  # constant
    m = Moments([6, 6])
    m.update(*acts)
    st = m.compute()
    assert st.dead(0).tolist() == [False, False, True, False, False, False]
    assert st.dead(1)[4] and st.dead(1).sum() == 1
    for i, j in [(0, 0), (0, 1), (1, 0), (1, 1)]:
        r = st.corr(i, j)
        assert torch.isfinite(r).all()
    assert (st.corr(0, 1)[2] == 0).all() and (st.corr(0, 1)[:, 4] == 0).all()
    assert st.corr(0, 0)[2, 2] == 0 and st.corr(0, 0)[1, 1] == 1


def test_merge_of_two_accumulators_equals_one():
    acts = make((50, 4, 5, 5), k=2)
    one, a, b = Moments([4, 4]), Moments([4, 4]), Moments([4, 4])
    one.update(*acts)
    a.update(*[x[:20] for x in acts])
    b.update(*[x[20:] for x in acts])
    merged, single = a.compute() + b.compute(), one.compute()
    assert merged.n == single.n
    torch.testing.assert_close(merged.cov(0, 1), single.cov(0, 1), atol=1e-12, rtol=0)
    torch.testing.assert_close(merged.qx[(0, 1)], single.qx[(0, 1)], atol=1e-9, rtol=1e-12)


def test_pairs_keep_only_the_requested_blocks():
    m = Moments([3, 3, 3], pairs=[(2, 0)])
    m.update(*make((20, 3), k=3))
    st = m.compute()
    assert st.blocks == [(0, 0), (0, 2), (1, 1), (2, 2)]
    assert st.cov(2, 0).shape == (3, 3)
    with pytest.raises(KeyError, match="no joint moments kept for nets"):
        st.cov(0, 1)


@pytest.mark.parametrize("shape", [(6, 3, 17, 17), (300, 3, 6, 6)])  # per-image products; runs over all samples
def test_kept_pairs_equal_the_same_blocks_of_all_pairs(shape):
    acts = make(shape, k=3, seed=4)
    some, every = Moments([3, 3, 3], pairs=[(2, 0)]), Moments([3, 3, 3])  # float64: equal to rounding
    some.update(*acts)
    every.update(*acts)
    a, b = some.compute(), every.compute()
    for block in a.blocks:
        torch.testing.assert_close(a.sxx[block], b.sxx[block], rtol=1e-13, atol=0)
        torch.testing.assert_close(a.qq[block], b.qq[block], rtol=1e-13, atol=0)
    for key in a.qx:
        torch.testing.assert_close(a.qx[key], b.qx[key], rtol=1e-13, atol=0)
    for i in range(3):
        torch.testing.assert_close(a.sums[i], b.sums[i], rtol=1e-13, atol=0)


def test_memory_does_not_grow_with_the_probe_set():
    m = Moments([8, 8])
    before = m.state_bytes()
    for seed in range(5):
        m.update(*make((64, 8, 6, 6), k=2, seed=seed))
    assert m.state_bytes() == before == estimate_state_bytes([8, 8])


def test_mismatched_inputs_are_a_clear_error():
    m = Moments([4, 4])
    with pytest.raises(ValueError, match="all nets must see the same inputs"):
        m.update(torch.zeros(5, 4), torch.zeros(6, 4))
    with pytest.raises(ValueError, match="one tensor per net"):
        m.update(torch.zeros(5, 4))


def test_does_not_modify_the_callers_activations():
    acts = [a.double() for a in make((10, 3), k=2)]
    copies = [a.clone() for a in acts]
    Moments([3, 3]).update(*acts)
    for a, c in zip(acts, copies):
        assert torch.equal(a, c)


@pytest.mark.parametrize("shape", [(600, 6), (40, 5, 17, 17), (300, 8, 6, 6)])
def test_float32_fast_path_equals_float64_on_activations_of_large_mean(shape):
    """Activations whose mean is 1000 x their spread: naive float32 products (sum x x^T, then
    subtract the means) lose the covariance entirely; the shifted float32 products summed in float64
    give correlation and linear CKA within 1e-6 of the float64 path."""
    from convergent.analysis.measures import linear_cka

    g = torch.Generator().manual_seed(3)
    base = torch.randn(shape, generator=g)
    acts = [(1000 + base + 0.5 * torch.randn(shape, generator=g)).float() for _ in range(2)]
    fast, exact = Moments([shape[1]] * 2, product_dtype=torch.float32), Moments([shape[1]] * 2, product_dtype=torch.float64)
    for lo in range(0, shape[0], 64):
        fast.update(*[a[lo : lo + 64] for a in acts])
        exact.update(*[a[lo : lo + 64] for a in acts])
    f, e = fast.compute(), exact.compute()
    assert (f.corr(0, 1) - e.corr(0, 1)).abs().max() < 1e-6
    assert (f.corr(1, 1) - e.corr(1, 1)).abs().max() < 1e-6
    assert abs(linear_cka(f, 0, 1) - linear_cka(e, 0, 1)) < 1e-6
    # the naive float32 way fails here: E[x x^T] - m m^T in float32
    x = flat(acts[0]).astype(np.float32)
    naive = (x.T @ x) / x.shape[0] - np.outer(x.mean(0), x.mean(0))
    assert np.abs(naive - e.cov(0, 0).numpy()).max() > 1e-2 * np.abs(e.cov(0, 0).numpy()).max()
