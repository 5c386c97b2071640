"""Errors a user can act on (a leaf module: it imports nothing of the project)."""

from __future__ import annotations

from collections.abc import Iterable


class ConfigError(ValueError):
    """A configuration mistake; the one-line message names the key and the fix. `convergent-train`
    and `convergent-analyze` print it as ``error: ...`` and exit with status 2."""


def check_choice(value, choices: Iterable, key: str) -> None:
    """A ConfigError naming `key` and the valid choices when `value` is not one of them."""
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(map(str, choices))}")
