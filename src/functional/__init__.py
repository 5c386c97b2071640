"""Functional convergence: do two members compute the same function once their units are matched?

Pure functions on `convergent.models.AlexNet` members and probe batches (no Lightning, W&B or
Hydra), in the style of `convergent.analysis`:

    aligned_b, perms = align(net_a, net_b, images)                  # activation matching
    aligned_b, perms = align(net_a, net_b, method="weight")         # Git Re-Basin weight matching
    net_t = interpolate(net_a, aligned_b, 0.5)                      # (1 - t) theta_a + t theta_b
    result = evaluate_pair(net_a, net_b, probe_batches)             # barriers, curves, stitching
    result.scalars()  # {"func/barrier/matched": ..., "func/conv1/stitch_acc/perm": ..., ...}

See README "Functional convergence" for what each number means and costs.
"""

from convergent.functional.evaluate import FunctionalResult, average_scalars, evaluate_pair, pair_scalars
from convergent.functional.interpolate import (
    METHODS,
    Barriers,
    Curve,
    InterpolatedLRN,
    Interpolation,
    interpolate,
    interpolation_barriers,
    repair,
    t_values,
)
from convergent.functional.permute import (
    HIDDEN,
    activation_perms,
    align,
    collect_moments,
    inverse,
    permute,
    random_perms,
    unit_blocks,
    weight_perms,
)
from convergent.functional.stitch import STITCH_MAPS, Stitching, StitchMap, lstsq_map, perm_map, stitch

__all__ = [
    "HIDDEN",
    "METHODS",
    "STITCH_MAPS",
    "Barriers",
    "Curve",
    "FunctionalResult",
    "InterpolatedLRN",
    "Interpolation",
    "StitchMap",
    "Stitching",
    "activation_perms",
    "align",
    "average_scalars",
    "collect_moments",
    "evaluate_pair",
    "interpolate",
    "interpolation_barriers",
    "inverse",
    "lstsq_map",
    "pair_scalars",
    "perm_map",
    "permute",
    "random_perms",
    "repair",
    "stitch",
    "t_values",
    "unit_blocks",
    "weight_perms",
]
