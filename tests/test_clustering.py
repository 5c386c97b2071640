"""Spectral and hierarchical clustering of two nets' units, on MomentStats built from real data."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from convergent.analysis.clustering import (
    AFFINITIES,
    ASSIGN_LABELS,
    combined_corr,
    hierarchical_merges,
    spectral_clusters,
    spectral_clusters_from_corr,
    spectral_summary,
)
from convergent.stats.moments import Moments

F64 = torch.float64


def _stats(*xs: torch.Tensor):
    m = Moments([x.shape[1] for x in xs])
    m.update(*xs)
    return m.compute()


def _planted_groups(seed: int = 0, groups: int = 5, signals: int = 3, per_group: int = 8, n: int = 2000, signed: bool = False):
    """Two nets whose units are noisy mixtures of the signals of one latent group each (units of
    both nets shuffled). Returns xa, xb and the true group of every unit (a's first)."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, groups, signals, generator=g, dtype=F64)

    def net():
        group = torch.arange(groups).repeat_interleave(per_group)
        group = group[torch.randperm(group.numel(), generator=g)]
        if signed:
            w = torch.randn(group.numel(), signals, generator=g, dtype=F64)
        else:  # positive mixtures: units of a group are positively correlated
            w = 0.2 + torch.rand(group.numel(), signals, generator=g, dtype=F64)
        x = torch.einsum("nus,us->nu", latent[:, group], w)
        return x + 0.5 * torch.randn(x.shape, generator=g, dtype=F64), group

    xa, ga = net()
    xb, gb = net()
    return xa, xb, torch.cat([ga, gb]).numpy()


# --- combined matrix -------------------------------------------------------------------------
def test_combined_corr_blocks():
    g = torch.Generator().manual_seed(1)
    xa, xb = torch.randn(300, 4, generator=g, dtype=F64), torch.randn(300, 6, generator=g, dtype=F64)
    xb[:, 0] += xa[:, 2]
    st = _stats(xa, xb)
    c = combined_corr(st, 0, 1)
    assert c.shape == (10, 10) and c.dtype == F64
    ref = np.corrcoef(torch.cat([xa, xb], 1).numpy(), rowvar=False)
    np.testing.assert_allclose(c.numpy(), ref, atol=1e-10)
    torch.testing.assert_close(c[:4, 4:], st.corr(0, 1))
    torch.testing.assert_close(c[4:, :4], st.corr(0, 1).T)
    # b first when asked
    torch.testing.assert_close(combined_corr(st, 1, 0)[:6, :6], st.corr(1, 1))


# --- spectral clustering ---------------------------------------------------------------------
@pytest.mark.parametrize("assign_labels", ASSIGN_LABELS)
@pytest.mark.parametrize("affinity", AFFINITIES)
def test_spectral_recovers_planted_groups(affinity, assign_labels):
    xa, xb, truth = _planted_groups()
    st = _stats(xa, xb)
    labels = spectral_clusters(st, 0, 1, n_clusters=5, affinity=affinity, seed=0, assign_labels=assign_labels)
    assert labels.shape == (80,) and np.issubdtype(labels.dtype, np.integer)
    assert adjusted_rand_score(truth, labels) >= 0.9
    s = spectral_summary(st, labels)
    assert s["shared_fraction"] == 1.0
    assert s["n_clusters"] == 5 and s["random_method"] == "exact"
    assert s["within_cluster_corr"] > s["random_within_cluster_corr"] + 0.3
    assert s["within_cluster_abs_corr"] > s["random_within_cluster_abs_corr"] + 0.3
    # block order: a permutation grouping each cluster, boundaries at the cluster edges
    order, bounds = s["order"], s["boundaries"]
    assert sorted(order.tolist()) == list(range(80))
    assert bounds[0] == 0 and bounds[-1] == 80 and len(bounds) == 6
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        assert len(set(labels[order[lo:hi]].tolist())) == 1
    # same answer from the plain matrix, and deterministic for a seed
    c = combined_corr(st, 0, 1)
    np.testing.assert_array_equal(
        spectral_clusters_from_corr(c, 5, affinity=affinity, seed=0, assign_labels=assign_labels), labels
    )
    s2 = spectral_summary(c.numpy(), labels, n_a=40)
    assert s2["within_cluster_corr"] == pytest.approx(s["within_cluster_corr"])


def test_spectral_abs_affinity_groups_sign_mixed_units():
    # random-sign mixtures: |corr| carries the group, signed corr averages out
    xa, xb, truth = _planted_groups(seed=3, signed=True)
    st = _stats(xa, xb)
    labels = spectral_clusters(st, 0, 1, 5, affinity="abs")
    assert adjusted_rand_score(truth, labels) >= 0.9
    s = spectral_summary(st, labels)
    assert s["within_cluster_abs_corr"] > s["random_within_cluster_abs_corr"] + 0.2


def test_summary_on_hand_made_matrix():
    corr = np.array(
        [
            [1.0, 0.5, 0.1, 0.8, 0.0],
            [0.5, 1.0, 0.2, 0.3, -0.4],
            [0.1, 0.2, 1.0, 0.0, 0.6],
            [0.8, 0.3, 0.0, 1.0, 0.1],
            [0.0, -0.4, 0.6, 0.1, 1.0],
        ]
    )
    # a = units 0..2, b = units 3..4; clusters {0, 1, 3}, {2, 4}
    s = spectral_summary(corr, np.array([0, 0, 1, 0, 1]), n_a=3)
    assert s["shared_fraction"] == 1.0 and s["n_shared_pairs"] == 3
    assert s["within_cluster_corr"] == pytest.approx((0.8 + 0.3 + 0.6) / 3)
    assert s["random_within_cluster_corr"] == pytest.approx(np.mean([0.8, 0.0, 0.3, -0.4, 0.0, 0.6]))
    np.testing.assert_array_equal(s["order"], [0, 1, 3, 2, 4])
    np.testing.assert_array_equal(s["boundaries"], [0, 3, 5])
    # cluster {0, 1} of a only, {3, 4} of b only, {2} of a only: no cluster is shared
    s = spectral_summary(corr, np.array([0, 0, 2, 1, 1]), n_a=3)
    assert s["shared_fraction"] == 0.0 and s["n_shared_pairs"] == 0
    assert np.isnan(s["within_cluster_corr"])


def _brute_force_random(corr: np.ndarray, labels: np.ndarray, n_a: int, draws: int, seed: int):
    """Average within-cluster between-net corr over uniformly random relabellings (same sizes)."""
    rng = np.random.default_rng(seed)
    member = np.flatnonzero(labels >= 0)
    values = []
    for _ in range(draws):
        lab = labels.copy()
        lab[member] = rng.permutation(labels[member])
        same = [(i, j) for i in range(n_a) for j in range(n_a, len(lab)) if lab[i] >= 0 and lab[i] == lab[j]]
        if same:
            values.append(np.mean([corr[i, j] for i, j in same]))
    return float(np.mean(values)), float(np.std(values) / np.sqrt(len(values)))


def test_random_baseline_is_exact_expectation():
    # structured data (within-net corr far above between-net corr), unequal clusters, one unit
    # left unclustered: the exact baseline must match the brute-force average of random relabellings
    g = torch.Generator().manual_seed(5)
    z = torch.randn(500, 3, generator=g, dtype=F64)
    xa = z[:, :1] * 1.5 + 0.3 * z[:, 1:2] + torch.randn(500, 7, generator=g, dtype=F64)
    xb = z[:, 2:3] * 1.5 + 0.5 * z[:, 1:2] + torch.rand(500, 5, generator=g, dtype=F64) * torch.arange(1, 6)
    st = _stats(xa, xb)
    corr = combined_corr(st, 0, 1).numpy()
    labels = np.array([0, 0, 0, 1, 2, 2, -1, 0, 1, 1, 2, 2])
    s = spectral_summary(st, labels)
    bf, se = _brute_force_random(corr, labels, 7, draws=3000, seed=1)
    assert abs(s["random_within_cluster_corr"] - bf) < max(4 * se, 1e-3)
    # the baseline is the between-net mean, not the overall mean (which this data separates)
    off = corr[~np.eye(12, dtype=bool)].mean()
    assert abs(bf - off) > 10 * se
    # Monte Carlo option agrees too
    mc = spectral_summary(st, labels, n_random=3000, seed=2)
    assert mc["random_method"] == "monte_carlo"
    assert abs(mc["random_within_cluster_corr"] - bf) < max(6 * se, 1e-3)


# --- hierarchical clustering -----------------------------------------------------------------
def test_hierarchical_first_merges_are_planted_pairs():
    g = torch.Generator().manual_seed(7)
    n_units = 30
    xa = torch.randn(2000, n_units, generator=g, dtype=F64)
    pi = torch.randperm(n_units, generator=g)
    xb = xa[:, pi] + 0.1 * torch.randn(2000, n_units, generator=g, dtype=F64)  # b unit k = a unit pi(k)
    st = _stats(xa, xb)
    res = hierarchical_merges(st)
    assert res.method == "average" and res.Z.shape == (2 * n_units - 1, 4)
    assert res.first_merges_cross == n_units and res.first_merges_same == 0
    assert res.cross_fraction == 1.0
    assert {(p.a_unit, p.b_unit) for p in res.cross_pairs} == {(int(pi[k]), k) for k in range(n_units)}
    dists = [p.distance for p in res.cross_pairs]
    assert dists == sorted(dists) and max(dists) < 0.05
    assert sorted(res.leaves.tolist()) == list(range(2 * n_units))
    # the same from the plain matrix, with any linkage valid on 1 - corr
    res2 = hierarchical_merges(combined_corr(st, 0, 1), n_a=n_units, method="complete")
    assert {(p.a_unit, p.b_unit) for p in res2.cross_pairs} == {(int(pi[k]), k) for k in range(n_units)}


def test_hierarchical_counts_same_net_merges():
    g = torch.Generator().manual_seed(8)
    base = torch.randn(1000, 8, generator=g, dtype=F64)
    extra = torch.randn(1000, 1, generator=g, dtype=F64)
    # a: 8 units copied by b, plus two near-duplicates of a unit nobody in b has
    xa = torch.cat([base, extra, extra + 0.05 * torch.randn(1000, 1, generator=g, dtype=F64)], 1)
    xb = base + 0.1 * torch.randn(1000, 8, generator=g, dtype=F64)
    res = hierarchical_merges(_stats(xa, xb))
    assert (res.first_merges_cross, res.first_merges_same) == (8, 1)
    assert res.cross_fraction == pytest.approx(8 / 9)
    assert {(p.a_unit, p.b_unit) for p in res.cross_pairs} == {(k, k) for k in range(8)}


# --- dead units ------------------------------------------------------------------------------
def test_dead_units_do_not_break_anything():
    xa, xb, truth = _planted_groups(seed=11, per_group=6)
    xa[:, [0, 5]] = 0.0  # never-firing units
    xb[:, 3] = 2.5  # a constant unit
    st = _stats(xa, xb)
    dead = np.zeros(60, dtype=bool)
    dead[[0, 5, 33]] = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = combined_corr(st, 0, 1)
        assert torch.isfinite(c).all()
        for affinity in AFFINITIES:
            labels = spectral_clusters(st, 0, 1, 5, affinity=affinity)
            assert (labels[dead] == -1).all() and (labels[~dead] >= 0).all()
            assert adjusted_rand_score(truth[~dead], labels[~dead]) >= 0.9
            s = spectral_summary(st, labels)
            for key in ("within_cluster_corr", "random_within_cluster_corr", "shared_fraction"):
                assert np.isfinite(s[key])
            assert s["boundaries"][-1] == 57 and set(s["order"][57:].tolist()) == {0, 5, 33}
        res = hierarchical_merges(st)
    assert np.isfinite(res.Z).all()
    np.testing.assert_array_equal(res.dead, dead)
    assert all(p.a_unit not in (0, 5) and p.b_unit != 3 for p in res.cross_pairs)
    # a dead unit is at distance 1 from all: it joins the tree at height >= 1
    for row in res.Z:
        if int(row[0]) in (0, 5, 33) or int(row[1]) in (0, 5, 33):
            assert row[2] >= 1.0 - 1e-12


def test_all_dead_but_few_units():
    xa = torch.zeros(100, 3, dtype=F64)
    xa[:, 0] = torch.arange(100, dtype=F64)
    xb = torch.ones(100, 2, dtype=F64)
    xb[:, 1] = torch.arange(100, dtype=F64) ** 2
    st = _stats(xa, xb)
    with pytest.raises(ValueError, match="live units"):
        spectral_clusters(st, 0, 1, 3)
    labels = spectral_clusters(st, 0, 1, 2)
    np.testing.assert_array_equal(labels, [0, -1, -1, -1, 1])
    res = hierarchical_merges(st)
    assert np.isfinite(res.Z).all() and res.first_merges_cross == 1 and res.first_merges_dead >= 1


# --- bad input -------------------------------------------------------------------------------
def test_bad_input_messages():
    g = torch.Generator().manual_seed(2)
    xa, xb = torch.randn(50, 3, generator=g, dtype=F64), torch.randn(50, 4, generator=g, dtype=F64)
    st = _stats(xa, xb)
    c = combined_corr(st, 0, 1)
    with pytest.raises(ValueError, match="at least 2"):
        spectral_clusters(st, 0, 1, 1)
    with pytest.raises(ValueError, match="exceeds the number of live units"):
        spectral_clusters(st, 0, 1, 8)
    with pytest.raises(ValueError, match="affinity must be one of"):
        spectral_clusters(st, 0, 1, 2, affinity="rbf")
    with pytest.raises(ValueError, match="assign_labels must be one of"):
        spectral_clusters(st, 0, 1, 2, assign_labels="qr")
    with pytest.raises(ValueError, match="method must be one of"):
        hierarchical_merges(st, method="ward")
    with pytest.raises(ValueError, match="n_a .* is required"):
        hierarchical_merges(c)
    with pytest.raises(ValueError, match="n_a must be in 1..6"):
        spectral_summary(c, np.zeros(7, dtype=int), n_a=7)
    with pytest.raises(ValueError, match="does not match"):
        hierarchical_merges(st, n_a=4)
    with pytest.raises(ValueError, match="one entry per unit"):
        spectral_summary(st, np.zeros(6, dtype=int))
    with pytest.raises(ValueError, match="square"):
        spectral_clusters_from_corr(np.zeros((3, 4)), 2)
    bad = c.clone()
    bad[0, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        hierarchical_merges(bad, n_a=3)
    asym = c.clone()
    asym[0, 1] += 0.5
    with pytest.raises(ValueError, match="not symmetric"):
        hierarchical_merges(asym, n_a=3)
    with pytest.raises(ValueError, match="outside"):
        spectral_clusters_from_corr(2 * torch.eye(4), 2)
    st3 = _stats(xa, xb, xa)
    with pytest.raises(ValueError, match="holds 3 nets"):
        hierarchical_merges(st3)
    with pytest.raises(ValueError, match="with a correlation matrix pass n_a"):
        hierarchical_merges(c, a=0, b=1)
    assert hierarchical_merges(st3, a=2, b=0).first_merges_cross == 3  # net 2 is a copy of net 0
