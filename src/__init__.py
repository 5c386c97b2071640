"""convergent: train networks that differ only in their seed and measure whether they converge."""

__version__ = "0.1.0"
