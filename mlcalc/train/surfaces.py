"""Structures of the EMT data set: metal and L1_2 alloy slabs with OC20 tags, adsorbates on sites, bulk cells.

OC20's conventions (ocdata ``Surface.tag_surface_atoms`` / ``constrain_surface``): tag 1 marks surface atoms
(under-coordinated and on the top side of the slab), tag 0 the subsurface atoms, which are fixed (``FixAtoms``),
tag 2 the adsorbate. Bulk cells (absent from OC20 S2EF) are all tag 0 and unconstrained. Every random choice
draws from the ``numpy.random.Generator`` passed in, so a structure is a function of the generator's state.
"""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.build import bulk, fcc100, fcc111, fcc211, surface
from ase.calculators.emt import parameters as emt_parameters
from ase.constraints import FixAtoms
from ase.geometry import find_mic
from ase.neighborlist import neighbor_list
from ase.units import Bohr

#: pure fcc metals EMT describes
METALS = ("Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt")
#: ordered L1_2 alloys A3B: name -> (A, B)
ALLOYS = {"Cu3Au": ("Cu", "Au"), "Pt3Ni": ("Pt", "Ni"), "Ni3Al": ("Ni", "Al")}
FACETS = ("fcc111", "fcc100", "fcc211")
#: alloys are cut along (111) and (100) only (an ordered (211) step needs a larger cell than 40 atoms allows)
ALLOY_FACETS = ("fcc111", "fcc100")
#: adsorbates: anchor atom first, then the atoms above it; "none" is the clean slab
ADSORBATES = ("none", "H", "C", "N", "O", "OH", "CO", "CH", "NH")
_BOND = {"OH": 0.98, "CO": 1.15, "CH": 1.10, "NH": 1.03}
#: anchor-to-nearest-metal distance (Å) used to place an adsorbate before relaxation
_ANCHOR_DISTANCE = {"H": 2.0, "C": 1.9, "N": 1.9, "O": 2.0}
VACUUM = 7.0


def emt_lattice_constant(symbol: str) -> float:
    """fcc lattice constant (Å) at which EMT's Wigner-Seitz radius s0 is met: a = (16 pi / 3)^(1/3) s0."""
    return float(emt_parameters[symbol][1] * Bohr * (16 * np.pi / 3) ** (1 / 3))


def alloy_lattice_constant(name: str) -> float:
    """Vegard's-law lattice constant (Å) of a metal or an A3B alloy from the EMT lattice constants."""
    if name in ALLOYS:
        a, b = ALLOYS[name]
        return 0.75 * emt_lattice_constant(a) + 0.25 * emt_lattice_constant(b)
    return emt_lattice_constant(name)


def l12_bulk(name: str) -> Atoms:
    """The 4-atom cubic cell of the L1_2 alloy A3B (B on the cube corners)."""
    a_sym, b_sym = ALLOYS[name]
    cell = bulk(a_sym, "fcc", a=alloy_lattice_constant(name), cubic=True)
    cell[0].symbol = b_sym
    return cell


def oc20_tags(slab: Atoms, lattice_constant: float) -> np.ndarray:
    """OC20 tags of a bare slab: 1 for under-coordinated atoms above the slab's centre, 0 otherwise.

    Coordination counts neighbours (all periodic images) closer than 0.85 a, between the first (a/sqrt 2) and
    second (a) fcc shells. Returns an int array (N,).
    """
    i = neighbor_list("i", slab, 0.85 * lattice_constant)
    cn = np.bincount(i, minlength=len(slab))
    z = slab.positions[:, 2]
    top_side = z > 0.5 * (z.min() + z.max()) + 1e-6
    return np.where((cn < 12) & top_side, 1, 0).astype(int)


def make_slab(metal: str, facet: str, size: tuple[int, int, int]) -> Atoms:
    """A slab (pbc x, y) with OC20 tags and FixAtoms on the tag-0 atoms; ``size`` = (nx, ny, layers).

    Pure metals use ase.build's fcc111/fcc100/fcc211 (fcc211 needs nx a multiple of 3). Alloys are cut from the
    L1_2 cubic cell with ase.build.surface, keeping the ordering, and repeated (nx // 2, ny // 2) in plane:
    (111) has 4 atoms per layer per 2x2 cell and ``layers`` layers; (100) has 2 atoms per layer per 1x1 cell
    (a x a) and ``layers`` rounded up to even.
    """
    a = alloy_lattice_constant(metal)
    if metal in ALLOYS:
        if facet not in ALLOY_FACETS:
            raise ValueError(f"alloy slabs are built for facets {ALLOY_FACETS}, got {facet!r}")
        nx, ny, layers = size
        if facet == "fcc111":  # one surface() layer = one atomic (111) layer of 4 atoms (a 2x2 cell)
            slab = surface(l12_bulk(metal), (1, 1, 1), layers, vacuum=VACUUM, periodic=False)
            slab = slab.repeat((max(nx // 2, 1), max(ny // 2, 1), 1))
        else:  # one surface() layer = two atomic (100) layers of 2 atoms each
            slab = surface(l12_bulk(metal), (1, 0, 0), (layers + 1) // 2, vacuum=VACUUM, periodic=False)
            slab = slab.repeat((max(nx // 2, 1), max(ny // 2, 1), 1))
        slab.pbc = (True, True, False)
    else:
        build = {"fcc111": fcc111, "fcc100": fcc100, "fcc211": fcc211}[facet]
        slab = build(metal, size=size, a=a, vacuum=VACUUM, orthogonal=facet != "fcc111")
    slab.info.pop("adsorbate_info", None)
    tags = oc20_tags(slab, a)
    slab.set_tags(tags)
    slab.set_constraint(FixAtoms(mask=tags == 0))
    return slab


def _lateral(slab: Atoms, point: np.ndarray, idx: np.ndarray | None = None) -> np.ndarray:
    """Minimum-image in-plane distances (Å) from ``point`` (x, y, any z) to slab atoms ``idx`` (all if None)."""
    pos = slab.positions if idx is None else slab.positions[idx]
    d = pos - point
    d[:, 2] = 0.0
    _, dist = find_mic(d, slab.cell, slab.pbc)
    return dist


def _circumcenter(p: np.ndarray) -> np.ndarray:
    """Circumcentre of three points (3, 3) in the plane they span."""
    a, b, c = p
    ab, ac = b - a, c - a
    n = np.cross(ab, ac)
    denom = 2.0 * np.dot(n, n)
    return a + (np.dot(ac, ac) * np.cross(n, ab) + np.dot(ab, ab) * np.cross(ac, n)) / denom


def surface_sites(slab: Atoms, lattice_constant: float) -> dict[str, list[np.ndarray]]:
    """Adsorption sites on the top surface: {'ontop'|'bridge'|'fcc'|'hcp'|'hollow': [(3,) points]}.

    ontop = a tag-1 atom, bridge = midpoint of two tag-1 neighbours, three-fold hollows = circumcentres of
    neighbour triples (radius ~ nn/sqrt 3; 'hcp' when a second-layer atom lies below, else 'fcc'), four-fold
    'hollow' = circumcentre of a right triangle (radius ~ nn/sqrt 2, (100) terraces). Points may lie outside
    the cell (periodic images); z is that of the defining atoms' plane.
    """
    nn = lattice_constant / np.sqrt(2)
    tags = slab.get_tags()
    pos = slab.positions
    ii, jj, dd = neighbor_list("ijD", slab, 1.5 * nn)
    sites: dict[str, list[np.ndarray]] = {"ontop": [], "bridge": [], "fcc": [], "hcp": [], "hollow": []}
    layer = lattice_constant / np.sqrt(3)
    for i in np.where(tags == 1)[0]:
        sel = (ii == i) & (tags[jj] == 1)
        nbrs = pos[i] + dd[sel]
        sites["ontop"].append(pos[i].copy())
        sites["bridge"] += [pos[i] + 0.5 * d for d in dd[sel] if np.linalg.norm(d) < 1.2 * nn]
        for u in range(len(nbrs)):
            for v in range(u + 1, len(nbrs)):
                if np.linalg.norm(nbrs[u] - nbrs[v]) >= 1.5 * nn:
                    continue
                tri = np.stack([pos[i], nbrs[u], nbrs[v]])
                c = _circumcenter(tri)
                if np.linalg.norm(c - tri[0]) > 0.65 * nn:
                    sites["hollow"].append(c)
                    continue
                below = (tags == 0) & (pos[:, 2] > c[2] - 1.5 * layer) & (pos[:, 2] < c[2] - 0.3)
                hcp = below.any() and _lateral(slab, c, np.where(below)[0]).min() < 0.5
                sites["hcp" if hcp else "fcc"].append(c)
    return {k: v for k, v in sites.items() if v}


def add_adsorbate_at(slab: Atoms, adsorbate: str, site: np.ndarray, rng: np.random.Generator) -> Atoms:
    """Slab + adsorbate (tag 2) with its anchor above ``site`` (x, y) at its bond distance to the nearest atom.

    The anchor height is the lowest z at which every slab atom is at least ``_ANCHOR_DISTANCE`` away; a second
    atom (OH, CO, CH, NH) sits above the anchor, tilted up to 20 degrees in a random direction.
    """
    anchor = adsorbate[0]
    d0 = _ANCHOR_DISTANCE[anchor]
    rho = _lateral(slab, site)
    close = rho < d0
    z = slab.positions[close, 2] + np.sqrt(d0**2 - rho[close] ** 2)
    z_anchor = z.max() if close.any() else slab.positions[:, 2].max() + d0
    p0 = np.array([site[0], site[1], z_anchor])
    symbols, positions = [anchor], [p0]
    if len(adsorbate) > 1:
        tilt, phi = np.deg2rad(rng.uniform(0.0, 20.0)), rng.uniform(0.0, 2 * np.pi)
        direction = np.array([np.sin(tilt) * np.cos(phi), np.sin(tilt) * np.sin(phi), np.cos(tilt)])
        symbols.append(adsorbate[1])
        positions.append(p0 + _BOND[adsorbate] * direction)
    ads = Atoms(symbols, positions=positions, tags=[2] * len(symbols))
    out = slab.copy()
    out.extend(ads)
    out.set_constraint(FixAtoms(mask=out.get_tags() == 0))
    out.wrap()
    return out


def make_bulk(metal: str, repeat: int, rng: np.random.Generator, max_strain: float = 0.03) -> Atoms:
    """A cubic fcc / L1_2 bulk cell repeated ``repeat`` times per axis, randomly strained (|e_ij| <= max_strain).

    Tags all 0 (bulk does not occur in OC20 S2EF); no constraints.
    """
    cell = l12_bulk(metal) if metal in ALLOYS else bulk(metal, "fcc", a=emt_lattice_constant(metal), cubic=True)
    atoms = cell.repeat((repeat, repeat, repeat))
    eps = rng.uniform(-max_strain, max_strain, size=(3, 3))
    eps = 0.5 * (eps + eps.T)
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + eps), scale_atoms=True)
    atoms.set_tags(np.zeros(len(atoms), dtype=int))
    return atoms
