"""The hetero benchmark's result (:func:`benchmarks.hetero.run_hetero_benchmark`) as Markdown."""

from __future__ import annotations

from typing import Any

from cspml_flows.core.tables import markdown_table

RETRIEVAL_HEADER = ["model / ranking", "recall@1", "recall@5", "recall@10", "MRR", "ground state first", "n"]


def retrieval_table(variants: dict, prefix: str = "") -> str:
    """Composition -> structure retrieval: one row per model variant or ranking."""
    rows = [
        [
            f"{prefix}{name}",
            f"{m['recall@1']:.3f}",
            f"{m['recall@5']:.3f}",
            f"{m['recall@10']:.3f}",
            f"{m['mrr']:.3f}",
            f"{m.get('poly_ground_state_first', float('nan')):.3f}",
            m["n"],
        ]
        for name, m in variants.items()
    ]
    return markdown_table(RETRIEVAL_HEADER, rows, align="lrrrrrr")


def match_rates_block(result: dict[str, Any]) -> list[str]:
    """The protocol's match rates of both models and the fusion chosen."""
    rows = [
        [name, f"{m['top1']:.1%}", f"{m['top5']:.1%}", f"{m['top20']:.1%}", f"{m['rmse_top1']:.4f}"]
        for name, m in result["match_rates"].items()
    ]
    lines = [
        f"### {result['protocol']} / {result['setting']}, {result['n_queries']} queries",
        "",
        markdown_table(["method", "top-1", "top-5", "top-20", "RMSE top-1"], rows, align="lrrrr"),
        "",
        f"Fusion chosen on held-out formulas: {result.get('fusion')}",
    ]
    if "hetero_uses_fusion" in result:
        path = "the fused score" if result["hetero_uses_fusion"] else "the core engine's (ranker included)"
        lines += [f"Hetero candidates: {path}"]
    return lines


def retrieval_block(result: dict[str, Any]) -> list[str]:
    """Retrieval on held-out formulas: of the benchmark model, then of each evaluation model."""
    lines = []
    if result.get("retrieval_held_out_formulas"):
        lines += ["", "Composition -> structure retrieval, held-out formulas of the training pool:", ""]
        lines += [retrieval_table(result["retrieval_held_out_formulas"])]
    for v, rep in (result.get("held_out_variants") or {}).items():
        lines += ["", f"Evaluation model ({v} embeddings; formulas and prototypes held out), its held-out formulas:"]
        lines += ["", retrieval_table(rep.get("variants") or {}, f"{v}: ")]
        lines += ["", f"fusion {rep.get('chosen')}, inverse weights {(rep.get('inverse') or {}).get('chosen')}"]
    return lines


def polymorph_block(result: dict[str, Any]) -> list[str]:
    """Polymorphs ordered by score alone and with the cross-validated energy weight."""
    ep = result.get("energy_polymorphs")
    if not (ep and ep.get("n_formulas")):
        return []
    k = ep["k"]
    rows = [
        [
            name,
            f"{ep[name]['ground_state_first']:.3f}",
            f"{ep[name][f'metastable_recall@{k}']:.3f}",
            ep[name]["n_metastable"],
        ]
        for name in ("score_only", "energy_cv")
    ]
    header = ["ordering", "ground state first", f"metastable recall@{k}", "n metastable"]
    return [
        "",
        f"Polymorphs ranked with {ep['calculator']} relaxed energies ({ep['n_formulas']} held-out formulas "
        f"with >= 2 prototypes, {ep['candidates']} distinct candidates each relaxed; settings {ep['settings']}):",
        "",
        markdown_table(header, rows, align="lrrr"),
        "",
        f"weights chosen per fold {ep['weights_cv']}, on all formulas {ep['weight_all']}; ground state among the "
        f"candidates {ep['ground_state_among_candidates']:.3f}; {ep['n_relaxations']} relaxations, "
        f"{ep['relax_cpu_seconds_per_formula']:.1f} s per formula (one thread), {ep['failed_relaxations']} failed",
    ]


def leave_prototype_out_block(v: str, lpo: dict[str, Any]) -> list[str]:
    """Structure -> composition retrieval and the user-template experiment of one evaluation model."""
    rows = [
        [name, *(f"{m[f'recall@{k}']:.3f}" for k in (1, 5, 10, 50)), f"{m['mrr']:.3f}", m["n"]]
        for name, m in lpo["structure_to_composition"].items()
    ]
    header = ["ranking", "recall@1", "recall@5", "recall@10", "recall@50", "MRR", "n"]
    lines = [
        "",
        f"Structure -> composition, leave-prototype-out ({v} model, {lpo['n_prototypes']} prototypes held out, "
        f"inverse weights {lpo.get('inverse_weights')}):",
        "",
        markdown_table(header, rows, align="lrrrrrr"),
    ]
    u = lpo["user_templates"]
    if u.get("n"):
        settings = ("without_user_file", "with_user_file", "cspml_with_user_file")
        rows = [[name, f"{u[name]['top1']:.1%}", f"{u[name]['top5']:.1%}"] for name in settings]
        lines += [
            "",
            f"User templates ({u['n']} compositions of held-out prototypes, pool without the prototype):",
            "",
            markdown_table(["setting", "top-1", "top-5"], rows, align="lrr"),
        ]
    return lines


def markdown(result: dict[str, Any]) -> str:
    """Tables of a hetero benchmark result."""
    lines = match_rates_block(result) + retrieval_block(result) + polymorph_block(result)
    for v, lpo in (result.get("leave_prototype_out") or {}).items():
        lines += leave_prototype_out_block(v, lpo)
    return "\n".join(lines) + "\n"
