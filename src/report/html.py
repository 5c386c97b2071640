"""index.html: the whole report in one self-contained page (figures as base64 PNG, tables as
HTML, no scripts or external files), to open offline or send to a colleague."""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Mapping
from html import escape
from pathlib import Path

from convergent.report.aggregate import Spread
from convergent.report.build import NO_LAYER, Report
from convergent.report.figures import BAND
from convergent.report.keys import parse_key

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1300px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.2em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
th { background: #f2f2f2; }
.wide { overflow-x: auto; }
.bad { color: #a00; }
figure { margin: 1em 0; }
figcaption { font-size: 0.85em; color: #555; }
img { max-width: 100%; }
code { background: #f4f4f4; padding: 0 0.2em; }
"""


def fmt(v: float) -> str:
    return f"{v:.4g}"


def cell(s: Spread, group_size: int) -> str:
    text = fmt(s.mean) if s.sd is None else f"{fmt(s.mean)} ± {fmt(s.sd)}"
    return text if s.n == group_size else f"{text} (n={s.n})"


def table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<div class="wide"><table><tr>{head}</tr>{body}</table></div>'


def final_layer_tables(report: Report) -> list[tuple[str, list[str], list[list[str]]]]:
    """Per layer (title, header, rows): groups as rows, that layer's headline keys as columns,
    mean ± sd (ddof 1) of each run's last value. Plain text (the page escapes it)."""
    sizes = report.group_sizes
    by_layer: dict[str, dict[str, dict[str, Spread]]] = {}
    for r in report.finals:
        by_layer.setdefault(report.layer_of(r.key), {}).setdefault(r.key, {})[r.group] = r.spread
    order = {layer: i for i, layer in enumerate(report.layers)}
    out = []
    for layer in sorted(by_layer, key=lambda name: (order.get(name, len(order)), name)):
        keys = sorted(by_layer[layer])
        header = ["group", "n_runs"] + [_short(k, report.layers) for k in keys]
        rows = [
            [group, str(n)] + [cell(by_layer[layer][k][group], n) if group in by_layer[layer][k] else "" for k in keys]
            for group, n in sizes.items()
        ]
        out.append(("keys without a layer" if layer == NO_LAYER else f"layer {layer}", header, rows))
    return out


def final_tables(report: Report) -> str:
    parts = [
        f"<h3>{escape(title)}</h3>{table(header, [[escape(c) for c in row] for row in rows])}"
        for title, header, rows in final_layer_tables(report)
    ]
    return "".join(parts) or "<p>No headline values were found in the runs' csv/metrics.csv.</p>"


def _short(key: str, layers) -> str:
    parsed = parse_key(key, layers)
    if parsed is None or parsed.layer is None:
        return key
    return f"{parsed.family}/{parsed.measure}" + ("" if parsed.stat == "value" else f"/{parsed.stat}")


def _image(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def render(report: Report, figures: Mapping[str, Path], files: Mapping[str, Path]) -> str:
    sizes = report.group_sizes
    groups = table(
        ["group", "n_runs", "runs"],
        [[escape(g), str(n), "<br>".join(escape(str(r.path)) for r in report.grouping.groups[g])] for g, n in sizes.items()],
    )
    common = ", ".join(f"<code>{escape(o)}</code>" for o in report.grouping.common) or "none"
    if report.problems:
        problems = f'<p class="bad">{len(report.problems)} of {len(report.runs)} runs failed or are incomplete; their values count at the steps they have.</p>'
        problems += table(
            ["run", "group", "status", "analysis steps", "last step", "detail"],
            [
                [
                    escape(str(s.run.path)),
                    escape(s.group),
                    s.status,
                    str(len(s.run.analysis_steps)),
                    str(s.run.analysis_steps[-1]) if s.run.analysis_steps else "",
                    escape(s.detail),
                ]
                for s in report.problems
            ],
        )
    else:
        problems = f"<p>None: all {len(report.runs)} runs finished with every analysis step of their group.</p>"
    figs = "".join(
        f'<figure><img alt="{escape(name)}" src="{_image(path)}"><figcaption>{escape(name)}: mean over the runs of each group, '
        f"{BAND}; dashed: permutation null, dotted: its p95 (means over runs).</figcaption></figure>"
        for name, path in figures.items()
    )
    listing = ", ".join(f"<code>{escape(name)}</code>" for name in files)
    paths = ", ".join(f"<code>{escape(str(p))}</code>" for p in report.paths)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>convergent report</title><style>{STYLE}</style></head>
<body>
<h1>convergent report</h1>
<p>{len(report.runs)} runs in {len(sizes)} groups from {paths}; written {escape(dt.datetime.now().isoformat(timespec="seconds"))}.
Runs are grouped by their Hydra overrides without the seed (<code>seed</code>, <code>ensemble.seeds</code>) and <code>hydra.*</code>.</p>
<h2>Groups</h2>{groups}
<p>Overrides common to every run: {common}</p>
<h2>Runs that failed or are incomplete</h2>{problems}
<h2>Final values</h2>
<p>Each run's value at the last analysis step it logged, then mean ± sd over the group's runs (sample sd, ddof = 1; a single run shows its value);
(n=…) where fewer runs than the group holds have the key.</p>
{final_tables(report)}
<h2>Over training</h2>{figs or "<p>No figures: no headline values.</p>"}
<h2>Files</h2><p>Next to this page: {listing}. <code>summary.csv</code>: one row per group, key and analysis step.</p>
</body></html>
"""


def write_index(report: Report, figures: Mapping[str, Path], files: Mapping[str, Path], out: Path) -> Path:
    path = out / "index.html"
    path.write_text(render(report, figures, files), encoding="utf-8")
    return path
