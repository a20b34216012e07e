"""Put a query's elements onto a template's sites and rescale the cell."""

from __future__ import annotations

import numpy as np
from pymatgen.core import Element, Lattice, Structure

from cspml_flows.core.composition import Roles
from cspml_flows.core.descriptors import elemental_volumes
from cspml_flows.templates.index import TemplateIndex


def volume_scale(query: Roles, template: Roles, perm: tuple[int, ...], volumes: np.ndarray | None = None) -> float:
    """Ratio of predicted to template volume: element ``volumes`` (per atom, by atomic number; default the
    pure elements') summed over the formula, role by role; 1 where an element has none."""
    table = elemental_volumes() if volumes is None else volumes
    vq = table[[Element(query.elements[j]).Z for j in perm]]
    vt = table[[Element(e).Z for e in template.elements]]
    amounts = np.asarray(template.amounts)
    ratio = (amounts * vq).sum() / (amounts * vt).sum()
    return float(ratio) if np.isfinite(ratio) and ratio > 0 else 1.0


def substitute(
    index: TemplateIndex, t: int, query: Roles, perm: tuple[int, ...], volumes: np.ndarray | None = None
) -> tuple[Structure, float]:
    """The template ``t`` with role ``r`` taken by ``query.elements[perm[r]]``, its cell rescaled by the element
    ``volumes`` (see :func:`volume_scale`; a model's are learned from its pool, :mod:`cspml_flows.templates.volumes`).

    Returns the structure and its minimum interatomic distance.
    """
    matrix, frac, site_roles, dmin = index.cell(t)
    scale = volume_scale(query, index.roles[t], perm, volumes) ** (1 / 3)
    q_el = [query.elements[j] for j in perm]
    species = [q_el[r] for r in site_roles]
    s = Structure(Lattice(matrix * scale), species, frac, validate_proximity=False)
    return s, dmin * scale
