"""What one monitor computes, resolved from the `analysis` config and the ensemble size.

`Plan.build(config, k)` imports `analysis.plugins`, resolves which analyses and measures run (in
dependency order: the order of `analysis.analyses` does not matter), which member pairs, and the
statistics the probe pass must collect. Every config mistake it finds is a one-line ConfigError.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from convergent.analysis.config import AnalysisConfig
from convergent.analysis.registry import REGISTRY, Analysis, Measure, Needs, Output, Pair, key_names
from convergent.errors import ConfigError

CONV_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5")


def resolve_pairs(value, k: int, key: str) -> list[Pair]:
    """`all`, `first` ([(0, 1)]) or a list of [a, b] member pairs, as sorted (a < b) pairs."""
    every = [(a, b) for a in range(k) for b in range(a + 1, k)]
    if value in (None, "all"):
        return every
    if value == "first":
        return every[:1]
    try:
        pairs = sorted({(min(int(a), int(b)), max(int(a), int(b))) for a, b in value})
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r}: give `all`, `first` or a list of member pairs like [[0, 1], [0, 2]]") from None
    for a, b in pairs:
        if a == b or a < 0 or b >= k:
            raise ConfigError(f"{key}: pair [{a}, {b}] is not two different members in 0..{k - 1}")
    return pairs


def resolve_layers(value, layers: Sequence[str], key: str) -> list[str]:
    """`all` (every analysed layer), `conv` (the conv layers among them) or an explicit list."""
    if value in (None, "all"):
        return list(layers)
    if value == "conv":
        return [layer for layer in layers if layer in CONV_LAYERS]
    chosen = [value] if isinstance(value, str) else list(value)
    for layer in chosen:
        if layer not in layers:
            raise ConfigError(f"{key}: {layer!r} is not in analysis.layers ({', '.join(layers)})")
    return chosen


def import_plugins(modules: Iterable[str]) -> None:
    """Import the modules of `analysis.plugins` (they register measures and analyses)."""
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as e:  # an import error of the user's module: name it and the cause
            raise ConfigError(
                f"analysis.plugins: cannot import {module!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                "give an importable module name (on sys.path or PYTHONPATH)"
            ) from e


def _ordered(names: set[str]) -> list[str]:
    """Analyses in dependency order (requires and optional first), ties by name: independent of
    the order the config lists them in."""
    out: list[str] = []
    seen: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in seen:
            return
        if name in path:
            raise ConfigError(f"analyses depend on each other in a cycle: {' -> '.join((*path, name))}")
        a = REGISTRY.analyses[name]
        for dep in sorted((*a.requires, *a.optional)):
            if dep in names:
                visit(dep, (*path, name))
        seen.add(name)
        out.append(name)

    for name in sorted(names):
        visit(name, ())
    return out


@dataclass
class Plan:
    config: AnalysisConfig
    k: int
    analyses: list[Analysis]  # switched on, in dependency order
    measures: list[Measure]  # registered measures switched on
    member_pairs: list[Pair]
    heavy_pairs: list[Pair]
    null_pairs: list[Pair]
    widths: dict[str, int] = field(default_factory=dict)  # units per layer (after max_units), once known

    # --- construction ------------------------------------------------------------------------
    @classmethod
    def build(cls, config: AnalysisConfig, k: int) -> Plan:
        import convergent.analysis.builtin  # noqa: F401 - registers the built-in analyses and measures

        import_plugins(config.plugins)
        valid = sorted(REGISTRY.analyses)
        if config.analyses in (None, "all"):
            chosen = set(valid)
        else:
            chosen = set([config.analyses] if isinstance(config.analyses, str) else config.analyses)
            for name in sorted(chosen):
                if name not in REGISTRY.analyses:
                    raise ConfigError(f"analysis.analyses: unknown analysis {name!r}; valid analyses: {', '.join(valid)}")
        # a plugin listed in analysis.plugins is asked for: its measures run even with an explicit list
        chosen |= {m.analysis for m in REGISTRY.measures.values() if m.module in config.plugins}
        if k < 2 and chosen:
            raise ConfigError(
                f"ensemble.k={k}: between-net analyses need at least 2 members; set ensemble.k>=2 or callbacks=none"
            )
        pending = list(chosen)
        while pending:  # required analyses are switched on with the ones that need them
            for dep in REGISTRY.analyses[pending.pop()].requires:
                if dep not in chosen:
                    chosen.add(dep)
                    pending.append(dep)
        analyses = [REGISTRY.analyses[n] for n in _ordered(chosen)]
        measures = [m for m in REGISTRY.measures.values() if m.analysis in chosen]
        if config.measures not in (None, "all"):
            wanted = set([config.measures] if isinstance(config.measures, str) else config.measures)
            known = {m.name for m in REGISTRY.measures.values()} | {m.family for m in REGISTRY.measures.values()}
            for name in sorted(wanted - known):
                raise ConfigError(
                    f"analysis.measures: unknown measure {name!r}; registered: {', '.join(sorted(m.name for m in REGISTRY.measures.values()))}"
                )
            measures = [m for m in measures if m.name in wanted or m.family in wanted]
        member = resolve_pairs(config.pairs, k, "analysis.pairs")
        heavy = [p for p in resolve_pairs(config.heavy_pairs, k, "analysis.heavy_pairs") if p in member]
        null = (
            [p for p in resolve_pairs(config.null.pairs, k, "analysis.null.pairs") if p in member] if config.null.enabled else []
        )
        plan = cls(config, k, analyses, measures, member, heavy, null)
        plan.check()
        return plan

    def check(self) -> None:
        c = self.config
        if self.null_pairs and c.probe_size < 4:
            raise ConfigError(
                f"analysis.probe_size={c.probe_size} is too small for the null (it re-pairs images within each "
                "probe batch: at least 4 probe images); raise analysis.probe_size or set analysis.null.enabled=false"
            )
        for analysis in self.analyses:
            check = getattr(analysis, "check", None)
            if check is not None:
                check(self)

    def check_widths(self, widths: Mapping[str, int]) -> None:
        """Checks that need the model's layer widths (after analysis.max_units)."""
        self.widths = {layer: min(int(widths[layer]), self.config.max_units or int(widths[layer])) for layer in self.layers}
        for analysis in self.analyses:
            check = getattr(analysis, "check_widths", None)
            if check is not None:
                check(self, self.widths)

    # --- what runs ---------------------------------------------------------------------------
    @property
    def layers(self) -> list[str]:
        return list(self.config.layers)

    @property
    def conv_layers(self) -> list[str]:
        return [layer for layer in self.layers if layer in CONV_LAYERS]

    @property
    def heavy_members(self) -> list[int]:
        return sorted({i for pair in self.heavy_pairs for i in pair})

    def on(self, name: str, full: bool = True) -> bool:
        """Is analysis `name` running (at a full step, or at a light one with full=False)?"""
        return any(a.name == name and (full or not a.heavy) for a in self.analyses)

    def at(self, full: bool) -> list[Analysis]:
        return [a for a in self.analyses if full or not a.heavy]

    @property
    def null_on(self) -> bool:
        return bool(self.null_pairs)

    @property
    def interval_groups(self) -> int:
        return self.config.interval.groups

    def needs(self, full: bool) -> Needs:
        needs = Needs(null=self.null_on and bool(self.measures))
        for a in self.at(full):
            needs = needs | a.needs
        if not self.null_on:
            needs = Needs(**{**needs.__dict__, "null": False})
        return needs

    # --- what is logged ----------------------------------------------------------------------
    def outputs(self, full: bool = True) -> list[tuple[Output, list[Pair]]]:
        """Every declared scalar output of a step with the member pairs it covers."""
        out: list[tuple[Output, list[Pair]]] = []
        for a in self.at(full):
            pairs = a.pairs(self)
            for layer in a.layers(self) if a.per_layer else [None]:
                out.extend((o, pairs) for o in a.outputs(self, layer))
        for m in self.measures:
            for layer in self.layers:
                out.append((Output(m.key(layer), "measure"), self.member_pairs))
        return out

    def declared_keys(self, full: bool = True) -> set[str]:
        """Every scalar key a (full or light) analysis step logs: the public interface documented in
        README "What gets logged" (the tests hold the step to it)."""
        keys: set[str] = set()
        for output, pairs in self.outputs(full):
            keys.update(key_names(output, pairs, bool(self.null_pairs_of(pairs))))
        return keys

    def null_pairs_of(self, pairs: Sequence[Pair]) -> list[Pair]:
        """The null pairs among `pairs` (a heavy analysis's null covers the null pairs it analyses)."""
        return [p for p in self.null_pairs if p in pairs]
