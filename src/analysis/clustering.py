"""Many-to-many and one-to-one structure between two nets' units, from their correlations.

Two analyses of Li et al., "Convergent Learning" (arXiv:1511.07543):

* spectral clustering (2015 version): cluster the units of both nets together on an affinity made
  from their correlations, then ask whether clusters mix the two nets and whether units of
  different nets that share a cluster are more correlated than a random assignment would give;
* hierarchical agglomerative clustering (2016 version): build the dendrogram on ``1 - corr`` and
  count, among the merges that join two single units ("first merges"), how many pair a unit of one
  net with a unit of the other (one-to-one matches) and how many join two units of the same net.

Every function takes either a :class:`MomentStats` (with net indices ``a``, ``b``) or a plain
combined correlation matrix ``[[C_aa, C_ab], [C_ba, C_bb]]`` (``n_a`` = number of a's units, which
come first). Units are numbered ``0 .. n_a + n_b - 1``, a's units first.

Dead units (zero variance) have all-zero correlation rows in a :class:`MomentStats`; in a plain
matrix a unit whose off-diagonal entries are all exactly 0 is treated as dead. Dead units are
never clustered by spectral clustering (label ``-1``), sit at distance 1 from every other unit in
the hierarchical analysis, and are left out of every summary count and mean.

Pure functions: numpy, scipy, scikit-learn and torch only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from scipy.cluster.hierarchy import leaves_list, linkage
from scipy.spatial.distance import squareform
from sklearn.cluster import SpectralClustering
from torch import Tensor

from convergent.stats.moments import MomentStats

AFFINITIES = ("abs", "shifted")
ASSIGN_LABELS = ("cluster_qr", "kmeans", "discretize")  # sklearn SpectralClustering(assign_labels=...)
# Linkages that are valid on an arbitrary (non-Euclidean) distance matrix such as 1 - corr.
LINKAGE_METHODS = ("average", "single", "complete", "weighted")
# Every affinity is floored at this value so the graph is connected (no sklearn warning); it is far
# below any correlation that can be measured and does not change the clusters.
AFFINITY_FLOOR = 1e-9
_SYMMETRY_TOL = 1e-6


# --- inputs ----------------------------------------------------------------------------------
def combined_corr(stats: MomentStats, a: int, b: int) -> Tensor:
    """The ``(C_a + C_b) x (C_a + C_b)`` correlation matrix ``[[C_aa, C_ab], [C_ba, C_bb]]``
    of nets ``a`` and ``b`` (float64, on the CPU, a's units first; dead rows/columns are 0).
    ``a == b`` is allowed (a sanity check: every unit then has a perfect copy)."""
    c_ab = stats.corr(a, b).detach().to("cpu", torch.float64)
    top = torch.cat([stats.corr(a, a).detach().to("cpu", torch.float64), c_ab], dim=1)
    bottom = torch.cat([c_ab.T, stats.corr(b, b).detach().to("cpu", torch.float64)], dim=1)
    return torch.cat([top, bottom], dim=0)


def _as_matrix(corr: Any) -> np.ndarray:
    """Validate a correlation matrix: float64 numpy copy, exactly symmetric, clipped to [-1, 1]."""
    if isinstance(corr, Tensor):
        corr = corr.detach().cpu().numpy()
    c = np.array(corr, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1] or c.shape[0] < 2:
        raise ValueError(f"correlation matrix must be square 2-D with at least 2 units, got shape {c.shape}")
    if not np.isfinite(c).all():
        raise ValueError("correlation matrix has NaN or infinite entries")
    if np.abs(c).max() > 1 + _SYMMETRY_TOL:
        raise ValueError(f"correlation matrix has entries outside [-1, 1] (max |r| = {np.abs(c).max():.6g})")
    if np.abs(c - c.T).max() > _SYMMETRY_TOL:
        raise ValueError("correlation matrix is not symmetric")
    return np.clip((c + c.T) / 2, -1.0, 1.0)


def _check_corr(corr: Any, n_a: int | None) -> tuple[np.ndarray, int]:
    """Validated combined matrix and the number of a's units."""
    c = _as_matrix(corr)
    n = c.shape[0]
    if n_a is None:
        raise ValueError("n_a (number of units of the first net) is required with a correlation matrix")
    n_a = int(n_a)
    if not 1 <= n_a <= n - 1:
        raise ValueError(f"n_a must be in 1..{n - 1} for a {n}x{n} correlation matrix, got {n_a}")
    return c, n_a


def _zero_rows(c: np.ndarray) -> np.ndarray:
    off = c.copy()
    np.fill_diagonal(off, 0.0)
    return ~off.any(axis=1)


def _resolve(
    stats_or_corr: MomentStats | Tensor | np.ndarray, n_a: int | None, a: int | None, b: int | None
) -> tuple[np.ndarray, int, np.ndarray]:
    """(combined corr as float64 numpy, n_a, dead mask) from a MomentStats or a plain matrix."""
    if isinstance(stats_or_corr, MomentStats):
        st = stats_or_corr
        if a is None or b is None:
            if st.k != 2:
                raise ValueError(f"MomentStats holds {st.k} nets: say which two with a=..., b=...")
            a, b = 0, 1
        corr = combined_corr(st, a, b)  # checks the net indices and the kept blocks
        size_a = st.sizes[a]
        if n_a is not None and int(n_a) != size_a:
            raise ValueError(f"n_a={n_a} does not match net {a}'s {size_a} units")
        c, n_a = _check_corr(corr, size_a)
        dead = torch.cat([st.dead(a), st.dead(b)]).cpu().numpy() | _zero_rows(c)
        return c, n_a, dead
    if a is not None or b is not None:
        raise ValueError("a and b select nets of a MomentStats; with a correlation matrix pass n_a")
    c, n_a = _check_corr(stats_or_corr, n_a)
    return c, n_a, _zero_rows(c)


# --- spectral clustering (many-to-many) ------------------------------------------------------
def make_affinity(corr: np.ndarray, affinity: str = "abs") -> np.ndarray:
    """Affinity from correlations: ``"abs"`` = ``|corr|`` (anti-correlated units are as related as
    correlated ones), ``"shifted"`` = ``(1 + corr) / 2`` (anti-correlated units repel). The diagonal
    is 1 and every entry is at least :data:`AFFINITY_FLOOR`."""
    if affinity == "abs":
        aff = np.abs(corr)
    elif affinity == "shifted":
        aff = (1.0 + corr) / 2.0
    else:
        raise ValueError(f"affinity must be one of {AFFINITIES}, got {affinity!r}")
    aff = np.maximum((aff + aff.T) / 2.0, AFFINITY_FLOOR)
    np.fill_diagonal(aff, 1.0)
    return aff


def spectral_clusters_from_corr(
    corr: Tensor | np.ndarray,
    n_clusters: int,
    affinity: str = "abs",
    seed: int = 0,
    assign_labels: str = "kmeans",
) -> np.ndarray:
    """Spectral clustering of all units of a combined correlation matrix (see
    :func:`spectral_clusters`). Returns int64 labels, one per unit; dead units get ``-1``."""
    c = _as_matrix(corr)
    dead = _zero_rows(c)
    return _spectral(c, dead, n_clusters, affinity, seed, assign_labels)


def spectral_clusters(
    stats: MomentStats,
    a: int,
    b: int,
    n_clusters: int,
    affinity: str = "abs",
    seed: int = 0,
    assign_labels: str = "kmeans",
) -> np.ndarray:
    """Cluster the units of nets ``a`` and ``b`` together (many-to-many matching).

    sklearn ``SpectralClustering(affinity="precomputed", random_state=seed,
    assign_labels=assign_labels)`` on :func:`make_affinity` of :func:`combined_corr`; ``affinity``
    is ``"abs"`` (default, ``|corr|``) or ``"shifted"`` (``(1 + corr) / 2``). Dead units are left
    out and labelled ``-1``. Labels are renumbered ``0..n_clusters-1`` in order of first
    appearance (a's units first), so they are deterministic for a given seed.
    Returns an int64 numpy array of length ``C_a + C_b``."""
    c, _, dead = _resolve(stats, None, a, b)
    return _spectral(c, dead, n_clusters, affinity, seed, assign_labels)


def _spectral(c: np.ndarray, dead: np.ndarray, n_clusters: int, affinity: str, seed: int, assign_labels: str) -> np.ndarray:
    if affinity not in AFFINITIES:
        raise ValueError(f"affinity must be one of {AFFINITIES}, got {affinity!r}")
    if assign_labels not in ASSIGN_LABELS:
        raise ValueError(f"assign_labels must be one of {ASSIGN_LABELS}, got {assign_labels!r}")
    n = c.shape[0]
    live = np.flatnonzero(~dead)
    n_clusters = int(n_clusters)
    if n_clusters < 2:
        raise ValueError(f"n_clusters must be at least 2, got {n_clusters}")
    if n_clusters > live.size:
        raise ValueError(f"n_clusters={n_clusters} exceeds the number of live units ({live.size} of {n}; {n - live.size} dead)")
    labels = np.full(n, -1, dtype=np.int64)
    if n_clusters == live.size:
        labels[live] = np.arange(live.size)
        return labels
    aff = make_affinity(c[np.ix_(live, live)], affinity)
    model = SpectralClustering(n_clusters=n_clusters, affinity="precomputed", random_state=seed, assign_labels=assign_labels)
    raw = model.fit_predict(aff)
    _, first = np.unique(raw, return_index=True)
    remap = {int(raw[i]): k for k, i in enumerate(sorted(first))}
    labels[live] = [remap[int(r)] for r in raw]
    return labels


def spectral_summary(
    stats_or_corr: MomentStats | Tensor | np.ndarray,
    labels: Tensor | np.ndarray,
    n_a: int | None = None,
    seed: int = 0,
    *,
    a: int | None = None,
    b: int | None = None,
    n_random: int = 0,
) -> dict[str, Any]:
    """How the clusters of :func:`spectral_clusters` mix the two nets.

    ``stats_or_corr`` is a MomentStats (nets ``a``, ``b``; default 0, 1 when it holds two nets) or
    a combined correlation matrix with ``n_a`` = number of a's units. Units with a negative label
    or dead units belong to no cluster and are ignored.

    Returns a dict:
      n_clusters, cluster_labels: the clusters (non-empty, ascending label), in block order;
      cluster_sizes, cluster_n_a, cluster_n_b: int arrays, units per cluster (all, of a, of b);
      shared_fraction: fraction of clusters holding units of both nets;
      n_shared_pairs: number of (a-unit, b-unit) pairs that share a cluster;
      within_cluster_corr: mean corr(a-unit, b-unit) over those pairs (NaN if there are none);
      within_cluster_abs_corr: the same for |corr|;
      random_within_cluster_corr / random_within_cluster_abs_corr: the expectation of the same
        means when the clustered units are dealt to clusters of the same sizes uniformly at random.
        With ``n_random=0`` (default) it is exact: given how many a- and b-units land in each
        cluster, every (a, b) pair shares a cluster with the same probability, so the expected mean
        (given at least one shared pair) is the mean over *all* clustered (a, b) pairs. With
        ``n_random > 0`` it is instead the average over that many random relabellings drawn with
        ``seed`` (draws without a shared pair are skipped);
      random_method: "exact" or "monte_carlo";
      order: int array, a permutation of all units grouping clusters (clusters in ``cluster_labels``
        order, a's units then b's within a cluster, unclustered units last), for a block heatmap
        of ``corr[order][:, order]``;
      boundaries: int array ``[0, s_1, s_1 + s_2, ..., n_clustered]``, the block edges in ``order``
        (unclustered units occupy ``boundaries[-1]:``).
    """
    c, n_a, dead = _resolve(stats_or_corr, n_a, a, b)
    n = c.shape[0]
    lab = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if lab.shape != (n,):
        raise ValueError(f"labels must have one entry per unit ({n}), got shape {lab.shape}")
    if not np.issubdtype(lab.dtype, np.integer):
        if not np.all(np.equal(np.mod(lab, 1), 0)):
            raise ValueError("labels must be integers")
    lab = lab.astype(np.int64)
    member = (lab >= 0) & ~dead
    is_a = np.arange(n) < n_a

    clusters = np.unique(lab[member])
    sizes = np.array([np.sum(member & (lab == k)) for k in clusters], dtype=np.int64)
    size_a = np.array([np.sum(member & is_a & (lab == k)) for k in clusters], dtype=np.int64)
    size_b = sizes - size_a
    shared_fraction = float(np.mean((size_a > 0) & (size_b > 0))) if clusters.size else float("nan")

    c_ab = c[:n_a, n_a:]
    ma, mb = member[:n_a], member[n_a:]
    la, lb = lab[:n_a], lab[n_a:]
    pair_ok = np.outer(ma, mb)

    def within(la_: np.ndarray, lb_: np.ndarray) -> tuple[int, float, float]:
        same = (la_[:, None] == lb_[None, :]) & pair_ok
        k = int(same.sum())
        if k == 0:
            return 0, float("nan"), float("nan")
        vals = c_ab[same]
        return k, float(vals.mean()), float(np.abs(vals).mean())

    n_pairs, w, w_abs = within(la, lb)

    if n_random <= 0:
        method = "exact"
        block = c_ab[np.ix_(ma, mb)]
        if block.size:
            rnd, rnd_abs = float(block.mean()), float(np.abs(block).mean())
        else:
            rnd = rnd_abs = float("nan")
    else:
        method = "monte_carlo"
        rng = np.random.default_rng(seed)
        idx = np.flatnonzero(member)
        acc, acc_abs, used = 0.0, 0.0, 0
        for _ in range(int(n_random)):
            perm = lab.copy()
            perm[idx] = rng.permutation(lab[idx])
            k, m, m_abs = within(perm[:n_a], perm[n_a:])
            if k:
                acc, acc_abs, used = acc + m, acc_abs + m_abs, used + 1
        rnd, rnd_abs = (acc / used, acc_abs / used) if used else (float("nan"), float("nan"))

    order = [np.flatnonzero(member & (lab == k)) for k in clusters]  # a's indices come first
    order.append(np.flatnonzero(~member))
    order_arr = np.concatenate(order).astype(np.int64)
    return {
        "n_clusters": int(clusters.size),
        "cluster_labels": clusters,
        "cluster_sizes": sizes,
        "cluster_n_a": size_a,
        "cluster_n_b": size_b,
        "shared_fraction": shared_fraction,
        "n_shared_pairs": n_pairs,
        "within_cluster_corr": w,
        "within_cluster_abs_corr": w_abs,
        "random_within_cluster_corr": rnd,
        "random_within_cluster_abs_corr": rnd_abs,
        "random_method": method,
        "order": order_arr,
        "boundaries": np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
    }


# --- hierarchical agglomerative clustering (one-to-one first merges) ------------------------
class CrossPair(NamedTuple):
    """A first merge joining unit ``a_unit`` of net a with unit ``b_unit`` of net b (indices
    within each net) at linkage distance ``distance`` (``1 - corr`` for two single units)."""

    a_unit: int
    b_unit: int
    distance: float


@dataclass
class HierarchicalResult:
    """Result of :func:`hierarchical_merges`.

    Z: scipy linkage matrix ``[n - 1, 4]`` over all units (a's first) on ``1 - corr``;
    leaves: dendrogram leaf order (``scipy.cluster.hierarchy.leaves_list``), for a heatmap;
    first_merges_cross / first_merges_same: among merges joining two single live units, how many
      join units of different nets / of the same net; first_merges_dead: such merges involving a
      dead unit (not counted in either);
    cross_fraction: cross / (cross + same) (NaN if neither);
    cross_pairs: the cross-net first merges as :class:`CrossPair`, in merge order;
    dead: bool mask of dead units (a's first).
    """

    Z: np.ndarray
    n_a: int
    n_b: int
    method: str
    first_merges_cross: int
    first_merges_same: int
    first_merges_dead: int
    cross_fraction: float
    cross_pairs: list[CrossPair] = field(default_factory=list)
    leaves: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    dead: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))


def corr_distance(corr: np.ndarray) -> np.ndarray:
    """Condensed distance vector of ``1 - corr`` (in [0, 2], zero diagonal; dead units, whose
    correlations are 0, are at distance 1 from every other unit)."""
    d = np.clip(1.0 - corr, 0.0, 2.0)
    d = (d + d.T) / 2.0
    np.fill_diagonal(d, 0.0)
    return squareform(d, checks=False)


def hierarchical_merges(
    stats_or_corr: MomentStats | Tensor | np.ndarray,
    n_a: int | None = None,
    method: str = "average",
    *,
    a: int | None = None,
    b: int | None = None,
) -> HierarchicalResult:
    """Agglomerative clustering of both nets' units on distance ``1 - corr`` with
    ``scipy.cluster.hierarchy.linkage(condensed, method)``; ``method`` is one of
    :data:`LINKAGE_METHODS` (default ``"average"``, UPGMA; centroid/median/ward need Euclidean
    distances and are refused). Counts the first merges (two single units joined) that pair the
    two nets (one-to-one matches) versus those within one net.

    ``stats_or_corr``: a MomentStats (nets ``a``, ``b``; default 0, 1 when it holds two nets) or a
    combined correlation matrix with ``n_a`` = number of a's units."""
    if method not in LINKAGE_METHODS:
        raise ValueError(f"method must be one of {LINKAGE_METHODS} (valid on 1 - corr), got {method!r}")
    c, n_a, dead = _resolve(stats_or_corr, n_a, a, b)
    n = c.shape[0]
    z = linkage(corr_distance(c), method=method)
    cross, same, with_dead = 0, 0, 0
    pairs: list[CrossPair] = []
    for i, j, dist, _ in z:
        i, j = int(i), int(j)
        if i >= n or j >= n:
            continue
        if dead[i] or dead[j]:
            with_dead += 1
            continue
        i, j = min(i, j), max(i, j)
        if i < n_a <= j:
            cross += 1
            pairs.append(CrossPair(i, j - n_a, float(dist)))
        else:
            same += 1
    total = cross + same
    return HierarchicalResult(
        Z=z,
        n_a=n_a,
        n_b=n - n_a,
        method=method,
        first_merges_cross=cross,
        first_merges_same=same,
        first_merges_dead=with_dead,
        cross_fraction=cross / total if total else float("nan"),
        cross_pairs=pairs,
        leaves=leaves_list(z).astype(np.int64),
        dead=dead,
    )
