"""Check a run's logged null against an independent one: members a and b of the run's last
checkpoint on the probe images, b's images randomly re-paired (numpy float64, whole-set
permutations, nothing shared with the monitor's streaming code), semi-match and linear CKA.

    python -m benchmarks.null_check outputs/RUN                 # fc6, fc7; 32 re-pairings of members 0, 1
    python -m benchmarks.null_check outputs/RUN --layers conv5 fc6 fc7 --draws 64 --json null.json

Prints, per layer and measure, the logged value and null (at the last step csv/metrics.csv holds them), the
re-paired mean and its standard error, and the difference (issue 16's goal: |difference| <= 0.03).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import run_members_and_probe
from convergent.report.runs import read_headline_metrics


def activations(member: torch.nn.Module, probe, layers: list[str], batch_size: int = 250) -> dict[str, np.ndarray]:
    """Post-ReLU taps of every probe image, float64, [images, units] (fc layers)."""
    out: dict[str, list[np.ndarray]] = {layer: [] for layer in layers}
    member.eval()
    with torch.no_grad():
        for lo in range(0, len(probe), batch_size):
            images = torch.stack([probe[i][0] for i in range(lo, min(lo + batch_size, len(probe)))])
            _, taps = member(images, taps=layers)
            for layer in layers:
                out[layer].append(taps[layer].double().flatten(1).numpy())
    return {layer: np.concatenate(chunks) for layer, chunks in out.items()}


def correlation(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation of every column of x with every column of y; 0 where a column is constant."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    sx, sy = np.sqrt((xc**2).sum(0)), np.sqrt((yc**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        c = (xc.T @ yc) / np.outer(sx, sy)
    c[~np.isfinite(c)] = 0.0
    c[sx <= 1e-12 * np.maximum(1.0, np.abs(x.mean(0)))] = 0.0
    c[:, sy <= 1e-12 * np.maximum(1.0, np.abs(y.mean(0)))] = 0.0
    return c


def semi_match(x: np.ndarray, y: np.ndarray) -> float:
    return float(correlation(x, y).max(axis=1).mean())


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    xc, yc = x - x.mean(0), y - y.mean(0)
    return float(np.linalg.norm(xc.T @ yc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc)))


MEASURES = {"align/{layer}/semi_match": semi_match, "cka/{layer}/linear": linear_cka}


def last_logged(run: Path) -> dict[str, float]:
    """Every headline key's value at the last step it was logged (csv/metrics.csv)."""
    return {key: by_step[max(by_step)] for key, by_step in read_headline_metrics(run / "csv" / "metrics.csv").items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run directory (with .hydra/config.yaml, csv/ and checkpoints/last.ckpt)")
    parser.add_argument("--layers", nargs="+", default=["fc6", "fc7"])
    parser.add_argument("--members", nargs=2, type=int, default=[0, 1])
    parser.add_argument("--draws", type=int, default=32, help="random re-pairings")
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    members, step, probe = run_members_and_probe(args.run)
    a, b = (activations(members[i], probe, args.layers) for i in args.members)
    rng = np.random.default_rng(args.seed)
    perms = [rng.permutation(len(probe)) for _ in range(args.draws)]

    logged = last_logged(args.run)
    rows = []
    for layer in args.layers:
        for template, measure in MEASURES.items():
            key = template.format(layer=layer)
            repaired = np.array([measure(a[layer], b[layer][p]) for p in perms])
            row = {
                "key": key,
                "step": step,
                "value": logged.get(key),
                "logged_null": logged.get(f"{key}/null"),
                "logged_null_p95": logged.get(f"{key}/null_p95"),
                "repaired_mean": float(repaired.mean()),
                "repaired_se": float(repaired.std(ddof=1) / np.sqrt(len(repaired))),
                "repaired_p95": float(np.quantile(repaired, 0.95)),
                "actual_same_images": measure(a[layer], b[layer]),
            }
            row["difference"] = None if row["logged_null"] is None else row["logged_null"] - row["repaired_mean"]
            rows.append(row)

    print(f"step {step}, members {args.members}, {args.draws} random re-pairings of {len(probe)} probe images")
    print(
        f"{'key':28s} {'value':>7s} {'same img':>8s} {'logged null':>11s} {'p95':>6s} {'re-paired':>9s} {'(se)':>7s} {'diff':>7s}"
    )
    for r in rows:
        fmt = lambda v, w=7: f"{v:{w}.4f}" if v is not None else f"{'-':>{w}s}"  # noqa: E731
        print(
            f"{r['key']:28s} {fmt(r['value'])} {fmt(r['actual_same_images'], 8)} {fmt(r['logged_null'], 11)} "
            f"{fmt(r['logged_null_p95'], 6)} {fmt(r['repaired_mean'], 9)} {fmt(r['repaired_se'])} {fmt(r['difference'])}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
