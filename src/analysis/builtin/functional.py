"""Functional convergence (placeholder until the functional analyses land): options only."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FunctionalOptions:
    """Options of the functional analyses (config group `analysis.functional`)."""

    points: int = 11  # values of t in [0, 1] where the interpolated nets are evaluated
