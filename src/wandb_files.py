"""Files handed to W&B as artifact entries without a copy outside the run directory.

`Artifact.add_file` copies each file into W&B's staging area (`WANDB_DATA_DIR/artifacts/staging`,
`~/.local/share/wandb` by default) unless `policy="immutable"`, and into its cache
(`WANDB_CACHE_DIR`) after an upload unless `skip_cache=True`; offline runs keep the staged copy
until `wandb sync`, so a sweep of offline runs filled the home directory. Here the entry is a hard
link to the run's own file, inside the W&B run's directory: no bytes are copied, and the version
W&B logged keeps its contents even when the run directory's file is later replaced (a resumed run
re-analysing a step writes a new file under the same name; "immutable" asks that the logged file
never change). Where hard links are not possible the entry is the run's file itself.
"""

from __future__ import annotations

import os
from pathlib import Path


def link_for_artifact(path: Path, wandb_run_dir: str | Path) -> Path:
    """A hard link to `path` under `<W&B run dir>/artifact-files/` (or `path` itself)."""
    links = Path(wandb_run_dir) / "artifact-files"
    link = links / path.name
    try:
        links.mkdir(parents=True, exist_ok=True)
        if link.exists():
            link.unlink()
        os.link(path, link)
    except OSError:
        return path
    return link


def add_immutable_file(artifact, path: Path, wandb_run_dir: str | Path, name: str | None = None):
    """Add `path` to `artifact` without a staged or cached copy (see the module docstring)."""
    source = link_for_artifact(Path(path), wandb_run_dir)
    return artifact.add_file(str(source), name=name or Path(path).name, policy="immutable", skip_cache=True)
