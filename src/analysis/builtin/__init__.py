"""The built-in analyses and measures: importing this package registers them."""

from convergent.analysis.builtin import (  # noqa: F401
    correlation,
    cross_layer,
    functional,
    hierarchical,
    mean_activation,
    mutual_info,
    patches,
    similarity,
    sparse,
    spectral,
)
