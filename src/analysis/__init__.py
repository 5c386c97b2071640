"""Pure analyses on statistics: no Lightning, W&B or Hydra imports."""
