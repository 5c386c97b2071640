"""A slow measure (a test plugin): every evaluation takes 0.3 s; the first evaluation at an analysis
step after step 0 creates the file named by $SLOW_MEASURE_MARKER (so a test knows an analysis step
is under way)."""

import os
import time
from pathlib import Path

from convergent.analysis import register_measure

_calls = {"n": 0}


def wait(stats, a, b):
    _calls["n"] += 1
    marker = os.environ.get("SLOW_MEASURE_MARKER")
    if marker and _calls["n"] > int(os.environ.get("SLOW_MEASURE_AFTER", "40")):  # past step 0's evaluations
        Path(marker).touch()
    time.sleep(0.3)
    return 0.5


register_measure("slow/wait", wait)
