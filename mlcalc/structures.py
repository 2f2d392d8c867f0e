"""Structure conversion: ase.Atoms is the native type; pymatgen Structure/Molecule in and out (extra ``pymatgen``)."""

from __future__ import annotations

from typing import Any

from ase import Atoms


def _is_pymatgen(obj: Any) -> bool:
    return type(obj).__module__.startswith("pymatgen.")


def as_atoms(obj: Any) -> Atoms:
    """An ase.Atoms for ``obj`` (Atoms as is; pymatgen Structure/Molecule converted, tags from site property)."""
    if isinstance(obj, Atoms):
        return obj
    if _is_pymatgen(obj):
        from pymatgen.io.ase import AseAtomsAdaptor

        atoms = AseAtomsAdaptor.get_atoms(obj)
        props = getattr(obj, "site_properties", {}) or {}
        if "tags" in props and props["tags"] is not None and None not in props["tags"]:
            atoms.set_tags([int(t) for t in props["tags"]])
        return atoms
    raise TypeError(f"expected an ase.Atoms or a pymatgen Structure/Molecule, got {type(obj).__name__}")


def to_pymatgen(atoms: Atoms) -> Any:
    """A pymatgen Structure (any periodic axis) or Molecule (no periodicity), with tags as a site property."""
    from pymatgen.io.ase import AseAtomsAdaptor

    if atoms.pbc.any():
        out = AseAtomsAdaptor.get_structure(atoms)
    else:
        out = AseAtomsAdaptor.get_molecule(atoms)
    out.add_site_property("tags", [int(t) for t in atoms.get_tags()])
    return out
