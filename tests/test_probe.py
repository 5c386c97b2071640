"""One probe pass against the statistics computed directly from every image's activations: the
image groups (probe image i in group i mod G), the fit / held-out split (even / odd images), the
jackknife's leave-one-group-out statistics and the null's re-paired images; several processes'
shards sum to one process's statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from convergent.analysis.config import AnalysisConfig, IntervalConfig, NullConfig
from convergent.analysis.plan import Plan
from convergent.ensemble import build_member
from convergent.monitor.probe import ProbeRunner
from convergent.stats.null import repairing

K, M, LAYERS, G, R = 3, 23, ["conv2", "fc6"], 4, 3
WIDTHS = {"conv2": 32, "fc6": 128}
pytestmark = pytest.mark.usefixtures("one_thread")


def members():
    return [build_member({"name": "alexnet_small", "width": 0.25}, seed, 10, 1, 28) for seed in range(K)]


def plan(**overrides) -> Plan:
    config = dict(layers=LAYERS, analyses=["correlation", "cka"], probe_size=M, products="float64",
                  null=NullConfig(draws=R, pairs="all"), interval=IntervalConfig(groups=G))  # fmt: skip
    config.update(overrides)
    return Plan.build(AnalysisConfig(**config), K)


def direct_taps(nets, images):
    with torch.no_grad():
        return [{layer: t.double() for layer, t in net.eval()(images, taps=LAYERS)[1].items()} for net in nets]


def samples(x: torch.Tensor) -> np.ndarray:
    """[N, C] or [N, C, H, W] -> [samples, C]: every position of every image a sample. (The direct
    forward runs all images as one batch: float32 results differ from the pass's batches by ~1e-6.)"""
    x = x.numpy()
    return x if x.ndim == 2 else x.transpose(0, 2, 3, 1).reshape(-1, x.shape[1])


def check_moments(stats, acts: list[torch.Tensor], nets=None) -> None:
    xs = [samples(a) for a in acts]
    nets = range(len(xs)) if nets is None else nets
    assert stats.n == xs[0].shape[0]
    for i, x in zip(nets, xs):
        np.testing.assert_allclose(stats.sums[i].numpy(), x.sum(0), rtol=1e-5, atol=1e-6)
    for (i, x), (j, y) in ((p, q) for p in zip(nets, xs) for q in zip(nets, xs) if p[0] <= q[0]):
        np.testing.assert_allclose(stats.sxx[(i, j)].numpy(), x.T @ y, rtol=1e-5, atol=1e-5)


BATCHES = (5, 1, 9, 8)  # batch edges that cut through groups and leave a one-image batch


def loader(images, sizes=BATCHES, start=0):
    edges = np.cumsum((start,) + sizes)
    return [(images[lo:hi], torch.zeros(hi - lo), torch.arange(lo, hi)) for lo, hi in zip(edges[:-1], edges[1:])]


def test_groups_split_and_leave_outs_equal_direct_computation():
    nets = members()
    images = torch.randn(M, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    probe = ProbeRunner(plan(), WIDTHS).run(nets, loader(images), "cpu", full=True)
    taps = direct_taps(nets, images)
    index = torch.arange(M)
    for layer in LAYERS:
        ls = probe.layers[layer]
        check_moments(ls.all, [t[layer] for t in taps])
        check_moments(ls.fit, [t[layer][index % 2 == 0] for t in taps])
        check_moments(ls.held, [t[layer][index % 2 == 1] for t in taps])
        for g in range(G):
            check_moments(ls.groups.subset([g]), [t[layer][index % G == g] for t in taps])
            check_moments(ls.groups.leave_out(g), [t[layer][index % G != g] for t in taps])


def test_null_statistics_are_the_re_paired_images():
    """Draw d pairs member a's image i with member b's image perm_d(i) inside each batch, a cycle
    over the batch's even and over its odd images: the same as moments of the re-paired taps."""
    nets = members()
    images = torch.randn(M, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    p = plan()
    batches = loader(images)
    probe = ProbeRunner(p, WIDTHS).run(nets, batches, "cpu", full=True)
    taps = direct_taps(nets, images)
    perms = torch.cat([repairing(int(b[2][0]), len(b[2]), R, seed=0) + int(b[2][0]) for b in batches], 1)
    index = torch.arange(M)
    for d in range(R):
        assert not bool(
            (perms[d] == index)[
                torch.tensor([len(b[2]) > 2 for b in batches]).repeat_interleave(torch.tensor([len(b[2]) for b in batches]))
            ].any()
        )
        assert bool(((perms[d] % 2) == (index % 2)).all())  # even images with even, odd with odd
    for layer in LAYERS:
        ls = probe.layers[layer]
        for a, b in p.null_pairs:
            for d in range(R):
                acts = [taps[a][layer], taps[b][layer][perms[d]]]
                check_moments(ls.null((a, b), d), acts)
                even = index % 2 == 0
                check_moments(ls.null((a, b), d, groups=range(0, G, 2)), [x[even] for x in acts])


def test_shards_of_two_processes_sum_to_one_process():
    """The statistics of two shards (as two DDP ranks get them: whole batches, consecutive) summed
    are those of one pass over every batch, null included (its re-pairings depend on the batch only)."""
    nets = members()
    images = torch.randn(M, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    p = plan()
    batches = loader(images)
    one = ProbeRunner(p, WIDTHS).run(nets, batches, "cpu", full=True)
    first, second = (ProbeRunner(p, WIDTHS).run(nets, part, "cpu", full=True) for part in (batches[:2], batches[2:]))
    for layer in LAYERS:
        for state in ("n",):
            torch.testing.assert_close(
                getattr(first.layers[layer].groups, state) + getattr(second.layers[layer].groups, state),
                getattr(one.layers[layer].groups, state),
            )
        for key, block in one.layers[layer].groups.sxx.items():
            torch.testing.assert_close(
                first.layers[layer].groups.sxx[key] + second.layers[layer].groups.sxx[key], block, rtol=1e-12, atol=1e-9
            )
        for pair, rep in one.layers[layer].repaired.items():
            got = first.layers[layer].repaired[pair].sxx + second.layers[layer].repaired[pair].sxx
            torch.testing.assert_close(got, rep.sxx, rtol=1e-12, atol=1e-9)


def test_batches_of_non_consecutive_images_are_a_clear_error():
    nets = members()
    images = torch.randn(8, 1, 28, 28)
    shuffled = [(images[:4], torch.zeros(4), torch.tensor([3, 0, 1, 2]))]
    with pytest.raises(ValueError, match="consecutive probe images"):
        ProbeRunner(plan(probe_size=8), WIDTHS).run(nets, shuffled, "cpu", full=False)


def test_heavy_pair_statistics_do_not_depend_on_the_other_members():
    """Mutual-information counts and top activations of heavy pair (1, 2), computed over those two
    members only, equal those of a pass that keeps every pair (exact integer counts, same top-k)."""
    nets = members()
    images = torch.rand(M, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    batches = loader(images, (8, 8, 7))

    def run(heavy_pairs):
        p = plan(heavy_pairs=heavy_pairs, analyses=["correlation", "mutual_info", "patches"], null=NullConfig(enabled=False))
        return ProbeRunner(p, WIDTHS).run(nets, batches, "cpu", full=True)

    only, every = run([[1, 2]]), run("all")
    assert only.layers["fc6"].mi is None  # mutual information runs on conv layers by default
    for layer in ["conv2"]:
        assert set(only.layers[layer].mi.groups) == {(1, 2)}
        counts = only.layers[layer].mi.groups[(1, 2)]
        assert counts.sum() > 0 and counts.shape[0] == G
        torch.testing.assert_close(counts, every.layers[layer].mi.groups[(1, 2)], rtol=0, atol=0)
    top_only, top_every = only.layers["conv2"].top, every.layers["conv2"].top
    assert set(top_only) == {1, 2}
    for m in (1, 2):
        for got, want in zip(top_only[m], top_every[m]):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
