"""The `convergent-train` console script: a busy run directory is refused before the heavy imports.

Importing torch, Lightning, Hydra and W&B takes 3-12 s on a loaded machine; a second process on a
live run directory (`resume=<dir>`, or `hydra.run.dir=<dir>` of an existing directory) must be
told at once. This module imports only the standard library and `convergent.runlock`, takes the
lock, then runs `convergent.train.main`, which takes it again (re-entrant) and holds it for the
job. `python -m convergent.train` (and DDP child processes) skip this step: the same refusal then
comes after the imports, before Hydra writes anything.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def existing_run_dir(argv: list[str]) -> Path | None:
    """The run directory these arguments name, if it exists already: `resume=<dir>`, else a plain
    `hydra.run.dir=<dir>`. None with Hydra flags (-m, --cfg, --help, ...) or an interpolated dir."""
    if any(a.startswith("-") for a in argv):
        return None
    for prefix in ("resume=", "hydra.run.dir="):
        given = [a.split("=", 1)[1].strip("'\"") for a in argv if a.startswith(prefix)]
        if given and given[-1] not in ("", "null", "None") and "${" not in given[-1]:
            path = Path(given[-1]).expanduser()
            return path.resolve() if path.is_dir() else None
    return None


def train() -> None:
    from convergent.runlock import RunDirBusy, acquire

    lock = None
    run_dir = existing_run_dir(sys.argv[1:])
    if run_dir is not None:
        try:
            lock = acquire(run_dir, os.environ)
        except RunDirBusy as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    try:
        from convergent.train import main

        main()
    finally:
        if lock is not None:
            lock.release()


if __name__ == "__main__":
    train()
