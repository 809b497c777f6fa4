"""``report.md`` of ``writesae demo --full``: each protocol's figures per model beside the paper's values.

The paper's values come from its own models (Qwen3.5-0.8B L9 H4 mostly, Mamba-2-370M L24 H0,
Qwen3.5-4B): the report cites them as references, marked as such, never as targets for the shipped
1.4M-parameter models trained on the Python standard library.
"""

from __future__ import annotations

from typing import Any

__all__ = ["fmt", "full_report"]

CAVEAT = (
    "**The paper's values are references from different, far larger models** (the model each is measured on is "
    "named with it: Qwen3.5-0.8B, Mamba-2-370M, Qwen3.5-4B, trained on web text). The shipped models have about "
    "1.4M parameters, were trained on the Python standard library, and the protocols ran at demo sizes; their "
    "figures illustrate each protocol end to end, they are not expected to reproduce the paper's."
)


def fmt(value: Any) -> str:
    """A headline value for a table cell (floats to 3 significant digits, intervals as ``[a, b]``)."""
    if isinstance(value, bool) or value is None:
        return "n/a" if value is None else str(value)
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(fmt(v) for v in value) + "]"
    if isinstance(value, dict):
        return "; ".join(f"{k} {fmt(v)}" for k, v in value.items())
    return str(value).replace("|", "/").replace("\n", " ")


def _cell(row: dict[str, Any]) -> str:
    """A model's overview cell: its key figures, or why there are none."""
    if row["status"] == "ran":
        return "<br>".join(f"{k} {fmt(row['headline'][k])}" for k in row["key_figures"]) or "(empty headline)"
    if row["status"] == "not applicable":
        return f"not applicable: {fmt(row['reason'])}"
    return f"**failed**: {fmt(row['error'])}"


def _references(refs: list[dict[str, str]], sep: str = "<br>") -> str:
    return sep.join(f"{fmt(r.get('table'))}, {fmt(r.get('model'))}: {fmt(r.get('value'))}" for r in refs) or "n/a"


def full_report(combined: dict[str, Any]) -> str:
    """The markdown of ``OUT/report.md`` from the combined summary (see `writesae.full_demo.runner`)."""
    models = combined["models"]
    names = list(models)
    heads = [f"{m} (L{run['cell']['layer']} H{run['cell']['head']})" for m, run in models.items()]
    by_name = {m: {row["protocol"]: row for row in run["protocols"]} for m, run in models.items()}
    lines = [
        "# writesae demo --full: the paper's protocols on the shipped models",
        "",
        CAVEAT,
        "",
        (
            "Each model's cell is the head with the longest memory; each model's folder holds the regular demo "
            "(`report.md`: substitution, logit shift, installs in detail) and `paper/<protocol>/`, one run directory "
            "per protocol (settings, records, summary, report, plots)."
        ),
        "",
        "## Overview",
        "",
        "| protocol | " + " | ".join(heads) + " | paper (reference, a different model) |",
        "|---|" + "---|" * len(names) + "---|",
    ]
    for name in combined["protocols"]:
        rows = [by_name[m].get(name) for m in names]
        refs = next((r["references"] for r in rows if r and r.get("references")), [])
        cells = [_cell(r) if r else "not run yet" for r in rows]
        lines.append(f"| `{name}` | " + " | ".join(cells) + f" | {_references(refs)} |")
    lines += ["", "## Every protocol", ""]
    for name in combined["protocols"]:
        rows = {m: by_name[m].get(name) for m in names}
        first = next((r for r in rows.values() if r), None)
        if first is None:
            continue
        lines += [f"### `{name}`: {first['what']}", ""]
        refs = first.get("references") or []
        for ref in refs:
            lines.append(f"- Paper (reference; {fmt(ref.get('model'))}, a different model), {fmt(ref.get('table'))}: "
                         f"{fmt(ref.get('value'))}")  # fmt: skip
        keys = list(dict.fromkeys(k for r in rows.values() if r for k in r["headline"]))
        if keys:
            lines += ["", "| figure | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
            for k in keys:
                values = [fmt(r["headline"][k]) if r and k in r["headline"] else "" for r in rows.values()]
                lines.append(f"| {k} | " + " | ".join(values) + " |")
        lines.append("")
        for m, r in rows.items():
            if r is None:
                continue
            where = f"`{r['run_dir']}`" + (" (the demo's own run)" if r["in_demo"] else "")
            ran = f"ran in {r['seconds']:.0f} s ({r.get('cpu_seconds', 0):.0f} s CPU), {where}"
            if r.get("after_summary_error"):
                ran += f"; **failed after writing its summary** (plots or report missing): {r['after_summary_error']}"
            status = {
                "ran": ran,
                "failed": f"FAILED: {r['error']}",
                "not applicable": f"not applicable: {r['reason']}",
            }[r["status"]]
            sizes = fmt(r["sizes"]) or "the demo's"
            lines.append(f"- {m}: {status}; sizes: {sizes}")
        lines.append("")
    lines += _not_run(combined) + _timing(combined)
    return "\n".join(lines)


def _not_run(combined: dict[str, Any]) -> list[str]:
    rows = [(m, row) for m, run in combined["models"].items() for row in run["protocols"] if row["status"] != "ran"]
    late = [
        (m, row) for m, run in combined["models"].items() for row in run["protocols"] if row.get("after_summary_error")
    ]
    notes = [f"- `{row['protocol']}` on {m}: its figures are above, but it failed after writing its summary "
             f"({row['after_summary_error']})" for m, row in late]  # fmt: skip
    if not rows and not notes:
        return ["## Not run", "", "Every protocol ran on every model.", ""]
    return ["## Not run", ""] + [
        f"- `{row['protocol']}` on {m}: " + (f"not applicable ({row['reason']})" if row["status"] == "not applicable"
                                            else f"failed ({row['error']})")
        for m, row in rows
    ] + notes + [""]  # fmt: skip


def _timing(combined: dict[str, Any]) -> list[str]:
    machine = combined["machine"]
    lines = [
        "## Time",
        "",
        "Wall time, and CPU time of the model's process (with one torch thread: its wall time on an idle core).",
        "",
        "| model | demo (s) | paper protocols (s) | total (s) | demo CPU (s) | total CPU (s) |",
        "|---|---|---|---|---|---|",
    ]
    for m, run in combined["models"].items():
        protocols = run["seconds"] - run["demo_seconds"]
        lines.append(f"| {m} | {run['demo_seconds']:.0f} | {protocols:.0f} | {run['seconds']:.0f} | "
                     f"{run.get('demo_cpu_seconds', 0):.0f} | {run.get('cpu_seconds', 0):.0f} |")  # fmt: skip
    load = machine.get("load_average_at_end") or machine["load_average_at_start"]
    lines.append("")
    lines.append(
        f"{combined.get('seconds', 0):.0f} s in all, preset `{combined['preset']}`, {machine.get('processes', 1)} "
        f"model(s) at once with {machine['torch_threads']} torch thread(s) each, on {machine['cpu_count']} CPUs; load "
        f"average (1, 5, 15 min) {fmt(machine['load_average_at_start'])} at the start, {fmt(load)} at the end (other "
        "processes shared the machine when it is above the CPU count)."
    )
    lines.append("")
    return lines
