"""Model stitching (Lenc & Vedaldi 2015; Bansal et al. 2021): member a's layer-L activations, sent
through a linear map into member b's units of layer L, feed b's own layers above L.

The stitched net is: a's stages up to layer L's ReLU (the tap), the map, then b's layer-L ``post``
(max-pool / LRN / dropout) and b's stages after it. Its accuracy on the probe set says how much of
b's function a's layer-L representation supports; the penalty is b's own accuracy minus it.

Maps (b_hat = map(a's layer-L tap), per position for conv layers: a 1x1 map, every position of
every image a sample, exactly what `convergent.stats.Moments` accumulates):
  perm    the matching permutation (`activation_perms`): b's unit perm[i] receives a's unit i. No
          fitting. For a net and a permuted copy of itself with the true permutation this is exact.
  lstsq   the least-squares map with intercept from the moments: b_hat = mu_b + (a - mu_a) W,
          W = C_aa^+ C_ab (minimum-norm, via `convergent.analysis.sparse_prediction` at l1 = 0,
          the dense end of the paper's sparse-prediction path: standardised pseudo-inverse with
          eigenvalues below 1e-10 x the largest dropped, dead a units weight 0, dead b units
          predicted by their mean). Zero extra data passes when the moments are given.
  trained optional: the lstsq map fine-tuned with Adam on b's cross-entropy over the probe
          batches for `steps` steps, b frozen (Bansal et al. train the stitching layer on the task
          loss). Off by default: it costs a forward and backward of b's upper part per step.
          Scored on the same probe batches it was trained on (an in-sample number).

Clamping at 0 (default on): b's ``post`` and next layer were trained on post-ReLU inputs (>= 0),
and a linear prediction of such a tap can be negative. Clamping projects it onto the set b's
activations live in; it never increases the error to b's true tap at any element (for y >= 0,
|max(p, 0) - y| <= |p - y|), keeps max-pool / LRN inputs in their training domain, and changes
nothing for the perm map (a's taps are already >= 0). In effect the stitched unit keeps b's ReLU.

Everything runs on private eval-mode copies, under torch.no_grad (except the trained map's fit).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from convergent.analysis.sparse import sparse_prediction
from convergent.functional._run import channels_last, forward_layerwise, score
from convergent.functional.permute import inverse
from convergent.models.alexnet import AlexNet
from convergent.stats.moments import MomentStats

STITCH_MAPS = ("perm", "lstsq", "trained")


@dataclass
class StitchMap:
    """b_hat = a[:, index] (a permutation), or b_hat = W a + bias per position ([C_b, C_a], [C_b]);
    clamped at 0 when `clamp`."""

    index: Tensor | None = None
    weight: Tensor | None = None
    bias: Tensor | None = None
    clamp: bool = True

    def __call__(self, h: Tensor) -> Tensor:
        if self.index is not None:
            out = channels_last(torch.index_select(h, 1, self.index.to(h.device)))
        elif h.dim() == 4:
            out = F.conv2d(h, self.weight[:, :, None, None].to(h), self.bias.to(h))
        else:
            out = F.linear(h, self.weight.to(h), self.bias.to(h))
        return F.relu(out) if self.clamp else out


def perm_map(perm: Tensor, clamp: bool = True) -> StitchMap:
    """b's unit j receives a's unit inverse(perm)[j], i.e. b's unit perm[i] receives a's unit i."""
    return StitchMap(index=inverse(perm.cpu()), clamp=clamp)


def lstsq_map(stats: MomentStats, pair: tuple[int, int], clamp: bool = True) -> StitchMap:
    """Least-squares map from net pair[0]'s units to net pair[1]'s (see the module docstring)."""
    fit = sparse_prediction(stats, stats, pair[0], pair[1], l1=(0.0,))
    return StitchMap(weight=fit.raw_weights[0].float(), bias=fit.intercept[0].float(), clamp=clamp)


def trained_map(
    init: StitchMap, net_b: AlexNet, layer: str, taps_a: list[Tensor], ys: list[Tensor], steps: int, lr: float = 1e-3
) -> StitchMap:
    """`init` (a linear map) fitted for `steps` Adam steps on the cross-entropy of the stitched net
    (one probe batch per step, cycling), net_b frozen. `taps_a`: a's layer-L taps per batch."""
    if init.weight is None:
        raise ValueError("the trained map starts from a linear map (lstsq), not a permutation")
    weight = init.weight.detach().clone().to(taps_a[0].device).requires_grad_(True)
    bias = init.bias.detach().clone().to(taps_a[0].device).requires_grad_(True)
    opt = torch.optim.Adam([weight, bias], lr=lr)
    with torch.enable_grad():
        for step in range(int(steps)):
            i = step % len(taps_a)
            mapped = StitchMap(weight=weight, bias=bias, clamp=init.clamp)(taps_a[i])
            logits = forward_layerwise(net_b, [mapped], start=layer)[0]
            loss = F.cross_entropy(logits, ys[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return StitchMap(weight=weight.detach(), bias=bias.detach(), clamp=init.clamp)


def stitched_score(net_b: AlexNet, layer: str, taps_a: list[Tensor], ys: list[Tensor], m: StitchMap) -> tuple[float, float]:
    """(loss, accuracy) of the stitched net on the probe batches, from a's layer-L taps."""
    with torch.no_grad():
        logits = forward_layerwise(net_b, [m(h) for h in taps_a], start=layer)
    return score(logits, ys)


@dataclass
class Stitching:
    """Stitched accuracy and penalty (b's own accuracy minus it) per layer and map."""

    acc: dict[str, dict[str, float]]
    penalty: dict[str, dict[str, float]]
    own_acc: float


def stitch(
    net_a: AlexNet,
    net_b: AlexNet,
    batches,
    *,
    layers=None,
    maps=("perm", "lstsq"),
    stats=None,
    pair: tuple[int, int] = (0, 1),
    perms=None,
    trained_steps: int = 0,
    clamp: bool = True,
) -> Stitching:
    """Stitch a's layers into b on the probe `batches` ((x, y, ...)); see the module docstring and
    `evaluate_pair` (which computes this together with the barriers, sharing one pass)."""
    from convergent.functional.evaluate import evaluate_pair

    result = evaluate_pair(
        net_a,
        net_b,
        batches,
        layers=layers,
        methods=(),
        stitch_maps=maps,
        stats=stats,
        pair=pair,
        perms=perms,
        trained_steps=trained_steps,
        clamp=clamp,
    )
    return Stitching(result.stitch_acc, result.stitch_penalty, result.acc[1])
