"""DDP under Hydra: child processes re-run this job's saved config in this job's directory.

Lightning's own Hydra support re-runs `sys.argv`, which under `-m` starts a whole new multirun
in every child, and points children at `hydra.run.dir` rather than the job's sweep subdir. Here a
child runs `python -m convergent.train --config-dir <job dir>/.hydra --config-name config` with
`hydra.run.dir=<job dir>`: exactly this job, one output directory per run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.strategies.launchers.subprocess_script import _SubprocessScriptLauncher


def child_command(run_dir: Path) -> list[str]:
    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.exists():
        raise RuntimeError(f"DDP needs the job's saved config at {saved}; do not set hydra.output_subdir=null")
    return [
        sys.executable, "-m", "convergent.train",
        "--config-dir", str(saved.parent), "--config-name", "config",
        f"hydra.run.dir={run_dir}", "hydra.output_subdir=null",
    ]  # fmt: skip


class _JobDirLauncher(_SubprocessScriptLauncher):
    def _call_children_scripts(self) -> None:
        from hydra.core.hydra_config import HydraConfig

        self._check_can_spawn_children()
        self.procs = []
        os.environ["MASTER_ADDR"] = self.cluster_environment.main_address
        os.environ["MASTER_PORT"] = str(self.cluster_environment.main_port)
        os.environ["NODE_RANK"] = str(self.cluster_environment.node_rank())
        os.environ["LOCAL_RANK"] = str(self.cluster_environment.local_rank())
        os.environ["WORLD_SIZE"] = f"{self.num_processes * self.num_nodes}"
        command = child_command(Path(HydraConfig.get().runtime.output_dir))
        for local_rank in range(1, self.num_processes):
            env = os.environ.copy()
            env["LOCAL_RANK"] = str(local_rank)
            self.procs.append(subprocess.Popen(command, env=env))


class HydraDDPStrategy(DDPStrategy):
    """DDP whose child processes rerun this Hydra job (see module docstring)."""

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if isinstance(self._launcher, _SubprocessScriptLauncher):
            self._launcher = _JobDirLauncher(self.cluster_environment, self.num_processes, self.num_nodes)


def configure_strategy(strategy, trainer_cfg: dict):
    """Swap plain `ddp` for the Hydra-aware strategy when running under Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if strategy == "ddp" and HydraConfig.initialized():
        backend = "gloo" if trainer_cfg.get("accelerator") == "cpu" else None
        return HydraDDPStrategy(process_group_backend=backend)
    return strategy
