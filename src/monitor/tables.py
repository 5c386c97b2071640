"""Tables of an analysis step, made from its typed results (README "Tables")."""

from __future__ import annotations

from convergent.analysis.builtin.sparse import l1_label
from convergent.analysis.registry import pair_suffix
from convergent.monitor.step import StepReport

Table = tuple[list[str], list[list]]


def matched_pairs_table(report: StepReport, layer: str) -> Table | None:
    """Every max-matched pair of every member pair of a layer: unit a, unit b, their correlation and
    (where mutual information ran) their MI."""
    corr = report.result("correlation", layer)
    if corr is None:
        return None
    mi = report.result("mutual_info", layer)
    rows = []
    for (a, b), (index, _) in corr.best.items():
        c = corr.corr[(a, b)].cpu().numpy()
        m = mi.mi[(a, b)].cpu().numpy() if mi is not None and (a, b) in mi.mi else None
        for u, v in enumerate(index.cpu().tolist()):
            if v >= 0:
                rows.append([pair_suffix(a, b), u, v, float(c[u, v]), float(m[u, v]) if m is not None else None])
    return (["pair", "unit_a", "unit_b", "correlation", "mi"], rows) if rows else None


def sparse_table(report: StepReport, layers) -> Table | None:
    """The paper's layout: one row per layer, held-out error and non-zeros per L1 weight (pair averages)."""
    results = report.results.get("sparse", {})
    if not results:
        return None
    l1 = next(iter(results.values())).l1
    columns = ["layer"]
    for w in l1:
        columns += [f"error l1={l1_label(w)}", f"nnz l1={l1_label(w)}"]
    rows = []
    for layer in layers:
        r = results.get(layer)
        if r is None:
            continue
        row = [layer]
        for i, w in enumerate(l1):
            nnz = [float(f.nnz[i]) for f in r.fits.values()]
            row += [r.error[l1_label(w)].value, sum(nnz) / len(nnz)]
        rows.append(row)
    return columns, rows


def step_tables(report: StepReport, layers) -> dict[str, Table]:
    out = {}
    for layer in layers:
        table = matched_pairs_table(report, layer)
        if table is not None:
            out[f"pairs/{layer}"] = table
    table = sparse_table(report, layers)
    if table is not None:
        out["sparse"] = table
    return out
