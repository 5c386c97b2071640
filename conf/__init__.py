"""Hydra configuration shipped with the package (loaded as pkg://convergent.conf).

Importing it stores the typed schema (convergent.config.schema) in Hydra's ConfigStore, so the
YAML files here can extend it wherever Hydra composes them (the CLI, tests, notebooks)."""

from convergent.config import register

register()
