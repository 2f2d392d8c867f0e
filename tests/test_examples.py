"""The examples and the notebook (issue 9) run with small settings and write what they say.

Each example's ``main(argv)`` runs in-process in a temporary directory with a small slab and few steps; the notebook
is executed with nbclient on the ``python3`` kernel (this interpreter). They need the shipped checkpoint
``checkpoints/gemnet_oc-emt.pt`` and matplotlib / nbclient, the
``plot`` and ``test`` extras.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import ase
import numpy as np
import pytest
from ase.io import read

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
NOTEBOOK = EXAMPLES / "notebook.ipynb"
CHECKPOINT = ROOT / "checkpoints" / "gemnet_oc-emt.pt"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NUMBER = re.compile(r"[-+]?\d+\.\d+(?:[eE][-+]?\d+)?")


@pytest.fixture(scope="module")
def checkpoint() -> Path:
    """The shipped GemNet-OC checkpoint the examples default to."""
    assert CHECKPOINT.exists(), "checkpoints/gemnet_oc-emt.pt is shipped with the repository"
    return CHECKPOINT


def load_example(name: str) -> ModuleType:
    """Import examples/NAME.py as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"mlcalc_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextmanager
def no_deprecated_calls() -> Iterator[None]:
    """Fail on a DeprecationWarning / FutureWarning raised by ASE or attributed to an example's own line."""
    ase_dir = Path(ase.__file__).resolve().parent
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    bad = [
        f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}"
        for w in caught
        if issubclass(w.category, (DeprecationWarning, FutureWarning))
        and (Path(w.filename).resolve().is_relative_to(EXAMPLES) or Path(w.filename).resolve().is_relative_to(ase_dir))
    ]
    assert not bad, bad


def assert_png(path: Path) -> None:
    """``path`` is a PNG that matplotlib reads back as a non-empty RGB(A) image."""
    import matplotlib.image

    assert path.is_file(), f"{path} was not written"
    assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100 and image.shape[2] in (3, 4)


def assert_finite_numbers(text: str, at_least: int) -> None:
    """The printed summary holds at least ``at_least`` decimal numbers, all finite, and no nan/inf."""
    assert not re.search(r"\b(nan|inf)\b", text, re.IGNORECASE), text
    numbers = [float(x) for x in NUMBER.findall(text)]
    assert len(numbers) >= at_least, text
    assert all(math.isfinite(x) for x in numbers), text


@pytest.mark.parametrize(
    "argv",
    [
        [],  # default system: O on Cu(111), fcc site
        ["--metal", "Pt", "--adsorbate", "CO", "--site", "ontop", "--output", "co_pt.png"],
    ],
    ids=["O-Cu-fcc", "CO-Pt-ontop"],
)
def test_relax_adsorbate(checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                         capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    example = load_example("relax_adsorbate")
    with no_deprecated_calls():
        result = example.main(["--size", "2", "2", "3", "--steps", "150", *argv])
    out = capsys.readouterr().out

    expected = tmp_path / (argv[-1] if "--output" in argv else "relax_adsorbate.png")  # default: in the cwd
    assert result["output"] == Path(expected.name)
    assert_png(expected)
    assert_finite_numbers(out, at_least=13)
    assert "model" in out and "EMT" in out and f"wrote {expected.name}" in out
    for key in ("model", "emt"):
        run = result[key]
        energies = run["energies"]
        assert run["converged"], f"{key} did not reach fmax in 150 steps"
        assert len(energies) == run["steps"] + 1  # step 0 (the start) is recorded too
        assert np.isfinite(energies).all()
    # the model's curve goes down to its converged value: below the start, and the last step is the lowest
    energies = result["model"]["energies"]
    assert energies[-1] < energies[0]
    assert energies[-1] <= energies.min() + 1e-3
    assert np.abs(result["model"]["atoms"].get_forces()).max() < 0.05 + 1e-9
    assert math.isfinite(result["emt_of_model_structure"])


def test_langevin_md(checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                     capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    example = load_example("langevin_md")
    steps, interval = 12, 3
    with no_deprecated_calls():
        result = example.main(["--size", "2", "2", "3", "--steps", str(steps), "--interval", str(interval),
                               "--temperature", "500", "--seed", "3"])
    out = capsys.readouterr().out

    assert_png(tmp_path / "langevin_md.png")  # the default names, in the cwd
    frames = read(tmp_path / "langevin_md.traj", ":")
    assert len(frames) == result["frames"] == steps // interval + 1
    n_atoms = 2 * 2 * 3 + 1  # slab + O
    assert all(len(f) == n_atoms for f in frames)
    assert (frames[-1].get_tags() == frames[0].get_tags()).all() and (frames[0].get_tags() == 2).sum() == 1
    fixed = frames[0].constraints[0].get_indices()
    assert len(fixed) == 4  # the bottom layer of three
    moved = np.linalg.norm(frames[-1].positions - frames[0].positions, axis=1)
    assert np.allclose(moved[fixed], 0.0) and moved.max() > 1e-3
    assert all(math.isfinite(f.get_potential_energy()) for f in frames)

    log = result["log"]
    assert list(log["step"]) == list(range(steps + 1))
    for key in ("potential", "kinetic", "total", "temperature"):
        assert len(log[key]) == steps + 1 and np.isfinite(log[key]).all()
    assert np.allclose(log["total"], log["potential"] + log["kinetic"])
    assert (log["temperature"] > 0).all()
    assert_finite_numbers(out, at_least=10)
    assert "langevin_md.traj" in out and "langevin_md.png" in out


@pytest.mark.parametrize("adsorbate, references", [("O", {"O2": 0.5}), ("CO", {"CO": 1.0})])
def test_adsorption_energy(checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture[str], adsorbate: str, references: dict[str, float]) -> None:
    monkeypatch.chdir(tmp_path)
    example = load_example("adsorption_energy")
    with no_deprecated_calls():
        result = example.main(["--metal", "Pt", "--adsorbate", adsorbate, "--size", "2", "2", "3", "--steps", "150"])
    out = capsys.readouterr().out

    assert result["reference"] == references
    for key in ("model", "emt"):
        r = result[key]
        e = r["energies"]
        assert r["converged"], f"{key}: a relaxation did not reach fmax in 150 steps"
        assert set(e) == {f"slab + {adsorbate}", "slab", *references}
        assert all(math.isfinite(v) for v in e.values())
        gas = sum(c * e[name] for name, c in references.items())
        assert r["binding"] == pytest.approx(e[f"slab + {adsorbate}"] - e["slab"])
        assert r["E_ads"] == pytest.approx(e[f"slab + {adsorbate}"] - e["slab"] - gas)
    ads_line = next(line for line in out.splitlines() if line.startswith("E_ads"))
    model_value, emt_value, difference = (float(x) for x in NUMBER.findall(ads_line.split(")", 1)[1]))
    assert model_value == pytest.approx(result["model"]["E_ads"], abs=1e-4)
    assert emt_value == pytest.approx(result["emt"]["E_ads"], abs=1e-4)
    assert difference == pytest.approx(model_value - emt_value, abs=2e-4)
    assert_finite_numbers(out, at_least=15)


def test_notebook_runs(checkpoint: Path) -> None:
    pytest.importorskip("matplotlib")
    pytest.importorskip("ipykernel")
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # Jupyter runs a notebook in its own folder; the notebook finds the checkpoint from there
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(EXAMPLES)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if a cell fails
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2  # the relaxation and the MD plots
    stderr = "".join(o.text for o in outputs if o.output_type == "stream" and o.name == "stderr")
    assert not re.search(r"DeprecationWarning|FutureWarning", stderr), stderr  # IPython shows the cells' own
    text = "".join(o.text for o in outputs if o.output_type == "stream" and o.name == "stdout")
    assert "E_ads" in text
    assert_finite_numbers(text, at_least=9)


def test_notebook_stored_without_outputs() -> None:
    """The notebook is kept in git with outputs stripped: no outputs, no execution counts."""
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    assert nb["nbformat"] == 4
    code_cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code_cells
    for cell in code_cells:
        assert cell["outputs"] == [], f"cell {cell.get('id')} has stored outputs"
        assert cell["execution_count"] is None, f"cell {cell.get('id')} has an execution count"
    assert nb["metadata"]["kernelspec"]["name"] == "python3"


def test_main_job_relaxes_co_on_pt111_close_to_emt(checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    """``./run relax``: the shipped GemNet-OC ends where EMT (its training reference, the oracle) ends."""
    relax = load_example("relax")
    with no_deprecated_calls():
        out = relax.main(["--device", "cpu"])
    text = capsys.readouterr().out
    assert "GemNetOCCalculator" in text and "EMT:" in text
    assert out["model_converged"] and out["emt_converged"]
    # the model's relaxed structure, judged by EMT, is close to EMT's own minimum, and so is the C height
    assert -0.01 <= out["emt_of_model_structure"] - out["emt_energy"] < 0.05
    assert abs(out["model_height"] - out["emt_height"]) < 0.1
    assert abs(out["model_energy"] - out["emt_energy"]) < 0.1  # measured: -0.03 eV


def test_readme_first_snippet_runs_as_written(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The README's first code block, run as written, relaxes O on Pt(111) to fmax through the name path.

    No machine here reaches fairchem's server, so the registry's URL for the name is served from 127.0.0.1 with the
    shipped trained GemNet-OC standing in for the released file: download, cache, verification, loading by name,
    tagging and the relaxation all run as a user's would."""
    from mlcalc import pretrained
    from mlcalc.testing import LocalFileServer

    text = (ROOT / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", text, re.S)
    assert snippet is not None
    name = re.search(r'GemNetOCCalculator\("([^"]+)"\)', snippet.group(1)).group(1)
    entry = pretrained.info(name)  # the snippet uses a registry name
    with LocalFileServer({entry.path: checkpoint.read_bytes()}) as server:
        monkeypatch.setenv("MLCALC_PRETRAINED_URL", server.url)
        monkeypatch.setenv("MLCALC_CACHE", str(tmp_path / "cache"))
        monkeypatch.chdir(ROOT)
        namespace: dict = {}
        exec(compile(snippet.group(1), "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
        assert server.requests == [entry.path]
    slab = namespace["slab"]
    assert sorted(set(slab.get_tags().tolist())) == [0, 1, 2]
    forces = slab.get_forces()
    assert np.isfinite(forces).all() and np.linalg.norm(forces, axis=1).max() < 0.05
