"""A measure from outside the package (README "Adding a measure"): `analysis.plugins=[toy_measure]`."""

from convergent.analysis import register_measure

register_measure("toy/pair_sum", lambda stats, a, b: a + b)
