"""User-defined templates: structures from no database, added to the pool at prediction time.

The towers encode any structure from its geometry and site chemistry, so a user CIF/POSCAR becomes a
candidate without retraining. Each file gets its own prototype cluster (ids ``user:<file name>``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pymatgen.core import Structure

from cspml_flows.core.errors import StructureReadError
from cspml_flows.learning.hetero.encoders import geometry_features
from cspml_flows.templates.index import TemplateIndex
from cspml_flows.templates.lazy import Concatenated
from cspml_flows.templates.readers import read_template_file, structure_files
from cspml_flows.templates.schema import template_doc_from_structure


def read_user_structures(folder: str | Path) -> dict[str, Structure]:
    """Every CIF/POSCAR of a folder by id ``user:<name>``; an unreadable file, or one that cannot be a template
    (partial occupancies, too many sites), raises StructureReadError naming it."""
    return {f"user:{f.name}": read_template_file(f) for f in structure_files(folder)}


def user_index(structures: dict[str, Structure]) -> TemplateIndex:
    """A template index of user structures (prototype labels, symmetry, descriptors).

    A user file carries no energy: it is taken as a ground state (e_above_hull 0), the value the models saw
    for most database templates, rather than as a missing value the models never saw."""
    docs = [
        template_doc_from_structure(s, mid, source="user", e_above_hull=0.0).model_dump(mode="json")
        for mid, s in structures.items()
    ]
    return TemplateIndex.from_docs(docs, workers=1)


def merge_indices(a: TemplateIndex, b: TemplateIndex) -> TemplateIndex:
    """Templates of ``a`` then ``b``; ``b``'s cluster ids are shifted past ``a``'s. Structures, roles and role
    symmetries are read through from both (a pool's are not decoded)."""
    if len(b) == 0:
        return a
    if len(a) == 0:
        return b
    offset = int(a.cluster.max()) + 1
    return TemplateIndex(
        ids=np.concatenate([a.ids.astype(object), b.ids.astype(object)]).astype(str),
        formulas=np.concatenate([a.formulas.astype(object), b.formulas.astype(object)]).astype(str),
        anon=np.concatenate([a.anon.astype(object), b.anon.astype(object)]).astype(str),
        roles=Concatenated(a.roles, b.roles),
        nprim=np.concatenate([a.nprim, b.nprim]),
        prototype=np.concatenate([a.prototype, b.prototype]),
        e_above_hull=np.concatenate([a.e_above_hull, b.e_above_hull]),
        spacegroup=np.concatenate([a.spacegroup, b.spacegroup]),
        structures=Concatenated(a.structures, b.structures),
        cluster=np.concatenate([a.cluster, b.cluster + offset]),
        stats=np.vstack([a.stats, b.stats]),
        role_props=np.concatenate([a.role_props, b.role_props]),
        role_fracs=np.concatenate([a.role_fracs, b.role_fracs]),
        signature=f"{a.signature}+{b.signature or 'user'}",
        min_dist=None if a.min_dist is None or b.min_dist is None else np.concatenate([a.min_dist, b.min_dist]),
        role_syms=None if a.role_syms is None or b.role_syms is None else Concatenated(a.role_syms, b.role_syms),
    )


def add_user_templates(
    index: TemplateIndex, source: str | Path | dict[str, Structure], geom: np.ndarray | None = None
) -> tuple[TemplateIndex, np.ndarray | None]:
    """The pool plus the user structures of a folder (or already read by :func:`read_user_structures`), and
    their geometry rows appended to ``geom`` when it is given."""
    structures = source if isinstance(source, dict) else read_user_structures(source)
    clash = set(structures) & set(index.ids.tolist())
    if clash:
        raise StructureReadError(f"user template ids already in the pool: {', '.join(sorted(clash))}")
    ui = user_index(structures)
    merged = merge_indices(index, ui)
    if geom is None:
        return merged, None
    ug = geometry_features(list(ui.ids), ui.structures, ui.roles, list(ui.spacegroup), list(ui.nprim), 1, False)
    return merged, np.vstack([geom, ug])
