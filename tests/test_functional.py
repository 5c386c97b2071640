"""convergent.functional: permuting a member exactly, alignment, interpolation barriers, REPAIR,
stitching and the monitor's entry point `evaluate_pair`.

Independent references: the nets' own module forward (the functional code runs its own
layer-by-layer executor), parameters averaged by a plain state_dict loop, numpy least squares,
planted permutations with a known answer, and exact properties (a net and a permuted copy of
itself compute the same function and match perfectly)."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from convergent.data import Synthetic
from convergent.functional import (
    HIDDEN,
    InterpolatedLRN,
    align,
    average_scalars,
    evaluate_pair,
    interpolate,
    interpolation_barriers,
    inverse,
    lstsq_map,
    pair_scalars,
    permute,
    random_perms,
    repair,
    stitch,
    t_values,
    unit_blocks,
)
from convergent.functional.interpolate import Curve, neighbourhood
from convergent.functional.permute import check_perms, collect_moments, dense_tensors, weight_perms
from convergent.models import AlexNet, build_model
from convergent.models.alexnet import LocalResponseNorm, channel_window
from convergent.stats import Moments
from tests.support import train_small_member

torch.set_num_threads(1)


# --- helpers ---------------------------------------------------------------------------------
def randomise_batch_norm(net: AlexNet, seed: int = 0) -> None:
    """Non-trivial batch-norm weights and running statistics (eval mode uses the latter)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(0.5 + 1.5 * torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.3)
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))


def build(variant: str, seed: int = 0, **options) -> AlexNet:
    """A randomly initialised net whose LRN is far from the identity: conv1 amplified 30x (LRN's
    alpha / size * sum x^2 of order 1), fc8 scaled so that the logits are of order 5."""
    torch.manual_seed(seed)
    size, channels = (28, 1) if variant == "alexnet_small" else (99, 3)
    net = build_model(variant, num_classes=10, in_channels=channels, input_size=size, **options)
    if options.get("batch_norm"):
        randomise_batch_norm(net, seed)
    net.eval()
    with torch.no_grad():
        conv1 = net.conv_stages.conv1.pre[0]
        conv1.weight.mul_(30)
        conv1.bias.mul_(30)
        fc8 = net.fc_stages.fc8.pre[0]
        fc8.weight.mul_(5 / float(net(inputs(net, seed=seed + 100)).abs().max()))
    return net


def inputs(net: AlexNet, n: int = 6, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # scale 3: activations large enough that LRN is far from the identity
    return 3 * torch.randn(n, net.in_channels, net.input_size, net.input_size, generator=g)


def logits(net: AlexNet, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net.eval()(x)


def l2(a: AlexNet, b: AlexNet) -> float:
    da, db = dense_tensors(a), dense_tensors(b)
    keys = [k for k in da if not k.endswith(("running_mean", "running_var"))]
    return float(sum((da[k].double() - db[k].double()).square().sum() for k in keys).sqrt())


def train_member(seed: int, data: Synthetic, steps: int = 120) -> AlexNet:
    """A member briefly trained (Adam, batch 32) on the synthetic data set."""
    return train_small_member(seed, data, steps, lambda params: torch.optim.Adam(params, lr=2e-3), batch=32)


@pytest.fixture(scope="module")
def trained():
    """Two members (seeds 0, 1) after 120 Adam steps on Synthetic (~6 s CPU together), the probe
    batches (200 validation images) and evaluate_pair's default result on them."""
    data = Synthetic(noise=1.0)
    data.setup()
    a, b = train_member(0, data), train_member(1, data)
    batches = list(data.probe_dataloader(200, 100))
    return a, b, batches, evaluate_pair(a, b, batches)


# --- LRN's channel order -----------------------------------------------------------------------
def test_lrn_in_order_matches_torch_and_reorder_is_equivariant():
    torch.manual_seed(0)
    x = 4 * torch.randn(3, 12, 5, 5)
    lrn = LocalResponseNorm(12)
    reference = torch.nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)(x)
    torch.testing.assert_close(lrn(x), reference, rtol=1e-5, atol=1e-6)
    perm = torch.randperm(12)
    lrn.reorder(perm)
    assert not lrn.in_order and torch.equal(lrn.position, perm)
    # stored channel c now holds original channel perm[c]: the same values, reordered
    torch.testing.assert_close(lrn(x[:, perm]), reference[:, perm], rtol=1e-5, atol=1e-6)
    lrn.reorder(inverse(perm))
    assert lrn.in_order  # back to the fast path
    # the order matters: an unpermuted window on permuted channels is a different function
    assert not torch.allclose(LocalResponseNorm(12)(x[:, perm]), reference[:, perm], rtol=1e-4, atol=1e-5)


def test_neighbourhood_matrix_is_the_lrn_window():
    perm = torch.randperm(10)
    sq = torch.rand(2, 10, 3, 3)
    m = neighbourhood(perm, 5)
    torch.testing.assert_close(torch.einsum("cd,ndhw->nchw", m, sq), channel_window(sq, 5, perm))
    a, b = LocalResponseNorm(10), LocalResponseNorm(10)
    b.reorder(perm)
    x = 5 * torch.randn(2, 10, 4, 4)
    torch.testing.assert_close(InterpolatedLRN(a, b, 0.0)(x), a(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(InterpolatedLRN(a, b, 1.0)(x), b(x), rtol=1e-5, atol=1e-6)


def test_old_state_dict_without_position_loads_in_stored_order():
    net = build("alexnet_small", width=0.25, lrn="after_pool")
    old = net.state_dict()
    for key in [k for k in old if k.endswith(".position")]:
        del old[key]
    for meta in old._metadata.values():  # saved before the buffer: LRN modules had version 1
        meta["version"] = 1
    fresh = build("alexnet_small", seed=5, width=0.25, lrn="after_pool")
    permuted = permute(fresh, random_perms(fresh, torch.Generator().manual_seed(0)))
    permuted.load_state_dict(old)  # strict: the hook fills in the identity
    lrns = [m for m in permuted.modules() if isinstance(m, LocalResponseNorm)]
    assert lrns and all(m.in_order and torch.equal(m.position, torch.arange(len(m.position))) for m in lrns)
    x = inputs(net)
    torch.testing.assert_close(logits(permuted, x), logits(net, x))
    # a current state dict missing the buffer is an error, not silently the identity
    current = net.state_dict()
    del current["conv_stages.conv1.post.1.position"]
    with pytest.raises(RuntimeError, match="position"):
        build("alexnet_small", width=0.25).load_state_dict(current)


def test_permuted_state_dict_round_trip_keeps_the_order():
    net = build("alexnet_small", width=0.25, lrn="before_pool")
    permuted = permute(net, random_perms(net, torch.Generator().manual_seed(1)))
    reloaded = build("alexnet_small", seed=3, width=0.25, lrn="before_pool")
    reloaded.load_state_dict(permuted.state_dict())
    assert not reloaded.conv_stages.conv1.post[0].in_order
    x = inputs(net)
    torch.testing.assert_close(logits(reloaded, x), logits(net, x), rtol=0, atol=1e-5)


# --- permutation equivalence (issue 18 "Done when") ----------------------------------------------
OPTIONS = list(itertools.product(("alexnet_small", "alexnet"), (1, 2), ("none", "before_pool", "after_pool"), (False, True)))


@pytest.mark.parametrize("variant,groups,lrn,batch_norm", OPTIONS)
def test_permuted_and_aligned_nets_compute_the_same_function(variant, groups, lrn, batch_norm):
    """For every model option: random non-identity permutations and the permutations both
    matchings find leave the logits unchanged (1e-5, float32); grouped nets stay grouped."""
    wide = (groups + batch_norm) % 2 == 1  # both widths across the options
    width = {"alexnet_small": (0.25, 0.5), "alexnet": (0.0625, 0.125)}[variant][wide]  # alexnet fc: 256 / 512
    net_b = build(variant, seed=1, width=width, groups=groups, lrn=lrn, batch_norm=batch_norm)
    net_a = build(variant, seed=2, width=width, groups=groups, lrn=lrn, batch_norm=batch_norm)
    x = inputs(net_b)
    ref = logits(net_b, x)
    perms = random_perms(net_b, torch.Generator().manual_seed(3))
    assert all(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
    candidates = [permute(net_b, perms)]
    for method in ("activation", "weight"):
        # (3 weight-matching sweeps: enough to move every layer; convergence is tested elsewhere)
        aligned, found = align(net_a, net_b, x, method, max_iter=3)
        check_perms(net_b, found)  # within blocks for grouped layers
        candidates.append(aligned)
    for c in candidates:
        torch.testing.assert_close(logits(c, x), ref, rtol=0, atol=1e-5)
        assert [m.groups for m in c.modules() if isinstance(m, torch.nn.Conv2d)] == [
            m.groups for m in net_b.modules() if isinstance(m, torch.nn.Conv2d)
        ]
    if lrn != "none":  # the test can fail: dropping the LRN order changes the function
        broken = copy.deepcopy(candidates[0])
        for m in broken.modules():
            if isinstance(m, LocalResponseNorm):
                m.reorder(inverse(m.position))
        assert (logits(broken, x) - ref).abs().max() > 1e-5


def test_unit_blocks_follow_the_groups():
    assert set(unit_blocks(build("alexnet_small", width=0.25)).values()) == {1}
    blocks = unit_blocks(build("alexnet_small", width=0.25, groups=2))
    assert blocks == {"conv1": 2, "conv2": 2, "conv3": 2, "conv4": 2, "conv5": 2, "fc6": 1, "fc7": 1}


def test_bad_permutations_are_refused():
    net = build("alexnet_small", width=0.25, groups=2)
    with pytest.raises(ValueError, match="permutation of 0..15"):
        permute(net, {"conv1": torch.zeros(16, dtype=torch.long)})
    with pytest.raises(ValueError, match="channel groups"):
        permute(net, {"conv1": torch.arange(16).flip(0)})
    with pytest.raises(ValueError, match="fc8"):
        permute(net, {"fc8": torch.arange(10)})
    with pytest.raises(ValueError, match="method must be one of"):
        align(net, net, method="cca")


# --- alignment ---------------------------------------------------------------------------------
@pytest.mark.parametrize("groups", [1, 2])
def test_matchings_recover_a_planted_permutation(groups):
    net = build("alexnet_small", width=0.25, groups=groups, batch_norm=True)
    perms = random_perms(net, torch.Generator().manual_seed(4))
    shuffled = permute(net, perms)
    aligned, found = align(net, shuffled, method="weight")
    assert all(torch.equal(found[l], inverse(perms[l])) for l in HIDDEN)
    assert l2(aligned, net) == 0.0
    x = inputs(net, n=64)
    stats = collect_moments(net, shuffled, x, HIDDEN)
    _, found = align(net, shuffled, x)
    for l in HIDDEN:  # live units are matched exactly; dead ones get some partner
        live = ~stats[l].dead(0)
        assert torch.equal(found[l][live], inverse(perms[l])[live])
        assert torch.equal(found[l].sort().values, torch.arange(len(found[l])))


def test_dead_units_still_get_partners():
    net_a, net_b = build("alexnet_small", seed=0, width=0.25), build("alexnet_small", seed=1, width=0.25)
    with torch.no_grad():
        for net in (net_a, net_b):
            net.fc_stages.fc6.pre[0].bias[:40] = -1e4  # 40 of 128 fc6 units never fire
    x = inputs(net_a, n=32)
    stats = collect_moments(net_a, net_b, x, ["fc6"])
    assert int(stats["fc6"].dead(0).sum()) >= 40
    aligned, perms = align(net_a, net_b, x)
    assert torch.equal(perms["fc6"].sort().values, torch.arange(128))
    torch.testing.assert_close(logits(aligned, x), logits(net_b, x), rtol=0, atol=1e-5)


def test_activation_matching_from_given_statistics_or_correlations():
    net_a, net_b, other = (build("alexnet_small", seed=s, width=0.25) for s in range(3))
    x = inputs(net_a, n=16)
    from_images = align(net_a, net_b, x)[1]
    # the monitor's statistics: three members, a and b at indices (2, 0)
    acc = {l: Moments([net_b.layer_width(l), other.layer_width(l), net_a.layer_width(l)]) for l in HIDDEN}
    with torch.no_grad():
        taps = [m(x, taps=HIDDEN)[1] for m in (net_b, other, net_a)]
    for l in HIDDEN:
        acc[l].update(*[t[l] for t in taps])
    stats = {l: m.compute() for l, m in acc.items()}
    from_stats = align(net_a, net_b, stats=stats, pair=(2, 0))[1]
    from_corr = align(net_a, net_b, corr={l: s.corr(2, 0) for l, s in stats.items()})[1]
    for l in HIDDEN:
        assert torch.equal(from_stats[l], from_corr[l])
        # the pass accumulates its own moments (float32 products): the same optimum, ties aside
        c = stats[l].corr(2, 0)
        rows = torch.arange(len(c))
        assert float(c[rows, from_images[l]].sum()) == pytest.approx(float(c[rows, from_stats[l]].sum()), abs=1e-4)
    with pytest.raises(ValueError, match="pass images, stats or corr"):
        align(net_a, net_b)
    with pytest.raises(ValueError, match="expected"):
        align(net_a, net_b, corr={l: torch.zeros(3, 3) for l in HIDDEN})
    subset = Moments([8, 16])
    subset.update(torch.rand(4, 8, 5, 5), torch.rand(4, 16, 5, 5))
    with pytest.raises(ValueError, match="max_units"):
        align(net_a, net_b, x, stats={"conv1": subset.compute()})


def test_weight_matching_never_scores_below_the_identity():
    """Git Re-Basin's objective sum_k <W_a, P W_b> after matching is at least the identity's and
    any random permutation's (coordinate ascent from the identity)."""
    net_a, net_b = build("alexnet_small", seed=0, width=0.25), build("alexnet_small", seed=1, width=0.25)

    def objective(perms):
        da, db = dense_tensors(net_a), dense_tensors(permute(net_b, perms))
        return sum(float((da[k].double() * db[k].double()).sum()) for k in da if not k.endswith(("mean", "var")))

    found = objective(weight_perms(net_a, net_b))
    assert found > objective({})
    assert found > max(objective(random_perms(net_b, torch.Generator().manual_seed(s))) for s in range(3))


def test_trained_members_align_closer_in_weight_space(trained):
    """Issue 18 "Done when": after matching, b's weights are closer to a's (L2 over all weights)."""
    a, b, batches, _ = trained
    before = l2(a, b)
    for method in ("activation", "weight"):
        aligned, _ = align(a, b, batches, method)
        after = l2(a, aligned)
        print(f"{method}: L2 {before:.3f} -> {after:.3f}")
        assert after < before


# --- interpolation -----------------------------------------------------------------------------
def test_t_values_always_hold_the_midpoint():
    assert np.allclose(t_values(11), np.linspace(0, 1, 11)) and 0.5 in t_values(11)
    t = t_values(4)
    assert len(t) == 5 and 0.5 in t and t[0] == 0 and t[-1] == 1
    with pytest.raises(ValueError, match="points"):
        t_values(1)


@pytest.mark.parametrize("offset", [0.0, 3.0, 1000.0])
def test_channel_statistics_match_float64(offset):
    """REPAIR's per-channel mean / variance (blocked float32 products) against float64 torch,
    including channels whose mean dwarfs their spread."""
    from convergent.functional._run import channel_mean_var

    g = torch.Generator().manual_seed(0)
    scale = torch.rand(1, 8, 1, 1, generator=g)
    maps = [torch.randn(40, 8, 30, 30, generator=g) * scale + offset * torch.rand(1, 8, 1, 1, generator=g) for _ in range(2)]
    mean, var, n = channel_mean_var([m.contiguous(memory_format=torch.channels_last) for m in maps])
    x = torch.cat(maps).double()
    assert n == 80 * 900
    torch.testing.assert_close(mean, x.mean((0, 2, 3)), rtol=0, atol=1e-5 * float(x.std((0, 2, 3)).min()))
    torch.testing.assert_close(var, x.var((0, 2, 3), correction=0), rtol=1e-4, atol=0)


def test_curve_barrier_is_the_largest_excess_over_the_chord():
    t = np.linspace(0, 1, 5)
    loss = np.array([1.0, 2.5, 3.0, 2.0, 3.0])
    c = Curve(t, loss, np.array([0.9, 0.5, 0.4, 0.6, 0.8]))
    assert c.barrier == pytest.approx(max(loss[i] - (1 - t[i]) * 1.0 - t[i] * 3.0 for i in range(5)))
    assert c.mid_acc == 0.4


@pytest.mark.parametrize("lrn", ["after_pool", "before_pool"])
def test_interpolated_net_is_each_endpoint_at_the_ends(lrn):
    net_a, net_b = build("alexnet_small", seed=0, width=0.25, lrn=lrn), build("alexnet_small", seed=1, width=0.25, lrn=lrn)
    x = inputs(net_a)
    aligned, _ = align(net_a, net_b, x)  # LRN orders now differ between the two
    assert isinstance(interpolate(net_a, aligned, 0.3).conv_stages.conv1.post[-1 if lrn == "after_pool" else 0], InterpolatedLRN)
    torch.testing.assert_close(logits(interpolate(net_a, aligned, 0.0), x), logits(net_a, x), rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(interpolate(net_a, aligned, 1.0), x), logits(net_b, x), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="different architectures"):
        interpolate(net_a, build("alexnet_small", width=0.5, lrn=lrn), 0.5)


def test_naive_midpoint_equals_averaged_parameters(trained):
    """Issue 18 "Done when": the naive midpoint accuracy equals an independent computation
    (the two members' state dicts averaged by hand, evaluated with the module's own forward)."""
    a, b, batches, result = trained
    sa, sb = a.state_dict(), b.state_dict()
    mid = AlexNet.small(num_classes=10, in_channels=1, input_size=28, width=0.25, dropout=0.5, lrn="after_pool").eval()
    mid.load_state_dict({k: (sa[k] + sb[k]) / 2 if sa[k].is_floating_point() else sa[k] for k in sa})
    correct, loss, n = 0, 0.0, 0
    with torch.no_grad():
        for x, y, _ in batches:
            out = mid(x)
            correct += int((out.argmax(1) == y).sum())
            loss += float(F.cross_entropy(out.double(), y, reduction="sum"))
            n += len(y)
    print(f"naive midpoint: accuracy {correct / n:.4f}, loss {loss / n:.5f}; evaluate_pair {result.mid_acc['naive']:.4f}")
    assert abs(result.mid_acc["naive"] - correct / n) <= 1e-6
    assert result.curves["naive"].mid_loss == pytest.approx(loss / n, rel=1e-5)


def test_barriers_of_a_net_with_itself_and_with_a_permuted_copy(trained):
    a, _, batches, _ = trained
    same = evaluate_pair(a, a, batches, points=3, stitch_maps=())
    for method, value in same.barrier.items():
        assert abs(value) < 1e-6, method
    shuffled = permute(a, random_perms(a, torch.Generator().manual_seed(7)))
    r = evaluate_pair(a, shuffled, batches, points=3, stitch_maps=())
    print("a vs permuted a:", r.barrier)
    assert abs(r.barrier["matched"]) < 1e-5 and abs(r.barrier["repair"]) < 1e-4 and abs(r.barrier["weight"]) < 1e-5
    assert r.barrier["naive"] > 0.1


def test_trained_members_matched_barrier_below_naive(trained):
    _, _, _, r = trained
    print("barriers", r.barrier, "midpoint accuracies", r.mid_acc, "own", r.acc)
    assert r.barrier["matched"] < r.barrier["naive"]
    assert r.mid_acc["matched"] > r.mid_acc["naive"]
    assert r.barrier["repair"] < r.barrier["matched"]
    for c in r.curves.values():  # the endpoints are the members themselves
        assert c.loss[0] == r.loss[0] and c.loss[-1] == r.loss[1] and c.acc[0] == r.acc[0]


def test_repair_renormalises_pre_activations_to_the_interpolated_statistics(trained):
    """REPAIR's definition, checked on the folded net with the module's own layers: every hidden
    unit's pre-ReLU mean and std over the probe equal (1 - t) a's + t b's."""
    a, b, batches, _ = trained
    aligned, _ = align(a, b, batches)
    t = 0.4
    net = repair(a, aligned, t, batches)
    x = torch.cat([bt[0] for bt in batches])

    def pre_stats(m):
        out, h = {}, x
        with torch.no_grad():
            for name in HIDDEN:
                st = m.conv_stages[name] if name in m.conv_stages else m.fc_stages[name]
                h = torch.flatten(h, 1) if name == "fc6" else h
                u = st.pre[:-1](h)  # before the ReLU
                dims = [0] + list(range(2, u.dim()))
                out[name] = (u.double().mean(dims), u.double().std(dims, correction=0))
                h = st.post(F.relu(u))
        return out

    got, sa, sb = pre_stats(net), pre_stats(a), pre_stats(aligned)
    for name in HIDDEN:
        goal_mean = (1 - t) * sa[name][0] + t * sb[name][0]
        goal_std = (1 - t) * sa[name][1] + t * sb[name][1]
        torch.testing.assert_close(got[name][0], goal_mean, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got[name][1], goal_std, rtol=1e-4, atol=1e-4)
    # and evaluate_pair's repair curve is this net's accuracy at its t values
    r = evaluate_pair(a, b, batches, points=3, methods=("repair",), stitch_maps=())
    net_mid = repair(a, aligned, 0.5, batches)
    with torch.no_grad():
        acc = float(np.mean(np.concatenate([(net_mid(bt[0]).argmax(1) == bt[1]).numpy() for bt in batches])))
    assert abs(r.mid_acc["repair"] - acc) <= 1.0 / 200 + 1e-9  # at most one image on a rounding edge


# --- stitching ---------------------------------------------------------------------------------
def test_perm_stitching_to_a_permuted_copy_is_exact(trained):
    a, _, batches, _ = trained
    perms = random_perms(a, torch.Generator().manual_seed(8))
    shuffled = permute(a, perms)
    truth = {"activation": {l: inverse(p) for l, p in perms.items()}}
    for given in (truth, None):  # the true permutation, and the one matching finds
        r = evaluate_pair(a, shuffled, batches, methods=(), stitch_maps=("perm",), perms=given)
        assert r.acc[0] == r.acc[1]
        for layer in HIDDEN:
            assert r.stitch_acc[layer]["perm"] == r.acc[1] and r.stitch_penalty[layer]["perm"] == 0.0, layer


def test_lstsq_stitching_of_a_net_with_itself_is_exact(trained):
    a, _, batches, _ = trained
    r = evaluate_pair(a, a, batches, methods=(), stitch_maps=("lstsq",))
    print("self lstsq penalties", {l: v["lstsq"] for l, v in r.stitch_penalty.items()})
    for layer in HIDDEN:
        assert abs(r.stitch_penalty[layer]["lstsq"]) <= 1.0 / 200 + 1e-9, layer  # one image at most


def test_lstsq_map_equals_numpy_least_squares(trained):
    a, b, batches, _ = trained
    x = torch.cat([bt[0] for bt in batches])
    stats = collect_moments(a, b, x, ["conv3"], product_dtype=torch.float64)
    m = lstsq_map(stats["conv3"], (0, 1), clamp=False)
    with torch.no_grad():
        ha, hb = a(x, taps=["conv3"])[1]["conv3"], b(x, taps=["conv3"])[1]["conv3"]
    xa = ha.movedim(1, -1).reshape(-1, ha.shape[1]).double().numpy()
    yb = hb.movedim(1, -1).reshape(-1, hb.shape[1]).double().numpy()
    live = xa.std(0) > 0
    design = np.hstack([xa[:, live], np.ones((len(xa), 1))])
    coef, *_ = np.linalg.lstsq(design, yb, rcond=None)
    with torch.no_grad():
        ours = m(ha).movedim(1, -1).reshape(-1, hb.shape[1]).double().numpy()
    np.testing.assert_allclose(ours, design @ coef, atol=2e-4 * float(np.abs(yb).max()))


def test_clamping_the_stitched_activations_never_moves_them_away_from_b(trained):
    a, b, batches, _ = trained
    x = torch.cat([bt[0] for bt in batches])
    for layer in ("conv2", "fc6"):
        stats = collect_moments(a, b, x, [layer])
        with torch.no_grad():
            ha, hb = a(x, taps=[layer])[1][layer], b(x, taps=[layer])[1][layer]
        raw = lstsq_map(stats[layer], (0, 1), clamp=False)(ha)
        clamped = lstsq_map(stats[layer], (0, 1), clamp=True)(ha)
        assert float(clamped.min()) >= 0.0 and float(raw.min()) < 0.0
        assert bool(((clamped - hb).abs() <= (raw - hb).abs() + 1e-7).all())
        assert float((clamped - hb).square().mean()) < float((raw - hb).square().mean())


def test_trained_members_stitch_well_above_chance(trained):
    _, _, _, r = trained
    print("stitch accuracies", r.stitch_acc, "own", r.acc)
    assert r.stitch_acc["conv1"]["perm"] > 0.4  # chance: 0.1
    assert r.stitch_acc["conv1"]["lstsq"] > 0.4


def test_trained_stitching_map_fits_the_task(trained):
    a, b, batches, _ = trained
    r = evaluate_pair(a, b, batches, methods=(), layers=["conv4"], stitch_maps=("lstsq",), trained_steps=30, trained_lr=1e-3)
    print("conv4 lstsq", r.stitch_acc["conv4"]["lstsq"], "trained", r.stitch_acc["conv4"]["trained"])
    assert r.stitch_acc["conv4"]["trained"] >= r.stitch_acc["conv4"]["lstsq"] - 0.01
    with pytest.raises(ValueError, match="trained_steps > 0"):
        evaluate_pair(a, b, batches, methods=(), stitch_maps=("trained",))


# --- the entry point ---------------------------------------------------------------------------
def test_evaluate_pair_with_the_monitors_statistics_needs_no_recomputation(trained):
    a, b, batches, result = trained
    x = torch.cat([bt[0] for bt in batches])
    st = collect_moments(b, a, x, HIDDEN)  # nets (b, a): the pair is (1, 0)
    r = evaluate_pair(a, b, batches, stats=st, pair=(1, 0), methods=("matched",))
    expected = align(a, b, stats=st, pair=(1, 0))[1]
    for l in HIDDEN:
        assert torch.equal(r.perms["activation"][l], expected[l])  # the given statistics' matching
        # ... which is the one from the pass's own float32 moments up to near-ties
        assert (r.perms["activation"][l] == result.perms["activation"][l]).float().mean() > 0.9
        for name in ("perm", "lstsq"):
            assert abs(r.stitch_acc[l][name] - result.stitch_acc[l][name]) <= 0.03, (l, name)
    assert r.barrier["matched"] == pytest.approx(result.barrier["matched"], abs=0.05)


def test_single_purpose_entry_points_agree_with_evaluate_pair(trained):
    a, b, batches, result = trained
    barriers = interpolation_barriers(a, b, batches, methods=("naive",), perms=result.perms)
    np.testing.assert_allclose(barriers.curves["naive"].loss, result.curves["naive"].loss, rtol=1e-6)
    assert barriers.mid_acc["naive"] == result.mid_acc["naive"]
    st = stitch(a, b, batches, layers=["fc7"], maps=("perm",), perms=result.perms)
    assert st.acc == {"fc7": {"perm": result.stitch_acc["fc7"]["perm"]}} and st.own_acc == result.acc[1]


def test_evaluate_pair_leaves_the_members_alone(trained):
    a, b, batches, _ = trained
    a2, b2 = copy.deepcopy(a).train(), copy.deepcopy(b).train()
    before = {k: v.clone() for k, v in a2.state_dict().items()}, {k: v.clone() for k, v in b2.state_dict().items()}
    evaluate_pair(a2, b2, batches, points=3, layers=["conv1"])
    assert a2.training and b2.training and torch.is_grad_enabled()
    for net, saved in zip((a2, b2), before):
        assert all(torch.equal(v, saved[k]) for k, v in net.state_dict().items())


def test_metric_keys_and_pair_average(trained):
    _, _, _, r = trained
    keys = set(r.scalars())
    expected = {f"func/{k}/{m}" for k in ("barrier", "mid_acc") for m in ("naive", "matched", "repair", "weight")}
    expected |= {f"func/{l}/stitch_{k}/{m}" for l in HIDDEN for k in ("acc", "penalty") for m in ("perm", "lstsq")}
    assert keys == expected
    assert set(pair_scalars(r, 0, 2)) == {f"{k}/m0-m2" for k in expected}
    avg = average_scalars([r, r])
    assert all(avg[k] == pytest.approx(v) for k, v in r.scalars().items())
    arrays = r.arrays()
    assert list(arrays["func/curve/t"]) == list(t_values(11)) and arrays["func/curve/loss/repair"].shape == (11,)
    assert all(v >= -1e-9 for k, v in r.scalars().items() if "barrier" in k)
    assert set(r.seconds) >= {"endpoints", "stitch", "curve/naive", "curve/repair"}


def test_evaluate_pair_bad_input():
    net = build("alexnet_small", width=0.25)
    batches = [(inputs(net, 4), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(ValueError, match="unknown interpolation method"):
        evaluate_pair(net, net, batches, methods=("mean",))
    with pytest.raises(ValueError, match="unknown stitching map"):
        evaluate_pair(net, net, batches, stitch_maps=("cca",))
    with pytest.raises(ValueError, match="cannot stitch at layer 'fc8'"):
        evaluate_pair(net, net, batches, layers=["fc8"])
    with pytest.raises(ValueError, match="labels"):
        evaluate_pair(net, net, [inputs(net, 4)])
    with pytest.raises(ValueError, match="no probe images"):
        evaluate_pair(net, net, [])


# --- figures -----------------------------------------------------------------------------------
def test_figures_draw_the_data(trained):
    import matplotlib.pyplot as plt

    from convergent.functional.figures import barrier_figure, convergence_figure

    _, _, _, r = trained
    fig = barrier_figure(r.curves, "step 120")
    lines = fig.axes[0].get_lines()
    assert len(lines) == 4 and np.allclose(lines[1].get_ydata(), r.curves["matched"].loss)
    plt.close(fig)
    history = {
        "align/conv2/semi_match": [(0, 0.2), (10, 0.4), (100, 0.6)],
        "cka/conv2/linear": [(0, 0.3), (100, 0.7)],
        "func/conv2/stitch_penalty/perm": [(0, 0.0), (10, 0.3), (100, 0.1)],
        "func/barrier/matched": [(10, 0.8), (100, 0.5)],
    }
    fig = convergence_figure(history, "conv2")
    top, bottom = fig.axes
    assert len(top.get_lines()) == 2 and top.get_xscale() == "log"
    assert list(top.get_lines()[0].get_xdata()) == [0.5, 10, 100]  # step 0 drawn at 0.5
    assert len(bottom.get_lines()) >= 2
    plt.close(fig)
    assert convergence_figure({}, "conv2") is None


def test_functional_imports_no_framework():
    """Like convergent.analysis: usable from a notebook without Lightning, W&B or Hydra."""
    import subprocess
    import sys

    code = (
        "import sys, convergent.functional, convergent.functional.figures;"
        "bad=[m for m in sys.modules if m.split('.')[0] in ('pytorch_lightning','lightning','wandb','hydra','omegaconf')];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"framework modules imported by convergent.functional: {out}"
