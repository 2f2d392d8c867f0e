"""OC20 tags from geometry: 0 = sub-surface slab, 1 = surface slab, 2 = adsorbate.

Why it matters: the OC20/OC22 GemNet-OC checkpoints build quadruplet interactions only on atoms tagged 1 or 2
(``qint_tags: [1, 2]``). A structure read with ``ase.io.read`` (CIF, POSCAR, xyz) has every tag 0, so the quadruplet
messages are silently zero and the energies and forces differ from those of the same structure tagged as in OC20
(by up to eV on OC20 slabs). eSCN, SCN and SphereNet ignore tags.

The rules follow the Open Catalyst data sets' own: the adsorbate is the molecule placed on the slab; surface atoms
are under-coordinated slab atoms of the upper half of the slab (OC20's rule), or with ``surface_depth`` the slab atoms
within that height of the top (the OC22 pipeline's height rule).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from ase import Atoms

logger = logging.getLogger(__name__)

#: elements of the OC20 adsorbates (C, H, O, N); used to find an adsorbate when no indices are given
ADSORBATE_ELEMENTS = frozenset({"H", "C", "N", "O"})


def _surface_normal(atoms: Atoms) -> np.ndarray:
    """Unit normal of the slab: a x b when the cell spans the two in-plane axes, else z."""
    cell = np.asarray(atoms.cell)
    n = np.cross(cell[0], cell[1])
    norm = float(np.linalg.norm(n))
    if norm < 1e-8:
        return np.array([0.0, 0.0, 1.0])
    n = n / norm
    if cell[2] @ n < 0:
        n = -n
    return n


def _heights(atoms: Atoms, normal: np.ndarray) -> np.ndarray:
    """Height of each atom along the normal, unwrapped across the periodic c boundary at the widest vacuum gap."""
    pos = atoms.get_positions()
    if not atoms.pbc[2] or atoms.cell.rank < 3:
        return pos @ normal
    raw = atoms.cell.scaled_positions(pos)[:, 2]
    order = np.sort(raw % 1.0)
    gaps = np.diff(np.concatenate([order, order[:1] + 1.0]))
    bottom = order[(int(np.argmax(gaps)) + 1) % len(order)]  # first atom above the widest gap
    unwrapped = bottom + (raw - bottom) % 1.0  # fractional c in [bottom, bottom + 1): the slab in one piece
    return (pos + np.outer(unwrapped - raw, np.asarray(atoms.cell)[2])) @ normal


def find_adsorbate(atoms: Atoms, tolerance: float = 0.3) -> list[int]:
    """Indices of the adsorbate: atoms of H, C, N, O lying above the top of the rest of the slab.

    An atom of H/C/N/O belongs to the adsorbate when its height along the surface normal exceeds that of the highest
    atom of any other element by more than ``tolerance`` (Å), or when it is bonded (ASE natural cutoffs) to such an
    atom. Slabs made only of H/C/N/O, or oxide/nitride slabs whose anions sit above the cations by more than
    ``tolerance``, need ``adsorbate_indices``. Returns [] when no atom qualifies.
    """
    symbols = atoms.get_chemical_symbols()
    light = np.array([s in ADSORBATE_ELEMENTS for s in symbols])
    if light.all():
        raise ValueError(
            "cannot tell adsorbate from slab: every atom is H, C, N or O; pass adsorbate_indices=[...] explicitly"
        )
    heights = _heights(atoms, _surface_normal(atoms))
    top = float(heights[~light].max())
    chosen = set(np.flatnonzero(light & (heights > top + tolerance)).tolist())
    if chosen:
        from ase.neighborlist import NeighborList, natural_cutoffs

        nl = NeighborList(natural_cutoffs(atoms), self_interaction=False, bothways=True)
        nl.update(atoms)
        frontier = list(chosen)
        while frontier:  # grow along bonds between light atoms (the O of an OH sitting in a hollow)
            i = frontier.pop()
            for j in nl.get_neighbors(i)[0]:
                j = int(j)
                if light[j] and j not in chosen:
                    chosen.add(j)
                    frontier.append(j)
    return sorted(chosen)


def _slab_coordination(atoms: Atoms, slab: np.ndarray, bond_scale: float) -> np.ndarray:
    """Number of slab neighbours of each slab atom (bond: distance < bond_scale x sum of covalent radii)."""
    from ase.neighborlist import natural_cutoffs, neighbor_list

    idx = np.flatnonzero(slab)
    sub = atoms[idx]
    first = neighbor_list("i", sub, natural_cutoffs(sub, mult=bond_scale))
    cn = np.zeros(len(atoms), dtype=int)
    cn[idx] = np.bincount(first, minlength=len(idx))
    return cn


def tag_adsorbate_slab(
    atoms: Atoms,
    adsorbate_indices: Sequence[int] | None = None,
    surface_depth: float | None = None,
    bond_scale: float = 1.2,
    inplace: bool = True,
) -> Atoms:
    """Set OC20 tags (0 sub-surface, 1 surface, 2 adsorbate) on an adsorbate+slab or bare slab from its geometry.

    Surface atoms, by default as OC20 marks them (the Open Catalyst data pipeline, ``ocdata``): slab atoms in the
    upper half of the slab (above the mean height along the surface normal) whose coordination is lower than the
    highest coordination in the slab (the bulk's). ``ocdata`` counts Voronoi neighbours; here a neighbour is a slab
    atom closer than ``bond_scale`` times the sum of covalent radii (ASE natural cutoffs), which gives the same top
    layer on fcc(111)/(100) and the step, terrace and corner atoms of (211). With ``surface_depth`` (Å) the rule is
    the height rule of the OC22 pipeline instead: slab atoms within ``surface_depth`` of the highest slab atom.

    Args:
        atoms: the structure; the slab's in-plane axes are cell vectors a and b (ase.build, OC20 and pymatgen slabs),
            the surface normal is a x b pointing along c (z when the cell has no in-plane axes).
        adsorbate_indices: indices of the adsorbate atoms; None finds them with ``find_adsorbate`` (H/C/N/O atoms
            above the slab's top atom of other elements, and the H/C/N/O atoms bonded to them). Pass [] for a bare slab.
        surface_depth: None (coordination rule, default) or a height in Å (height rule).
        bond_scale: multiplier of the covalent radii for the coordination rule.
        inplace: set the tags on ``atoms`` (default) or on a copy.

    Returns:
        The tagged Atoms (``atoms`` itself when ``inplace``).

    Raises:
        ValueError: an index out of range or repeated, surface_depth not positive, every atom in the adsorbate, or no
            way to tell adsorbate from slab (all atoms H/C/N/O without ``adsorbate_indices``).
    """
    if surface_depth is not None and not surface_depth > 0:
        raise ValueError(f"surface_depth must be positive (Å), got {surface_depth}")
    n = len(atoms)
    if n == 0:
        raise ValueError("cannot tag an empty structure")
    if adsorbate_indices is None:
        ads = find_adsorbate(atoms)
        if not ads:
            logger.info("no adsorbate found above the slab; tagging a bare slab")
    else:
        ads = [int(i) for i in adsorbate_indices]
        bad = [i for i in ads if not -n <= i < n]
        if bad:
            raise ValueError(f"adsorbate_indices {bad} out of range for {n} atoms")
        ads = [i % n for i in ads]
        if len(set(ads)) != len(ads):
            raise ValueError(f"adsorbate_indices repeat atoms: {sorted(ads)}")
    if len(ads) == n:
        raise ValueError("every atom is in the adsorbate; a slab is needed to set surface tags")
    target = atoms if inplace else atoms.copy()
    heights = _heights(target, _surface_normal(target))
    tags = np.zeros(n, dtype=int)
    slab = np.ones(n, dtype=bool)
    slab[ads] = False
    if surface_depth is not None:
        surface = slab & (heights >= float(heights[slab].max()) - surface_depth)
    else:
        cn = _slab_coordination(target, slab, bond_scale)
        upper = heights > float(heights[slab].mean())
        surface = slab & upper & (cn < int(cn[slab].max()))
        if not surface[slab].any():  # a slab without a bulk-like atom (one or two layers): the top layer
            surface = slab & (heights >= float(heights[slab].max()) - 0.5)
    tags[surface] = 1
    tags[ads] = 2
    target.set_tags(tags)
    return target
