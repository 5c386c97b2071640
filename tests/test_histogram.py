"""UnitBins / JointHistogram / mutual information against independent numpy computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from convergent.analysis.mutual_info import (
    marginal_entropies,
    mi_semi_match,
    mutual_information,
    mutual_information_from_arrays,
)
from convergent.stats.histogram import JointHistogram, UnitBins, digitize, estimate_joint_bytes

THRESHOLD = 1e-6


def _samples(x: np.ndarray) -> np.ndarray:
    """[N, C] or [N, C, H, W] -> [samples, C], every position a sample (numpy, independently)."""
    if x.ndim == 2:
        return x
    return np.transpose(x, (0, 2, 3, 1)).reshape(-1, x.shape[1])


def _numpy_counts(xa: np.ndarray, xb: np.ndarray, ea: np.ndarray, eb: np.ndarray) -> np.ndarray:
    """Joint bin counts [Ca, Cb, B, B] with np.digitize and np.histogram2d."""
    sa, sb = _samples(xa).astype(np.float64), _samples(xb).astype(np.float64)
    nbin = ea.shape[1]
    ba = np.stack([np.digitize(sa[:, u], ea[u, :-1]) for u in range(sa.shape[1])], 1)
    bb = np.stack([np.digitize(sb[:, v], eb[v, :-1]) for v in range(sb.shape[1])], 1)
    out = np.zeros((sa.shape[1], sb.shape[1], nbin, nbin))
    grid = np.arange(nbin + 1) - 0.5
    for u in range(sa.shape[1]):
        for v in range(sb.shape[1]):
            out[u, v] = np.histogram2d(ba[:, u], bb[:, v], bins=[grid, grid])[0]
    return out


def _numpy_mi(counts: np.ndarray) -> np.ndarray:
    """MI (nats) from counts [..., B, B]: sum p log(p / (pa pb)) over p > 0, float64."""
    out = np.zeros(counts.shape[:-2])
    for idx in np.ndindex(*counts.shape[:-2]):
        c = counts[idx]
        n = c.sum()
        if n == 0:
            continue
        p = c / n
        pa, pb = p.sum(1), p.sum(0)
        nz = p > 0
        out[idx] = np.sum(p[nz] * np.log(p[nz] / np.outer(pa, pb)[nz]))
    return out


def _entropy(bins: np.ndarray) -> float:
    p = np.bincount(bins) / bins.size
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def _activations(seed: int, n=24, ca=5, cb=4, h=3, w=4):
    """Two nets' ReLU taps with related units, a dead unit and a nearly dead one."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, ca, h, w, generator=g, dtype=torch.float64)
    xa = torch.relu(base * torch.linspace(0.5, 3.0, ca, dtype=torch.float64)[None, :, None, None] - 0.2)
    xa[:, 1] = 0.0  # dead
    xa[:, 2] = torch.relu(base[:, 2] - 2.2)  # rarely positive
    mix = base[:, :cb] + 0.7 * torch.randn(n, cb, h, w, generator=g, dtype=torch.float64)
    xb = torch.relu(mix.flip(1) * 1e-3 + 1e-4)  # small values: exercises the low end of the grid
    return xa.float(), xb.float()


def _run_bins(xs, splits, **options):
    bins = UnitBins([x.shape[1] for x in xs], **options)
    for s in splits:
        bins.update(*(x[s] for x in xs))
    return bins


def _run_joint(xs, edges, splits, **options):
    joint = JointHistogram([x.shape[1] for x in xs], edges, **options)
    for s in splits:
        joint.update(*(x[s] for x in xs))
    return joint


SPLITS = [
    [slice(0, 24)],
    [slice(0, 1), slice(1, 13), slice(13, 24)],
    [slice(i, i + 5) for i in range(0, 24, 5)],
]


def test_counts_and_mi_equal_numpy_for_every_batch_split():
    xa, xb = _activations(0)
    results = []
    for splits in SPLITS:
        edges = _run_bins([xa, xb], splits).compute()
        joint = _run_joint([xa, xb], edges, splits).compute()
        results.append((edges, joint))
    edges, joint = results[0]
    for other_edges, other_joint in results[1:]:  # integer counts: batching changes nothing
        for e, o in zip(edges, other_edges):
            assert torch.equal(e, o)
        assert torch.equal(joint[(0, 1)], other_joint[(0, 1)])
    ea, eb = (e.numpy() for e in edges)
    expected = _numpy_counts(xa.numpy(), xb.numpy(), ea, eb)
    counts = joint[(0, 1)]
    assert counts.shape == (5, 4, 10, 10)
    np.testing.assert_array_equal(counts.numpy(), expected)
    mi = mutual_information(counts)
    assert mi.dtype == torch.float64 and not torch.isnan(mi).any()
    np.testing.assert_allclose(mi.numpy(), _numpy_mi(expected), rtol=1e-12, atol=1e-14)
    assert (mi[1] == 0).all()  # the dead unit shares no information


def test_fc_taps_three_nets_and_float32_products_match_float64():
    g = torch.Generator().manual_seed(1)
    xs = [torch.relu(torch.randn(300, c, generator=g)) for c in (3, 6, 2)]
    splits = [slice(0, 100), slice(100, 300)]
    edges = _run_bins(xs, splits).compute()
    j32 = _run_joint(xs, edges, splits).compute()
    j64 = _run_joint(xs, edges, splits, product_dtype=torch.float64).compute()
    small = _run_joint(xs, edges, splits, chunk_elements=64).compute()  # many tiny chunks
    assert set(j32) == {(0, 1), (0, 2), (1, 2)}
    for pair in j32:
        assert torch.equal(j32[pair], j64[pair])
        assert torch.equal(j32[pair], small[pair])
        a, b = pair
        expected = _numpy_counts(xs[a].numpy(), xs[b].numpy(), edges[a].numpy(), edges[b].numpy())
        np.testing.assert_array_equal(j32[pair].numpy(), expected)
    only = _run_joint(xs, edges, splits, pairs=[(2, 0)]).compute()
    assert set(only) == {(0, 2)} and torch.equal(only[(0, 2)], j32[(0, 2)])


def test_edges_are_percentiles_of_positive_values_within_grid_resolution():
    g = torch.Generator().manual_seed(2)
    n = 4000
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    scales = torch.tensor([1.0, 1e-4, 300.0, 5.0], dtype=torch.float64)
    x = torch.relu(x * scales)
    x[:, 3] = torch.exp(torch.randn(n, generator=g, dtype=torch.float64) * 3)  # 1e-4..1e4, no zeros
    bins = _run_bins([x], [slice(0, 1500), slice(1500, n)])
    edges = bins.compute()[0]
    assert edges.shape == (4, 10)
    log_step = math.log(bins.bin_ratio)
    assert abs(bins.bin_ratio - 10 ** (1 / 100)) < 1e-12  # the documented default: 100 per decade
    xn = x.numpy()
    for u in range(4):
        pos = xn[:, u][xn[:, u] >= THRESHOLD]
        assert edges[u, 0] == THRESHOLD
        assert edges[u, -1] == pos.max()
        expected = np.percentile(pos, np.arange(1, 9) / 9 * 100)
        err = np.abs(np.log(edges[u, 1:9].numpy()) - np.log(expected))
        assert err.max() <= 2 * log_step, (u, err.max() / log_step)
        assert np.median(err) <= log_step
        # equal-count bins: every positive bin holds about 1/9 of the positive values
        counts = np.bincount(np.digitize(pos, edges[u, :-1].numpy()), minlength=10)
        assert counts[0] == 0
        assert np.all(np.abs(counts[1:] - pos.size / 9) <= 0.03 * pos.size / 9 + 2), counts
    assert torch.all(edges[:, 1:] >= edges[:, :-1])


def test_values_beyond_the_grid_and_dead_units():
    x = torch.zeros(100, 3, dtype=torch.float64)
    x[:, 0] = torch.logspace(5, 8, 100, dtype=torch.float64)  # half of it above the 1e6 grid top
    x[:50, 2] = -1.0  # negative and zero values: both below the threshold
    x[50:, 2] = torch.linspace(1, 2, 50, dtype=torch.float64)
    bins = _run_bins([x], [slice(0, 100)])
    edges = bins.compute()[0]
    assert not torch.isnan(edges).any()
    pos = x[:, 0].numpy()
    expected = np.percentile(pos, np.arange(1, 9) / 9 * 100)
    got = edges[0, 1:9].numpy()
    on_grid = expected < 1e6 / bins.bin_ratio
    assert on_grid.sum() == 2
    np.testing.assert_allclose(np.log(got[on_grid]), np.log(expected[on_grid]), atol=2 * math.log(bins.bin_ratio))
    # beyond the grid the overflow bin is interpolated between 1e6 and the largest value
    assert np.all(got[~on_grid] >= 1e6) and np.all(got <= pos.max()) and edges[0, -1] == pos.max()
    assert np.all(np.diff(got) > 0)
    assert torch.all(edges[1] == THRESHOLD)  # dead: every edge at the threshold
    np.testing.assert_allclose(bins.zero_fraction()[0].numpy(), [0.0, 1.0, 0.5])
    joint = _run_joint([x, x], [edges, edges], [slice(0, 100)], pairs=[(0, 1)]).compute()[(0, 1)]
    assert joint[1, 1, 0, 0] == 100  # all of the dead unit's samples in bin 0
    assert joint[2, 2, 0, 0] == 50 and joint[2, 2].diagonal()[1:].sum() == 50
    mi = mutual_information(joint)
    assert not torch.isnan(mi).any()
    assert (mi[1] == 0).all() and (mi[:, 1] == 0).all()


def test_identical_units_give_their_entropy_and_independent_units_give_zero():
    g = torch.Generator().manual_seed(3)
    n = 20000
    zero_share = torch.tensor([0.0, 0.3, 0.6], dtype=torch.float64)
    z = torch.randn(n, 3, generator=g, dtype=torch.float64)
    x = torch.relu(z - torch.distributions.Normal(0.0, 1.0).icdf(zero_share.clamp_min(1e-9)))
    y = torch.relu(torch.randn(n, 3, generator=g, dtype=torch.float64))  # independent of x
    edges = _run_bins([x, y], [slice(0, n)]).compute()
    joint = _run_joint([x, x, y], [edges[0], edges[0], edges[1]], [slice(0, n)], pairs=[(0, 1), (0, 2)]).compute()
    same = mutual_information(joint[(0, 1)])
    ha, hb = marginal_entropies(joint[(0, 1)])
    for u in range(3):
        bins = np.digitize(x[:, u].numpy(), edges[0][u, :-1].numpy())
        assert same[u, u].item() == pytest.approx(_entropy(bins), rel=1e-12)
        assert ha[u].item() == pytest.approx(_entropy(bins), rel=1e-12) and hb[u] == pytest.approx(ha[u])
        zs = float(zero_share[u])
        ideal = (-zs * math.log(zs) if zs > 0 else 0.0) - (1 - zs) * math.log((1 - zs) / 9)
        assert same[u, u].item() == pytest.approx(ideal, abs=0.01)
    assert same[0, 0].item() == pytest.approx(math.log(9), abs=0.01)
    independent = mutual_information(joint[(0, 2)])
    assert independent.max() < 0.01  # plug-in bias ~ 81 / (2 n) = 0.002
    assert (same.diagonal() > 1.0).all()


def test_mi_never_nan_and_clamped():
    counts = torch.zeros(2, 2, 10, 10)
    counts[0, 0, 3, 3] = 7  # a single occupied cell: MI 0
    counts[1, 1] = torch.eye(10) * 5  # perfectly dependent: log 10
    mi = mutual_information(counts)
    assert not torch.isnan(mi).any()
    assert mi[0, 0] == 0 and mi[0, 1] == 0  # no samples -> 0
    assert mi[1, 1].item() == pytest.approx(math.log(10), rel=1e-12)
    assert torch.all(mi >= 0)


def test_mi_semi_match_recovers_planted_permutation_with_lowest_index_ties():
    g = torch.Generator().manual_seed(4)
    n, c = 2000, 6
    xa = torch.relu(torch.randn(n, c, generator=g, dtype=torch.float64))
    perm = torch.randperm(c, generator=g)
    xb = xa[:, perm] * 3.0 + 1e-3 * torch.rand(n, c, generator=g, dtype=torch.float64)
    mi = mutual_information_from_arrays(xa, xb)
    index, value = mi_semi_match(mi)
    inverse = torch.argsort(perm)
    assert torch.equal(index, inverse)  # unit u of a is unit inverse[u] of b
    assert torch.allclose(value, mi.max(1).values)
    tied = torch.tensor([[0.1, 0.5, 0.5], [0.2, 0.2, 0.2], [0.0, 0.0, 0.3]])
    assert mi_semi_match(tied)[0].tolist() == [1, 0, 2]


def test_from_arrays_equals_two_passes_and_accepts_numpy():
    xa, xb = _activations(5, n=10)
    edges = _run_bins([xa, xb], [slice(0, 10)]).compute()
    expected = mutual_information(_run_joint([xa, xb], edges, [slice(0, 10)]).compute()[(0, 1)])
    got = mutual_information_from_arrays(xa.numpy(), xb.numpy(), batch_size=3)
    assert torch.equal(got, expected)


def test_digitize_matches_numpy_including_ties_and_nan():
    edges = torch.tensor([[1e-6, 1.0, 1.0, 2.0, 3.0]], dtype=torch.float64)
    x = torch.tensor([[-1.0], [0.0], [1e-6], [0.5], [1.0], [1.5], [2.0], [3.0], [9.0], [float("nan")]])
    got = digitize(x, edges)[:, 0].numpy()
    expected = np.digitize(x[:, 0].numpy().astype(np.float64), edges[0, :-1].numpy())
    expected[-1] = 0  # numpy sends NaN to the top bin; we count it with the zeros
    np.testing.assert_array_equal(got, expected)


def test_state_is_independent_of_the_probe_size_and_sum_merge_is_exact():
    xa, xb = _activations(6, n=12)
    full = _run_bins([xa, xb], [slice(0, 12)])
    part1 = _run_bins([xa, xb], [slice(0, 7)])
    part2 = _run_bins([xa, xb], [slice(7, 12)])
    part1.merge_state(part2)  # what the sum/max reductions across processes do
    for e, f in zip(part1.compute(), full.compute()):
        assert torch.equal(e, f)
    edges = full.compute()
    joint = _run_joint([xa, xb], edges, [slice(0, 12)])
    size = joint.state_bytes()
    assert size == estimate_joint_bytes([5, 4])
    joint.update(xa, xb)
    assert joint.state_bytes() == size and joint.n == 2 * 12 * 12


def test_rejects_mismatched_inputs():
    bins = UnitBins([3, 2])
    with pytest.raises(ValueError):
        bins.update(torch.zeros(4, 3))
    with pytest.raises(ValueError):
        bins.update(torch.zeros(4, 3), torch.zeros(5, 2))
    with pytest.raises(ValueError):
        JointHistogram([3, 2], [torch.zeros(3, 10), torch.zeros(3, 10)])
    with pytest.raises(ValueError):
        JointHistogram([3, 2], [torch.zeros(3, 10), torch.zeros(2, 10)], product_dtype=torch.float16)
