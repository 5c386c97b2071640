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
