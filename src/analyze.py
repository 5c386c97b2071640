"""`convergent-analyze`: the monitor's analyses, with the same outputs, on saved checkpoints.

    convergent-analyze outputs/RUN/checkpoints/last.ckpt
    convergent-analyze multirun/SWEEP/0/checkpoints/last.ckpt multirun/SWEEP/1/checkpoints/last.ckpt
    convergent-analyze RUN/checkpoints/analysis/step=100.ckpt analysis.probe_size=1000 --out posthoc/

Members are every member of every checkpoint, in order (so K single-network checkpoints from
separate runs are compared like one ensemble). The data and analysis settings come from the first
checkpoint's run directory (its saved Hydra config), so the live numbers are reproduced; `key=value`
arguments override them (OmegaConf dotlist, e.g. `analysis.layers=[conv1,conv2]`).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from convergent.errors import ConfigError


def find_run_config(checkpoint: Path) -> Path | None:
    """The `.hydra/config.yaml` of the run a checkpoint belongs to (searching its parents)."""
    for parent in checkpoint.resolve().parents:
        saved = parent / ".hydra" / "config.yaml"
        if saved.exists():
            return saved
    return None


def default_config() -> DictConfig:
    """Package defaults for data and analysis, for checkpoints without a run directory."""
    import importlib.resources

    conf = importlib.resources.files("convergent.conf")
    return OmegaConf.create(
        {
            "data": OmegaConf.load(str(conf / "data" / "mnist5k.yaml")),
            "analysis": OmegaConf.load(str(conf / "analysis" / "default.yaml")),
        }
    )


def load_members(checkpoints: list[Path], trust: bool = False) -> tuple[list[torch.nn.Module], int]:
    from convergent.checkpoint_io import load_ensemble

    members, steps = [], []
    for path in checkpoints:
        ensemble, step = load_ensemble(path, trust=trust)  # weights-only unless trusted (--trust-checkpoint)
        members.extend(ensemble.members)
        steps.append(step)
    return members, steps[0]


def analyze_checkpoints(
    checkpoints: list[Path],
    overrides: list[str],
    out_dir: Path | None = None,
    loggers=(),
    device: str | None = None,
    trust: bool = False,
) -> dict:
    """Run every configured analysis on the checkpoints' members (as at a full step) through the
    same step service as the live monitor; write the same files under `out_dir`. Returns
    {"step", "scalars", "out_dir", "report"}."""
    from hydra.utils import instantiate

    from convergent.analysis.plan import Plan
    from convergent.config import typed
    from convergent.models import receptive_field
    from convergent.monitor.service import StepService

    saved = find_run_config(checkpoints[0])
    cfg = OmegaConf.load(saved) if saved else default_config()
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except Exception as e:  # a malformed key=value
        raise ConfigError(f"could not apply overrides {overrides}: {e}") from None
    members, step = load_members(checkpoints, trust)
    conf = typed(OmegaConf.create({"analysis": cfg.analysis, "data": cfg.data}))
    analysis = OmegaConf.to_object(conf.analysis)
    plan = Plan.build(analysis, k=len(members))
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    members = [m.to(dev) for m in members]
    widths = {layer: members[0].layer_width(layer) for layer in plan.layers}
    plan.check_widths(widths)
    if out_dir is None:
        base = saved.parent.parent if saved else Path.cwd()
        out_dir = base / "posthoc" / f"step={step}"
    figures = analysis.figures != "none"
    service = StepService(
        plan,
        widths,
        out_dir,
        loggers,
        background=False,
        probe_set=datamodule.probe_set(analysis.probe_size, analysis.probe_seed) if figures else None,
        fields={layer: receptive_field(members[0], layer) for layer in plan.conv_layers},
    )
    service.check_memory()

    def loader():
        return datamodule.probe_dataloader(analysis.probe_size, analysis.batch_size, seed=analysis.probe_seed)

    probe = service.probe(members, loader(), dev, full=True)
    report = service.analyse_and_write(probe, step, True, figures=figures, members=members, batches=loader)
    service.close()
    report.failures.extend(f for f in service.writer.failures if f not in report.failures)
    with open(Path(out_dir) / "scalars.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "key", "value"])
        writer.writerows([step, key, value] for key, value in sorted(report.scalars.items()) if key != "monitor/analysis_seconds")
    return {"step": step, "scalars": report.scalars, "out_dir": Path(out_dir), "report": report}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="convergent-analyze", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "checkpoints", nargs="+", help="checkpoint files or directories (any existing path), then optional key=value overrides"
    )
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: <run dir>/posthoc/step=<step>)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--wandb", action="store_true", help="also log to a new W&B run (offline without an API key)")
    parser.add_argument(
        "--trust-checkpoint", action="store_true", help="load checkpoints that need more than weights-only loading (can run code)"
    )
    args = parser.parse_args(argv)
    start = time.time()
    try:
        from convergent.checkpoint_args import parse

        parsed = parse(args.checkpoints)  # an existing path is a checkpoint, whatever characters it holds
        checkpoints, overrides = parsed.checkpoints, parsed.overrides
        loggers = []
        if args.wandb:
            from convergent.loggers import build_loggers

            out = args.out or Path.cwd() / "convergent-analyze"
            loggers = build_loggers(
                {"wandb": {"project": "convergent", "tags": ["posthoc"]}},
                out,
                {"checkpoints": [str(c) for c in checkpoints]},
                "posthoc",
                None,
            )
        result = analyze_checkpoints(checkpoints, overrides, args.out, loggers, args.device, trust=args.trust_checkpoint)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        from convergent.train import finish_run

        finish_run()
    for failure in result["report"].failures:
        print(f"convergent-analyze: {failure}", file=sys.stderr)
    print(
        f"convergent-analyze: step {result['step']}, {len(result['scalars'])} scalars, "
        f"written to {result['out_dir']} in {time.time() - start:.1f} s"
    )


if __name__ == "__main__":
    main()
