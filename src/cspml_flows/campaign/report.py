"""Per-campaign Markdown report: ranked candidates with energies and e_above_hull per round, and a
convex-hull plot per chemical system (pymatgen PDPlotter, matplotlib backend, PNG)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
from pymatgen.analysis.phase_diagram import PDPlotter
from pymatgen.core import Composition

from cspml_flows.campaign.config import CampaignConfig
from cspml_flows.core.schemas import CampaignSummary, CandidateRow, RelaxRecord, RoundSummary, TierSummary
from cspml_flows.core.tables import markdown_table
from cspml_flows.flows.stability import phase_diagram
from cspml_flows.flows.stores import RESULTS_COLLECTION, close_store, open_store

logger = logging.getLogger(__name__)


def _fmt(x: Any, spec: str = ".3f") -> str:
    """A number in ``spec`` (``-`` for None or a non-finite value)."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, spec) if isinstance(x, int | float) else str(x)


def hull_plot(records: list[RelaxRecord], chemsys: str, path: Path, vasp: bool = False) -> Path | None:
    """Write the convex hull of one chemical system (2 or 3 elements) as PNG; None if it cannot be drawn."""
    if not 2 <= len(chemsys.split("-")) <= 3:
        return None
    pd = phase_diagram(records, chemsys, vasp=vasp)
    if pd is None:
        return None
    matplotlib.use("Agg")  # files only, whatever the display
    try:
        ax = PDPlotter(pd, backend="matplotlib", show_unstable=0.5).get_plot()
        fig = ax.get_figure()
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
    except Exception:  # a plot is an extra: the report is written without it
        logger.warning("no hull plot of %s", chemsys, exc_info=True)
        return None
    return path


def header_lines(cfg: CampaignConfig, result: CampaignSummary) -> list[str]:
    """Title, calculator tiers, stores."""
    calcs = result.calculators or [result.calculator]
    names = [cfg.calculator.name, *(t.name for t in cfg.tiers)]
    tiers = ", then ".join(
        f"`{c}` ({n}{'' if k == 0 else f', within {cfg.tiers[k - 1].hull_window or 0.1} eV/atom of the previous hull'})"
        for k, (c, n) in enumerate(zip(calcs, names, strict=False))
    )
    return [
        f"# Campaign `{cfg.name}` ({cfg.kind})",
        "",
        f"Calculator{'s' if len(calcs) > 1 else ''} {tiers}; top-{cfg.top_k} per composition, "
        f"promotion threshold e_above_hull <= {cfg.hull_threshold} eV/atom (last tier), "
        f"{len(result.rounds)} round(s).",
        f"Template store `{cfg.template_store()}`; results store `{cfg.results_store()}`.",
        "",
    ]


def tier_table(tiers: list[TierSummary]) -> str:
    """Counts per calculator tier."""
    header = ["tier", "calculator", "candidates", "relaxed now", "cached", "failed", "references"]
    rows = [
        [t.tier, f"`{t.calculator}`", t.n_candidates, t.n_computed, t.n_cached, t.n_failed, t.n_references]
        if t.finished
        else [t.tier, "did not finish", "", "", "", "", ""]
        for t in tiers
    ]
    return markdown_table(header, rows, "rlrrrrr")


def candidate_cells(c: CandidateRow, later_tiers: list[TierSummary]) -> list[str]:
    """The cells of one candidate's row."""
    note = c.reason or c.hull_note or ""
    if c.corrections:  # custodian fixed VASP errors on the way
        note = "; ".join([note, f"custodian corrected {', '.join(c.corrections)}"]).lstrip("; ")
    later = {t.tier: t for t in c.tiers}
    cells = [_fmt(later[t.tier].e_above_hull, ".4f") if t.tier in later else "-" for t in later_tiers]
    return [
        c.formula,
        _fmt(c.rank, "d"),
        _fmt(c.score),
        str(c.template_id),
        c.status,
        _fmt(c.energy_per_atom, ".4f"),
        _fmt(c.e_above_hull, ".4f"),
        *cells,
        note,
    ]


def round_lines(r: RoundSummary) -> list[str]:
    """One round's section: counts, messages, the tier table (several tiers), the candidates."""
    lines = [
        f"## Round {r.round}",
        "",
        f"{r.n_candidates} candidates; {r.n_computed} relaxed in this run, {r.n_cached} from the cache, "
        f"{r.n_failed} failed; {r.n_references} competing phases; {len(r.promoted)} promoted "
        f"({r.seconds:.1f} s).",
        "",
    ]
    lines += [f"- {formula}: {msg}" for formula, msg in sorted(r.messages.items())]
    if len(r.tiers) > 1:
        lines += ["", tier_table(r.tiers)]
    later = r.tiers[1:]
    header = ["formula", "rank", "score", "template", "status", "E (eV/atom)", "e_above_hull (eV/atom)"]
    header += [f"tier {t.tier} e_above_hull" for t in later] + ["note"]
    rows = sorted(r.candidates, key=lambda c: (c.formula, c.rank or 0))
    table = markdown_table(header, [candidate_cells(c, later) for c in rows], "lrrllrr" + "r" * len(later) + "l")
    lines += ["", table]
    if r.promoted:
        lines += ["", "Promoted into the template store: " + ", ".join(f"`{m}`" for m in r.promoted)]
    lines.append("")
    return lines


def write_report(cfg: CampaignConfig, result: CampaignSummary) -> Path:
    """Write ``<workdir>/report.md`` (and ``hull_<chemsys>.png`` files per calculator tier) for a campaign."""
    out = cfg.workdir_path()
    out.mkdir(parents=True, exist_ok=True)
    lines = header_lines(cfg, result)
    systems: set[str] = set()
    for r in result.rounds:
        lines += round_lines(r)
        systems |= {Composition(c.formula).chemical_system for c in r.candidates if c.status == "successful"}
    calcs = result.calculators or [result.calculator]
    names = [cfg.calculator.name, *(t.name for t in cfg.tiers)]
    plots = []
    for k, (calc, name) in enumerate(zip(calcs, names, strict=False)):
        plots += _plots(cfg, calc, name == "vasp", sorted(systems), out, "" if k == 0 else f"_tier{k + 1}")
    if plots:
        lines += ["## Convex hulls", ""]
        lines += [f"![{cs} hull]({p.name})" for cs, p in plots]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _plots(
    cfg: CampaignConfig, calc: str, vasp: bool, systems: list[str], out: Path, suffix: str = ""
) -> list[tuple[str, Path]]:
    """Hull plots of ``systems`` from the successful records of calculator ``calc``."""
    store = open_store(cfg.results_store(), RESULTS_COLLECTION)
    try:
        records = [RelaxRecord.coerce(d) for d in store.query({"calculator": calc, "status": "successful"})]
    finally:
        close_store(store)
    made = []
    for cs in systems:
        p = hull_plot(records, cs, out / f"hull_{cs}{suffix}.png", vasp=vasp)
        if p is not None:
            made.append((cs, p))
    return made
