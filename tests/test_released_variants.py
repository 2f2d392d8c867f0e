"""The configurations the released checkpoints use, against fairchem 1.10 (tests/data/released_variants_make.py).

OC20 base/Large block layout (num_concat 4, six blocks), ODAC's GemNet-OC graph (cutoff 8 Å everywhere, quadruplets
on tags 0-2, 100 elements), energy-only IS2RE GemNet-OC and eSCN, an OC22-style file with fairchem >= 1.1
``elementrefs``, eSCN lmax 6 / mmax 3 and ODAC's eSCN: each stored in fairchem's checkpoint layout, loaded by
mlcalc from the file and compared with fairchem's float64 outputs (1e-6 eV, eV/Å).
"""

from __future__ import annotations

import json
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from ase.calculators.calculator import PropertyNotImplementedError

from mlcalc import load_calculator

DATA = Path(__file__).parent / "data"
CHECKPOINTS = torch.load(DATA / "released_variants.pt", weights_only=True)
EXPECTED = json.loads((DATA / "released_variants.json").read_text())["variants"]
STRUCTURES = {
    a.info["name"]: a
    for f in ("structures.extxyz", "released_variants_structures.extxyz")
    for a in ase.io.read(DATA / f, index=":")
}
CASES = [(v, s) for v in EXPECTED for s in EXPECTED[v]["structures"]]


@pytest.fixture(scope="module")
def calculators(tmp_path_factory) -> dict:
    out = {}
    for name, ckpt in CHECKPOINTS.items():
        path = tmp_path_factory.mktemp("released") / f"{name}.pt"
        torch.save(ckpt, path)
        out[name] = load_calculator(path, device="cpu", dtype="float64")
    return out


@pytest.mark.parametrize("variant, structure", CASES)
def test_parity_with_fairchem(calculators, variant: str, structure: str) -> None:
    calc = calculators[variant]
    ref = EXPECTED[variant]["structures"][structure]
    atoms = STRUCTURES[structure].copy()
    atoms.calc = calc
    assert abs(atoms.get_potential_energy() - ref["energy"]) <= 1e-6
    if "forces" in ref:
        assert np.abs(atoms.get_forces() - np.array(ref["forces"])).max() <= 1e-6
    else:
        with pytest.raises(PropertyNotImplementedError, match="energy-only"):
            atoms.get_forces()


def test_what_each_variant_declares(calculators) -> None:
    assert calculators["gemnet_oc_is2re"].implemented_properties == ["energy", "free_energy"]
    assert calculators["escn_is2re"].implemented_properties == ["energy", "free_energy"]
    oc22 = calculators["gemnet_oc_oc22_elementrefs"]
    assert oc22.info["energy"] == "total" and len(oc22.model.element_references) == 118
    odac = calculators["gemnet_oc_odac"].model
    assert odac.max_elements == 100 and sorted(odac.qint_tags.tolist()) == [0, 1, 2]
    assert calculators["escn_l6_m3"].model.mmax_list == [3]
