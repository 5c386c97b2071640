"""Linear interpolation between two members, loss barriers, and REPAIR.

interpolate(net_a, net_b, t): the net with every parameter (1 - t) theta_a + t theta_b, and every
floating-point buffer likewise (batch-norm running statistics; REPAIR then corrects what averaging
them gets wrong). Integer buffers (num_batches_tracked) are a's.

LRN adjacency. A member aligned to another stores its channels in a different order and carries
their LRN positions (`LocalResponseNorm.position`). LRN's denominator is linear in x^2 through a
0/1 channel-neighbourhood matrix M (x^2 -> M x^2), fixed but part of the function like a weight:
the interpolated net uses (1 - t) M_a + t M_b (`InterpolatedLRN`), so that it is exactly net_a at
t = 0 and exactly net_b at t = 1 and continuous in between. Where both orders agree (always for
unaligned members) it is the plain LRN.

Barrier (Frankle et al. 2020; Entezari et al. 2022): max over t of
loss(t) - ((1 - t) loss(0) + t loss(1)), loss = mean cross-entropy on the probe set; >= 0 since the
endpoints are among the t values. Midpoint accuracy: accuracy at t = 0.5 (always evaluated).

REPAIR (Jordan et al. 2023, "REnormalizing Permuted Activations for Interpolation Repair"): in the
interpolated net, every hidden unit's PRE-activation (the ReLU's input: the conv/linear output, or
the batch-norm output where there is one) is renormalised per channel, over the probe set (every
position of every image a sample), to the mean and standard deviation interpolated from the
endpoints' same units: mu_t = (1 - t) mu_a + t mu_b, sigma_t = (1 - t) sigma_a + t sigma_b
(KellerJordan/REPAIR: TrackLayer / ResetLayer wrap each conv, before its ReLU). Pre- and not post-
ReLU because that is REPAIR's definition and because variance collapse is a property of the
averaged linear map: an affine correction before the ReLU can restore both the scale and the
fraction of the unit's inputs above threshold, and it folds exactly into the layer's weight and
bias (or batch-norm weight and bias). Layers are corrected in order (conv1 first), each from the
statistics of the net already corrected below it: one layer-by-layer pass over the probe set per
t, the "exact" variant of the paper (its statistics from forward passes of the interpolated net,
here the probe set rather than the training set; fc8, the logits, is not corrected). The endpoint
statistics are the endpoints' own pre-activation moments; post-ReLU moments (what the monitor
accumulates) cannot give them.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convergent.functional._run import Affine, channel_mean_var, channel_shape, forward_layerwise, layer_steps, split_pre
from convergent.functional.permute import HIDDEN, _lrns, check_net, dense_tensors, stage
from convergent.models.alexnet import AlexNet, LocalResponseNorm

METHODS = ("naive", "matched", "repair", "weight")
DEFAULT_POINTS = 11
# A pre-activation channel whose standard deviation is below this fraction of its goal's (or
# zero) is only shifted by REPAIR, not rescaled.
TINY_STD = 1e-12


def t_values(points: int = DEFAULT_POINTS) -> np.ndarray:
    """`points` evenly spaced values in [0, 1], plus 0.5 when it is not among them."""
    if int(points) != points or points < 2:
        raise ValueError(f"points must be an integer >= 2 (t = 0 and t = 1 at least), got {points}")
    t = np.linspace(0.0, 1.0, int(points))
    if not np.any(np.isclose(t, 0.5, rtol=0, atol=1e-12)):
        t = np.sort(np.append(t, 0.5))
    t[np.isclose(t, 0.5, rtol=0, atol=1e-12)] = 0.5
    return t


@dataclass
class Curve:
    """Loss (mean cross-entropy) and accuracy on the probe set along t."""

    t: np.ndarray
    loss: np.ndarray
    acc: np.ndarray

    @property
    def barrier(self) -> float:
        """max over t of loss(t) minus the straight line between the endpoint losses."""
        line = (1 - self.t) * self.loss[0] + self.t * self.loss[-1]
        return float(np.max(self.loss - line))

    @property
    def mid_acc(self) -> float:
        return float(self.acc[int(np.flatnonzero(self.t == 0.5)[0])])

    @property
    def mid_loss(self) -> float:
        return float(self.loss[int(np.flatnonzero(self.t == 0.5)[0])])


class CurveSummaries:
    """`barrier` and `mid_acc` per method, from the `curves` of the class it is mixed into."""

    curves: dict[str, Curve]

    @property
    def barrier(self) -> dict[str, float]:
        return {m: c.barrier for m, c in self.curves.items()}

    @property
    def mid_acc(self) -> dict[str, float]:
        return {m: c.mid_acc for m, c in self.curves.items()}


@dataclass
class Barriers(CurveSummaries):
    """Curves per method, with their barrier and midpoint accuracy."""

    curves: dict[str, Curve]


def neighbourhood(position: Tensor, size: int) -> Tensor:
    """LRN's channel-neighbourhood matrix [C, C] (float): M[c, c'] = 1 when stored channel c' is
    among stored channel c's `size` neighbours in the order `position`, so that the LRN window
    is M x^2 (`channel_window(x^2, size, position)`)."""
    d = position.unsqueeze(0) - position.unsqueeze(1)  # d[c, c'] = position[c'] - position[c]
    return ((d >= -(size // 2)) & (d <= (size - 1) // 2)).float()


class InterpolatedLRN(nn.Module):
    """LRN whose neighbourhood is (1 - t) a's + t b's: x / (k + alpha / size * (M_t x^2)) ** beta,
    M_t = (1 - t) M_a + t M_b, applied as a 1x1 convolution (a matmul over channels)."""

    def __init__(self, lrn_a: LocalResponseNorm, lrn_b: LocalResponseNorm, t: float = 0.0) -> None:
        super().__init__()
        if (lrn_a.size, lrn_a.alpha, lrn_a.beta, lrn_a.k) != (lrn_b.size, lrn_b.alpha, lrn_b.beta, lrn_b.k):
            raise ValueError("cannot interpolate two LRNs with different size / alpha / beta / k")
        self.size, self.alpha, self.beta, self.k = lrn_a.size, lrn_a.alpha, lrn_a.beta, lrn_a.k
        self.register_buffer("neighbours_a", neighbourhood(lrn_a.position, self.size))
        self.register_buffer("neighbours_b", neighbourhood(lrn_b.position, self.size))
        self.set_t(t)

    def set_t(self, t: float) -> None:
        self.t = float(t)
        mix = (1 - self.t) * self.neighbours_a + self.t * self.neighbours_b
        self.mix = (self.alpha / self.size) * mix[:, :, None, None]
        self.bias = torch.full((mix.shape[0],), float(self.k), dtype=mix.dtype, device=mix.device)

    def forward(self, x: Tensor) -> Tensor:
        denominator = F.conv2d(x * x, self.mix.to(x), self.bias.to(x))  # k + M_t x^2 (alpha / size in M_t)
        if self.beta == 0.75:  # d ** -0.75 = d ** -0.5 * (d ** -0.5) ** 0.5: roots are ~3x faster than pow
            root = denominator.rsqrt_()
            out = x * root
            return out.mul_(root.sqrt_())
        return x / denominator.pow(self.beta)


def _check_pair(net_a: AlexNet, net_b: AlexNet) -> None:
    check_net(net_a), check_net(net_b)
    sa = {k: v.shape for k, v in dense_tensors(net_a).items()}
    sb = {k: v.shape for k, v in dense_tensors(net_b).items()}
    if sa != sb or type(net_a) is not type(net_b):
        raise ValueError("cannot interpolate nets of different architectures (widths, groups, batch norm or classes differ)")
    lrn_a = [(l, len(_lrns(net_a, l))) for l in HIDDEN]
    if lrn_a != [(l, len(_lrns(net_b, l))) for l in HIDDEN]:
        raise ValueError("cannot interpolate nets with different LRN placement")


class Interpolation:
    """The interpolated net between `net_a` and `net_b`, rewritten in place by `at(t)` (one copy of
    the architecture, however many t values; the endpoints are not modified).

    every_lrn: make every LRN an `InterpolatedLRN`, also where both orders agree (the same
    function to float rounding, ~2x faster on the CPU); False keeps those plain LRNs."""

    def __init__(self, net_a: AlexNet, net_b: AlexNet, every_lrn: bool = False) -> None:
        _check_pair(net_a, net_b)
        self.net = copy.deepcopy(net_a)
        self.mixed: list[InterpolatedLRN] = []
        for layer in HIDDEN:
            post = stage(self.net, layer).post
            lrn_b = iter(_lrns(net_b, layer))
            for i, m in enumerate(post):
                if isinstance(m, LocalResponseNorm):
                    other = next(lrn_b)
                    if every_lrn or not torch.equal(m.position, other.position.to(m.position.device)):
                        post[i] = InterpolatedLRN(m, other)
                        self.mixed.append(post[i])
        named_a = dict(net_a.named_parameters()) | dict(net_a.named_buffers())
        named_b = dict(net_b.named_parameters()) | dict(net_b.named_buffers())
        self.slots = [
            (tensor, named_a[name].detach(), named_b[name].detach())
            for name, tensor in list(self.net.named_parameters()) + list(self.net.named_buffers())
            if name in named_a and tensor.is_floating_point()
        ]
        self.t: float | None = None

    @torch.no_grad()
    def at(self, t: float) -> AlexNet:
        t = float(t)
        for dst, a, b in self.slots:
            dst.copy_(a * (1 - t)).add_(b, alpha=t)
        for m in self.mixed:
            m.set_t(t)
        self.t = t
        return self.net


def interpolate(net_a: AlexNet, net_b: AlexNet, t: float) -> AlexNet:
    """A new net with parameters (1 - t) theta_a + t theta_b (see the module docstring)."""
    return Interpolation(net_a, net_b).at(t)


# --- REPAIR ------------------------------------------------------------------------------------
@dataclass
class PreStats:
    """Per-channel mean and standard deviation (float64) of a net's pre-ReLU activations."""

    mean: dict[str, Tensor]
    std: dict[str, Tensor]

    def permuted(self, perms: dict[str, Tensor] | None) -> PreStats:
        if not perms:
            return self
        return PreStats(
            {l: m[perms[l].to(m.device)] for l, m in self.mean.items()},
            {l: s[perms[l].to(s.device)] for l, s in self.std.items()},
        )


def pre_relu_stats(net: AlexNet, xs: list[Tensor]) -> PreStats:
    """Pre-ReLU channel statistics of every hidden layer of `net` over the batches `xs`."""
    mean, std = {}, {}
    for step in layer_steps(net, xs):
        if step.h is not None:
            m, v, _ = channel_mean_var(step.u)
            mean[step.layer], std[step.layer] = m, v.sqrt()
    return PreStats(mean, std)


def repair_correction(stats_a: PreStats, stats_b: PreStats, t: float, record: dict[str, Affine] | None = None):
    """`correct` callback for forward_layerwise: renormalise each layer's pre-ReLU activations to
    the interpolated endpoint statistics (REPAIR). `record` receives the (scale, shift) per layer."""

    def correct(layer: str, u: list[Tensor]) -> Affine:
        goal_mean = (1 - t) * stats_a.mean[layer] + t * stats_b.mean[layer]
        goal_std = (1 - t) * stats_a.std[layer] + t * stats_b.std[layer]
        mean, var, _ = channel_mean_var(u)
        std = var.sqrt()
        ok = std > TINY_STD * goal_std.clamp_min(TINY_STD)
        scale = torch.where(ok, goal_std / torch.where(ok, std, torch.ones_like(std)), torch.ones_like(std))
        shift = goal_mean - mean * scale
        shape = channel_shape(u[0])
        coef = (scale.to(u[0].dtype).reshape(shape), shift.to(u[0].dtype).reshape(shape))
        if record is not None:
            record[layer] = (scale, shift)
        return coef

    return correct


@torch.no_grad()
def fuse_affine(net: AlexNet, coefficients: dict[str, Affine]) -> None:
    """Fold per-channel pre-ReLU affines into each layer's batch norm (or conv/linear) in place."""
    for layer, (scale, shift) in coefficients.items():
        lin, norms, _ = split_pre(stage(net, layer))
        target = norms[-1] if norms else lin
        s, b = scale.to(target.weight.dtype), shift.to(target.weight.dtype)
        target.weight.mul_(s.reshape((-1,) + (1,) * (target.weight.dim() - 1)))
        target.bias.mul_(s).add_(b)


def repair(net_a: AlexNet, net_b: AlexNet, t: float, batches: Iterable) -> AlexNet:
    """interpolate(net_a, net_b, t) with REPAIR's corrections, computed on `batches` (an iterable
    of (x, ...) or a tensor), folded into its weights: a plain AlexNet. Align net_b first (REPAIR
    is defined on matched nets)."""
    _check_pair(net_a, net_b)
    device = next(net_a.parameters()).device
    if isinstance(batches, Tensor):
        batches = [batches]
    xs = [(b if isinstance(b, Tensor) else b[0]).to(device, torch.float32) for b in batches]
    from convergent.functional.permute import evaluating

    with torch.no_grad(), evaluating(net_a, net_b):
        sa, sb = pre_relu_stats(net_a, xs), pre_relu_stats(net_b, xs)
        net = interpolate(net_a, net_b, t).eval()
        coefficients: dict[str, Affine] = {}
        forward_layerwise(net, xs, correct=repair_correction(sa, sb, float(t), coefficients))
    fuse_affine(net, coefficients)
    return net


# --- curves ------------------------------------------------------------------------------------
def interpolation_barriers(
    net_a: AlexNet,
    net_b: AlexNet,
    batches: Iterable,
    *,
    points: int = DEFAULT_POINTS,
    methods: Sequence[str] = METHODS,
    perms: dict[str, dict[str, Tensor]] | None = None,
) -> Barriers:
    """Loss and accuracy along the interpolation from net_a to net_b on the probe `batches`
    ((x, y, ...)), for `methods`: naive (b as it is), matched (b aligned by activation matching),
    repair (matched + REPAIR), weight (b aligned by weight matching). `perms` may give the
    "activation" / "weight" permutations already found. See `evaluate_pair` for everything at once."""
    from convergent.functional.evaluate import evaluate_pair

    result = evaluate_pair(net_a, net_b, batches, points=points, methods=methods, stitch_maps=(), perms=perms)
    return Barriers(result.curves)
