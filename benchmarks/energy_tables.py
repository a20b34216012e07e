"""The energy experiment's result (:func:`benchmarks.energy.run_energy`) as Markdown."""

from __future__ import annotations

from typing import Any

from cspml_flows.core.tables import markdown_table

SETS = ("protocol", "protocol, relaxed", "pool", "pool, relaxed")


def order_table(rows: list[dict[str, Any]]) -> str:
    """One line per order of the candidates: top-1 with its SE, paired difference to the ranker, top-3."""
    return markdown_table(
        ["order", "top-1", "SE", "vs ranker (paired)", "wins / losses", "top-3"],
        [
            [
                r["order"],
                f"{r['rate']:.1%}",
                f"{r['se']:.1%}",
                f"{r['diff']:+.1%} ± {r['diff_se']:.1%}",
                f"{r['wins']} / {r['losses']}",
                f"{r['top3']:.1%}",
            ]
            for r in rows
        ],
        align="lrrrrr",
    )


def cost_line(c: dict[str, Any]) -> str:
    """The CPU cost of single points and relaxations in one sentence."""
    relax = (
        f"; {c['relax_steps']}-step relaxation {c['relax_cpu_seconds_per_composition']:.1f} s per composition "
        f"({c['relaxed_per_composition']} candidates, {c['relax_cpu_seconds_per_structure']:.1f} s each)"
        if "relax_cpu_seconds_per_composition" in c
        else ""
    )
    return (
        f"cost, CPU time of one thread: single point {c['single_point_cpu_seconds_per_composition']:.2f} s per "
        f"composition ({c['candidates_per_composition']} candidates, "
        f"{c['single_point_cpu_seconds_per_structure'] * 1000:.0f} ms each)"
        + relax
        + f"; model load {c['sevennet_load_seconds']:.1f} s (wall)"
    )


def markdown(result: dict[str, Any]) -> str:
    """The result as Markdown tables (protocol first), the cost, the weights and the decision."""
    lines = []
    for name in SETS:
        rows = result["tables"].get(name)
        if not rows:
            continue
        fit = " (weights fitted here: in-sample)" if name.startswith("pool") else ""
        lines += ["", f"{name}: {rows[0]['n']} queries{fit}", "", order_table(rows)]
    lines += ["", cost_line(result["cost"])]
    for kind, wt in result["weights"].items():
        h = wt.get("protocol_hindsight")
        if h:
            lines.append(
                f"{kind.replace('_', ' ')} blend: w = {wt['w']:g} fitted on the pool; for the record only, the best "
                f"w in hindsight on the protocol queries, {h['w']:g}, would give top-1 {h['top1']:.1%}"
            )
    d = result["decision"]
    lines.append(
        f"decision: blend lift {d['blend_top1_lift']:+.1%} vs SE {d['blend_top1_se']:.1%} -> "
        + ("keep the --rerank energy stage" if d["keep_rerank_stage"] else "no --rerank stage")
        + ("" if result["n"]["protocol"] >= 200 else " (fewer than 200 protocol queries: no decision)")
    )
    return "\n".join(lines).lstrip() + "\n"
