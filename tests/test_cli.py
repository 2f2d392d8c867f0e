"""Command line and the shipped checkpoint."""

import json
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk
from ase.io import read, write

from mlcalc.cli import main

CKPT = Path(__file__).parents[1] / "checkpoints" / "lj_argon.pt"


def test_info_describes_the_shipped_checkpoint(capsys):
    assert main(["--device", "cpu", "info", str(CKPT)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model"] == "lennard_jones" and info["cutoff"] == 8.5
    assert "stress" in info["implemented_properties"]


def test_relax_writes_a_relaxed_structure(tmp_path, capsys):
    atoms = bulk("Ar", "fcc", a=5.3, cubic=True)
    atoms.rattle(0.1, seed=0)
    write(tmp_path / "in.xyz", atoms, format="extxyz")
    rc = main(["--device", "cpu", "--dtype", "float64", "relax", str(CKPT), str(tmp_path / "in.xyz"),
               "--fmax", "1e-3", "-o", str(tmp_path / "out.xyz")])
    assert rc == 0 and "converged = True" in capsys.readouterr().out
    out = read(tmp_path / "out.xyz")
    assert np.abs(out.get_forces()).max() < 1e-3


def test_md_runs(tmp_path, capsys):
    atoms = bulk("Ar", "fcc", a=5.26, cubic=True) * (2, 1, 1)
    write(tmp_path / "in.xyz", atoms, format="extxyz")
    assert main(["--device", "cpu", "md", str(CKPT), str(tmp_path / "in.xyz"), "--steps", "20", "--every", "10",
                 "--temperature", "50"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[-1].startswith("step     20")


def test_bad_checkpoint_path_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError):
        main(["info", str(tmp_path / "nope.pt")])
