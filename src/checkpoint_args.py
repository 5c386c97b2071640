"""The positional arguments of `convergent-analyze`: paths first, `key=value` overrides second.

- An argument that names an existing file is a checkpoint, whatever characters it holds
  (`RUN/checkpoints/analysis/step=945.ckpt` is a file, not an override).
- An existing directory stands for checkpoints: a run directory (it holds `.hydra/config.yaml` or
  `checkpoints/`) means its `checkpoints/last.ckpt`; any other directory means every `*.ckpt`
  directly in it, in natural order (`step=2.ckpt` before `step=10.ckpt`), as if they were listed
  one by one (so their members form one ensemble, like several files do).
- Any other argument of the form `key=value` (a dotted config key before the first `=`) is an
  override, unless it ends in `.ckpt`; anything else is a checkpoint that does not exist, and the
  error says so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from convergent.errors import ConfigError


@dataclass(frozen=True)
class AnalyzeArguments:
    checkpoints: list[Path]
    overrides: list[str]


def natural_key(path: Path) -> list:
    """Sort key that orders the numbers in a name by value: step=2 < step=10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def is_run_dir(path: Path) -> bool:
    return (path / ".hydra" / "config.yaml").is_file() or (path / "checkpoints").is_dir()


def checkpoints_in(path: Path) -> list[Path]:
    """The checkpoints a directory argument stands for (see the module docstring)."""
    if is_run_dir(path):
        last = path / "checkpoints" / "last.ckpt"
        if not last.is_file():
            raise ConfigError(
                f"run directory {path} holds no checkpoints/last.ckpt; pass one of its checkpoints/analysis/step=<n>.ckpt"
            )
        return [last]
    found = sorted((p for p in path.glob("*.ckpt") if p.is_file()), key=natural_key)
    if not found:
        raise ConfigError(f"directory {path} holds no *.ckpt file; pass checkpoint files or run directories")
    return found


_KEY = re.compile(r"^[+~]*[A-Za-z_][\w-]*(\.[\w-]+|\[\d+\])*$")


def is_override(arg: str) -> bool:
    """`analysis.probe_size=1000`, `data.root=/data/x`; not `RUN/step=5.ckpt`, not `step=5.ckpt`."""
    key, sep, _ = arg.partition("=")
    return bool(sep) and bool(_KEY.match(key)) and not arg.endswith(".ckpt")


def parse(args: list[str]) -> AnalyzeArguments:
    checkpoints: list[Path] = []
    overrides: list[str] = []
    for arg in args:
        path = Path(arg).expanduser()
        if path.is_file():
            checkpoints.append(path)
        elif path.is_dir():
            checkpoints.extend(checkpoints_in(path))
        elif is_override(arg):
            overrides.append(arg)
        else:
            raise ConfigError(f"checkpoint {arg} does not exist; pass .ckpt files or run directories, then key=value overrides")
    if not checkpoints:
        raise ConfigError("no checkpoint given; pass one or more .ckpt files or run directories")
    return AnalyzeArguments(checkpoints, overrides)
