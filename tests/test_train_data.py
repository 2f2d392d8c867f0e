"""The EMT data set: deterministic from the seed, OC20 tags, whole-system splits, labels = EMT (the oracle)."""

from __future__ import annotations

import numpy as np
import pytest
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
from ase.db import connect

from mlcalc.train.data import System, generate_emt_dataset, labels, load_split, read_db
from mlcalc.train.surfaces import add_adsorbate_at, alloy_lattice_constant, make_slab, surface_sites

#: one of each kind: pure (111) and (211) slabs with adsorbates, an alloy (100) slab, a clean slab, a bulk cell
SYSTEMS = [
    System("Pt", "fcc111", "CO"),
    System("Au", "fcc211", "H"),
    System("Cu3Au", "fcc100", "O"),
    System("Ni", "fcc111", "none"),
    System("Cu", "bulk", "none"),
]


@pytest.fixture(scope="module")
def tiny_db(tmp_path_factory):
    path = tmp_path_factory.mktemp("emt") / "tiny.db"
    summary = generate_emt_dataset(path, seed=3, size="tiny", systems=SYSTEMS, max_atoms=24)
    return path, summary


def _rows(path):
    """Everything physical and every key-value pair of each row (not ids, timestamps or unique ids)."""
    out = []
    for row in connect(path).select():
        atoms = row.toatoms()
        fixed = [c.index.tolist() for c in atoms.constraints if isinstance(c, FixAtoms)]
        out.append(
            (
                atoms.numbers.tolist(), atoms.positions.tolist(), atoms.cell.array.tolist(), atoms.pbc.tolist(),
                atoms.get_tags().tolist(), fixed, row.energy, row.forces.tolist(),
                row.get("stress", np.zeros(0)).tolist(), sorted(row.key_value_pairs.items()),
            )
        )  # fmt: skip
    return out


def test_deterministic_from_seed(tmp_path, tiny_db) -> None:
    path, _ = tiny_db
    again = tmp_path / "again.db"
    generate_emt_dataset(again, seed=3, size="tiny", systems=SYSTEMS, max_atoms=24)
    assert _rows(again) == _rows(path)
    other = tmp_path / "other.db"
    generate_emt_dataset(other, seed=4, size="tiny", systems=SYSTEMS, max_atoms=24)
    assert _rows(other) != _rows(path)


def test_default_subset_deterministic(tmp_path) -> None:
    a = generate_emt_dataset(tmp_path / "a.db", seed=0, size="tiny", n_systems=3)
    b = generate_emt_dataset(tmp_path / "b.db", seed=0, size="tiny", n_systems=3)
    assert a.systems_per_split == b.systems_per_split and a.n_frames == b.n_frames == 9
    assert _rows(tmp_path / "a.db") == _rows(tmp_path / "b.db")


def test_oc20_tags_slab_with_adsorbate() -> None:
    slab = make_slab("Cu", "fcc111", (2, 2, 3))
    z = slab.positions[:, 2]
    top_layer = np.isclose(z, z.max())
    np.testing.assert_array_equal(slab.get_tags(), np.where(top_layer, 1, 0))
    sites = surface_sites(slab, alloy_lattice_constant("Cu"))
    assert {"ontop", "bridge", "fcc", "hcp"} <= set(sites)
    atoms = add_adsorbate_at(slab, "OH", sites["fcc"][0], np.random.default_rng(0))
    np.testing.assert_array_equal(atoms.get_tags(), [0] * 8 + [1] * 4 + [2, 2])
    assert atoms.get_chemical_symbols()[-2:] == ["O", "H"]
    (fix,) = atoms.constraints
    np.testing.assert_array_equal(np.sort(fix.index), np.where(atoms.get_tags() == 0)[0])
    o = atoms.positions[-2]
    assert atoms.get_distances(12, range(12), mic=True).min() == pytest.approx(2.0, abs=1e-6)
    assert o[2] > z.max() + 1.0


def test_tags_in_database(tiny_db) -> None:
    path, _ = tiny_db
    for atoms in read_db(path):
        tags = atoms.get_tags()
        info = atoms.info
        if info["facet"] == "bulk":
            assert (tags == 0).all() and not atoms.constraints and atoms.pbc.all()
            continue
        n_ads = 0 if info["adsorbate"] == "none" else len(info["adsorbate"])
        assert (tags == 2).sum() == n_ads and (tags[len(atoms) - n_ads :] == 2).all()
        assert (tags == 1).sum() > 0 and (tags == 0).sum() > 0
        assert list(atoms.pbc) == [True, True, False]
        # surface atoms sit above the subsurface ones
        z = atoms.positions[:, 2]
        assert z[tags == 1].mean() > z[tags == 0].mean()


def test_split_holds_out_whole_systems(tiny_db) -> None:
    path, summary = tiny_db
    systems = {s: {a.info["system"] for a in load_split(path, s)} for s in ("train", "val", "test")}
    assert systems["val"] and systems["test"] and systems["train"]
    assert not systems["train"] & systems["test"] and not systems["train"] & systems["val"]
    assert not systems["val"] & systems["test"]
    assert "Cu-bulk-none" in systems["train"]
    assert {k: sorted(v) for k, v in systems.items()} == summary.systems_per_split
    assert summary.frames_per_split == {s: 3 * len(v) for s, v in systems.items()}
    kinds = {a.info["kind"] for a in read_db(path)}
    assert kinds == {"relax", "md", "rattle"}


def test_labels_are_emt(tiny_db) -> None:
    path, _ = tiny_db
    frames = read_db(path)
    assert max(len(a) for a in frames) <= 24
    for atoms in frames[::2]:
        energy, forces = labels(atoms)
        ref = atoms.copy()
        ref.calc = EMT()
        assert energy == pytest.approx(ref.get_potential_energy(), abs=1e-9)
        assert atoms.get_potential_energy() == energy  # free_energy too
        np.testing.assert_allclose(forces, ref.get_forces(apply_constraint=False), atol=1e-9)
        if atoms.pbc.all():
            np.testing.assert_allclose(atoms.get_stress(), ref.get_stress(), atol=1e-10)
        else:
            assert "stress" not in atoms.calc.results
        # fixed atoms keep their (nonzero) labels
        fixed = atoms.get_tags() == 0
        if atoms.constraints:
            assert np.abs(forces[fixed]).max() > 0


def test_errors(tmp_path, tiny_db) -> None:
    path, _ = tiny_db
    with pytest.raises(FileExistsError, match="overwrite"):
        generate_emt_dataset(path, seed=3, size="tiny", systems=SYSTEMS)
    with pytest.raises(ValueError, match="at least 3 frames"):
        generate_emt_dataset(tmp_path / "x.db", size="tiny", frames_per_system=2, n_systems=1)
    with pytest.raises(ValueError, match="unknown size"):
        generate_emt_dataset(tmp_path / "y.db", size="huge")
    with pytest.raises(ValueError, match="split"):
        load_split(path, "training")
    with pytest.raises(FileNotFoundError):
        read_db(tmp_path / "missing.db")


def test_cli_data(tmp_path, capsys) -> None:
    import argparse
    import json

    from mlcalc.train.cli import add_data_parser

    parser = argparse.ArgumentParser()
    add_data_parser(parser.add_subparsers(dest="cmd"))
    out = tmp_path / "cli.db"
    args = parser.parse_args(["data", str(out), "--size", "tiny", "--n-systems", "2", "--seed", "5"])
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_frames"] == 6 and summary["seed"] == 5 and len(read_db(out)) == 6
