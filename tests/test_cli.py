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


def test_relax_writes_a_relaxed_structure_trajectory_and_log(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    atoms = bulk("Ar", "fcc", a=5.3, cubic=True)
    atoms.rattle(0.1, seed=0)
    write(tmp_path / "in.xyz", atoms, format="extxyz")
    rc = main(["--device", "cpu", "--dtype", "float64", "relax", str(CKPT), str(tmp_path / "in.xyz"),
               "--fmax", "1e-3", "-o", str(tmp_path / "out.xyz")])
    assert rc == 0 and "converged = True" in capsys.readouterr().out
    out = read(tmp_path / "out.xyz")
    assert np.abs(out.get_forces()).max() < 1e-3
    traj = read(tmp_path / "in-relax.traj", ":")
    assert len(traj) > 2 and traj[-1].get_potential_energy() == pytest.approx(out.get_potential_energy())
    log = (tmp_path / "in-relax.log").read_text()
    assert "BFGS:" in log and log.count("BFGS:") == len(traj)


def test_md_runs(tmp_path, capsys):
    atoms = bulk("Ar", "fcc", a=5.26, cubic=True) * (2, 1, 1)
    write(tmp_path / "in.xyz", atoms, format="extxyz")
    assert main(["--device", "cpu", "md", str(CKPT), str(tmp_path / "in.xyz"), "--steps", "20", "--every", "10",
                 "--temperature", "50", "--trajectory", str(tmp_path / "md.traj"), "--log", "none"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[1].startswith("step     20") and lines[2] == f"wrote trajectory {tmp_path}/md.traj"


def test_bad_checkpoint_path_is_reported(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope.pt")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"mlcalc info: error: checkpoint file not found: {tmp_path / 'nope.pt'}"


# -- issue 8 item 6: the CLI as users use it -------------------------------------------------------------------------
DATA = Path(__file__).parent / "data"


def argon(tmp_path, frames=1, name="in.xyz"):
    out = []
    for k in range(frames):
        a = bulk("Ar", "fcc", a=5.3, cubic=True)
        a.rattle(0.1, seed=k)
        out.append(a)
    write(tmp_path / name, out, format="extxyz")
    return str(tmp_path / name)


@pytest.mark.parametrize("fixture, calculator", [("gemnet_oc_small_direct", "GemNetOCCalculator"),
                                                 ("escn_small", "ESCNCalculator")])
def test_info_shows_the_family_calculator_notes(fixture, calculator, capsys):
    from mlcalc.calculator import load_calculator

    assert main(["info", str(DATA / f"{fixture}.pt"), "--device", "cpu"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["calculator"] == calculator
    assert info["notes"] == load_calculator(DATA / f"{fixture}.pt", device="cpu").info["notes"]
    assert any("adsorption" in n for n in info["notes"]) and any("directly" in n for n in info["notes"])


def test_common_options_work_after_the_subcommand(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["info", str(CKPT), "--dtype", "float64", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["dtype"] == "float64"
    rc = main(["relax", str(CKPT), argon(tmp_path), "--dtype", "float64", "--device", "cpu", "--steps", "3"])
    assert rc in (0, 1)
    assert "E0 = " in capsys.readouterr().out
    assert main(["--dtype", "float64", "info", str(CKPT)]) == 0  # before the subcommand too
    assert json.loads(capsys.readouterr().out)["dtype"] == "float64"
    assert main(["--dtype", "float64", "info", str(CKPT), "--device", "cpu"]) == 0  # a later option keeps the first
    info = json.loads(capsys.readouterr().out)
    assert info["dtype"] == "float64" and info["device"] == "cpu"


def test_relax_every_frame_of_a_multi_frame_file_or_index(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = argon(tmp_path, frames=3, name="multi.xyz")
    rc = main(["relax", str(CKPT), path, "--device", "cpu", "--dtype", "float64", "-o", "out.xyz"])
    out = capsys.readouterr().out
    assert rc == 0 and [ln.split(":")[0] for ln in out.splitlines()[:3]] == ["frame 0", "frame 1", "frame 2"]
    relaxed = read(tmp_path / "out.xyz", ":")
    assert len(relaxed) == 3
    for k, a in enumerate(relaxed):  # each frame keeps its own results, not the shared calculator's last ones
        assert read(tmp_path / f"multi-relax-{k}.traj", -1).get_potential_energy() == pytest.approx(
            a.get_potential_energy())
    assert len({round(a.get_potential_energy(), 8) for a in relaxed}) == 3
    assert (tmp_path / "multi-relax.log").read_text().count("# frame") == 3
    assert main(["relax", str(CKPT), path, "--device", "cpu", "--index", "1", "--trajectory", "none",
                 "--log", "none"]) == 0
    assert capsys.readouterr().out.startswith("E0 = ")


def test_md_writes_a_trajectory_and_a_per_step_log(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["md", str(CKPT), argon(tmp_path), "--steps", "12", "--every", "4", "--friction", "0.02",
                 "--temperature", "40", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip().endswith("wrote trajectory in-md.traj, log in-md.log")
    traj = read(tmp_path / "in-md.traj", ":")
    assert len(traj) == 4 and all(np.isfinite(a.get_potential_energy()) for a in traj)  # steps 0, 4, 8, 12
    rows = (tmp_path / "in-md.log").read_text().strip().splitlines()
    assert "T[K]" in rows[0] and "Epot[eV]" in rows[0] and len(rows) == 1 + 13


def test_friction_is_an_option(tmp_path, monkeypatch):
    import ase.md.langevin

    seen = {}
    orig = ase.md.langevin.Langevin.__init__

    def spy(self, *a, **kw):
        seen["friction"] = kw["friction"]
        orig(self, *a, **kw)

    monkeypatch.setattr(ase.md.langevin.Langevin, "__init__", spy)
    monkeypatch.chdir(tmp_path)
    assert main(["md", str(CKPT), argon(tmp_path), "--steps", "2", "--every", "1", "--friction", "0.05"]) == 0
    from ase import units

    assert seen["friction"] == pytest.approx(0.05 / units.fs)


def test_md_uses_no_deprecated_ase_calls(tmp_path, monkeypatch):
    import warnings

    monkeypatch.chdir(tmp_path)
    path = argon(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["md", str(CKPT), path, "--steps", "2", "--every", "1", "--device", "cpu"]) == 0
        assert main(["relax", str(CKPT), path, "--steps", "2", "--device", "cpu"]) in (0, 1)


def test_progress_bar_on_a_terminal(tmp_path, monkeypatch, capsys):
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    monkeypatch.chdir(tmp_path)
    assert main(["md", str(CKPT), argon(tmp_path), "--steps", "5", "--every", "5", "--device", "cpu"]) == 0
    assert "md:" in term.getvalue() and "step" in term.getvalue()
    term.seek(0)
    term.truncate()
    assert main(["md", str(CKPT), argon(tmp_path), "--steps", "5", "--every", "5", "--no-progress"]) == 0
    assert term.getvalue() == ""


def test_tqdm_is_a_dependency():
    import re

    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    deps = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
    assert '"tqdm' in deps


@pytest.mark.parametrize(
    "argv, message",
    [
        (["relax", "{ck}", "{tmp}/missing.xyz"], "structure file not found: {tmp}/missing.xyz"),
        (["relax", "{tmp}/missing.pt", "{s}"], "checkpoint file not found: {tmp}/missing.pt"),
        (["relax", "{s}", "{ck}"], "arguments swapped? {ck} is a torch checkpoint and {s} is not"),
        (["info", "{s}"], "is not a torch checkpoint"),
        (["relax", "{ck}", "{s}", "--fmax", "-1"], "argument --fmax: expected a number > 0, got '-1'"),
        (["relax", "{ck}", "{s}", "--steps", "ten"], "argument --steps: expected an integer >= 1, got 'ten'"),
        (["md", "{ck}", "{s}", "--timestep", "0"], "argument --timestep: expected a number > 0"),
        (["md", "{ck}", "{s}", "--friction", "-0.1"], "argument --friction: expected a number >= 0"),
        (["relax", "{ck}", "{s}", "--index", "abc"], "argument --index: expected a frame index"),
        (["relax", "{ck}", "{s}", "--device", "gpu"], "unknown device 'gpu'"),
        (["relax", "{ck}", "{s}", "--dtype", "float16"], "argument --dtype: invalid choice"),
        (["relax", "{ck}", "{tmp}/cu.xyz"], "Cu (atom indices [0, 1, 2, 3]) not covered"),
        (["relax", "{direct}", "{tmp}/cu.xyz", "--cell"], "--cell needs stress: stress is not available"),
        (["relax", "{ck}", "{ck}"], "cannot read structure file"),
    ],
)
def test_user_errors_are_one_line_without_traceback(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "cu.xyz", bulk("Cu", "fcc", a=3.6, cubic=True))
    fill = dict(ck=str(CKPT), s=argon(tmp_path), tmp=str(tmp_path), direct=str(DATA / "gemnet_oc_small_direct.pt"))
    try:
        rc = main([a.format(**fill) for a in argv])
    except SystemExit as exit_:  # argparse
        rc = exit_.code
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert message.format(**fill) in lines[0]
    assert not list(tmp_path.glob("*-relax.*"))  # nothing written on a bad input


def test_md_skin_reuses_neighbours_with_identical_results(tmp_path, capsys, monkeypatch):
    """--skin (default 1 Å) reuses candidate pairs; the trajectory equals a run that rebuilds every step."""
    monkeypatch.chdir(tmp_path)
    start = argon(tmp_path)
    common = ["md", str(CKPT), start, "--steps", "30", "--every", "10", "--temperature", "60", "--device", "cpu",
              "--dtype", "float64", "--log", "none"]
    assert main([*common, "--trajectory", "reuse.traj"]) == 0
    assert main([*common, "--skin", "0", "--trajectory", "fresh.traj", "--matmul-precision", "highest"]) == 0
    for a, b in zip(read("reuse.traj", ":"), read("fresh.traj", ":"), strict=True):
        assert np.array_equal(a.positions, b.positions)
    with pytest.raises(SystemExit) as exit_info:
        main([*common, "--skin", "-1"])
    assert exit_info.value.code == 2 and "--skin" in capsys.readouterr().err


def test_index_past_the_last_frame_says_how_many_there_are(tmp_path, capsys):
    path = argon(tmp_path, frames=2)
    assert main(["relax", str(CKPT), path, "--index", "5", "--trajectory", "none", "--log", "none"]) == 2
    expected = f"--index 5 selects no frame of {path}; the file has 2 frame(s)"
    assert capsys.readouterr().err.strip().endswith(expected)
