"""The `analysis` config group as a checked, typed object (shared by the live monitor and
`convergent-analyze`). Every key is documented in README.md ("analysis")."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from convergent.analysis.clustering import AFFINITIES, ASSIGN_LABELS, LINKAGE_METHODS
from convergent.config import ConfigError
from convergent.models import CONV_LAYERS, LAYERS

# Analyses by config name. `correlation` includes the matchings, the within-net baseline and
# dead units; the others add to it.
ANALYSES = (
    "correlation",
    "mutual_info",
    "sparse",
    "spectral",
    "hierarchical",
    "patches",
    "mean_activation",
    "cka",
    "cca",
    "procrustes",
    "cross_layer",
)
# Analyses that need a second probe pass, per-position state or seconds of solver time: they run at
# "full" analysis steps only (step 0, every `full_every`-th analysis step, the end of fit); the
# others run at every analysis step.
HEAVY = ("mutual_info", "sparse", "spectral", "hierarchical", "patches", "cross_layer")
SCHEDULE_KINDS = ("log", "every_n_steps", "every_n_epochs")
PRODUCTS = {"auto": None, "float64": torch.float64, "float32": torch.float32}
DEFAULT_L1 = (0.0, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def _layer_subset(value, layers: list[str], key: str) -> list[str] | None:
    """`all` (None), `conv` (the conv layers among `layers`) or an explicit list."""
    if value in (None, "all"):
        return None
    if value == "conv":
        return [layer for layer in layers if layer in CONV_LAYERS]
    chosen = [value] if isinstance(value, str) else list(value)
    for layer in chosen:
        if layer not in layers:
            raise ConfigError(f"{key}: {layer!r} is not in analysis.layers ({', '.join(layers)})")
    return chosen


def _pairs(value, k: int, key: str) -> list[tuple[int, int]] | None:
    """`all` (None), `first` ([(0, 1)]) or a list of [a, b] member pairs."""
    if value in (None, "all"):
        return None
    if value == "first":
        return [(0, 1)] if k > 1 else []
    try:
        pairs = sorted({(min(int(a), int(b)), max(int(a), int(b))) for a, b in value})
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r}: give `all`, `first` or a list of member pairs like [[0, 1], [0, 2]]") from None
    for a, b in pairs:
        if a == b or a < 0 or b >= k:
            raise ConfigError(f"{key}: pair [{a}, {b}] is not two different members in 0..{k - 1}")
    return pairs


@dataclass
class AnalysisSettings:
    layers: list[str]
    probe_size: int
    batch_size: int
    analyses: list[str]
    k: int
    pairs: list[tuple[int, int]] | None = None  # None: all member pairs
    null: bool = True
    null_pairs: list[tuple[int, int]] | None = field(default_factory=lambda: [(0, 1)])
    schedule_kind: str = "log"
    points_per_decade: int = 3
    every: int = 1
    full_every: int = 5
    figures: str = "full"  # full: at every full step | ends: step 0 and the end | none
    save_checkpoints: bool = True
    heavy_pairs: list[tuple[int, int]] | None = field(default_factory=lambda: [(0, 1)])
    products: str = "auto"
    max_units: int | None = None
    memory_limit_gb: float = 8.0
    mi_layers: list[str] | None = None  # None: every analysed layer
    sparse_layers: list[str] | None = None
    mi_positions: int | None = 16
    l1: tuple[float, ...] = DEFAULT_L1
    sparse_tol: float = 1e-6
    sparse_max_iter: int = 1000
    n_clusters: int = 8
    affinity: str = "abs"
    assign_labels: str = "cluster_qr"
    linkage: str = "average"
    top_k: int = 9
    patch_pairs: int = 8
    svcca_keep: float = 0.99
    cca_epsilon: float = 1e-6
    seed: int = 0

    # --- derived -----------------------------------------------------------------------------
    def product_dtype(self, device: torch.device | str = "cpu") -> torch.dtype:
        """`auto`: float64 on CUDA (fast there), float32 products on the CPU (summed in float64;
        correlations agree with float64 to ~1e-7)."""
        if self.products == "auto":
            return torch.float64 if torch.device(device).type == "cuda" else torch.float32
        return PRODUCTS[self.products]

    def on(self, name: str, full: bool = True) -> bool:
        """Is analysis `name` enabled (at a full step, or at a light one when full=False)?"""
        return name in self.analyses and (full or name not in HEAVY)

    @property
    def member_pairs(self) -> list[tuple[int, int]]:
        if self.pairs is None:
            return [(a, b) for a in range(self.k) for b in range(a + 1, self.k)]
        return list(self.pairs)

    @property
    def baseline_pairs(self) -> list[tuple[int, int]]:
        """Member pairs whose permutation null is computed (the chance level barely depends on the pair)."""
        if self.null_pairs is None:
            return self.member_pairs
        return [p for p in self.null_pairs if p in self.member_pairs]

    def layer_has(self, analysis: str, layer: str) -> bool:
        """Analyses restricted to some layers (mutual_info, sparse)."""
        chosen = {"mutual_info": self.mi_layers, "sparse": self.sparse_layers}.get(analysis)
        return chosen is None or layer in chosen

    @property
    def plotted_pairs(self) -> list[tuple[int, int]]:
        """Member pairs of the heavy analyses and of the figures."""
        if self.heavy_pairs is None:
            return self.member_pairs
        return [p for p in self.heavy_pairs if p in self.member_pairs]

    @property
    def plotted_members(self) -> list[int]:
        return sorted({i for pair in self.plotted_pairs for i in pair})

    @property
    def conv_layers(self) -> list[str]:
        return [layer for layer in self.layers if layer in CONV_LAYERS]

    # --- construction ------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: Mapping, k: int) -> AnalysisSettings:
        """Build from the `analysis` config group; a ConfigError names any bad key."""
        cfg = dict(cfg)
        layers = list(cfg.get("layers") or [])
        for layer in layers:
            if layer not in LAYERS:
                raise ConfigError(f"analysis.layers: unknown layer {layer!r}; valid layers: {', '.join(LAYERS)}")
        if not layers:
            raise ConfigError("analysis.layers is empty; list at least one of " + ", ".join(LAYERS))
        analyses = list(cfg.get("analyses") or [])
        for name in analyses:
            if name not in ANALYSES:
                raise ConfigError(f"analysis.analyses: unknown analysis {name!r}; valid analyses: {', '.join(ANALYSES)}")
        if k < 2 and analyses:
            raise ConfigError(
                f"ensemble.k={k}: between-net analyses need at least 2 members; set ensemble.k>=2 or callbacks=none"
            )
        schedule = dict(cfg.get("schedule") or {})
        kind = schedule.get("kind", "log")
        if kind not in SCHEDULE_KINDS:
            raise ConfigError(f"analysis.schedule.kind={kind!r} is not valid; choose one of: {', '.join(SCHEDULE_KINDS)}")
        sparse = dict(cfg.get("sparse") or {})
        spectral = dict(cfg.get("spectral") or {})
        hierarchical = dict(cfg.get("hierarchical") or {})
        patches = dict(cfg.get("patches") or {})
        cca = dict(cfg.get("cca") or {})
        mi = dict(cfg.get("mutual_info") or {})
        products = cfg.get("products", "auto")
        if products not in PRODUCTS:
            raise ConfigError(f"analysis.products={products!r} is not valid; choose one of: {', '.join(PRODUCTS)}")
        l1 = tuple(float(w) for w in sparse.get("l1", DEFAULT_L1))
        if any(w < 0 for w in l1):
            raise ConfigError(f"analysis.sparse.l1={list(l1)} has a negative L1 weight; L1 weights must be >= 0")
        settings = cls(
            layers=layers,
            probe_size=int(cfg.get("probe_size", 500)),
            batch_size=int(cfg.get("batch_size", 250)),
            analyses=analyses,
            k=k,
            pairs=_pairs(cfg.get("pairs", "all"), k, "analysis.pairs"),
            null=bool(cfg.get("permutation_null", True)),
            null_pairs=_pairs(cfg.get("null_pairs", "first"), k, "analysis.null_pairs"),
            schedule_kind=kind,
            points_per_decade=int(schedule.get("points_per_decade", 3)),
            every=int(schedule.get("every", 1)),
            full_every=int(cfg.get("full_every", 5)),
            figures=str(cfg.get("figures", "full")),
            save_checkpoints=bool(cfg.get("save_checkpoints", True)),
            heavy_pairs=_pairs(cfg.get("heavy_pairs", "first"), k, "analysis.heavy_pairs"),
            products=products,
            max_units=cfg.get("max_units"),
            memory_limit_gb=float(cfg.get("memory_limit_gb", 8.0)),
            mi_layers=_layer_subset(mi.get("layers", "conv"), layers, "analysis.mutual_info.layers"),
            mi_positions=mi.get("positions", 16),
            l1=l1,
            sparse_layers=_layer_subset(sparse.get("layers", "conv"), layers, "analysis.sparse.layers"),
            sparse_tol=float(sparse.get("tol", 1e-6)),
            sparse_max_iter=int(sparse.get("max_iter", 1000)),
            n_clusters=int(spectral.get("n_clusters", 8)),
            affinity=str(spectral.get("affinity", "abs")),
            assign_labels=str(spectral.get("assign_labels", "cluster_qr")),
            linkage=str(hierarchical.get("method", "average")),
            top_k=int(patches.get("top_k", 9)),
            patch_pairs=int(patches.get("pairs", 8)),
            svcca_keep=float(cca.get("svcca_keep", 0.99)),
            cca_epsilon=float(cca.get("epsilon", 1e-6)),
            seed=int(cfg.get("seed", 0)),
        )
        settings.check()
        return settings

    def check(self) -> None:
        if self.probe_size < 1 or self.batch_size < 1:
            raise ConfigError(f"analysis.probe_size={self.probe_size} and analysis.batch_size={self.batch_size} must be >= 1")
        if self.n_clusters < 2:
            raise ConfigError(f"analysis.spectral.n_clusters={self.n_clusters} must be at least 2")
        null_members = len({i for pair in self.baseline_pairs for i in pair})
        if self.null and self.probe_size < null_members:
            # the null shifts member i's probe sequence by i images: it needs an image per member
            raise ConfigError(
                f"analysis.probe_size={self.probe_size} is too small for the permutation null over {null_members} "
                "members (it needs at least one probe image per member); raise analysis.probe_size or set "
                "analysis.permutation_null=false"
            )
        if self.affinity not in AFFINITIES:
            raise ConfigError(f"analysis.spectral.affinity={self.affinity!r} is not valid; choose one of: {', '.join(AFFINITIES)}")
        if self.assign_labels not in ASSIGN_LABELS:
            raise ConfigError(
                f"analysis.spectral.assign_labels={self.assign_labels!r} is not valid; choose one of: {', '.join(ASSIGN_LABELS)}"
            )
        if self.linkage not in LINKAGE_METHODS:
            raise ConfigError(
                f"analysis.hierarchical.method={self.linkage!r} is not valid; choose one of: {', '.join(LINKAGE_METHODS)}"
            )
        if self.max_units is not None and int(self.max_units) < 2:
            raise ConfigError(f"analysis.max_units={self.max_units} must be null or at least 2")
        if not 0 < self.svcca_keep <= 1:
            raise ConfigError(f"analysis.cca.svcca_keep={self.svcca_keep} must be in (0, 1]")
        if self.figures not in ("full", "ends", "none"):
            raise ConfigError(f"analysis.figures={self.figures!r} is not valid; choose one of: full, ends, none")
        if self.top_k < 1:
            raise ConfigError(f"analysis.patches.top_k={self.top_k} must be >= 1")
        if self.every < 1 or self.points_per_decade < 1 or self.full_every < 1:
            raise ConfigError("analysis.schedule.every, schedule.points_per_decade and analysis.full_every must be >= 1")

    def check_model(self, widths: Mapping[str, int]) -> None:
        """Checks that need the model's layer widths."""
        for layer in self.layers:
            units = min(widths[layer], self.max_units or widths[layer])
            if self.on("spectral") and self.n_clusters > 2 * units:
                raise ConfigError(
                    f"analysis.spectral.n_clusters={self.n_clusters} is more than the {2 * units} units of two "
                    f"{layer} nets; lower it or drop {layer} from analysis.layers"
                )


def check_analysis_config(cfg: Mapping, k: int) -> AnalysisSettings:
    return AnalysisSettings.from_config(cfg, k)
