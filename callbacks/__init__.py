"""Lightning callbacks: schedule the probe passes and hand results to the loggers."""

from convergent.callbacks.checkpointing import LastCheckpoint, save_checkpoint_atomic
from convergent.callbacks.monitor import ConvergenceMonitor
from convergent.callbacks.schedule import Schedule, log_spaced_steps

__all__ = ["ConvergenceMonitor", "LastCheckpoint", "Schedule", "log_spaced_steps", "save_checkpoint_atomic"]
