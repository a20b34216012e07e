"""Per-role site environments: textbook coordination of simple structures."""

from __future__ import annotations

import numpy as np
import pytest
from benchmarks.site_environments import environment_arrays, role_environments
from pymatgen.core import Lattice, Structure

from cspml_flows.core.composition import roles


def envs(s: Structure):
    r = roles(s.composition)
    site_roles = np.array([r.elements.index(site.specie.symbol) for site in s])
    return r.elements, role_environments(s.lattice.matrix, s.frac_coords, site_roles)


def test_perovskite_octahedral_b_site_and_large_a_site():
    s = Structure(
        Lattice.cubic(3.905),
        ["Sr", "Ti", "O", "O", "O"],
        [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]],
    )
    els, (ecn, shell_n, shell_d) = envs(s)
    sr, ti, o = (els.index(e) for e in ("Sr", "Ti", "O"))
    assert ecn[ti] == pytest.approx(6.0, abs=0.05)
    assert ecn[sr] > 11.5
    assert shell_n[ti, o] == pytest.approx(6.0, abs=0.05)
    assert shell_d[ti, o] == pytest.approx(3.905 / 2, abs=1e-3)
    assert shell_d[sr, o] == pytest.approx(3.905 / 2**0.5, abs=1e-3)
    assert np.isnan(ecn[3:]).all()  # padding past the three roles


FCC = Lattice.from_parameters(*[1 / 2**0.5] * 3, 60, 60, 60).matrix  # primitive fcc cell of unit cube edge


@pytest.mark.parametrize(
    ("species", "coords", "lattice", "cn"),
    [
        (["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]], Lattice(FCC * 5.64), 6),
        (["Zn", "S"], [[0, 0, 0], [0.25, 0.25, 0.25]], Lattice(FCC * 5.41), 4),
    ],
    ids=["rocksalt", "zincblende"],
)
def test_binary_coordination_numbers(species, coords, lattice, cn):
    _, (ecn, shell_n, _) = envs(Structure(lattice, species, coords))
    assert ecn[:2] == pytest.approx([cn, cn], abs=0.1)
    assert shell_n[0, 1] == pytest.approx(cn, abs=0.1)


def test_cscl_counts_its_second_shell_in_part():
    """Eight Cl at a, six Cs at 2a/sqrt(3) (15 % further): the effective number lies between 8 and 14."""
    _, (ecn, shell_n, _) = envs(Structure(Lattice.cubic(4.12), ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]))
    assert 8 < ecn[0] < 14
    assert shell_n[0, 1] > 2 * shell_n[0, 0]


def test_a_lone_atom_in_a_large_cell_still_has_a_shell():
    s = Structure(Lattice.cubic(7.5), ["Xe"], [[0, 0, 0]])
    _, (ecn, _, shell_d) = envs(s)
    assert ecn[0] == pytest.approx(6.0, abs=0.05)
    assert shell_d[0, 0] == pytest.approx(7.5, abs=0.05)


def test_environment_arrays_stack_cells():
    s = Structure(Lattice.cubic(4.12), ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    cell = (s.lattice.matrix, s.frac_coords, np.array([0, 1]))
    env = environment_arrays([cell, cell], 2)
    assert env.ecn.shape == (2, 6) and env.shell_n.shape == (2, 6, 6)
    assert env.take(np.array([1])).ecn[0, 0] == env.ecn[0, 0]
