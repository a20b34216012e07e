"""Per-element volumes learned from the template pool: how much room each element takes in a crystal.

A substituted template is rescaled by the ratio of the query's to the template's summed element volumes
(:func:`cspml_flows.predict.substitute.volume_scale`). Elemental ground-state volumes (Magpie's
``GSvolume_pa``) describe the pure elements, which for most elements pack very differently than in a
compound (an alkali metal's bcc volume against its size in an oxide). Here the volume per atom of every
template is fitted as a composition-weighted sum of element volumes (a Vegard-like mixing rule), by
non-negative least squares over the pool, with a weak pull toward the elemental volume so that an element
the pool rarely holds keeps a sensible value and one it never holds keeps the elemental one.
"""

from __future__ import annotations

import numpy as np
from pymatgen.core import Element
from scipy.optimize import lsq_linear

from cspml_flows.core.descriptors import N_ELEMENTS, elemental_volumes
from cspml_flows.templates.geometry import cell_arrays
from cspml_flows.templates.index import TemplateIndex

MAX_ROWS = 50_000  # templates the fit reads at most (evenly spaced over the pool)
PRIOR_WEIGHT = 0.1  # weight of each element's elemental volume, in templates' worth of evidence
MIN_VOLUME = 0.5  # Å^3 per atom: the least volume an element may take


def volume_mapping(table: np.ndarray) -> dict[str, float]:
    """A volume table by atomic number as element symbol -> volume (the finite ones), as model files hold it."""
    return {Element.from_Z(z).symbol: round(float(v), 4) for z, v in enumerate(table) if z > 0 and np.isfinite(v)}


def volume_table(mapping: dict[str, float]) -> np.ndarray:
    """Inverse of :func:`volume_mapping`: NaN for an element the mapping does not hold."""
    table = np.full(N_ELEMENTS, np.nan)
    for symbol, value in mapping.items():
        table[Element(symbol).Z] = value
    return table


def volume_rows(index: TemplateIndex, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Element fractions (rows x atomic number) and volume per atom of the templates ``rows``."""
    x = np.zeros((len(rows), N_ELEMENTS))
    vpa = np.empty(len(rows))
    for k, t in enumerate(rows.tolist()):
        r = index.roles[t]
        matrix, frac, _ = cell_arrays(index.structures[t], r)
        vpa[k] = abs(np.linalg.det(matrix)) / len(frac)
        total = sum(r.amounts)
        for el, amount in zip(r.elements, r.amounts, strict=True):
            x[k, Element(el).Z] += amount / total
    return x, vpa


def fit_element_volumes(
    index: TemplateIndex, max_rows: int = MAX_ROWS, prior_weight: float = PRIOR_WEIGHT
) -> np.ndarray:
    """Volume per atom of each element (by atomic number) that best sums to the templates' volumes per atom.

    Least squares over at most ``max_rows`` templates, each element also pulled toward its elemental volume
    with ``prior_weight``; bounded below by :data:`MIN_VOLUME`. NaN for an element with neither templates
    nor an elemental volume.
    """
    prior = elemental_volumes()
    rows = np.arange(len(index))
    if len(rows) > max_rows:
        rows = rows[np.linspace(0, len(rows) - 1, max_rows).round().astype(np.int64)]
    x, vpa = volume_rows(index, rows)
    ok = np.isfinite(vpa) & (vpa > 0)
    x, vpa = x[ok], vpa[ok]
    seen = x.sum(axis=0) > 0
    known = np.isfinite(prior) & (prior > 0)
    fitted = seen | known
    cols = np.flatnonzero(fitted)
    pulled = np.flatnonzero(known[cols])
    w = np.sqrt(prior_weight)
    a = np.vstack([x[:, cols], w * np.eye(len(cols))[pulled]])
    b = np.concatenate([vpa, w * prior[cols[pulled]]])
    out = np.full(N_ELEMENTS, np.nan)
    if len(cols):
        out[cols] = lsq_linear(a, b, bounds=(MIN_VOLUME, np.inf), method="bvls").x
    return out
