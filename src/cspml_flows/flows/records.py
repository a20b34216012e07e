"""Relaxation items and records: what a relaxation stage is given (one item per structure) and what it keeps
(one :class:`~cspml_flows.core.schemas.RelaxRecord` per structure and calculator)."""

from __future__ import annotations

import os
import socket
from typing import Any, Protocol

from pymatgen.core import Structure

from cspml_flows.core.engines import relax_key, structure_fingerprint
from cspml_flows.core.schemas import CandidateDoc, CandidateSet, RelaxRecord


class Relaxation(Protocol):
    """What a record needs of its relaxation (a :class:`~cspml_flows.flows.relax.RelaxationMaker`)."""

    @property
    def calc_id(self) -> str:
        """Calculator id: one hull per id."""
        ...

    @property
    def label(self) -> str:
        """The calculator's name in messages."""
        ...

    @property
    def vasp(self) -> bool:
        """Whether the relaxation runs VASP."""
        ...


def as_structure(value: Structure | dict) -> Structure:
    """A Structure from a dict or a Structure (engines such as FireWorks decode job arguments)."""
    return value if isinstance(value, Structure) else Structure.from_dict(value)


def candidate_items(candidates: CandidateSet) -> list[dict]:
    """Relaxation items of a candidate set (structure, kind, template id, the candidate document, round)."""
    cs = CandidateSet.coerce(candidates)
    return [
        {
            "structure": c.structure.as_dict(),
            "kind": "candidate",
            "source_id": c.template_id,
            "candidate": c.model_dump(mode="json"),
            "round": c.round,
        }
        for c in cs.candidates
    ]


def new_record(item: dict, relaxation: Relaxation, **fields: Any) -> RelaxRecord:
    """A :class:`RelaxRecord` for ``item`` (formula, chemical system and key from its structure)."""
    s = as_structure(item["structure"])
    fp = structure_fingerprint(s)
    candidate = item.get("candidate")
    return RelaxRecord(
        key=relax_key(fp, relaxation),
        fingerprint=fp,
        calculator=relaxation.calc_id,
        kind=item.get("kind", "candidate"),
        formula=s.composition.reduced_formula,
        chemsys=s.composition.chemical_system,
        nsites=len(s),
        initial_structure=s,
        source_id=item.get("source_id"),
        candidate=CandidateDoc.coerce(candidate) if candidate is not None else None,
        round=item.get("round"),
        worker=f"{socket.gethostname()}:{os.getpid()}",
        **fields,
    )
