"""Check a run's logged functional-convergence numbers (issue 18) against independent ones.

    python -m benchmarks.functional_check outputs/RUN          # members 0, 1 of checkpoints/last.ckpt

Prints the analysis steps at which each `func/...` key was logged, the final barriers and midpoint
accuracies, and the naive midpoint accuracy recomputed by hand: the two members' state dicts
averaged (floating-point entries; integer buffers from member a), loaded into a copy of member a
and evaluated on the probe images with the module's own forward, nothing from
`convergent.functional` involved.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from benchmarks.common import run_members_and_probe
from convergent.report.runs import read_headline_metrics


def averaged(net_a: torch.nn.Module, net_b: torch.nn.Module) -> torch.nn.Module:
    """A copy of a whose floating-point parameters and buffers are the mean of a's and b's."""
    sa, sb = net_a.state_dict(), net_b.state_dict()
    mid = {k: (sa[k] + sb[k]) / 2 if sa[k].is_floating_point() else sa[k] for k in sa}
    net = copy.deepcopy(net_a)
    net.load_state_dict(mid)
    return net.eval()


def accuracy(net: torch.nn.Module, probe, batch_size: int = 250) -> float:
    correct = 0
    with torch.no_grad():
        for lo in range(0, len(probe), batch_size):
            items = [probe[i] for i in range(lo, min(lo + batch_size, len(probe)))]
            x = torch.stack([item[0] for item in items])
            y = torch.tensor([int(item[1]) for item in items])
            logits = net(x)
            logits = logits[0] if isinstance(logits, tuple) else logits
            correct += int((logits.argmax(1) == y).sum())
    return correct / len(probe)


def logged(run: Path) -> dict[str, dict[int, float]]:
    """Every pair-average `func/...` key of csv/metrics.csv: step -> value."""
    return {k: v for k, v in read_headline_metrics(run / "csv" / "metrics.csv").items() if k.startswith("func/")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--members", nargs=2, type=int, default=[0, 1])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    members, step, probe = run_members_and_probe(args.run)
    a, b = (members[i].eval() for i in args.members)

    values = logged(args.run)
    steps = sorted({s for v in values.values() for s in v})
    keys = sorted(values)
    end = max(steps) if steps else None
    out = {
        "checkpoint_step": step,
        "analysis_steps": steps,
        "keys": {k: sorted(values[k]) for k in keys},
        "final": {k: values[k][end] for k in keys if end in values[k]},
        "acc_a": accuracy(a, probe),
        "acc_b": accuracy(b, probe),
        "mid_acc_naive_by_hand": accuracy(averaged(a, b), probe),
    }
    print(f"checkpoint step {step}; func/ keys logged at steps {steps}")
    short = [k for k in keys if len(values[k]) < 3 or 0 not in values[k] or end not in values[k]]
    print(f"{len(keys)} pair-average func/ keys; keys with < 3 steps or missing step 0 / the end: {short or 'none'}")
    for key in sorted(out["final"]):
        print(f"  {key:40s} {out['final'][key]:.4f}")
    logged_mid = out["final"].get("func/mid_acc/naive")
    print(f"member accuracies on the probe set: {out['acc_a']:.4f}, {out['acc_b']:.4f}")
    print(f"naive midpoint accuracy: logged {logged_mid}, by hand {out['mid_acc_naive_by_hand']:.4f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
