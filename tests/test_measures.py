"""Tests of convergent.analysis.measures against direct implementations on raw activations, and of
the properties each measure declares in the registry (convergent.analysis.registry)."""

from __future__ import annotations

import math
import warnings
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import convergent.analysis.builtin  # noqa: E402,F401 - registers the built-in measures
from convergent.analysis.measures import (
    SampleSizeWarning,
    canonical_correlations,
    cca,
    linear_cka,
    procrustes,
    procrustes_distance,
    pwcca,
    pwcca_weights,
    stats_from_arrays,
    svcca,
)
from convergent.analysis.registry import INVARIANCES, REGISTRY

# The one registry of measures: the property tests below are generated from its declarations.
MEASURES = dict(REGISTRY.measures)
pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------------
# reference implementations on raw activations (numpy, float64)
# --------------------------------------------------------------------------------------------------
def gram_linear(x: np.ndarray) -> np.ndarray:
    return x @ x.T


def center_gram(gram: np.ndarray, unbiased: bool = False) -> np.ndarray:
    """Kornblith et al.'s reference (google-research/representation_similarity)."""
    assert np.allclose(gram, gram.T)
    gram = gram.copy()
    if unbiased:
        n = gram.shape[0]
        np.fill_diagonal(gram, 0)
        means = np.sum(gram, 0, dtype=np.float64) / (n - 2)
        means -= np.sum(means) / (2 * (n - 1))
        gram -= means[:, None]
        gram -= means[None, :]
        np.fill_diagonal(gram, 0)
    else:
        means = np.mean(gram, 0, dtype=np.float64)
        means -= np.mean(means) / 2
        gram -= means[:, None]
        gram -= means[None, :]
    return gram


@np.errstate(invalid="ignore", divide="ignore")
def ref_cka(gram_x: np.ndarray, gram_y: np.ndarray, debiased: bool = False) -> float:
    gram_x = center_gram(gram_x, unbiased=debiased)
    gram_y = center_gram(gram_y, unbiased=debiased)
    scaled_hsic = gram_x.ravel().dot(gram_y.ravel())
    return scaled_hsic / (np.linalg.norm(gram_x) * np.linalg.norm(gram_y))


def raw_debiased_hsic(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased HSIC (x n(n-3)) from raw, uncentred X, Y in feature space (the brief's form):
    tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1."""
    n = x.shape[0]
    qx, qy = (x**2).sum(1), (y**2).sum(1)
    sx, sy = x.sum(0), y.sum(0)
    xty = x.T @ y
    tr_kl = (xty**2).sum() - qx @ qy
    k1 = sx @ sx - qx.sum()
    l1 = sy @ sy - qy.sum()
    kl1 = sx @ xty @ sy - (qx @ y) @ sy - (qy @ x) @ sx + qx @ qy
    return tr_kl + k1 * l1 / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * kl1


def positions(x: np.ndarray) -> np.ndarray:
    """[N, C, H, W] -> [N*H*W, C]."""
    return x if x.ndim == 2 else np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])


def svd_reduce(x: np.ndarray, keep: float) -> np.ndarray:
    """Raghu et al.: centred data projected on its top singular directions explaining `keep` of the
    variance."""
    xc = x - x.mean(0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    frac = np.cumsum(s**2) / np.sum(s**2)
    k = int(np.argmax(frac >= keep - 1e-12)) + 1
    return xc @ vt[:k].T


def ref_cca(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Canonical correlations via QR + SVD; returns (rho, a's orthonormal canonical variates)."""
    qa, _ = np.linalg.qr(x - x.mean(0))
    qb, _ = np.linalg.qr(y - y.mean(0))
    u, s, _ = np.linalg.svd(qa.T @ qb, full_matrices=False)
    m = min(x.shape[1], y.shape[1])
    return s[:m], qa @ u[:, :m]


def ref_svcca(x: np.ndarray, y: np.ndarray, keep: float = 0.99) -> float:
    return float(ref_cca(svd_reduce(x, keep), svd_reduce(y, keep))[0].mean())


def ref_pwcca(x: np.ndarray, y: np.ndarray) -> float:
    rho, h = ref_cca(x, y)
    w = np.abs(h.T @ (x - x.mean(0))).sum(1)
    w /= w.sum()
    return float(w @ rho)


def ref_procrustes(x: np.ndarray, y: np.ndarray) -> float:
    xc, yc = x - x.mean(0), y - y.mean(0)
    xc, yc = xc / np.linalg.norm(xc), yc / np.linalg.norm(yc)
    return float(np.linalg.svd(xc.T @ yc, compute_uv=False).sum())


def related_pair(seed: int, n: int = 300, da: int = 8, db: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Two nets sharing part of a latent code, anisotropic spectra (SVCCA's 99% cut drops dims),
    distinct canonical correlations, non-zero means."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, da))
    qa = np.linalg.qr(rng.standard_normal((da, da)))[0]
    x = z @ np.diag(np.geomspace(3.0, 0.2, da)) @ qa + rng.normal(0, 2, da)
    y = z[:, :db] @ rng.standard_normal((db, db)) + rng.standard_normal((n, db)) * np.linspace(0.1, 2.0, db)
    return x, y + rng.normal(0, 2, db)


# --------------------------------------------------------------------------------------------------
# CKA against Kornblith's Gram formula
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("batch_size", [None, 7, 1])
def test_linear_cka_matches_gram_reference(debiased, batch_size):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, 12)) @ rng.standard_normal((12, 12)) + 3.0
    y = np.maximum(x[:, :9] @ rng.standard_normal((9, 9)) + rng.standard_normal((40, 9)), 0.0)
    stats = stats_from_arrays(x, y, batch_size=batch_size)
    expected = ref_cka(gram_linear(x), gram_linear(y), debiased=debiased)
    assert linear_cka(stats, 0, 1, debiased=debiased) == pytest.approx(expected, abs=1e-6)
    assert linear_cka(stats, 1, 0, debiased=debiased) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("debiased", [False, True])
def test_linear_cka_conv_shaped_every_position_a_sample(debiased):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 5, 4, 3))
    y = np.maximum(np.einsum("nchw,cd->ndhw", x, rng.standard_normal((5, 7))) + rng.standard_normal((6, 7, 4, 3)), 0)
    expected = ref_cka(gram_linear(positions(x)), gram_linear(positions(y)), debiased=debiased)
    for bs in (None, 2, 5):
        stats = stats_from_arrays(torch.from_numpy(x), torch.from_numpy(y), batch_size=bs)
        assert stats.n == 6 * 4 * 3
        assert linear_cka(stats, 0, 1, debiased=debiased) == pytest.approx(expected, abs=1e-6)


def test_debiased_hsic_is_translation_invariant_and_feature_form_is_exact():
    """Centring does not matter for the unbiased estimator: raw and centred data give the same
    debiased CKA (Gram reference), and the raw feature-space form equals the Gram form."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((25, 10)) + rng.normal(0, 5, 10)
    y = x[:, :4] @ rng.standard_normal((4, 8)) + rng.standard_normal((25, 8)) + 7.0
    raw = ref_cka(gram_linear(x), gram_linear(y), debiased=True)
    centred = ref_cka(gram_linear(x - x.mean(0)), gram_linear(y - y.mean(0)), debiased=True)
    assert raw == pytest.approx(centred, abs=1e-9)
    feat = raw_debiased_hsic(x, y) / math.sqrt(raw_debiased_hsic(x, x) * raw_debiased_hsic(y, y))
    assert feat == pytest.approx(raw, abs=1e-9)
    # the biased CKA, by contrast, is only translation-invariant because it centres its Grams
    assert linear_cka(stats_from_arrays(x, y), 0, 1, debiased=True) == pytest.approx(raw, abs=1e-8)


def test_debiased_cka_near_zero_for_independent_nets_at_small_n():
    biased, debiased = [], []
    for seed in range(6):
        rng = np.random.default_rng(100 + seed)
        stats = stats_from_arrays(rng.standard_normal((32, 64)), rng.standard_normal((32, 64)))
        biased.append(linear_cka(stats, 0, 1))
        debiased.append(linear_cka(stats, 0, 1, debiased=True))
    assert abs(np.mean(debiased)) < 0.1
    assert max(abs(v) for v in debiased) < 0.2
    assert min(biased) > 0.3


def test_debiased_needs_cka_sums():
    rng = np.random.default_rng(4)
    stats = stats_from_arrays(rng.standard_normal((20, 3)), rng.standard_normal((20, 3)), cka_sums=False)
    linear_cka(stats, 0, 1)  # the biased one does not need them
    with pytest.raises(KeyError, match="cka_sums"):
        linear_cka(stats, 0, 1, debiased=True)


# --------------------------------------------------------------------------------------------------
# CCA family against Raghu / Morcos on raw data
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_cca_svcca_pwcca_match_raw_data_reference(seed):
    x, y = related_pair(seed)
    stats = stats_from_arrays(x, y, batch_size=64)
    assert cca(stats, 0, 1, epsilon=0.0) == pytest.approx(ref_cca(x, y)[0].mean(), abs=1e-8)
    assert svcca(stats, 0, 1, epsilon=0.0) == pytest.approx(ref_svcca(x, y), abs=1e-8)
    assert svcca(stats, 0, 1, keep=0.9, epsilon=0.0) == pytest.approx(ref_svcca(x, y, 0.9), abs=1e-8)
    assert pwcca(stats, 0, 1, epsilon=0.0) == pytest.approx(ref_pwcca(x, y), abs=1e-8)
    assert pwcca(stats, 1, 0, epsilon=0.0) == pytest.approx(ref_pwcca(y, x), abs=1e-8)
    # the SVD step really dropped dimensions here, so SVCCA is not plain CCA
    assert svd_reduce(x, 0.99).shape[1] < x.shape[1]
    assert abs(ref_svcca(x, y) - ref_cca(x, y)[0].mean()) > 1e-3
    # the default ridge barely moves well-sampled values
    assert cca(stats, 0, 1) == pytest.approx(ref_cca(x, y)[0].mean(), abs=1e-4)
    assert svcca(stats, 0, 1) == pytest.approx(ref_svcca(x, y), abs=1e-4)
    assert pwcca(stats, 0, 1) == pytest.approx(ref_pwcca(x, y), abs=1e-4)


def test_canonical_directions_give_the_canonical_correlations():
    x, y = related_pair(5)
    stats = stats_from_arrays(x, y)
    res = canonical_correlations(stats, 0, 1, epsilon=0.0)
    ha = res.variates_a(torch.from_numpy(x)).numpy()
    hb = res.variates_b(torch.from_numpy(y)).numpy()
    c = np.cov(np.concatenate([ha, hb], 1).T, bias=True)
    m = res.rho.numel()
    np.testing.assert_allclose(np.diag(c)[: 2 * m], 1.0, atol=1e-8)  # unit variance
    np.testing.assert_allclose(np.diag(c[:m, m:]), res.rho.numpy(), atol=1e-8)
    np.testing.assert_allclose(c[:m, :m], np.eye(m), atol=1e-8)  # uncorrelated variates
    assert list(res.rho) == sorted(res.rho, reverse=True)
    w, rho = pwcca_weights(stats, 0, 1)
    assert float(w.sum()) == pytest.approx(1.0) and bool((w >= 0).all())


@pytest.mark.parametrize("fn", [cca, svcca, pwcca])
def test_cca_family_warns_when_samples_do_not_exceed_features(fn):
    rng = np.random.default_rng(6)
    x, y = rng.standard_normal((20, 30)), rng.standard_normal((20, 10))
    with pytest.warns(SampleSizeWarning, match="MEANINGLESS"):
        value = fn(stats_from_arrays(x, y), 0, 1)
    assert value > 0.9  # the meaningless near-perfect score the warning is about
    with warnings.catch_warnings():
        warnings.simplefilter("error", SampleSizeWarning)
        fn(stats_from_arrays(rng.standard_normal((200, 30)), rng.standard_normal((200, 10))), 0, 1)


def test_cca_warns_at_equality():
    rng = np.random.default_rng(7)
    with pytest.warns(SampleSizeWarning):
        cca(stats_from_arrays(rng.standard_normal((10, 10)), rng.standard_normal((10, 3))), 0, 1)


# --------------------------------------------------------------------------------------------------
# Procrustes
# --------------------------------------------------------------------------------------------------
def test_procrustes_matches_reference_and_distance():
    x, y = related_pair(8)
    stats = stats_from_arrays(x, y)
    s = procrustes(stats, 0, 1)
    assert s == pytest.approx(ref_procrustes(x, y), abs=1e-9)
    # the distance is the residual of the optimal partial isometry (zero-pad the narrower net)
    xc, yc = x - x.mean(0), y - y.mean(0)
    xc, yc = xc / np.linalg.norm(xc), np.pad(yc / np.linalg.norm(yc), ((0, 0), (0, 2)))
    u, _, vt = np.linalg.svd(yc.T @ xc)
    assert procrustes_distance(stats, 0, 1) == pytest.approx(np.linalg.norm(xc - yc @ u @ vt), abs=1e-7)
    assert procrustes_distance(stats, 0, 1, squared=True) == pytest.approx(2 - 2 * s)


# --------------------------------------------------------------------------------------------------
# registry-generated property tests
# --------------------------------------------------------------------------------------------------
def random_transform(kind: str, d: int, rng: np.random.Generator):
    if kind == "permutation":
        perm = rng.permutation(d)
        while d > 1 and (perm == np.arange(d)).all():
            perm = rng.permutation(d)
        return lambda x: x[:, perm]
    if kind == "orthogonal":
        q = np.linalg.qr(rng.standard_normal((d, d)))[0]
        return lambda x: x @ q
    if kind == "isotropic_scaling":
        c = float(rng.choice([0.03, 7.5]))
        return lambda x: x * c
    if kind == "invertible_linear":  # well conditioned (singular values in [0.5, 2]), far from orthogonal
        q1, q2 = (np.linalg.qr(rng.standard_normal((d, d)))[0] for _ in range(2))
        m = q1 @ np.diag(np.geomspace(0.5, 2.0, d)[rng.permutation(d)]) @ q2
        return lambda x: x @ m
    if kind == "translation":
        t = rng.normal(0.0, 5.0, d)
        return lambda x: x + t
    raise ValueError(kind)


def value(measure, x, y):
    return measure(stats_from_arrays(x, y), 0, 1)


def invariance_tol(measure, kind: str) -> float:
    # the CCA ridge is not invariant to general linear maps (observed ~3e-6); everything else is
    # exact up to rounding (observed ~1e-15)
    return 1e-5 if kind == "invertible_linear" else 1e-9


def test_registry_fields():
    assert {
        "cka/linear",
        "cka/linear_debiased",
        "cca/mean",
        "cca/svcca",
        "cca/pwcca",
        "procrustes/similarity",
        "align/semi_match",
    } <= set(MEASURES)
    for name, m in MEASURES.items():
        assert m.name == name and callable(m.fn)
        assert m.invariances <= INVARIANCES
        # the declarations are consistent with the inclusions between the transformation groups
        if "invertible_linear" in m.invariances:
            assert {"orthogonal", "isotropic_scaling"} <= m.invariances
        if "orthogonal" in m.invariances:
            assert "permutation" in m.invariances
        lo, hi = m.value_range
        assert lo <= m.self_similarity <= hi
    assert not MEASURES["cca/pwcca"].symmetric and not MEASURES["align/semi_match"].symmetric
    assert "invertible_linear" not in MEASURES["cka/linear"].invariances
    assert "invertible_linear" in MEASURES["cca/mean"].invariances
    assert MEASURES["cka/linear_debiased"].needs_cka_sums


INVARIANCE_CASES = [(name, kind) for name, m in MEASURES.items() for kind in sorted(m.invariances)]
NON_INVARIANCE_CASES = [(name, kind) for name, m in MEASURES.items() for kind in sorted(INVARIANCES - m.invariances)]


@pytest.mark.parametrize("name,kind", INVARIANCE_CASES)
def test_declared_invariances_hold(name, kind):
    m = MEASURES[name]
    rng = np.random.default_rng(zlib.crc32(f"{name}/{kind}".encode()))
    x, y = related_pair(11)
    base = value(m, x, y)
    ty = random_transform(kind, y.shape[1], rng)
    tx = random_transform(kind, x.shape[1], rng)
    tol = invariance_tol(m, kind)
    assert value(m, x, ty(y)) == pytest.approx(base, abs=tol)
    assert value(m, tx(x), y) == pytest.approx(base, abs=tol)


@pytest.mark.parametrize("name,kind", NON_INVARIANCE_CASES)
def test_undeclared_invariances_do_not_hold(name, kind):
    """The declarations are honest: a transformation not declared changes the value (applied to
    one net or the other)."""
    m = MEASURES[name]
    rng = np.random.default_rng(12)
    x, y = related_pair(11)
    base = value(m, x, y)
    changes = []
    for _ in range(3):  # a few random instances of T
        ty = random_transform(kind, y.shape[1], rng)
        tx = random_transform(kind, x.shape[1], rng)
        changes += [abs(value(m, x, ty(y)) - base), abs(value(m, tx(x), y) - base)]
    assert max(changes) > 1e-3


def test_every_measure_has_an_undeclared_invariance_checked_or_is_fully_invariant():
    for name, m in MEASURES.items():
        assert m.invariances == INVARIANCES or any(n == name for n, _ in NON_INVARIANCE_CASES)


@pytest.mark.parametrize("name", sorted(MEASURES))
def test_self_similarity(name):
    m = MEASURES[name]
    x, _ = related_pair(13)
    assert value(m, x, x) == pytest.approx(m.self_similarity, abs=1e-4 if m.family == "cca" else 1e-7)
    # also against itself inside one stats, and against an invertibly-related copy when declared
    assert m(stats_from_arrays(x), 0, 0) == pytest.approx(m.self_similarity, abs=1e-4)


@pytest.mark.parametrize("name", sorted(MEASURES))
def test_symmetry_as_declared(name):
    m = MEASURES[name]
    x, y = related_pair(14)
    stats = stats_from_arrays(x, y)
    ab, ba = m(stats, 0, 1), m(stats, 1, 0)
    if m.symmetric:
        assert ab == pytest.approx(ba, abs=1e-10)
    else:
        assert abs(ab - ba) > 1e-3


@pytest.mark.parametrize("name", sorted(MEASURES))
def test_net_indices_inside_larger_stats(name):
    """The same function serves any pair of nets inside one stats."""
    m = MEASURES[name]
    x, y = related_pair(15)
    z = np.random.default_rng(15).standard_normal((x.shape[0], 4))
    stats = stats_from_arrays(z, x, y)
    assert m(stats, 2, 1) == pytest.approx(m(stats_from_arrays(y, x), 0, 1), abs=1e-10)
    assert m(stats, 1, 2) == pytest.approx(m(stats_from_arrays(x, y), 0, 1), abs=1e-10)


@pytest.mark.parametrize("name", sorted(MEASURES))
def test_all_zero_and_dead_nets(name):
    m = MEASURES[name]
    x, y = related_pair(16)
    zero_value = m.value_range[1] if not m.higher_is_similar else 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no NaN warnings, no sample-size warnings here
        assert m(stats_from_arrays(x, np.zeros_like(y)), 0, 1) == zero_value
        # constant nets: their covariance is rounding noise (not exactly 0) with these batch splits
        for c in (1 / 3, 12345.678):
            const = stats_from_arrays(np.full_like(x, c), y, batch_size=7)
            assert m(const, 0, 1) == zero_value and m(const, 1, 0) == zero_value
        if not m.ignores_dead:
            return
        # dead (never-firing) and constant units change nothing
        y_dead = np.concatenate([y, np.zeros((len(y), 3)), np.full((len(y), 2), 1e3 / 7)], 1)
        assert m(stats_from_arrays(x, y_dead, batch_size=7), 0, 1) == pytest.approx(value(m, x, y), abs=1e-6)


finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, allow_subnormal=False)


@st.composite
def degenerate_pair(draw):
    n = draw(st.integers(1, 12))
    xs = []
    for _ in range(2):
        c = draw(st.integers(1, 6))
        x = draw(hnp.arrays(np.float64, (n, c), elements=finite))
        scale = draw(st.sampled_from([1.0, 1e-6, 1e6]))
        x = x * scale
        for j in range(c):  # degenerate columns
            kind = draw(st.sampled_from(["keep", "keep", "zero", "const", "dup"]))
            if kind == "zero":
                x[:, j] = 0.0
            elif kind == "const":
                x[:, j] = draw(finite)
            elif kind == "dup" and j:
                x[:, j] = x[:, 0]
        if draw(st.booleans()):
            x = np.maximum(x, 0.0)  # ReLU
        xs.append(x)
    return xs


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(degenerate_pair())
@example([np.array([[3.68e-118], [0.0]]), np.zeros((2, 1))])  # sqrt(ta * tb) underflowed to 0 once
@example([np.array([[1.88798916e-155], [0.0]]), np.zeros((2, 1))])  # a whitener cached unscaled (dead partner)
@example([np.array([[1e-150, 2e-150], [3e-150, -1e-150], [0.0, 5e-150], [1e-150, 1e-150]]), np.ones((4, 2))])
def test_no_nan_or_inf_on_degenerate_inputs(pair):
    x, y = pair
    stats = stats_from_arrays(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SampleSizeWarning)
        warnings.filterwarnings("error", category=RuntimeWarning)
        for m in MEASURES.values():
            for a, b in ((0, 1), (1, 0), (0, 0)):
                v = m(stats, a, b)
                assert isinstance(v, float) and math.isfinite(v), (m.name, a, b, v)
                lo, hi = m.value_range
                assert lo - 1e-12 <= v <= hi + 1e-12, (m.name, v)


@settings(max_examples=25, deadline=None)
@given(st.integers(5, 40), st.integers(1, 5), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_cka_matches_reference_over_shapes(n, ca, cb, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, ca)) * rng.uniform(0.1, 10, ca) + rng.normal(0, 3, ca)
    y = np.maximum(rng.standard_normal((n, cb)) + x[:, :1], 0)
    stats = stats_from_arrays(x, y, batch_size=int(rng.integers(1, n + 1)))
    for debiased in (False, True):
        ref = ref_cka(gram_linear(x), gram_linear(y), debiased=debiased)
        if np.isfinite(ref) and np.abs(y - y.mean(0)).max() > 1e-6:
            assert linear_cka(stats, 0, 1, debiased=debiased) == pytest.approx(ref, abs=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", sorted(MEASURES))
def test_measures_on_cuda_match_cpu(name):
    """Float64 on the stats' device: CUDA stats (moved, or accumulated there) give the CPU value."""
    m = MEASURES[name]
    x, y = related_pair(17)
    cpu = stats_from_arrays(x, y, batch_size=64)
    moved = cpu.to("cuda")
    built = stats_from_arrays(torch.from_numpy(x).cuda(), torch.from_numpy(y).cuda(), batch_size=64)
    assert built.sxx[(0, 1)].is_cuda
    expected = m(cpu, 0, 1)
    assert m(moved, 0, 1) == pytest.approx(expected, abs=1e-9)
    assert m(built, 0, 1) == pytest.approx(expected, abs=1e-9)
    res = canonical_correlations(moved, 0, 1)
    assert res.rho.is_cuda and res.variates_a(torch.from_numpy(x).cuda()).is_cuda


@pytest.mark.parametrize("name", ["cca/mean", "cca/svcca", "cca/pwcca"])
def test_cca_family_does_not_depend_on_the_pairs_computed_before(name):
    """Each net's whitener is cached on the stats: a pair with an all-dead net computed first must
    not change a later pair's value (it once cached an unscaled whitener: 0.98 -> 0.015)."""
    rng = np.random.default_rng(0)
    x = 30 * rng.standard_normal((200, 5))
    y = x @ rng.standard_normal((5, 5)) + rng.standard_normal((200, 5))
    dead = np.zeros((200, 5))
    measure = MEASURES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SampleSizeWarning)
        alone = measure(stats_from_arrays(x, y, dead), 0, 1)
        stats = stats_from_arrays(x, y, dead)
        assert measure(stats, 0, 2) == 0.0 and measure(stats, 2, 1) == 0.0
        after = measure(stats, 0, 1)
    assert alone > 0.5
    assert after == pytest.approx(alone, rel=1e-12)
