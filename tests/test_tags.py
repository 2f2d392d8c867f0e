"""OC20 tags from geometry (mlcalc.tag_adsorbate_slab): ASE-built slabs whose layers are known by construction."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import add_adsorbate, fcc100, fcc111, fcc211, molecule

from mlcalc import tag_adsorbate_slab
from mlcalc.tags import find_adsorbate


def _layer_of(slab: Atoms) -> np.ndarray:
    """ase.build numbers layers from the top (1 = top layer) in the 'layer' tags it sets."""
    return slab.get_tags().copy()


@pytest.mark.parametrize("build, metal, size", [(fcc111, "Pt", (2, 2, 4)), (fcc100, "Cu", (2, 2, 4)),
                                                (fcc111, "Au", (3, 3, 3))])
def test_flat_surfaces_tag_the_top_layer_and_the_adsorbate(build, metal, size) -> None:
    slab = build(metal, size, vacuum=8.0)
    layers = _layer_of(slab)
    add_adsorbate(slab, molecule("CO"), 1.9, "ontop")
    tag_adsorbate_slab(slab)
    tags = slab.get_tags()
    n = len(layers)
    assert (tags[:n][layers == 1] == 1).all() and (tags[:n][layers != 1] == 0).all()
    assert (tags[n:] == 2).all()


def test_stepped_211_tags_the_exposed_atoms_only() -> None:
    slab = fcc211("Cu", (3, 2, 3), vacuum=8.0)
    z = slab.positions[:, 2]
    tag_adsorbate_slab(slab, adsorbate_indices=[])
    tags = slab.get_tags()
    assert 0 < (tags == 1).sum() < len(slab) / 2
    assert z[tags == 1].min() > z[tags == 0].max() - 1.0  # surface atoms sit at the top of the slab
    assert (tags[z >= z.max() - 1e-6] == 1).all()  # the step-edge row


def test_slab_wrapped_across_the_cell_boundary() -> None:
    slab = fcc111("Pt", (2, 2, 3), vacuum=6.0)
    add_adsorbate(slab, "O", 1.2, "fcc")
    expected = tag_adsorbate_slab(slab, inplace=False).get_tags()
    moved = slab.copy()
    moved.positions[:, 2] += 0.75 * moved.cell[2, 2]
    moved.wrap()
    assert (tag_adsorbate_slab(moved).get_tags() == expected).all()


def test_hollow_site_hydroxyl_and_explicit_indices() -> None:
    slab = fcc100("Ni", (2, 2, 3), vacuum=6.0)
    add_adsorbate(slab, molecule("OH"), 1.4, "hollow")
    assert find_adsorbate(slab) == [12, 13]
    tagged = tag_adsorbate_slab(slab, adsorbate_indices=[-1, -2], inplace=False)
    assert (tagged.get_tags()[-2:] == 2).all() and (slab.get_tags()[:4] != 99).all()


def test_height_rule_with_surface_depth() -> None:
    slab = fcc100("Ni", (2, 2, 4), vacuum=6.0)  # interlayer spacing a/2 = 1.76 Å
    tags = tag_adsorbate_slab(slab, adsorbate_indices=[], surface_depth=2.0).get_tags()
    assert (tags == 1).sum() == 8  # the top two layers lie within 2 Å of the top


@pytest.mark.parametrize("kwargs, match", [
    (dict(adsorbate_indices=[99]), "out of range"),
    (dict(adsorbate_indices=[1, 1]), "repeat"),
    (dict(surface_depth=0.0), "surface_depth"),
])
def test_bad_arguments(kwargs, match) -> None:
    slab = fcc111("Pt", (2, 2, 3), vacuum=6.0)
    with pytest.raises(ValueError, match=match):
        tag_adsorbate_slab(slab, **kwargs)


def test_all_light_atoms_need_indices() -> None:
    with pytest.raises(ValueError, match="adsorbate_indices"):
        tag_adsorbate_slab(molecule("CH4"))


def test_cli_tag_option(tmp_path, monkeypatch) -> None:
    from pathlib import Path

    from ase.io import read, write

    from mlcalc.cli import main

    ckpt = Path(__file__).parents[1] / "checkpoints" / "gemnet_oc-emt.pt"
    slab = fcc111("Pt", (2, 2, 3), vacuum=6.0)
    add_adsorbate(slab, molecule("CO"), 1.9, "ontop")
    expected = tag_adsorbate_slab(slab, inplace=False).get_tags()
    slab.set_tags(0)
    slab.info.pop("adsorbate_info", None)
    write(tmp_path / "in.xyz", slab)
    monkeypatch.chdir(tmp_path)
    argv = ["relax", str(ckpt), "in.xyz", "--steps", "1", "-o", "out.xyz", "--trajectory", "none", "--log", "none"]
    assert main([*argv, "--tag"]) in (0, 1)
    assert (read("out.xyz").get_tags() == expected).all()
    assert main([*argv, "--tag", "--adsorbate", "12,13"]) in (0, 1)
    assert (read("out.xyz").get_tags() == expected).all()
    assert main([*argv, "--adsorbate", "12,13"]) == 2  # --adsorbate without --tag
