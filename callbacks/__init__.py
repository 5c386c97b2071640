"""Lightning callbacks: schedule the probe passes and hand results to the loggers."""

from convergent.callbacks.monitor import ConvergenceMonitor
from convergent.callbacks.schedule import Schedule, log_spaced_steps

__all__ = ["ConvergenceMonitor", "Schedule", "log_spaced_steps"]
