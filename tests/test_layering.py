"""The analyses and statistics stay usable from a notebook: no Lightning, W&B or Hydra."""

import subprocess
import sys


def test_analysis_and_stats_import_no_framework():
    code = (
        "import sys, convergent.analysis, convergent.stats;"
        "bad=[m for m in sys.modules if m.split('.')[0] in ('pytorch_lightning','lightning','wandb','hydra','omegaconf')];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"framework modules imported by the analyses: {out}"


def test_every_package_is_installed():
    """pyproject's package list names every folder of the package (`pip install .` ships them all)."""
    from pathlib import Path

    import pytest

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    root = Path(__file__).resolve().parent.parent
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    dirs = {"src": "convergent", "callbacks": "convergent.callbacks", "conf": "convergent.conf"}
    found = set()
    for top, name in dirs.items():
        for init in (root / top).rglob("__init__.py"):
            rel = init.parent.relative_to(root / top).parts
            found.add(".".join((name, *rel)))
    assert found == listed, (sorted(found - listed), sorted(listed - found))
