"""What a metric key is, by rules (not by lists of measures), so new measures and suffixes are
classified without touching this file.

    family/layer/measure[/stat][/m{a}-m{b}]      align/conv1/semi_match, cka/fc6/linear/null,
                                                 sparse/conv2/error/l1=0.001/m0-m1
    family/measure[/stat][/m{a}-m{b}]            layer_id/cka_linear, func/barrier/linear

- per-pair: ends in `/m{a}-m{b}`; everything else with an analysis family is a headline key
  (pair averages, their nulls, calibrated scores and intervals, functional values).
- not an analysis key at all (None from `parse_key`): no `/`, a bookkeeping first component
  (`train`, `val`, `member3`, `monitor`, `epoch`, `analysis`, ...) or a W&B-internal `_` name.
- the layer is the second component when it is one of the run's layers (`analysis.layers`) or
  looks like one (`conv3`, `fc6`); the measure is what remains (it may hold `/`: `error/l1=0`).
- stat: a calibration suffix (`CALIBRATION`) or `value`; its role says how it is shown.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

PER_PAIR = re.compile(r"/(m\d+-m\d+)$")
LAYER_NAME = re.compile(r"^(conv|fc)\d+$")
MEMBER = re.compile(r"^member\d+$")

# First components that are not analysis families: training curves, bookkeeping, media.
RUN_FAMILIES = frozenset(
    [
        "train",
        "val",
        "test",
        "epoch",
        "step",
        "monitor",
        "trainer",
        "analysis",
        "fig",
        "table",
        "over_training",
        "report",
        "system",
    ]
)

# Calibration suffixes -> role. baseline: drawn with its value (dashed / dotted); score: a curve of
# its own; spread: a within-run interval or spread, in the tables and summary.csv only.
CALIBRATION = {
    "null": "baseline",
    "null_p95": "baseline",
    "above_null": "score",
    "pairs_sd": "spread",
    "ci_lo": "spread",
    "ci_hi": "spread",
}
VALUE = "value"


@dataclass(frozen=True)
class MetricKey:
    key: str
    family: str
    layer: str | None
    measure: str
    stat: str  # "value" or a calibration suffix
    pair: str | None  # "m0-m1" for a per-pair key

    @property
    def headline(self) -> bool:
        return self.pair is None

    @property
    def role(self) -> str:
        return CALIBRATION.get(self.stat, VALUE)

    @property
    def base(self) -> str:
        """The key of the value this key belongs to (itself for a value)."""
        return "/".join(p for p in (self.family, self.layer, self.measure) if p)


def is_per_pair(key: str) -> bool:
    return PER_PAIR.search(key) is not None


def parse_key(key: str, layers: Iterable[str] = ()) -> MetricKey | None:
    """The parts of an analysis key; None for training and bookkeeping keys."""
    match = PER_PAIR.search(key)
    pair = match.group(1) if match else None
    parts = (key[: match.start()] if match else key).split("/")
    family = parts[0]
    if len(parts) < 2 or not family or family.startswith("_") or family in RUN_FAMILIES or MEMBER.match(family):
        return None
    stat = VALUE
    if len(parts) >= 3 and parts[-1] in CALIBRATION:
        stat, parts = parts[-1], parts[:-1]
    layer = None
    if len(parts) >= 3 and (parts[1] in set(layers) or LAYER_NAME.match(parts[1])):
        layer, parts = parts[1], [parts[0], *parts[2:]]
    return MetricKey(key=key, family=family, layer=layer, measure="/".join(parts[1:]), stat=stat, pair=pair)


def is_headline(key: str, layers: Iterable[str] = ()) -> bool:
    parsed = parse_key(key, layers)
    return parsed is not None and parsed.headline


# --- which headline keys are drawn together ---------------------------------------------------
@dataclass(frozen=True)
class Series:
    panel: str  # a layer, or the measure for keys without a layer
    key: str
    stat: str
    role: str  # "value", "score" (a main curve) or "baseline" (drawn with it)


@dataclass(frozen=True)
class Chart:
    """One figure / one W&B chart: per layered measure, a panel per layer; keys without a layer
    (`layer_id/*`, `func/barrier/*`) make one chart per family with a panel per measure."""

    name: str  # "align/semi_match", "align/semi_match/above_null", "layer_id"
    series: tuple[Series, ...]

    @property
    def panels(self) -> list[str]:
        return list(dict.fromkeys(s.panel for s in self.series))

    def in_panel(self, panel: str) -> list[Series]:
        return [s for s in self.series if s.panel == panel]


def _natural(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def charts(keys: Iterable[str], layers: Sequence[str] = ()) -> list[Chart]:
    """Headline keys arranged into charts: every value and score key is a main curve, each
    baseline (null, null_p95) joins its value's panel; spreads are not drawn."""
    parsed = [p for p in (parse_key(k, layers) for k in keys) if p is not None and p.headline]
    values = {p.base for p in parsed if p.role == VALUE}
    order = {layer: i for i, layer in enumerate(layers)}
    grouped: dict[str, list[Series]] = {}
    for p in parsed:
        if p.role == "spread" or (p.role == "baseline" and p.base not in values):
            continue
        main = p.role == "score"
        suffix = f"/{p.stat}" if main else ""
        name = f"{p.family}/{p.measure}{suffix}" if p.layer else f"{p.family}{suffix}"
        grouped.setdefault(name, []).append(Series(panel=p.layer or p.measure, key=p.key, stat=p.stat, role=p.role))

    def panel_rank(s: Series):
        return (order.get(s.panel, len(order)), _natural(s.panel), s.role == "baseline", s.stat)

    return [
        Chart(name, tuple(sorted(series, key=panel_rank)))
        for name, series in sorted(grouped.items(), key=lambda kv: _natural(kv[0]))
    ]
