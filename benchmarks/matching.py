"""max_match_4096: the Hungarian matching at the paper's fc width."""

from __future__ import annotations

import torch

from benchmarks.common import (
    Measured,
    Options,
    median,
    spread,
    stopwatch,
)


# --- 5. max_match_4096 ---------------------------------------------------------------------------
def correlation_of_random_data(units: int, samples: int, seed: int = 0) -> torch.Tensor:
    """Correlations between the units of two independent random data sets [units, units]."""
    g = torch.Generator().manual_seed(seed)
    x, y = (torch.randn(samples, units, generator=g) for _ in range(2))
    x, y = ((z - z.mean(0)) / z.std(0, correction=0) for z in (x, y))
    return (x.T @ y / samples).double()


def max_match_4096(options: Options) -> Measured:
    from convergent.analysis.matching import max_match

    corr = correlation_of_random_data(4096, 1024)
    times = [stopwatch(lambda: max_match(corr))() for _ in range(options.pick(full=3, quick=1))]
    detail = (
        "max_match (Hungarian, scipy) on the 4096 x 4096 correlations of two independent random data sets "
        f"(1024 samples): {spread(times)}"
    )
    if not options.quick:
        uniform = torch.rand(4096, 4096, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
        detail += f"; uniform in [-1, 1] (harder): {stopwatch(lambda: max_match(uniform))():.3g} s"
    return Measured(median(times), detail)
