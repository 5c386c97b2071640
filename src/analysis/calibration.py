"""What a measure's number means: its null, its interval, its spread, its score above chance.

One code path for every measure (`calibrate`). A measure is a function ``fn(view, a, b)`` of a
statistics view (a `MomentStats` for registered measures; the analyses with other statistics,
mutual information and sparse prediction, pass their own views) and two net indices; it may return
a float or a dict of named floats (several outputs from one computation). `Views` says how to get
the statistics of every probe image, of every image but one group (the jackknife) and of a null
draw. Given the member pairs:

- ``value``: the mean over member pairs of ``fn(full view, a, b)``; ``pairs_sd`` their standard
  deviation (ddof 1; 0 with a single pair).
- ``ci_lo``, ``ci_hi``: a ``level`` (95 %) interval over probe images, a delete-a-group jackknife:
  the probe images fall into G groups (image i in group i mod G); with the pair mean recomputed
  without group g, ``theta_g``, the standard error is ``sqrt((G - 1) / G * sum (theta_g - mean)^2)``
  and the interval ``value -+ t_{G-1} * se`` (Student's t with G - 1 degrees of freedom; empty
  groups, in a probe set of fewer than G images, are not counted). It says
  how much the number would move on another probe set of the same size; it does not correct a
  measure's small-sample bias (semi-matching's maximum over partners is biased upwards).
- ``null`` and ``null_p95``: the mean and 95th percentile over R draws of the pair-averaged measure
  on randomly re-paired images (`convergent.stats.null`): the value at chance.
- ``above_null = (value - null) / (perfect - null)``: 0 at chance, 1 for identical nets.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from scipy import stats as scipy_stats

from convergent.analysis.budget import check
from convergent.analysis.measures import SampleSizeWarning

Pair = tuple[int, int]


class Views(Protocol):
    """Statistics views of one layer for `calibrate`."""

    groups: int  # jackknife groups (0: no interval)
    draws: int  # null draws (0: no null)

    def full(self) -> Any: ...

    def leave_out(self, g: int) -> Any: ...  # None: group g is empty (or its removal leaves nothing)

    def null(self, draw: int, pair: Pair) -> tuple[Any, int, int]: ...


@dataclass
class Calibrated:
    """A measure over member pairs, with its calibration (see the module docstring)."""

    per_pair: dict[Pair, float]
    ci_lo: float
    ci_hi: float
    null_draws: list[float] | None = None  # the pair-averaged null of each draw
    perfect: float = 1.0

    @property
    def value(self) -> float:
        return float(np.mean(list(self.per_pair.values())))

    @property
    def pairs_sd(self) -> float:
        values = list(self.per_pair.values())
        return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0

    @property
    def null(self) -> float | None:
        return float(np.mean(self.null_draws)) if self.null_draws else None

    @property
    def null_p95(self) -> float | None:
        return float(np.percentile(self.null_draws, 95)) if self.null_draws else None

    @property
    def above_null(self) -> float | None:
        null = self.null
        if null is None or self.perfect == null:
            return None
        return (self.value - null) / (self.perfect - null)

    def scalars(self, key: str) -> dict[str, float]:
        """The logged scalars of this measure under `key` (README "What gets logged")."""
        from convergent.analysis.registry import pair_suffix

        out = {key: self.value, f"{key}/pairs_sd": self.pairs_sd, f"{key}/ci_lo": self.ci_lo, f"{key}/ci_hi": self.ci_hi}
        out.update({f"{key}/{pair_suffix(a, b)}": v for (a, b), v in self.per_pair.items()})
        if self.null_draws:
            out[f"{key}/null"] = self.null  # type: ignore[assignment]
            out[f"{key}/null_p95"] = self.null_p95  # type: ignore[assignment]
            above = self.above_null
            if above is not None:
                out[f"{key}/above_null"] = above
        return out


def jackknife_interval(value: float, replicates: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """``value -+ t * se`` with the delete-a-group jackknife standard error of the replicates."""
    g = len(replicates)
    if g < 2:
        return value, value
    r = np.asarray(replicates, dtype=np.float64)
    se = math.sqrt((g - 1) / g * float(np.sum((r - r.mean()) ** 2)))
    t = float(scipy_stats.t.ppf(0.5 + level / 2, g - 1))
    return value - t * se, value + t * se


def _as_dict(x: float | Mapping[str, float]) -> dict[str, float]:
    return {"": float(x)} if not isinstance(x, Mapping) else {k: float(v) for k, v in x.items()}


def _replicates(fn, views: Views, pairs, null_pairs, names) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """The pair-averaged outputs without each group (jackknife) and on each null draw."""
    jack: list[dict[str, float]] = []
    for g in range(views.groups):
        check()
        view = views.leave_out(g)
        if view is None:  # an empty group is no replicate: the jackknife runs over the others
            continue
        values = [_as_dict(fn(view, *p)) for p in pairs]
        jack.append({n: float(np.mean([v[n] for v in values])) for n in names})
    draws: list[dict[str, float]] = []
    if null_pairs:
        for d in range(views.draws):
            check()
            values = [_as_dict(fn(*views.null(d, q))) for q in null_pairs]
            draws.append({n: float(np.mean([v[n] for v in values])) for n in names})
    return jack, draws


def calibrate(
    fn: Callable[[Any, int, int], float | Mapping[str, float]],
    views: Views,
    pairs: Sequence[Pair],
    null_pairs: Sequence[Pair] = (),
    level: float = 0.95,
    perfect: float | Mapping[str, float] = 1.0,
) -> Calibrated | dict[str, Calibrated]:
    """Calibrate `fn` over `pairs` (see the module docstring). The null is averaged over
    `null_pairs` (default: none; then no null). Returns one `Calibrated`, or one per output name
    when `fn` returns a dict."""
    if not pairs:
        raise ValueError("calibrate needs at least one member pair")
    full = views.full()
    per_pair = {p: _as_dict(fn(full, *p)) for p in pairs}
    names = list(next(iter(per_pair.values())))
    with warnings.catch_warnings():
        # a measure warns once, on every image; its replicates would repeat it with other counts
        warnings.simplefilter("ignore", SampleSizeWarning)
        jack, draws = _replicates(fn, views, pairs, null_pairs, names)
    out = {}
    for n in names:
        values = {p: per_pair[p][n] for p in pairs}
        mean = float(np.mean(list(values.values())))
        lo, hi = jackknife_interval(mean, [j[n] for j in jack], level)
        best = perfect[n] if isinstance(perfect, Mapping) else perfect
        out[n] = Calibrated(values, lo, hi, [d[n] for d in draws] or None, float(best))
    return out[""] if names == [""] else out
