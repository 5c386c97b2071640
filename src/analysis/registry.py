"""One registry of what an analysis step computes: analyses and measures.

An **analysis** is a class in one module (the built-in ones are in `convergent.analysis.builtin`):
it declares its config name, its options (a dataclass: the config group `analysis.<name>`), which
statistics it needs (`Needs`), whether it is heavy (full analysis steps only), the analyses whose
typed results it takes (`requires`, `optional`), the scalar keys it produces (`outputs`), and
returns a typed `Result` from `run`. The step runs analyses in dependency order, so the order of
`analysis.analyses` does not matter.

A **measure** is a pairwise similarity ``fn(stats: MomentStats, a: int, b: int) -> float`` of two
nets' units, registered under ``"family/name"`` (`register_measure`, also a decorator). Every
registered measure is computed for every analysed layer and member pair, logged as
``family/{layer}/name`` (pair average) and ``family/{layer}/name/m{a}-m{b}``, and calibrated by
one code path (`convergent.analysis.calibration`): a null from randomly re-paired images
(``/null``, ``/null_p95``), a jackknife interval over probe images (``/ci_lo``, ``/ci_hi``), the
spread over member pairs (``/pairs_sd``) and the score above chance (``/above_null``).

    from convergent.analysis import register_measure

    @register_measure("toy/mean_corr")
    def mean_corr(stats, a, b):
        return float(stats.corr(a, b).mean())

Measures also declare their properties (direction, invariances, symmetry, value of a net with
itself: the measure-property tests are generated from these declarations).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

Pair = tuple[int, int]

INVARIANCES = frozenset({"permutation", "orthogonal", "isotropic_scaling", "invertible_linear", "translation"})

#: How a declared scalar output is logged (see `key_names`):
#: "pairs": one value per member pair (``key/m{a}-m{b}``), their mean (``key``) and ``key/pairs_sd``;
#: "measure": like "pairs", plus the interval (``/ci_lo``, ``/ci_hi``) and, with the null on,
#: ``/null``, ``/null_p95`` and ``/above_null``;
#: "value": one number (``key``).
OUTPUT_KINDS = ("pairs", "measure", "value")
CALIBRATION_SUFFIXES = ("pairs_sd", "ci_lo", "ci_hi", "null", "null_p95", "above_null")


def pair_suffix(a: int, b: int) -> str:
    return f"m{a}-m{b}"


@dataclass(frozen=True)
class Output:
    """A scalar output an analysis declares: its key (``family/layer/name``) and its kind."""

    key: str
    kind: str = "pairs"

    def __post_init__(self) -> None:
        if self.kind not in OUTPUT_KINDS:
            raise ValueError(f"output kind {self.kind!r}; choose one of {OUTPUT_KINDS}")


def key_names(output: Output, pairs: Sequence[Pair], null: bool) -> list[str]:
    """Every scalar key an output expands into (the public interface, README "What gets logged")."""
    if output.kind == "value":
        return [output.key]
    keys = [output.key, f"{output.key}/pairs_sd"] + [f"{output.key}/{pair_suffix(a, b)}" for a, b in pairs]
    if output.kind == "measure":
        keys += [f"{output.key}/ci_lo", f"{output.key}/ci_hi"]
        if null:
            keys += [f"{output.key}/null", f"{output.key}/null_p95", f"{output.key}/above_null"]
    return keys


@dataclass(frozen=True)
class Needs:
    """Statistics an analysis needs besides the moments of every analysed layer (always kept)."""

    null: bool = False  # the null's re-paired cross moments (measures)
    histograms: bool = False  # unit bins and joint bin counts: a second probe pass (mutual information)
    top: bool = False  # each conv unit's top activations and where they are (unit visualisations)
    pooled: bool = False  # image-level features of every layer (cross-layer measures)
    members: bool = False  # the members themselves and the probe batches (functional analyses)

    def __or__(self, other: Needs) -> Needs:
        return Needs(*(x or y for x, y in zip(self.__dict__.values(), other.__dict__.values())))


class Result:
    """What an analysis returns: typed data (subclasses are dataclasses). `scalars()` gives the
    values of its declared outputs by key (a {pair: value} dict for "pairs", a `Calibrated` for
    "measure", a float for "value"); `arrays()` the arrays it adds to the step's npz."""

    def scalars(self) -> Mapping[str, Any]:
        return {}

    def arrays(self) -> Mapping[str, np.ndarray]:
        return {}


class Analysis:
    """Base class of an analysis (see the module docstring). Subclasses set the class attributes
    and implement `run`; `layers`, `pairs` and `outputs` have defaults that suit most."""

    name: ClassVar[str]
    heavy: ClassVar[bool] = False  # runs at full analysis steps only (step 0, every full_every-th, the end)
    needs: ClassVar[Needs] = Needs()
    requires: ClassVar[tuple[str, ...]] = ()  # analyses whose results `run` receives (run first, switched on)
    optional: ClassVar[tuple[str, ...]] = ()  # analyses whose results `run` receives when they are on
    per_layer: ClassVar[bool] = True  # run once per layer (else once per step, with every layer's stats)
    options: ClassVar[type | None] = None  # its options dataclass, the config group analysis.<name>
    description: ClassVar[str] = ""

    def layers(self, plan) -> list[str]:
        """The layers it runs on (per-layer analyses)."""
        return list(plan.layers)

    def pairs(self, plan) -> list[Pair]:
        """The member pairs it runs on: the heavy pairs for heavy analyses, else every analysed pair."""
        return list(plan.heavy_pairs if self.heavy else plan.member_pairs)

    def outputs(self, plan, layer: str | None) -> list[Output]:
        """The scalar outputs it produces for `layer` (None for per-step analyses)."""
        return []

    def run(self, ctx) -> Result:
        raise NotImplementedError


# --- measures --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Measure:
    """A registered pairwise measure and its declared properties.

    ``fn(stats, a, b, **options) -> float``; ``options(config)`` gives its options from the
    `analysis` config (built-in measures; None: no options). ``analysis``: the config analysis that
    switches it on (default: the family). ``perfect``: the value of two identical nets (1 for a
    similarity), the 1 of ``above_null = (value - null) / (perfect - null)``. ``cross_layer``: also
    used for the layer x layer view and layer identification. Properties (ReSi-style, the tests are
    generated from them): ``higher_is_similar``; ``invariances``, transformations T of either net's
    units (a subset of `INVARIANCES`) with fn(X, T(Y)) == fn(X, Y); ``symmetric``;
    ``self_similarity`` (fn(X, X) for non-degenerate X); ``value_range``; ``needs_cka_sums``;
    ``ignores_dead`` (adding units that never fire leaves the value unchanged).
    """

    name: str
    fn: Callable[..., float]
    analysis: str = ""
    perfect: float = 1.0
    options: Callable[[Any], dict] | None = None
    cross_layer: bool = False
    higher_is_similar: bool = True
    invariances: frozenset[str] = frozenset()
    symmetric: bool = True
    self_similarity: float | None = 1.0
    value_range: tuple[float, float] = (-math.inf, math.inf)
    needs_cka_sums: bool = False
    ignores_dead: bool = True  # dead (zero-variance) units of either net leave the value unchanged
    description: str = ""
    module: str = ""  # the module that registered it (a plugin's measures run whenever it is listed)

    def __post_init__(self) -> None:
        family, sep, short = self.name.partition("/")
        if not sep or not family or not short or "/" in short:
            raise ValueError(f"measure name {self.name!r} must be 'family/name' (keys: family/<layer>/name)")
        unknown = set(self.invariances) - INVARIANCES
        if unknown:
            raise ValueError(f"unknown invariances {sorted(unknown)}; choose from {sorted(INVARIANCES)}")
        if not self.analysis:
            object.__setattr__(self, "analysis", family)

    @property
    def family(self) -> str:
        return self.name.split("/")[0]

    @property
    def short(self) -> str:
        return self.name.split("/")[1]

    def key(self, layer: str) -> str:
        return f"{self.family}/{layer}/{self.short}"

    def bind(self, config) -> Callable[..., float]:
        """fn with its options from the `analysis` config."""
        if self.options is None:
            return self.fn
        opts = self.options(config)
        return lambda stats, a, b: self.fn(stats, a, b, **opts)

    def __call__(self, stats, a: int, b: int, **options) -> float:
        return self.fn(stats, a, b, **options)


@dataclass
class Registry:
    analyses: dict[str, Analysis] = field(default_factory=dict)
    measures: dict[str, Measure] = field(default_factory=dict)

    def add_analysis(self, analysis: Analysis) -> Analysis:
        name = analysis.name
        existing = self.analyses.get(name)
        if existing is not None and not isinstance(existing, MeasureFamily) and type(existing) is not type(analysis):
            raise ValueError(f"an analysis named {name!r} is already registered ({type(self.analyses[name]).__name__})")
        self.analyses[name] = analysis
        return analysis

    def add_measure(self, measure: Measure) -> Measure:
        self.measures[measure.name] = measure
        if measure.analysis not in self.analyses:
            self.add_analysis(MeasureFamily(measure.analysis))
        return measure


class MeasureFamily(Analysis):
    """The analysis that switches a family of registered measures on (e.g. ``cka``); the
    measures themselves are computed and calibrated by the step's measure runner."""

    def __init__(self, name: str) -> None:
        self.name = name  # type: ignore[misc]
        self.description = f"the registered measures of analysis {name!r}"  # type: ignore[misc]

    def run(self, ctx) -> Result:
        return Result()


REGISTRY = Registry()


def register_analysis(cls: type[Analysis]) -> type[Analysis]:
    """Class decorator: register an analysis (an instance of it) under ``cls.name``."""
    REGISTRY.add_analysis(cls())
    return cls


def register_measure(name: str, fn: Callable[..., float] | None = None, **properties):
    """Register a pairwise measure ``fn(stats, a, b) -> float`` under ``"family/name"``; usable as
    ``register_measure(name, fn, ...)`` or as a decorator ``@register_measure(name, ...)``.
    ``properties``: the fields of `Measure` (perfect, higher_is_similar, invariances, ...).
    Registering a name again replaces the measure (a reloaded plugin)."""
    module = sys._getframe(1).f_globals.get("__name__", "")

    def add(f: Callable[..., float]) -> Callable[..., float]:
        if not callable(f):
            raise TypeError(f"register_measure({name!r}, fn): fn must be callable, got {type(f).__name__}")
        inv = properties.pop("invariances", frozenset())
        REGISTRY.add_measure(Measure(name, f, invariances=frozenset(inv), module=module, **properties))
        return f

    return add if fn is None else add(fn)


def measures_of(analyses: Iterable[str]) -> list[Measure]:
    chosen = set(analyses)
    return [m for m in REGISTRY.measures.values() if m.analysis in chosen]
