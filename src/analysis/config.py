"""The `analysis` config group: what the monitor measures, on which probe images, and when.

Plain dataclasses (no Hydra here): `convergent.config` registers them as the group's schema, and
every key's default lives only here (README's tables are generated from these classes). The
options of each analysis are the dataclass its module declares (`analysis.sparse` is
`SparseOptions` in `convergent.analysis.builtin.sparse`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from convergent.analysis.builtin.functional import FunctionalOptions
from convergent.analysis.builtin.hierarchical import HierarchicalOptions
from convergent.analysis.builtin.mutual_info import MutualInfoOptions
from convergent.analysis.builtin.patches import PatchesOptions
from convergent.analysis.builtin.similarity import CCAOptions
from convergent.analysis.builtin.sparse import SparseOptions
from convergent.analysis.builtin.spectral import SpectralOptions
from convergent.errors import ConfigError, check_choice

DEFAULT_LAYERS = ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7"]
SCHEDULE_KINDS = ("log", "every_n_steps", "every_n_epochs")
FIGURES = ("full", "ends", "none")
PRODUCTS = ("auto", "float64", "float32")


@dataclass
class ScheduleConfig:
    """When the monitor analyses (step 0 and the end of fit always)."""

    kind: str = "log"  # log (log-spaced global steps) | every_n_steps | every_n_epochs
    points_per_decade: int = 3  # log: steps 10**(i / points_per_decade) rounded: 1, 2, 5, 10, 22, 46, 100, 215, 464, ...
    first: int = 10  # log: the first of those steps analysed (steps before it sit at the initialisation during the warm-up)
    every: int = 1  # every_n_steps / every_n_epochs

    def __post_init__(self) -> None:
        check_choice(self.kind, SCHEDULE_KINDS, "analysis.schedule.kind")
        if self.every < 1 or self.points_per_decade < 1 or self.first < 1:
            raise ConfigError("analysis.schedule.every, points_per_decade and first must be >= 1")


@dataclass
class NullConfig:
    """The null: every measure on randomly re-paired probe images (README "Methods")."""

    enabled: bool = True  # compute the null of every measure (was analysis.permutation_null)
    draws: int = 8  # independent re-pairings: the null is their mean, null_p95 their 95th percentile
    pairs: Any = "first"  # member pairs it is computed on: first | all | [[0, 1], ...] (was analysis.null_pairs)
    seed: int = 0  # seed of the re-pairings

    def __post_init__(self) -> None:
        if self.draws < 1:
            raise ConfigError(f"analysis.null.draws={self.draws} must be >= 1 (or set analysis.null.enabled=false)")


@dataclass
class IntervalConfig:
    """The interval over probe images of every measure: a delete-a-group jackknife."""

    groups: int = 6  # probe image i is in group i mod groups (even: the fit/held-out split is even/odd groups)
    level: float = 0.95  # coverage of [ci_lo, ci_hi]

    def __post_init__(self) -> None:
        if self.groups < 2 or self.groups % 2:
            raise ConfigError(
                f"analysis.interval.groups={self.groups} must be even and >= 2 (its even and odd groups are the "
                "sparse predictor's fit and held-out images); 6 is a good choice"
            )
        if not 0 < self.level < 1:
            raise ConfigError(f"analysis.interval.level={self.level} must be in (0, 1)")


@dataclass
class TimeBudgetConfig:
    """Seconds an analysis step may spend; past them the work is cut short, reported as a failure, and
    training goes on."""

    analysis: float | None = 600.0  # each analysis (each layer of a per-layer one) at each step; null: no limit
    step: float | None = None  # the whole step (probe pass excluded); null: no limit

    def __post_init__(self) -> None:
        for name in ("analysis", "step"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"analysis.time_budget.{name}={value} must be positive or null")


@dataclass
class AnalysisConfig:
    """The ConvergenceMonitor's settings (config group `analysis`)."""

    layers: list[str] = field(default_factory=lambda: list(DEFAULT_LAYERS))  # layers analysed
    probe_size: int = 500  # the probe set: a fixed random sample of the validation split (probe_seed)
    probe_seed: int = 0  # seed of the probe sample (and of its order)
    batch_size: int = 250  # probe batch size
    pairs: Any = "all"  # member pairs analysed: all | first | [[0, 1], [0, 2]]
    heavy_pairs: Any = "first"  # member pairs of the heavy analyses and of the figures: first | all | [[0, 1], ...]
    analyses: Any = "all"  # all (every registered analysis) or a list of analysis names
    measures: Any = "all"  # all, or a list of measures (family/name) or families to compute
    plugins: list[str] = field(default_factory=list)  # modules imported before the run (they register measures)
    null: NullConfig = field(default_factory=NullConfig)
    interval: IntervalConfig = field(default_factory=IntervalConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    full_every: int = 5  # heavy analyses and figures at step 0, every full_every-th analysis step and the end
    figures: str = "full"  # full: at every full step | ends: step 0 and the end | none
    background_writes: bool = False  # true: figures and files by a background thread (slower on a CPU: README)
    save_checkpoints: bool = True  # checkpoints/analysis/step=<step>.ckpt at every analysis step
    products: str = "auto"  # shifted products per chunk: auto (float32) | float32 | float64; sums always float64
    max_units: int | None = None  # keep at most this many units per layer (a fixed random subset)
    memory_limit_gb: float = 8.0  # fail before training, with the estimate, if the statistics would need more
    seed: int = 0  # seed of the clustering analyses
    time_budget: TimeBudgetConfig = field(default_factory=TimeBudgetConfig)
    mutual_info: MutualInfoOptions = field(default_factory=MutualInfoOptions)
    sparse: SparseOptions = field(default_factory=SparseOptions)
    spectral: SpectralOptions = field(default_factory=SpectralOptions)
    hierarchical: HierarchicalOptions = field(default_factory=HierarchicalOptions)
    patches: PatchesOptions = field(default_factory=PatchesOptions)
    cca: CCAOptions = field(default_factory=CCAOptions)
    functional: FunctionalOptions = field(default_factory=FunctionalOptions)

    def __post_init__(self) -> None:
        from convergent.models import LAYERS

        if not self.layers:
            raise ConfigError("analysis.layers is empty; list at least one of " + ", ".join(LAYERS))
        for layer in self.layers:
            if layer not in LAYERS:
                raise ConfigError(f"analysis.layers: unknown layer {layer!r}; valid layers: {', '.join(LAYERS)}")
        if self.probe_size < 1 or self.batch_size < 1:
            raise ConfigError(f"analysis.probe_size={self.probe_size} and analysis.batch_size={self.batch_size} must be >= 1")
        if self.full_every < 1:
            raise ConfigError(f"analysis.full_every={self.full_every} must be >= 1")
        check_choice(self.figures, FIGURES, "analysis.figures")
        check_choice(self.products, PRODUCTS, "analysis.products")
        if self.max_units is not None and int(self.max_units) < 2:
            raise ConfigError(f"analysis.max_units={self.max_units} must be null or at least 2")
        if self.memory_limit_gb <= 0:
            raise ConfigError(f"analysis.memory_limit_gb={self.memory_limit_gb} must be positive")
