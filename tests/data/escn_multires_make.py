"""Regenerate escn_multires.pt / escn_multires_expected.json: a two-resolution eSCN reference from fairchem 1.10.

The released eSCN checkpoints (and escn_small.pt) have one resolution; this fixture covers what they do not:
lmax_list [3, 2] / mmax_list [1, 2] (m = 2 only in the second resolution, an lmax == mmax S² grid), sigmoid-free
Gaussian basis with another width, fewer sphere samples. Run with a Python that has fairchem-core 1.10, e3nn and
ase (torch_scatter/torch_sparse are stubbed if absent: the eSCN forward never calls them):

    /path/to/reference/python tests/data/escn_multires_make.py

The weights are fairchem's initialisation after ``torch.manual_seed(11)``. fairchem's eSCN module computes the
float64 reference (default dtype float64 while the model is built and run, as the shared fixtures) on the graph
mlcalc builds (``radius_graph(..., backend="torch")``), with ``torch.rand_like`` patched so that fairchem's
auxiliary vector is mlcalc's constant one. Outputs are denormalised with the checkpoint's normalisers.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import ase.io
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the repository root, for mlcalc.graph

HPARAMS = dict(
    num_layers=2,
    lmax_list=[3, 2],
    mmax_list=[1, 2],
    sphere_channels=8,
    hidden_channels=16,
    edge_channels=12,
    cutoff=6.0,
    max_neighbors=20,
    num_sphere_samples=64,
    basis_width_scalar=1.5,
    distance_function="gaussian",
    use_pbc=True,
    regress_forces=True,
    otf_graph=True,
)
SEED = 11
NORMALIZERS = {"energy": {"mean": 0.5, "rmsd": 512.0}, "forces": {"mean": 0.0, "rmsd": 8192.0}}
STRUCTURE_INDICES = (0, 2, 3, 4)
AUX_VECTOR = (0.3, -0.5, 0.8)


def _stub_compiled_extensions() -> None:
    for name in ("torch_scatter", "torch_sparse"):
        try:
            __import__(name)
        except ImportError:
            module = types.ModuleType(name)
            for attr in ("scatter", "segment_coo", "segment_csr", "SparseTensor"):
                setattr(module, attr, None)
            sys.modules[name] = module


def _patch_rand_like() -> None:
    original = torch.rand_like

    def fake(t, *args, **kwargs):
        if t.dim() == 2 and t.shape[1] == 3:
            v = torch.tensor(AUX_VECTOR, dtype=torch.float64) + 0.5
            return v.to(dtype=t.dtype, device=t.device).expand(t.shape).clone()
        return original(t, *args, **kwargs)

    torch.rand_like = fake


def main() -> None:
    _stub_compiled_extensions()
    _patch_rand_like()
    from fairchem.core.models.escn.escn import eSCN

    from mlcalc.graph import radius_graph

    torch.manual_seed(SEED)
    model32 = eSCN(**HPARAMS)
    state = {k: v.detach().clone() for k, v in model32.state_dict().items()}
    ckpt = {
        "state_dict": {f"module.{k}": v for k, v in state.items()},
        "normalizers": {k: {n: torch.tensor(x) for n, x in v.items()} for k, v in NORMALIZERS.items()},
        "config": {"model": {"name": "escn", **HPARAMS}, "trainer": "ocp"},
        "elementrefs": {},
    }
    torch.save(ckpt, HERE / "escn_multires.pt")

    torch.set_default_dtype(torch.float64)
    model = eSCN(**HPARAMS)
    model.load_state_dict(state)
    model = model.double().eval()
    structures = ase.io.read(HERE / "structures.extxyz", index=":")
    results = {}
    for index in STRUCTURE_INDICES:
        atoms = structures[index]
        graph = radius_graph(atoms, HPARAMS["cutoff"], HPARAMS["max_neighbors"], True, backend="torch")
        vec = graph.edge_vectors()
        fc_graph = types.SimpleNamespace(
            edge_index=graph.edge_index, edge_distance=vec.norm(dim=-1), edge_distance_vec=vec
        )
        model.generate_graph = lambda data, g=fc_graph: g
        data = types.SimpleNamespace(
            pos=graph.pos, atomic_numbers=graph.numbers, natoms=graph.natoms, batch=graph.batch
        )
        with torch.no_grad():
            out = model(data)
        e_norm, f_norm = NORMALIZERS["energy"], NORMALIZERS["forces"]
        energy = float(out["energy"].item()) * e_norm["rmsd"] + e_norm["mean"]
        forces = out["forces"].double() * f_norm["rmsd"] + f_norm["mean"]
        results[atoms.info["name"]] = {
            "structure_index": index,
            "num_edges": graph.num_edges,
            "energy_f64": energy,
            "forces_f64": forces.tolist(),
        }
        print(f"{atoms.info['name']}: {graph.num_edges} edges, E = {energy:.6f} eV")  # noqa: T201
    meta = {"hparams": HPARAMS, "init_seed": SEED, "normalizers": NORMALIZERS, "aux_vector": AUX_VECTOR}
    import fairchem.core

    meta["fairchem"] = getattr(fairchem.core, "__version__", "unknown")
    (HERE / "escn_multires_expected.json").write_text(json.dumps({"meta": meta, "structures": results}, indent=1))


if __name__ == "__main__":
    main()
