"""`evaluate_pair`: every functional-convergence number of one member pair, sharing passes.

One layer-by-layer pass of both members over the probe batches gives their losses and
accuracies, the post-ReLU moments (unless the caller has them), the activation matching, the
endpoints' pre-ReLU statistics (REPAIR's targets), conv1's linear outputs (reused by every
interpolated net) and every stitched net (a's layer-L taps are at hand when layer L is). Then
each method's interpolated nets are run at the interior t values (t = 0 and 1 are the members
themselves, for every method: an aligned member computes the member's function).

Metric keys (the monitor appends ``/m{a}-m{b}`` per pair; `average_scalars` gives the pair mean):
  func/barrier/{naive,matched,repair,weight}
  func/mid_acc/{naive,matched,repair,weight}
  func/{layer}/stitch_acc/{perm,lstsq,trained}
  func/{layer}/stitch_penalty/{perm,lstsq,trained}
Arrays (npz): func/curve/t, func/curve/loss/{method}, func/curve/acc/{method}.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from convergent.functional._run import (
    as_probe,
    channel_mean_var,
    channels_last,
    forward_layerwise,
    layer_steps,
    score,
    working_copy,
)
from convergent.functional.interpolate import (
    DEFAULT_POINTS,
    METHODS,
    Curve,
    CurveSummaries,
    Interpolation,
    PreStats,
    _check_pair,
    repair_correction,
    t_values,
)
from convergent.functional.permute import HIDDEN, assign, pair_corr, permute, unit_blocks, weight_perms
from convergent.functional.stitch import STITCH_MAPS, StitchMap, lstsq_map, perm_map, stitched_score, trained_map
from convergent.models.alexnet import AlexNet
from convergent.stats.moments import Moments, MomentStats

# conv1's linear outputs of both members are kept for the interpolated nets when they take at
# most this many bytes together (2 x 25 MB for the default main job); above it conv1 is rerun.
CONV1_CACHE_BYTES = 256 << 20


@dataclass
class FunctionalResult(CurveSummaries):
    """Functional-convergence numbers of one pair (a, b) on the probe set.

    t: the interpolation points; curves[method]: loss and accuracy along t; barrier[method],
    mid_acc[method]: see `convergent.functional.interpolate`. stitch_acc[layer][map],
    stitch_penalty[layer][map] (b's own accuracy minus the stitched): see
    `convergent.functional.stitch`. acc, loss: the members' own (a, b). perms: "activation" and /
    or "weight" -> layer -> LongTensor (b's unit perms[l][i] is matched to a's unit i).
    seconds: wall time per part."""

    t: np.ndarray
    curves: dict[str, Curve]
    stitch_acc: dict[str, dict[str, float]]
    stitch_penalty: dict[str, dict[str, float]]
    acc: tuple[float, float]
    loss: tuple[float, float]
    perms: dict[str, dict[str, Tensor]]
    n_images: int
    seconds: dict[str, float] = field(default_factory=dict)

    def scalars(self) -> dict[str, float]:
        """The logged values, keyed without the pair suffix."""
        out = {}
        for m, c in self.curves.items():
            out[f"func/barrier/{m}"] = c.barrier
            out[f"func/mid_acc/{m}"] = c.mid_acc
        for layer, per_map in self.stitch_acc.items():
            for name, value in per_map.items():
                out[f"func/{layer}/stitch_acc/{name}"] = value
                out[f"func/{layer}/stitch_penalty/{name}"] = self.stitch_penalty[layer][name]
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        """The loss-vs-t curves, for the npz."""
        out: dict[str, np.ndarray] = {"func/curve/t": np.asarray(self.t)} if self.curves else {}
        for m, c in self.curves.items():
            out[f"func/curve/loss/{m}"] = np.asarray(c.loss)
            out[f"func/curve/acc/{m}"] = np.asarray(c.acc)
        return out


def pair_scalars(result: FunctionalResult, a: int, b: int) -> dict[str, float]:
    """result.scalars() with the per-pair suffix ``/m{a}-m{b}``."""
    return {f"{k}/m{a}-m{b}": v for k, v in result.scalars().items()}


def average_scalars(results: Sequence[FunctionalResult]) -> dict[str, float]:
    """The pair average of every key (over the pairs that have it)."""
    values: dict[str, list[float]] = defaultdict(list)
    for r in results:
        for k, v in r.scalars().items():
            values[k].append(v)
    return {k: float(np.mean(v)) for k, v in values.items()}


def _check_options(methods, stitch_maps, layers, trained_steps) -> tuple[list[str], list[str], list[str]]:
    methods = list(methods)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown interpolation method {bad[0]!r}; choose from {', '.join(METHODS)}")
    maps = list(stitch_maps)
    bad = [m for m in maps if m not in STITCH_MAPS]
    if bad:
        raise ValueError(f"unknown stitching map {bad[0]!r}; choose from {', '.join(STITCH_MAPS)}")
    if int(trained_steps) < 0:
        raise ValueError(f"trained_steps must be >= 0, got {trained_steps}")
    if "trained" in maps and trained_steps == 0:
        raise ValueError("stitch map 'trained' needs trained_steps > 0 (the Adam steps of its fit)")
    if trained_steps > 0 and "trained" not in maps:
        maps.append("trained")
    layers = list(HIDDEN if layers is None else layers)
    bad = [l for l in layers if l not in HIDDEN]
    if bad:
        raise ValueError(f"cannot stitch at layer {bad[0]!r}; choose from {', '.join(HIDDEN)}")
    return methods, maps, layers


@torch.no_grad()
def evaluate_pair(
    net_a: AlexNet,
    net_b: AlexNet,
    batches: Iterable,
    *,
    points: int = DEFAULT_POINTS,
    layers: Sequence[str] | None = None,
    stats: Mapping[str, MomentStats] | None = None,
    pair: tuple[int, int] = (0, 1),
    methods: Sequence[str] = METHODS,
    stitch_maps: Sequence[str] = ("perm", "lstsq"),
    trained_steps: int = 0,
    trained_lr: float = 1e-3,
    clamp: bool = True,
    perms: Mapping[str, Mapping[str, Tensor]] | None = None,
    seed: int = 0,
) -> FunctionalResult:
    """Barriers, midpoint accuracies, loss curves and stitching of members (net_a, net_b) on the
    probe `batches` (an iterable of (x, y, ...), iterated once).

    points: t values (`t_values`: evenly spaced in [0, 1], plus 0.5). layers: the stitched
    layers (default conv1..fc7). stats: layer -> MomentStats of the post-ReLU taps over the same
    probe images with a and b at indices `pair` (the monitor's); layers without them are
    accumulated in the pass. methods: interpolations (naive, matched, repair, weight).
    stitch_maps: perm, lstsq (and trained, added when trained_steps > 0; Adam with trained_lr).
    clamp: clamp stitched activations at 0. perms: {"activation": ..., "weight": ...} already
    found (skips that matching). seed: weight matching's layer order.

    The members are not modified (private eval-mode copies; their modes stay as they were)."""
    methods, maps, layers = _check_options(methods, stitch_maps, layers, trained_steps)
    _check_pair(net_a, net_b)
    seconds: dict[str, float] = defaultdict(float)
    clock = time.perf_counter()
    device = next(net_a.parameters()).device
    a, b = working_copy(net_a), working_copy(net_b)
    probe = as_probe(batches, device)
    stats = dict(stats or {})
    perms = {k: dict(v) for k, v in (perms or {}).items()}
    need_act = any(m in ("matched", "repair") for m in methods) or "perm" in maps
    blocks = unit_blocks(a)
    seconds["setup"] += time.perf_counter() - clock

    # --- pass 1: both members, layer by layer -----------------------------------------------
    act: dict[str, Tensor] = dict(perms.get("activation", {}))
    pre_a, pre_b = PreStats({}, {}), PreStats({}, {})
    conv1_z: tuple[list[Tensor], list[Tensor]] | None = None
    stitch_acc: dict[str, dict[str, float]] = {}
    for sa, sb in zip(layer_steps(a, probe.xs), layer_steps(b, probe.xs)):
        layer = sa.layer
        if sa.h is None:
            logits_a, logits_b = sa.u, sb.u
            break
        clock = time.perf_counter()
        st, st_pair = stats.get(layer), pair
        needs_stats = (need_act and layer not in act) or (layer in layers and ("lstsq" in maps or "trained" in maps))
        if st is None and needs_stats:
            acc = Moments([sa.h[0].shape[1], sb.h[0].shape[1]], product_dtype=torch.float32, cka_sums=False).to(device)
            for ha, hb in zip(sa.h, sb.h):
                acc.update(ha, hb)
            st, st_pair = acc.compute(), (0, 1)
        if need_act and layer not in act:
            corr = pair_corr(st, st_pair, layer, (a.layer_width(layer), b.layer_width(layer)))
            act[layer] = assign(corr, blocks[layer])
        if "repair" in methods:
            for target, s in ((pre_a, sa), (pre_b, sb)):
                m, v, _ = channel_mean_var(s.u)
                target.mean[layer], target.std[layer] = m, v.sqrt()
        if layer == "conv1" and methods:
            size = sum(z.numel() * z.element_size() for z in sa.z + sb.z)
            if size <= CONV1_CACHE_BYTES:
                conv1_z = (sa.z, sb.z)
        seconds["endpoints"] += time.perf_counter() - clock
        clock = time.perf_counter()
        if layer in layers and maps:
            stitch_acc[layer] = {}
            built: dict[str, StitchMap] = {}
            if "perm" in maps:
                built["perm"] = perm_map(act[layer], clamp)
            if "lstsq" in maps or "trained" in maps:
                built["lstsq"] = lstsq_map(st, st_pair, clamp)
            if "trained" in maps:
                built["trained"] = trained_map(built["lstsq"], b, layer, sa.h, probe.ys, trained_steps, trained_lr)
            for name in maps:
                _, stitch_acc[layer][name] = stitched_score(b, layer, sa.h, probe.ys, built[name])
        seconds["stitch"] += time.perf_counter() - clock
    clock = time.perf_counter()
    loss_a, acc_a = score(logits_a, probe.ys)
    loss_b, acc_b = score(logits_b, probe.ys)
    del logits_a, logits_b
    stitch_penalty = {l: {m: acc_b - v for m, v in per.items()} for l, per in stitch_acc.items()}
    seconds["endpoints"] += time.perf_counter() - clock

    # --- alignment --------------------------------------------------------------------------
    if need_act:
        perms["activation"] = act
    if "weight" in methods and "weight" not in perms:
        clock = time.perf_counter()
        perms["weight"] = weight_perms(a, b, seed=seed)
        seconds["align"] += time.perf_counter() - clock

    # --- the interpolated nets --------------------------------------------------------------
    t = t_values(points)
    curves: dict[str, Curve] = {}
    interior = [float(v) for v in t[1:-1]]
    shared: dict[str, Interpolation] = {}
    z1_buffers = [torch.empty_like(z) for z in conv1_z[0]] if conv1_z is not None else []
    for method in methods:
        clock = time.perf_counter()
        which = {"naive": None, "matched": "activation", "repair": "activation", "weight": "weight"}[method]
        p = perms[which] if which else None
        if which not in shared:
            shared[which] = Interpolation(a, permute(b, p) if p else b, every_lrn=True)
        interp = shared[which]
        zb = None
        if conv1_z is not None:
            idx = p["conv1"].to(device) if p else None
            zb = [z if idx is None else channels_last(torch.index_select(z, 1, idx)) for z in conv1_z[1]]
        target_b = pre_b.permuted(p) if method == "repair" else None
        loss, acc = [loss_a], [acc_a]
        for tv in interior:
            net = interp.at(tv)
            z1 = None
            if zb is not None:  # conv1 is linear in its weights: interpolate its outputs (into reused buffers)
                z1 = [torch.lerp(za, zbi, tv, out=buf) for za, zbi, buf in zip(conv1_z[0], zb, z1_buffers)]
            correct = repair_correction(pre_a, target_b, tv) if method == "repair" else None
            logits = forward_layerwise(net, probe.xs, conv1_z=z1, correct=correct)
            lv, av = score(logits, probe.ys)
            loss.append(lv)
            acc.append(av)
        loss.append(loss_b)
        acc.append(acc_b)
        curves[method] = Curve(t.copy(), np.array(loss), np.array(acc))
        seconds[f"curve/{method}"] += time.perf_counter() - clock

    return FunctionalResult(
        t=t,
        curves=curves,
        stitch_acc=stitch_acc,
        stitch_penalty=stitch_penalty,
        acc=(acc_a, acc_b),
        loss=(loss_a, loss_b),
        perms=perms,
        n_images=probe.n,
        seconds=dict(seconds),
    )
