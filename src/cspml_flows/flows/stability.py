"""Phase stability with energies from one calculator: competing phases from the template store, pymatgen
PhaseDiagram per chemical system, MP2020 corrections for VASP GGA/GGA+U entries."""

from __future__ import annotations

import logging
import math
import warnings
from itertools import combinations

from pymatgen.analysis.phase_diagram import PhaseDiagram
from pymatgen.core import Composition, Element, Lattice, Structure
from pymatgen.entries.compatibility import MaterialsProject2020Compatibility
from pymatgen.entries.computed_entries import ComputedEntry

from cspml_flows.core.descriptors import element_volume
from cspml_flows.core.schemas import RelaxRecord, StabilityRecord
from cspml_flows.templates.store import TemplateStore

logger = logging.getLogger(__name__)


def subsystems(chemsys: str) -> list[str]:
    """Every chemical system inside ``chemsys`` (``Li-O`` -> ``Li``, ``O``, ``Li-O``)."""
    els = sorted(chemsys.split("-"))
    return ["-".join(c) for n in range(1, len(els) + 1) for c in combinations(els, n)]


def elemental_prototypes(element: str) -> list[Structure]:
    """fcc, bcc and hcp cells of an element at its Magpie ground-state volume per atom: references for an
    element the template store lacks."""
    v = float(element_volume([element])[0])
    if not v or math.isnan(v):
        v = 20.0
    fcc_a = (4 * v) ** (1 / 3)
    bcc_a = (2 * v) ** (1 / 3)
    hcp_a = (2 * v / (1.633 * 3**0.5 / 2)) ** (1 / 3)
    return [
        Structure(Lattice.cubic(fcc_a), [element] * 4, [[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]]),
        Structure(Lattice.cubic(bcc_a), [element] * 2, [[0, 0, 0], [0.5, 0.5, 0.5]]),
        Structure(Lattice.hexagonal(hcp_a, 1.633 * hcp_a), [element] * 2, [[1 / 3, 2 / 3, 0.25], [2 / 3, 1 / 3, 0.75]]),
    ]


def competing_phases(template_store: str, systems: list[str], max_per_system: int = 40) -> list[dict]:
    """Relaxation items for the competing phases of ``systems``: store templates in every subsystem (lowest
    stored e_above_hull first, at most ``max_per_system`` per subsystem) plus generated elemental cells for
    elements the store lacks."""
    subs = sorted({s for cs in systems for s in subsystems(cs)})
    if not subs:
        return []
    items: list[dict] = []
    ts = TemplateStore.open(template_store, create=False)
    try:
        by_sys: dict[str, list[dict]] = {}
        for d in ts.docs(
            {"chemsys": {"$in": subs}}, properties=["material_id", "structure", "chemsys", "e_above_hull"]
        ):
            by_sys.setdefault(d["chemsys"], []).append(d)
    finally:
        ts.close()
    for sub in subs:
        docs = sorted(
            by_sys.get(sub, []),
            key=lambda d: (d.get("e_above_hull") is None, d.get("e_above_hull") or 0.0, str(d["material_id"])),
        )
        for d in docs[:max_per_system]:
            items.append({"structure": d["structure"], "kind": "reference", "source_id": str(d["material_id"])})
        if "-" not in sub and not docs:
            for i, s in enumerate(elemental_prototypes(sub)):
                items.append({"structure": s.as_dict(), "kind": "reference", "source_id": f"generated-{sub}-{i}"})
    return items


def _entry(r: RelaxRecord, vasp: bool) -> ComputedEntry:
    """The ComputedEntry of a successful record (VASP: its stored entry, for MP2020), keyed by its key."""
    if vasp and r.entry:
        e = ComputedEntry.from_dict(r.entry)
        e.entry_id = r.key
        return e
    return ComputedEntry(_composition(r), r.energy, entry_id=r.key)


def _composition(r: RelaxRecord) -> Composition:
    """The composition of a record's (relaxed, else initial) structure."""
    return (r.structure or r.initial_structure).composition


def mp2020_process(entries: list[ComputedEntry]) -> tuple[list[ComputedEntry], set[str]]:
    """MP2020 corrections for VASP GGA/GGA+U entries; returns the kept entries and the ids it rejected."""
    with warnings.catch_warnings():
        # intermetallics have no oxidation states to guess and relaxations carry no oxide type: MP2020 then
        # applies no anion correction, which is right for them, and says so once per entry
        for message in ("Failed to guess oxidation states", "No structure or oxide_type parameter"):
            warnings.filterwarnings("ignore", message=message, category=UserWarning)
        compat = MaterialsProject2020Compatibility(check_potcar=False)
        kept = compat.process_entries(entries, clean=True, inplace=False)
    ids = {e.entry_id for e in kept}
    return kept, {e.entry_id for e in entries} - ids


def hull_analysis(
    candidates: list[RelaxRecord], references: list[RelaxRecord], vasp: bool = False
) -> tuple[list[StabilityRecord], dict[str, list[str]]]:
    """e_above_hull of every successful candidate in its chemical system; all entries from one calculator.

    Returns the records (candidates in input order) and the reference keys used per chemical system.
    """
    ok_c = [r for r in candidates if r.status == "successful" and r.energy is not None]
    ok_r = [r for r in references if r.status == "successful" and r.energy is not None]
    entries = {r.key: _entry(r, vasp) for r in [*ok_c, *ok_r]}
    rejected: set[str] = set()
    if vasp:
        kept, rejected = mp2020_process(list(entries.values()))
        entries = {e.entry_id: e for e in kept}
    out: list[StabilityRecord] = []
    systems: dict[str, list[str]] = {}
    diagrams: dict[str, PhaseDiagram | str] = {}
    for r in candidates:
        rec = StabilityRecord(key=r.key, formula=r.formula, chemsys=r.chemsys, energy_per_atom=r.energy_per_atom)
        if r.status != "successful" or r.energy is None:
            rec.reason = f"relaxation failed: {r.reason}"
            out.append(rec)
            continue
        if r.key in rejected:
            rec.reason = "rejected by MP2020 compatibility (run type or POTCARs not GGA/GGA+U)"
            out.append(rec)
            continue
        if r.chemsys not in diagrams:
            els = set(r.chemsys.split("-"))
            members = [e for e in entries.values() if {el.symbol for el in e.composition.elements} <= els]
            systems[r.chemsys] = sorted(e.entry_id for e in members if e.entry_id in {x.key for x in ok_r})
            missing = sorted(
                el for el in els if not any(e.composition.is_element and Element(el) in e.composition for e in members)
            )
            if missing:
                diagrams[r.chemsys] = f"no successful elemental reference for {', '.join(missing)}"
            else:
                diagrams[r.chemsys] = PhaseDiagram(members)
        pd = diagrams[r.chemsys]
        if isinstance(pd, str):
            rec.reason = pd
            out.append(rec)
            continue
        e = entries[r.key]
        decomp, ehull = pd.get_decomp_and_e_above_hull(e, allow_negative=True)
        rec.e_above_hull = float(ehull)
        rec.corrected_energy_per_atom = float(e.energy_per_atom)
        rec.formation_energy_per_atom = float(pd.get_form_energy_per_atom(e))
        rec.decomposition = {d.composition.reduced_formula: float(x) for d, x in decomp.items()}
        out.append(rec)
    return out, systems


def phase_diagram(records: list[RelaxRecord], chemsys: str, vasp: bool = False) -> PhaseDiagram | None:
    """The PhaseDiagram of one chemical system from successful records (for reports); None if incomplete."""
    els = set(chemsys.split("-"))
    entries = [
        _entry(r, vasp)
        for r in records
        if r.status == "successful" and r.energy is not None and set(r.chemsys.split("-")) <= els
    ]
    if vasp:
        entries, _ = mp2020_process(entries)
    try:
        return PhaseDiagram(entries)
    except ValueError:  # no entries, or an element without an elemental entry: no diagram to draw
        logger.info("no phase diagram of %s from %d entries", chemsys, len(entries), exc_info=True)
        return None
