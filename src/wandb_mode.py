"""Which W&B mode a run uses, without importing Lightning or W&B (convergent-report reuses it).

With no W&B API key configured, W&B logs offline instead of prompting. The mode is passed to
`wandb.init` directly, never through the environment, so nothing leaks between a multirun's jobs.
"""

from __future__ import annotations

import netrc
import os

WANDB_MODES = ("online", "offline", "disabled")


def has_wandb_key() -> bool:
    """An API key in the environment or in ~/.netrc (where `wandb login` puts it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = os.environ.get("NETRC", os.path.expanduser("~/.netrc"))
    try:
        auth = netrc.netrc(path).authenticators(os.environ.get("WANDB_BASE_URL", "api.wandb.ai").split("//")[-1])
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])


def resolve_wandb_mode(requested: str | None) -> str:
    """Config first, then WANDB_MODE, then online only when a key is configured."""
    mode = requested or os.environ.get("WANDB_MODE") or ("online" if has_wandb_key() else "offline")
    if mode == "dryrun":
        mode = "offline"
    if mode not in WANDB_MODES:
        raise ValueError(f"logger.wandb.mode={mode!r} is not one of {WANDB_MODES}")
    return mode
