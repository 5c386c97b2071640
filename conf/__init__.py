"""Hydra configuration shipped with the package (loaded as pkg://convergent.conf)."""
