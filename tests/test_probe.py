"""One probe pass against the statistics computed directly from every image's activations:
the fit / held-out split (even / odd probe index) and the permutation null (member i's images
rolled by i), for consecutive and for shuffled probe indices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from convergent.ensemble import build_member
from convergent.probe import ProbeOptions, ProbeRunner

K, M, LAYERS = 3, 23, ("conv2", "fc6")


def members():
    return [build_member({"name": "alexnet_small", "width": 0.25}, seed, 10, 1, 28) for seed in range(K)]


def direct_taps(nets, images):
    with torch.no_grad():
        return [{layer: t.double() for layer, t in net.eval()(images, taps=LAYERS)[1].items()} for net in nets]


def samples(x: torch.Tensor) -> np.ndarray:
    """[N, C] or [N, C, H, W] -> [samples, C]: every position of every image a sample."""
    x = x.numpy()
    return x if x.ndim == 2 else x.transpose(0, 2, 3, 1).reshape(-1, x.shape[1])


def check_moments(stats, acts: list[torch.Tensor]) -> None:
    xs = [samples(a) for a in acts]
    assert stats.n == xs[0].shape[0]
    for i, x in enumerate(xs):
        np.testing.assert_allclose(stats.sums[i].numpy(), x.sum(0), rtol=1e-5, atol=1e-6)
        for j in range(i, len(xs)):
            np.testing.assert_allclose(stats.sxx[(i, j)].numpy(), x.T @ xs[j], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("order", ["consecutive", "shuffled"])
def test_split_and_null_statistics_equal_direct_computation(order):
    nets = members()
    images = torch.randn(M, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    index = torch.arange(M) if order == "consecutive" else torch.randperm(M, generator=torch.Generator().manual_seed(1))
    sizes = (5, 1, 9, 8)  # batch edges that cut through the shift's K - 1 boundary rows
    edges = np.cumsum((0,) + sizes)
    # A loader of (image, label, probe index); shuffled: image t of the pass has probe index index[t]
    loader = [(images[index[lo:hi]], torch.zeros(hi - lo), index[lo:hi]) for lo, hi in zip(edges[:-1], edges[1:])]
    widths = {"conv2": 32, "fc6": 128}
    runner = ProbeRunner(ProbeOptions(layers=LAYERS, mutual_info=False, pooled=False, product_dtype=torch.float64), widths, K)
    probe = runner.run(nets, loader, "cpu", full=True)

    taps = direct_taps(nets, images)  # by probe index
    even = torch.arange(M) % 2 == 0
    seen = index  # probe index of the t-th image of the pass
    for layer in LAYERS:
        ls = probe.layers[layer]
        check_moments(ls.fit, [t[layer][even] for t in taps])
        check_moments(ls.held, [t[layer][~even] for t in taps])
        # null row r (pass order): member i's image at pass position (r - i) mod M; split by r's parity
        rolled = [t[layer][seen][torch.roll(torch.arange(M), i)] for i, t in enumerate(taps)]
        rows = torch.arange(M)
        check_moments(ls.null_fit, [r[rows % 2 == 0] for r in rolled])
        check_moments(ls.null_held, [r[rows % 2 == 1] for r in rolled])


def test_heavy_pair_statistics_do_not_depend_on_the_other_members():
    """Mutual-information counts and top activations of heavy pair (1, 2), computed over those two
    members only, equal those of a pass that keeps every pair (exact integer counts, same top-k)."""
    nets = members()
    images = torch.rand(M, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    loader = [(images[lo : lo + 8], torch.zeros(8), torch.arange(lo, min(lo + 8, M))) for lo in range(0, M, 8)]
    widths = {"conv2": 32, "fc6": 128}

    def run(heavy_pairs):
        options = ProbeOptions(layers=LAYERS, heavy_pairs=heavy_pairs, null=False, mutual_info=True, top_k=3, pooled=False)
        return ProbeRunner(options, widths, K).run(nets, loader, "cpu", full=True)

    only, every = run([(1, 2)]), run(None)
    for layer in LAYERS:
        assert set(only.layers[layer].mi_counts) == {(1, 2)}
        counts = only.layers[layer].mi_counts[(1, 2)]
        assert counts.sum() > 0
        torch.testing.assert_close(counts, every.layers[layer].mi_counts[(1, 2)], rtol=0, atol=0)
    top_only, top_every = only.layers["conv2"].top, every.layers["conv2"].top
    assert set(top_only) == {1, 2}
    for m in (1, 2):
        for got, want in zip(top_only[m], top_every[m]):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
