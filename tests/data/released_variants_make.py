#!/usr/bin/env python
"""Regenerate released_variants.pt / released_variants.json: fairchem 1.10 references for the configurations the
released checkpoints use and the other fixtures do not cover.

Needs the reference environment (../shared/tools/reference-env.sh: fairchem-core 1.10 with torch_scatter and
torch_sparse); run from anywhere:

    /root/.cache/mlcalc-reference/bin/python tests/data/released_variants_make.py

Variants (small randomly initialised models, fixed seeds; hyperparameters that define the released layouts kept,
widths shrunk so the file stays small):

- ``gemnet_oc_released_layout``: the OC20 base/Large block layout (num_before_skip 2, num_after_skip 2, num_atom 3,
  num_output_afteratom 3, num_atom_emb_layers 2, num_global_out_layers 2) with Large's num_blocks 6 and
  num_concat 4, direct forces, legacy normalizers.
- ``gemnet_oc_odac``: GemNet-OC-S2EF-ODAC's graph (all four cutoffs 8 Å, max_neighbors 30/8/20/1000), qint_tags
  [0, 1, 2] (quadruplets on every atom) and num_elements 100, direct forces.
- ``gemnet_oc_is2re``: Gemnet-OC-IS2RE-ODAC's energy-only head (regress_forces False, direct_forces False).
- ``gemnet_oc_oc22_elementrefs``: an OC22-style config (otf_graph, ``symmetric_edge_symmetrization`` in the stored
  config, which GemNet-OC ignores) with fairchem >= 1.1 ``elementrefs`` (per-element energy references added after
  denormalisation by fairchem's own LinearReferences module).
- ``escn_l6_m3``: eSCN lmax 6 / mmax 3 (eSCN-L6-M3-Lay20).
- ``escn_odac``: eSCN-S2EF-ODAC's max_num_elements 100 and cutoff 8 Å.
- ``escn_is2re``: eSCN-IS2RE-ODAC's energy-only model (regress_forces False: no force head).

Each checkpoint is stored in fairchem's new layout (``config["model"] = {"name", ...}``, ``module.`` prefixes,
Normalizer-style normalizers, ``elementrefs``). References are fairchem's float64 outputs (GemNet-OC through the
float64 copy of the package as in gemnet_oc_make_variants.py; eSCN on mlcalc's graph with fairchem's random
auxiliary vector replaced by mlcalc's constant one, as in escn_multires_make.py), denormalised with the stored
normalizers, then element references added with fairchem's LinearReferences.
"""

from __future__ import annotations

import json
import sys
import tempfile
import types
from pathlib import Path

import ase.io
import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

import gemnet_oc_make_variants as gv  # noqa: E402
from escn_multires_make import _patch_rand_like  # noqa: E402  (mlcalc's constant auxiliary vector)

SMALL = dict(
    num_spherical=4, num_radial=8, emb_size_atom=16, emb_size_edge=16, emb_size_trip_in=4, emb_size_trip_out=4,
    emb_size_quad_in=4, emb_size_quad_out=4, emb_size_aint_in=4, emb_size_aint_out=4, emb_size_rbf=4,
    emb_size_cbf=4, emb_size_sbf=4,
)  # fmt: skip
RELEASED_BLOCKS = dict(
    num_before_skip=2, num_after_skip=2, num_atom=3, num_output_afteratom=3, num_atom_emb_layers=2,
    num_global_out_layers=2, rbf={"name": "gaussian"}, envelope={"name": "polynomial", "exponent": 5},
    cbf={"name": "spherical_harmonics"}, sbf={"name": "legendre_outer"}, extensive=True, activation="silu",
    otf_graph=True,
)  # fmt: skip

GEMNET = {
    "gemnet_oc_released_layout": dict(
        **SMALL, **RELEASED_BLOCKS, num_blocks=6, num_concat=4, cutoff=6.0, cutoff_qint=6.0, cutoff_aeaint=6.0,
        cutoff_aint=6.0, max_neighbors=30, max_neighbors_qint=8, max_neighbors_aeaint=20, max_neighbors_aint=1000,
        qint_tags=[1, 2], direct_forces=True, regress_forces=True, num_elements=83,
    ),
    "gemnet_oc_odac": dict(
        **SMALL, **RELEASED_BLOCKS, num_blocks=2, num_concat=1, cutoff=8.0, cutoff_qint=8.0, cutoff_aeaint=8.0,
        cutoff_aint=8.0, max_neighbors=30, max_neighbors_qint=8, max_neighbors_aeaint=20, max_neighbors_aint=1000,
        qint_tags=[0, 1, 2], direct_forces=True, regress_forces=True, num_elements=100,
    ),
    "gemnet_oc_is2re": dict(
        **SMALL, **RELEASED_BLOCKS, num_blocks=2, num_concat=1, cutoff=8.0, cutoff_qint=8.0, cutoff_aeaint=8.0,
        cutoff_aint=8.0, max_neighbors=30, max_neighbors_qint=8, max_neighbors_aeaint=20, max_neighbors_aint=1000,
        qint_tags=[0, 1, 2], direct_forces=False, regress_forces=False, num_elements=100,
    ),
    "gemnet_oc_oc22_elementrefs": dict(
        **SMALL, **RELEASED_BLOCKS, num_blocks=2, num_concat=1, cutoff=6.0, cutoff_qint=6.0, cutoff_aeaint=6.0,
        cutoff_aint=6.0, max_neighbors=30, max_neighbors_qint=8, max_neighbors_aeaint=20, max_neighbors_aint=1000,
        qint_tags=[1, 2], direct_forces=True, regress_forces=True, num_elements=83,
        symmetric_edge_symmetrization=False,
    ),
}  # fmt: skip
ESCN = {
    "escn_l6_m3": dict(
        num_layers=2, lmax_list=[6], mmax_list=[3], sphere_channels=8, hidden_channels=16, edge_channels=8,
        cutoff=6.0, max_neighbors=20, num_sphere_samples=128, basis_width_scalar=2.0, distance_function="gaussian",
        use_pbc=True, regress_forces=True, otf_graph=True,
    ),
    "escn_odac": dict(
        num_layers=2, lmax_list=[4], mmax_list=[2], sphere_channels=8, hidden_channels=16, edge_channels=8,
        cutoff=8.0, max_neighbors=20, num_sphere_samples=128, basis_width_scalar=2.0, distance_function="gaussian",
        use_pbc=True, regress_forces=True, otf_graph=True, max_num_elements=100,
    ),
    "escn_is2re": dict(
        num_layers=2, lmax_list=[4], mmax_list=[2], sphere_channels=8, hidden_channels=16, edge_channels=8,
        cutoff=8.0, max_neighbors=20, num_sphere_samples=128, basis_width_scalar=2.0, distance_function="gaussian",
        use_pbc=True, regress_forces=False, otf_graph=True, max_num_elements=100,
    ),
}  # fmt: skip

#: per variant: energy mean/rmsd and forces mean/rmsd (None: no force normaliser, energy-only models)
NORMALIZERS = {
    "gemnet_oc_released_layout": (-0.7554450631141663, 2.887317180633545, 0.0, 2.887317180633545),
    "gemnet_oc_odac": (-0.39596545696258545, 1.451111078262329, 0.0, 0.04262716323137283),
    "gemnet_oc_is2re": (-0.5249277949333191, 0.943034291267395, None, None),
    "gemnet_oc_oc22_elementrefs": (0.25, 1.5, 0.0, 1.5),
    "escn_l6_m3": (0.3, 1000.0, 0.0, 20000.0),
    "escn_odac": (-0.39596545696258545, 1000.0, 0.0, 20000.0),
    "escn_is2re": (-0.5249277949333191, 1000.0, None, None),
}
ELEMENTREFS = {"gemnet_oc_oc22_elementrefs"}
STRUCTURES = ["a_cu111_2x2x3_O", "c_triclinic_NiAlO", "e_pt100_CO_pbcTTF"]
#: GemNet-OC's max_neighbors 30 falls on distance ties in the small public slabs (an atom's own periodic images at
#: +-a are equally far, which no rattle breaks): the canonical choice there differs from fairchem's arbitrary one
#: (README, "Where parity ends"). The GemNet-OC variants use the triclinic cell and a 4x4 slab, checked tie-free.
GEMNET_STRUCTURES = ["c_triclinic_NiAlO", "i_cu111_4x4x3_O"]


def _normalizers(name: str) -> dict:
    e_mean, e_std, f_mean, f_std = NORMALIZERS[name]
    out = {"energy": {"mean": torch.tensor(e_mean), "rmsd": torch.tensor(e_std)}}
    if f_std is not None:
        out["forces"] = {"mean": torch.tensor(f_mean), "rmsd": torch.tensor(f_std)}
    return out


def _elementrefs(name: str) -> dict:
    if name not in ELEMENTREFS:
        return {}
    rng = np.random.default_rng(7)
    table = torch.zeros(119, dtype=torch.float32)
    table[1:] = torch.tensor(rng.uniform(-9.0, -1.0, 118), dtype=torch.float32)
    return {"energy": {"element_references": table}}


def _add_elementrefs(name: str, energy: torch.Tensor, atoms) -> torch.Tensor:
    """fairchem's own LinearReferences.forward on the denormalised (B,) energy."""
    refs = _elementrefs(name)
    if not refs:
        return energy
    from fairchem.core.modules.normalization.element_references import LinearReferences

    module = LinearReferences(element_references=refs["energy"]["element_references"].clone())
    batch = types.SimpleNamespace(
        atomic_numbers=torch.tensor(atoms.numbers), batch=torch.zeros(len(atoms), dtype=torch.long),
        natoms=torch.tensor([len(atoms)]),
    )
    return module(energy.view(1, 1), batch).view(-1)


def gemnet_reference(name: str, hp: dict, state: dict, atoms_list: list) -> dict:
    from ase.geometry import wrap_positions
    from fairchem.core.datasets import data_list_collater
    from fairchem.core.models.gemnet_oc.gemnet_oc import GemNetOC
    from fairchem.core.preprocessing import AtomsToGraphs

    e_mean, e_std, f_mean, f_std = NORMALIZERS[name]
    model = GemNetOC(**hp).double().eval()
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
        res = model(batch)
        energy = res["energy"].detach().view(-1) * e_std + e_mean
        energy = _add_elementrefs(name, energy, atoms)
        entry = {"energy": float(energy[0])}
        if "forces" in res:
            entry["forces"] = (res["forces"].detach() * f_std + f_mean).numpy().tolist()
        out[atoms.info["name"]] = entry
        print(f"  {atoms.info['name']}: E = {entry['energy']:.6f}")  # noqa: T201
    return out


def escn_reference(name: str, hp: dict, state: dict, atoms_list: list) -> dict:
    from fairchem.core.models.escn.escn import eSCN

    from mlcalc.graph import radius_graph

    e_mean, e_std, f_mean, f_std = NORMALIZERS[name]
    model = eSCN(**hp)
    model.load_state_dict(state)
    model = model.double().eval()
    out = {}
    for atoms in atoms_list:
        graph = radius_graph(atoms, hp["cutoff"], hp["max_neighbors"], True, backend="torch")
        vec = graph.edge_vectors()
        fc_graph = types.SimpleNamespace(edge_index=graph.edge_index, edge_distance=vec.norm(dim=-1),
                                         edge_distance_vec=vec)
        model.generate_graph = lambda data, g=fc_graph: g
        data = types.SimpleNamespace(pos=graph.pos, atomic_numbers=graph.numbers, natoms=graph.natoms,
                                     batch=graph.batch)
        with torch.no_grad():
            res = model(data)
        energy = res["energy"].detach().view(-1) * e_std + e_mean
        entry = {"energy": float(energy[0])}
        if "forces" in res:
            entry["forces"] = (res["forces"].detach().double() * f_std + f_mean).numpy().tolist()
        out[atoms.info["name"]] = entry
        print(f"  {atoms.info['name']}: E = {entry['energy']:.6f}")  # noqa: T201
    return out


def extra_structures() -> list:
    """A 4x4x3 Cu(111) slab with O (rattled, OC20 tags): lateral cell 10.2 Å, so no self-image ties within 8 Å."""
    from ase.build import add_adsorbate, fcc111

    slab = fcc111("Cu", size=(4, 4, 3), vacuum=8.0, a=3.61)
    layer = slab.get_tags()
    add_adsorbate(slab, "O", 1.2, "fcc")
    slab.set_tags(np.concatenate([np.where(layer == 1, 1, 0), [2]]))
    slab.pbc = True
    slab.rattle(0.05, seed=12)
    slab.info["name"] = "i_cu111_4x4x3_O"
    return [slab]


def assert_no_ties(atoms, cutoff: float, ks: tuple[int, ...]) -> None:
    from mlcalc.graph import radius_graph

    graph = radius_graph(atoms, cutoff, None, True)
    d = graph.edge_vectors().norm(dim=1).numpy()
    target = graph.edge_index[1].numpy()
    for i in range(len(atoms)):
        di = np.sort(d[target == i])
        for k in ks:
            if len(di) > k and abs(di[k] - di[k - 1]) < 1e-6:
                raise RuntimeError(f"{atoms.info['name']}: atom {i} has a distance tie at neighbour {k}")


def main() -> None:
    structures = {a.info["name"]: a for a in ase.io.read(HERE / "structures.extxyz", index=":")}
    path = HERE / "released_variants_structures.extxyz"
    ase.io.write(path, extra_structures(), format="extxyz")
    for a in ase.io.read(path, index=":"):  # references from the re-read file
        structures[a.info["name"]] = a
    for name in GEMNET_STRUCTURES:
        for hp in GEMNET.values():
            assert_no_ties(structures[name], hp["cutoff"], (hp["max_neighbors"], hp["max_neighbors_qint"],
                                                           hp["max_neighbors_aeaint"]))
    sys.path.insert(0, str(gv.float64_fairchem_copy(Path(tempfile.mkdtemp()))))
    import fairchem.core
    from fairchem.core.models.escn.escn import eSCN

    print("fairchem from", fairchem.core.__file__)  # noqa: T201
    _patch_rand_like()
    checkpoints, states = {}, {}
    for seed, (name, hp) in enumerate(GEMNET.items(), start=30):
        full, state = gv.build_variant(name, {k: v for k, v in hp.items() if k != "symmetric_edge_symmetrization"},
                                       seed)
        states[name] = (full, state)
        stored_hp = {**full, **hp}  # the full hyperparameters (BASE included), as fairchem's own config records
        checkpoints[name] = {
            "state_dict": {f"module.{k}": v for k, v in state.items()},
            "normalizers": _normalizers(name),
            "elementrefs": _elementrefs(name),
            "config": {"model": {"name": "gemnet_oc", **stored_hp}, "trainer": "ocp",
                       "task": {"dataset": "oc22_lmdb" if "oc22" in name else "lmdb"}},
        }
    for seed, (name, hp) in enumerate(ESCN.items(), start=40):
        torch.manual_seed(seed)
        model = eSCN(**hp)
        state = {k: v.detach().to(torch.float32).clone() for k, v in model.state_dict().items()}
        states[name] = (hp, state)
        checkpoints[name] = {
            "state_dict": {f"module.{k}": v for k, v in state.items()},
            "normalizers": _normalizers(name),
            "elementrefs": {},
            "config": {"model": {"name": "escn", **hp}, "trainer": "ocp", "task": {"dataset": "lmdb"}},
        }
    torch.set_default_dtype(torch.float64)
    expected = {"fairchem": getattr(fairchem.core, "__version__", "unknown"), "variants": {}}
    for name, (hp, state) in states.items():
        print(name)  # noqa: T201
        gemnet = name.startswith("gemnet")
        ref = gemnet_reference if gemnet else escn_reference
        names = GEMNET_STRUCTURES if gemnet else STRUCTURES
        expected["variants"][name] = {"structures": ref(name, hp, state, [structures[n] for n in names])}
    torch.save(checkpoints, HERE / "released_variants.pt")
    (HERE / "released_variants.json").write_text(json.dumps(expected, indent=1))


if __name__ == "__main__":
    main()
