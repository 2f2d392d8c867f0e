"""pymatgen Structure/Molecule in and out (the ``pymatgen`` extra; part of the test extra so CI runs these)."""

import numpy as np
import pytest
from ase.build import fcc111, molecule

from mlcalc import MLCalculator, radius_graph
from mlcalc.models import LennardJones
from mlcalc.structures import as_atoms, to_pymatgen

pytest.importorskip("pymatgen.core")


def test_structure_round_trip_keeps_cell_pbc_tags():
    slab = fcc111("Cu", (2, 2, 3), vacuum=5.0)
    slab.set_tags([0] * 4 + [1] * 8)
    s = to_pymatgen(slab)
    back = as_atoms(s)
    np.testing.assert_allclose(back.positions, slab.positions, atol=1e-10)
    np.testing.assert_allclose(back.cell.array, slab.cell.array, atol=1e-10)
    assert (back.get_tags() == slab.get_tags()).all()
    assert type(to_pymatgen(molecule("H2O"))).__name__ == "Molecule"


def test_graph_and_predict_accept_pymatgen():
    slab = fcc111("Cu", (2, 2, 3), vacuum=5.0)
    slab.pbc = True
    g1, g2 = radius_graph(slab, 5.0), radius_graph(to_pymatgen(slab), 5.0)
    assert g1.num_edges == g2.num_edges
    calc = MLCalculator(LennardJones(sigma=2.3, epsilon=0.4, rc=5.0), device="cpu", dtype="float64")
    r = calc.predict([to_pymatgen(slab)])[0]
    assert r["energy"] == pytest.approx(calc.get_potential_energy(slab), abs=1e-10)


def test_unknown_type_is_rejected():
    with pytest.raises(TypeError, match="pymatgen"):
        as_atoms("Cu")
