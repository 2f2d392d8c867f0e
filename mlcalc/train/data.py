"""An OC20-style data set labelled with ASE's EMT, written as an ASE database, and readers for any ASE database.

What is in it (``generate_emt_dataset``): fcc(111), (100) and (211) slabs of Al Cu Ag Au Ni Pd Pt, (111) and
(100) slabs of the L1_2 alloys Cu3Au, Pt3Ni, Ni3Al, clean or with one adsorbate (H C N O OH CO CH NH) on an
ontop / bridge / fcc / hcp / hollow site, and strained bulk cells. For each placement: frames of an EMT BFGS
relaxation (``kind='relax'``), of Langevin MD at 300-1000 K started from the relaxed structure (``kind='md'``) and
rattled copies of it (``kind='rattle'``) — what OC20's S2EF data is. At most ``max_atoms`` (40) atoms per frame.

OC20 conventions: tags 0 subsurface (fixed with FixAtoms), 1 surface, 2 adsorbate; bulk all 0 and unconstrained.
Labels are EMT's energy (eV; EMT's reference is the bulk metals, so these are total EMT energies, not adsorption
energies), forces of ALL atoms (eV/Å, fixed ones included) and, for bulk, stress (eV/Å³). Each row has the
key-value pairs ``system`` (e.g. 'Cu-fcc111-OH'), ``metal`` ('Cu' or 'Cu3Au'), ``facet`` ('fcc111', 'fcc100',
'fcc211', 'bulk'), ``adsorbate`` ('none' for clean slabs and bulk), ``site``, ``kind``, ``split``,
``placement`` (index of the starting structure in the system) and ``frame`` (index in that placement's
trajectory).

Splits are of whole systems (metal/facet/adsorbate combinations): a system's frames are all in ``train``, ``val``
or ``test``. Bulk cells are always ``train``. Everything is a function of ``seed`` (numpy Generators are passed
down; ASE's ``rattle`` and global RNGs are never used), so generating twice gives the same rows.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms, units
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms
from ase.db import connect
from ase.md.langevin import Langevin
from ase.optimize import BFGS

from mlcalc.train.surfaces import (
    ADSORBATES,
    ALLOY_FACETS,
    ALLOYS,
    FACETS,
    METALS,
    add_adsorbate_at,
    alloy_lattice_constant,
    make_bulk,
    make_slab,
    surface_sites,
)

try:  # ase >= 3.29
    from ase.md.velocitydistribution import thermalize_momenta
except ImportError:  # pragma: no cover - older ase: the same draw under its previous name
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    def thermalize_momenta(atoms: Atoms, temperature_K: float, *, rng: np.random.Generator) -> None:
        MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=rng)


logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")

#: size presets: number of systems (None = all 253), frames per system, placements (starting structures) per system
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"n_systems": 6, "frames_per_system": 3, "placements_per_system": 1, "max_atoms": 20},
    "small": {"n_systems": 40, "frames_per_system": 8, "placements_per_system": 1, "max_atoms": 40},
    "full": {"n_systems": None, "frames_per_system": 20, "placements_per_system": 2, "max_atoms": 40},
}

#: slab sizes (nx, ny, layers) per kind of slab; one is drawn per placement among those within max_atoms - 2
_SLAB_SIZES = {
    "fcc111": [(2, 2, 3), (2, 2, 4), (3, 3, 3), (3, 3, 4)],
    "fcc100": [(2, 2, 3), (2, 2, 4), (3, 3, 3), (3, 3, 4)],
    "fcc211": [(3, 2, 3), (3, 2, 4), (3, 3, 4)],
    "alloyfcc111": [(2, 2, 3), (2, 2, 4), (4, 2, 3), (4, 2, 4)],
    "alloyfcc100": [(4, 2, 4), (4, 2, 6), (4, 4, 4)],
}
_WANTED_SITES = {"fcc111": ("ontop", "bridge", "fcc", "hcp"), "fcc100": ("ontop", "bridge", "hollow")}


@dataclass(frozen=True)
class System:
    """One metal/facet/adsorbate combination (facet 'bulk' for bulk cells)."""

    metal: str
    facet: str
    adsorbate: str

    @property
    def name(self) -> str:
        return f"{self.metal}-{self.facet}-{self.adsorbate}"


@dataclass
class DatasetSummary:
    """What ``generate_emt_dataset`` wrote: counts per split, elements, wall time (s)."""

    path: str
    seed: int
    n_frames: int
    n_systems: int
    frames_per_split: dict[str, int]
    systems_per_split: dict[str, list[str]]
    elements: list[str]
    max_atoms_seen: int
    seconds: float
    options: dict[str, Any] = field(default_factory=dict)


def all_systems() -> list[System]:
    """Every system of the full set, in a fixed order: metal slabs, alloy slabs, then bulk cells."""
    out = [System(m, f, a) for m in METALS for f in FACETS for a in ADSORBATES]
    out += [System(m, f, a) for m in ALLOYS for f in ALLOY_FACETS for a in ADSORBATES]
    out += [System(m, "bulk", "none") for m in (*METALS, *ALLOYS)]
    return out


def assign_splits(
    systems: list[System], rng: np.random.Generator, val_fraction: float, test_fraction: float
) -> dict[System, str]:
    """Whole systems to train/val/test; bulk always train; at least one val and one test slab system when >= 3."""
    slabs = [s for s in systems if s.facet != "bulk"]
    order = rng.permutation(len(slabs))
    n_val = int(round(val_fraction * len(slabs)))
    n_test = int(round(test_fraction * len(slabs)))
    if len(slabs) >= 3:
        n_val, n_test = max(n_val, 1 if val_fraction > 0 else 0), max(n_test, 1 if test_fraction > 0 else 0)
    split = {s: "train" for s in systems}
    for rank, k in enumerate(order):
        if rank < n_val:
            split[slabs[k]] = "val"
        elif rank < n_val + n_test:
            split[slabs[k]] = "test"
    return split


def _initial_structure(system: System, rng: np.random.Generator, max_atoms: int) -> tuple[Atoms, str]:
    """A starting structure (slab + adsorbate on a random site, or a strained bulk cell) and its site name."""
    if system.facet == "bulk":
        repeat = 2 if max_atoms >= 32 and rng.random() < 0.5 else 1
        atoms = make_bulk(system.metal, repeat, rng)
        return atoms, "none"
    key = f"alloy{system.facet}" if system.metal in ALLOYS else system.facet
    extra = len(system.adsorbate) if system.adsorbate != "none" else 0
    candidates = []
    for size in _SLAB_SIZES[key]:
        n = len(make_slab(system.metal, system.facet, size))
        if n + extra <= max_atoms:
            candidates.append(size)
    if not candidates:
        raise ValueError(f"no slab size of {system.name} fits in max_atoms={max_atoms}")
    size = candidates[int(rng.integers(len(candidates)))]
    slab = make_slab(system.metal, system.facet, size)
    if system.adsorbate == "none":
        return slab, "none"
    sites = surface_sites(slab, alloy_lattice_constant(system.metal))
    wanted = [s for s in _WANTED_SITES.get(system.facet, tuple(sites)) if s in sites] or sorted(sites)
    site = wanted[int(rng.integers(len(wanted)))]
    point = sites[site][int(rng.integers(len(sites[site])))]
    return add_adsorbate_at(slab, system.adsorbate, point, rng), site


def _labelled(atoms: Atoms, calc: EMT) -> Atoms:
    """A copy with EMT's energy, free_energy, forces (all atoms, constraints ignored) and stress if 3-D periodic."""
    atoms = atoms.copy()
    atoms.calc = calc
    energy = atoms.get_potential_energy()
    results: dict[str, Any] = {
        "energy": energy,
        "free_energy": energy,
        "forces": atoms.get_forces(apply_constraint=False).copy(),
    }
    if atoms.pbc.all():
        results["stress"] = atoms.get_stress(apply_constraint=False).copy()
    atoms.calc = SinglePointCalculator(atoms, **results)
    return atoms


def _frame_counts(frames: int) -> tuple[int, int, int]:
    """Frames of one placement split into (relax, md, rattle); needs frames >= 3."""
    if frames < 3:
        raise ValueError(f"each placement needs at least 3 frames (relax, md, rattle), got {frames}")
    n_relax = max(1, (2 * frames) // 5)
    n_rattle = max(1, frames // 5)
    return n_relax, frames - n_relax - n_rattle, n_rattle


def placement_frames(
    system: System, rng: np.random.Generator, frames: int, max_atoms: int, relax_steps: int = 60
) -> list[tuple[str, str, Atoms]]:
    """Labelled frames of one starting structure: [(kind, site, atoms)] with relax, md and rattle frames
    (fewer relax frames when the BFGS trajectory is shorter than asked).

    relax: a BFGS trajectory (fmax 0.05 eV/Å, at most ``relax_steps``) from the structure with its free atoms
    rattled by 0.03 Å, frames evenly spaced from first to last; md: Langevin (1 fs, friction 0.02/fs,
    T ~ U(300, 1000) K) from the relaxed structure, one frame every 8 steps after 10; rattle: the relaxed
    structure with Gaussian noise (sigma ~ U(0.03, 0.15) Å) on the free atoms.
    """
    n_relax, n_md, n_rattle = _frame_counts(frames)
    atoms, site = _initial_structure(system, rng, max_atoms)
    free = np.ones(len(atoms), dtype=bool)
    for constraint in atoms.constraints:
        if isinstance(constraint, FixAtoms):
            free[constraint.index] = False
    calc = EMT()
    out: list[tuple[str, str, Atoms]] = []

    atoms.positions[free] += rng.normal(0.0, 0.03, size=(int(free.sum()), 3))
    atoms.calc = calc
    trajectory: list[Atoms] = []
    opt = BFGS(atoms, logfile=None)
    opt.attach(lambda: trajectory.append(_labelled(atoms, calc)))
    opt.run(fmax=0.05, steps=relax_steps)
    picks = np.unique(np.linspace(0, len(trajectory) - 1, n_relax).round().astype(int))
    out += [("relax", site, trajectory[k]) for k in picks]
    relaxed = atoms.copy()

    md = relaxed.copy()
    md.calc = calc
    temperature = float(rng.uniform(300.0, 1000.0))
    thermalize_momenta(md, temperature, rng=rng)
    dyn = Langevin(md, 1.0 * units.fs, temperature_K=temperature, friction=0.02 / units.fs, rng=rng, fixcm=False)
    dyn.run(10)
    for _ in range(n_md):
        dyn.run(8)
        out.append(("md", site, _labelled(md, calc)))

    for _ in range(n_rattle):
        rattled = relaxed.copy()
        sigma = float(rng.uniform(0.03, 0.15))
        rattled.positions[free] += rng.normal(0.0, sigma, size=(int(free.sum()), 3))
        out.append(("rattle", site, _labelled(rattled, calc)))
    return out


def generate_emt_dataset(
    path: str | os.PathLike,
    seed: int = 0,
    size: str = "small",
    *,
    n_systems: int | None = None,
    frames_per_system: int | None = None,
    placements_per_system: int | None = None,
    max_atoms: int | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    systems: Iterable[System] | None = None,
    overwrite: bool = False,
) -> DatasetSummary:
    """Generate the EMT data set into the ASE database ``path`` (.db) and return a summary.

    Args:
        path: database file to write; it must not exist unless ``overwrite``.
        seed: the only source of randomness (system subset, splits, sizes, sites, rattles, MD noise).
        size: preset 'tiny' (6 systems x 3 frames, <= 20 atoms: seconds), 'small' (40 x 8) or 'full' (all 253
            systems x 20 frames from 2 placements, <= 40 atoms: 5,059 frames, ~2 CPU-minutes).
        n_systems, frames_per_system, placements_per_system, max_atoms: override the preset.
        val_fraction, test_fraction: share of slab systems held out whole.
        systems: explicit list of ``System`` (default: a seeded subset of ``all_systems()``).

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        ValueError: unknown preset, or fewer than 3 frames per placement.
    """
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
    opts = dict(SIZES[size])
    for key, value in (
        ("n_systems", n_systems),
        ("frames_per_system", frames_per_system),
        ("placements_per_system", placements_per_system),
        ("max_atoms", max_atoms),
    ):
        if value is not None:
            opts[key] = value
    path = Path(path)
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: --overwrite) to replace it")
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    master = np.random.default_rng(seed)
    pool = list(systems) if systems is not None else all_systems()
    if systems is None and opts["n_systems"] is not None and opts["n_systems"] < len(pool):
        keep = np.sort(master.permutation(len(pool))[: opts["n_systems"]])
        pool = [pool[k] for k in keep]
    splits = assign_splits(pool, master, val_fraction, test_fraction)
    placements = int(opts["placements_per_system"])
    per_placement = np.full(placements, int(opts["frames_per_system"]) // placements)
    per_placement[: int(opts["frames_per_system"]) % placements] += 1
    counts = {s: 0 for s in SPLITS}
    elements: set[str] = set()
    biggest = 0
    full_index = {s: k for k, s in enumerate(all_systems())}
    with connect(path, type="db", append=False) as db:
        for index, system in enumerate(pool):
            # one generator per system, keyed by its place in the full list: a system's frames do not depend on
            # which other systems are generated
            rng = np.random.default_rng([seed, full_index.get(system, len(full_index) + index)])
            for p, n_frames in enumerate(per_placement):
                frames = placement_frames(system, rng, int(n_frames), opts["max_atoms"])
                for frame, (kind, site, atoms) in enumerate(frames):
                    db.write(
                        atoms,
                        system=system.name,
                        metal=system.metal,
                        facet=system.facet,
                        adsorbate=system.adsorbate,
                        site=site,
                        kind=kind,
                        split=splits[system],
                        placement=p,
                        frame=frame,
                    )
                    counts[splits[system]] += 1
                    elements.update(atoms.get_chemical_symbols())
                    biggest = max(biggest, len(atoms))
            logger.info("%s (%s): %d frames", system.name, splits[system], int(per_placement.sum()))
    seconds = time.perf_counter() - t0
    summary = DatasetSummary(
        path=str(path),
        seed=seed,
        n_frames=sum(counts.values()),
        n_systems=len(pool),
        frames_per_split=counts,
        systems_per_split={s: sorted(x.name for x in pool if splits[x] == s) for s in SPLITS},
        elements=sorted(elements),
        max_atoms_seen=biggest,
        seconds=seconds,
        options=opts,
    )
    logger.info("wrote %d frames of %d systems to %s in %.1f s", summary.n_frames, summary.n_systems, path, seconds)
    return summary


def read_db(path: str | os.PathLike, select: str | dict[str, Any] | None = None) -> list[Atoms]:
    """Structures of an ASE database (any, not only mlcalc's) with their labels, in row order.

    ``select``: an ase.db query string ('split=train,facet=fcc111') or a dict of key-value pairs. Each Atoms keeps
    its SinglePointCalculator (energy, forces, ...), tags and constraints; the row's key-value pairs and id are in
    ``atoms.info``. Read forces with ``atoms.get_forces(apply_constraint=False)`` (or ``labels``): with FixAtoms,
    ASE's default zeroes the fixed atoms.

    Raises FileNotFoundError if the file does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ASE database not found: {path}")
    db = connect(path)
    rows = db.select(**select) if isinstance(select, dict) else db.select(select)
    out = []
    for row in rows:
        atoms = row.toatoms()
        atoms.info.update(row.key_value_pairs)
        atoms.info["db_id"] = row.id
        out.append(atoms)
    return out


def load_split(db_path: str | os.PathLike, split: str) -> list[Atoms]:
    """The frames of one split ('train', 'val', 'test') of a data set from ``generate_emt_dataset``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return read_db(db_path, {"split": split})


def labels(atoms: Atoms) -> tuple[float, np.ndarray]:
    """(energy eV, forces (N, 3) eV/Å of all atoms) of a labelled Atoms; ValueError if either is missing."""
    calc = atoms.calc
    results = getattr(calc, "results", None) or {}
    if "energy" not in results or "forces" not in results:
        raise ValueError(
            f"structure {atoms.get_chemical_formula()} (db id {atoms.info.get('db_id')}) has no energy/forces labels"
        )
    return float(results["energy"]), np.asarray(results["forces"], dtype=np.float64).reshape(len(atoms), 3)
