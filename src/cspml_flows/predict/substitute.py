"""Put a query's elements onto a template's sites and rescale the cell."""

from __future__ import annotations

import numpy as np
from pymatgen.core import Lattice, Structure

from cspml_flows.core.composition import Roles
from cspml_flows.core.descriptors import element_volume
from cspml_flows.templates.index import TemplateIndex


def volume_scale(query: Roles, template: Roles, perm: tuple[int, ...]) -> float:
    """Ratio of predicted to template volume: elemental volumes summed over the formula, role by role."""
    q_el = [query.elements[j] for j in perm]
    vq = element_volume(q_el)
    vt = element_volume(template.elements)
    amounts = np.asarray(template.amounts)
    if not (np.all(np.isfinite(vq)) and np.all(np.isfinite(vt))):
        return 1.0
    return float((amounts * vq).sum() / (amounts * vt).sum())


def substitute(index: TemplateIndex, t: int, query: Roles, perm: tuple[int, ...]) -> tuple[Structure, float]:
    """The template ``t`` with role ``r`` taken by ``query.elements[perm[r]]``, volume rescaled.

    Returns the structure and its minimum interatomic distance.
    """
    matrix, frac, site_roles, dmin = index.cell(t)
    scale = volume_scale(query, index.roles[t], perm) ** (1 / 3)
    q_el = [query.elements[j] for j in perm]
    species = [q_el[r] for r in site_roles]
    s = Structure(Lattice(matrix * scale), species, frac, validate_proximity=False)
    return s, dmin * scale
