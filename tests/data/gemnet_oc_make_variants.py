#!/usr/bin/env python
"""Regenerate gemnet_oc_variants.{pt,json} and gemnet_oc_variant_structures.extxyz with fairchem-core 1.10.

Needs the reference environment (fairchem-core 1.10, torch_scatter, torch_sparse, ase); run from anywhere:

    /root/.cache/mlcalc-reference/bin/python tests/data/gemnet_oc_make_variants.py

Covers the GemNet-OC options the public fixtures do not: spherical_bessel / bernstein radial bases, exponential
envelope, gaussian circular basis, spherical_harmonics / gaussian_outer spherical bases, rbf_spherical,
scale_basis, forces_coupled, intensive energy, non-strict max-neighbour truncation, models without atom
interactions (main graph = calculator graph) or without quadruplets, num_elements, and output blocks without
the after-atom MLP. Each variant is a small randomly initialised model (fixed seed) whose state_dict (float32,
fairchem key names, random scale factors in [0.5, 2]) is stored; fairchem's float64 outputs are the reference.

float64 reference: as for the public fixtures, a temporary copy of the installed fairchem package with
dtype-only edits (FLOAT64_EDITS: periodic offsets and image grid in the cell's dtype, the max-neighbour sort
buffer in the distances' dtype, no float32 cast before the output layers) is imported, torch's default dtype is
float64 in this process, the model is converted to float64 and positions are wrapped in float64 exactly as
AtomsToGraphs does.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import ase.io
import numpy as np
import torch
from ase.build import bulk, fcc111
from ase.geometry import wrap_positions

HERE = Path(__file__).resolve().parent

BASE = dict(
    num_spherical=4, num_radial=8, num_blocks=2, emb_size_atom=16, emb_size_edge=16, emb_size_trip_in=4,
    emb_size_trip_out=4, emb_size_quad_in=4, emb_size_quad_out=4, emb_size_aint_in=4, emb_size_aint_out=4,
    emb_size_rbf=4, emb_size_cbf=4, emb_size_sbf=4, num_before_skip=1, num_after_skip=1, num_concat=1,
    num_atom=1, num_output_afteratom=1, num_atom_emb_layers=1, num_global_out_layers=1,
    cutoff=6.0, cutoff_qint=5.0, cutoff_aeaint=5.5, cutoff_aint=6.0,
    max_neighbors=20, max_neighbors_qint=8, max_neighbors_aeaint=12, max_neighbors_aint=50,
    quad_interaction=True, atom_edge_interaction=True, edge_atom_interaction=True, atom_interaction=True,
    qint_tags=[1, 2], regress_forces=True, otf_graph=True,
)  # fmt: skip

VARIANTS = {
    # radial/angular bases, direct forces coupled, intensive energy
    "bessel_exponential": dict(
        rbf={"name": "spherical_bessel"}, envelope={"name": "exponential"}, cbf={"name": "gaussian"},
        sbf={"name": "spherical_harmonics"}, direct_forces=True, forces_coupled=True, extensive=False,
    ),
    # bernstein with a separate gaussian rbf_spherical, gaussian_outer, scale_basis, gradient forces
    "bernstein_scale_basis": dict(
        rbf={"name": "bernstein"}, rbf_spherical={"name": "gaussian"}, envelope={"name": "polynomial", "exponent": 6},
        cbf={"name": "spherical_harmonics"}, sbf={"name": "gaussian_outer"}, scale_basis=True, direct_forces=False,
        num_output_afteratom=0, num_atom_emb_layers=0, num_global_out_layers=0,
    ),
    # quadruplets only: the main graph is the calculator's graph, qint sub-selected from it
    "quad_only": dict(
        atom_edge_interaction=False, edge_atom_interaction=False, atom_interaction=False, cutoff=5.5,
        cutoff_qint=4.5, max_neighbors=21, max_neighbors_qint=10, sbf={"name": "legendre_outer"},
        direct_forces=True, qint_tags=[1], num_elements=100,
    ),
    # no quadruplets, atom-to-edge only (cutoff_aint = max of the others), gradient forces
    "atom_edge_only": dict(
        quad_interaction=False, edge_atom_interaction=False, atom_interaction=False, cutoff=5.0,
        cutoff_aeaint=5.5, max_neighbors=16, max_neighbors_aeaint=21, direct_forces=False,
    ),
    # non-strict truncation on degenerate shells
    "nonstrict": dict(
        enforce_max_neighbors_strictly=False, cutoff=6.0, cutoff_qint=5.0, cutoff_aeaint=5.5, cutoff_aint=6.0,
        max_neighbors=14, max_neighbors_qint=8, max_neighbors_aeaint=16, max_neighbors_aint=40,
        sbf={"name": "legendre_outer"}, direct_forces=True,
    ),
}  # fmt: skip

#: structures from the public fixtures used by the variants (non-strict uses its own)
FIXTURE_STRUCTURES = ["a_cu111_2x2x3_O", "c_triclinic_NiAlO", "e_pt100_CO_pbcTTF"]


def degenerate_structures() -> list:
    """Ideal lattices (degenerate neighbour shells) rattled by 1e-4 Å: shells stay far inside the 0.01
    tolerances, collinear quadruplets are broken (well-conditioned dihedral angles)."""
    pt = bulk("Pt", "fcc", a=3.92, cubic=True) * (2, 2, 2)
    pt.set_tags(np.ones(len(pt), dtype=int))
    pt.rattle(1e-4, seed=5)
    pt.info["name"] = "g_pt_bulk_degenerate"
    slab = fcc111("Cu", size=(3, 3, 3), vacuum=7.0, a=3.61)
    z = slab.positions[:, 2]
    slab.set_tags(np.where(z > z.min() + 0.5, 1, 0))
    slab.rattle(1e-4, seed=6)
    slab.info["name"] = "h_cu111_degenerate"
    return [pt, slab]


def build_variant(name: str, extra: dict, seed: int):
    from fairchem.core.models.gemnet_oc.gemnet_oc import GemNetOC
    from fairchem.core.modules.scaling import ScaleFactor

    hp = {**BASE, **extra}
    torch.manual_seed(seed)
    model = GemNetOC(**hp)
    rng = np.random.default_rng(seed)
    for _, mod in model.named_modules():
        if isinstance(mod, ScaleFactor):
            mod.scale_factor.fill_(float(rng.uniform(0.5, 2.0)))
    state = {k: v.detach().to(torch.float32).clone() for k, v in model.state_dict().items()}
    return hp, state


#: dtype-only edits for the float64 copy of fairchem: (file, old, new, expected count)
FLOAT64_EDITS = [
    ("core/common/utils.py", "offsets = cell_offsets.float().view(-1, 1, 3).bmm(cell.float())",
     "offsets = cell_offsets.to(cell.dtype).view(-1, 1, 3).bmm(cell)", 1),
    ("core/common/utils.py", "rep.item() + 1, device=device, dtype=torch.float)",
     "rep.item() + 1, device=device, dtype=data.cell.dtype)", 1),
    ("core/common/utils.py", "np.inf, device=device)", "np.inf, device=device, dtype=atom_distance.dtype)", 1),
    ("core/models/gemnet_oc/gemnet_oc.py", "self.out_energy(x_E.float())", "self.out_energy(x_E)", 2),
    ("core/models/gemnet_oc/gemnet_oc.py", "self.out_forces(x_F.float())", "self.out_forces(x_F)", 1),
]  # fmt: skip


def float64_fairchem_copy(target: Path) -> Path:
    """Copy the installed fairchem package to ``target`` and apply FLOAT64_EDITS; returns the sys.path entry."""
    import importlib.util

    source = Path(importlib.util.find_spec("fairchem").submodule_search_locations[0])
    shutil.copytree(source, target / "fairchem")
    for rel, old, new, count in FLOAT64_EDITS:
        path = target / "fairchem" / rel
        text = path.read_text()
        if text.count(old) != count:
            raise RuntimeError(f"{rel}: expected {count} occurrence(s) of {old!r}, found {text.count(old)}")
        path.write_text(text.replace(old, new))
    return target


def reference(hp: dict, state: dict, atoms_list: list, std: float) -> dict:
    from fairchem.core.datasets import data_list_collater
    from fairchem.core.models.gemnet_oc.gemnet_oc import GemNetOC
    from fairchem.core.preprocessing import AtomsToGraphs

    model = GemNetOC(**hp)
    model = model.double().eval()
    model.load_state_dict({k: v.to(torch.float64) if v.is_floating_point() else v for k, v in state.items()})
    a2g = AtomsToGraphs(r_edges=False, r_pbc=True)
    out = {}
    for atoms in atoms_list:
        data = a2g.convert(atoms)
        pos = atoms.positions
        if atoms.pbc.any():
            pos = wrap_positions(pos, atoms.cell.complete(), atoms.pbc, eps=0)
        data.pos = torch.tensor(pos, dtype=torch.float64)
        data.cell = torch.tensor(np.asarray(atoms.cell.complete()), dtype=torch.float64).view(1, 3, 3)
        batch = data_list_collater([data], otf_graph=True)
        if not hp["direct_forces"]:
            batch.pos.requires_grad_(True)
        res = model(batch)
        energy = float(res["energy"].detach()[0]) * std
        forces = res["forces"].detach().numpy() * std
        out[atoms.info["name"]] = {"energy": energy, "forces": forces.tolist()}
        print(f"  {atoms.info['name']}: E = {energy:.6f}, max|F| = {np.abs(forces).max():.4f}")
    return out


def main() -> None:
    structures = {a.info["name"]: a for a in ase.io.read(HERE / "structures.extxyz", index=":")}
    extra = degenerate_structures()
    path = HERE / "gemnet_oc_variant_structures.extxyz"
    ase.io.write(path, extra, format="extxyz")
    for a in ase.io.read(path, index=":"):  # references from the re-read file
        structures[a.info["name"]] = a

    sys.path.insert(0, str(float64_fairchem_copy(Path(tempfile.mkdtemp()))))
    import fairchem.core

    print("fairchem from", fairchem.core.__file__)
    models, expected = {}, {"std": 2.0, "variants": {}}
    for seed, (name, extra_hp) in enumerate(VARIANTS.items(), start=10):
        hp, state = build_variant(name, extra_hp, seed)
        models[name] = {"hparams": hp, "state_dict": state, "seed": seed}
    torch.set_default_dtype(torch.float64)
    for name, entry in models.items():
        names = ["g_pt_bulk_degenerate", "h_cu111_degenerate"] if name == "nonstrict" else FIXTURE_STRUCTURES
        print(name)
        expected["variants"][name] = {
            "hparams": entry["hparams"],
            "seed": entry["seed"],
            "structures": reference(entry["hparams"], entry["state_dict"], [structures[n] for n in names], 2.0),
        }
    torch.save(models, HERE / "gemnet_oc_variants.pt")
    (HERE / "gemnet_oc_variants.json").write_text(json.dumps(expected, indent=1))


if __name__ == "__main__":
    main()
