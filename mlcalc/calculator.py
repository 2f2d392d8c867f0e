"""ASE calculators: MLCalculator (any mlcalc model) and the named calculators of each model family."""

from __future__ import annotations

import copy
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from typing import Any, ClassVar

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.data import atomic_numbers, chemical_symbols
from ase.stress import full_3x3_to_voigt_6_stress

from mlcalc.checkpoint import load_model
from mlcalc.graph import AtomGraph, check_cell, radius_graph
from mlcalc.memory import check_fits
from mlcalc.models.base import MLModel
from mlcalc.nn.scatter import gather
from mlcalc.precision import Bfloat16Linears, cpu_has_bfloat16
from mlcalc.structures import as_atoms

logger = logging.getLogger(__name__)

#: live calculators of this process (their locks are renewed in a forked child)
_CALCULATORS: weakref.WeakSet[MLCalculator] = weakref.WeakSet()
#: set once this process has made a calculator (loading, casting or running a model may start torch's OpenMP pool)
_TORCH_POOL_MAY_EXIST = False


def _after_fork_in_child() -> None:
    """Make a forked child usable: fresh calculator locks and a single torch intra-op thread.

    A child forked after the parent ran torch ops on more than one intra-op thread hangs in its first parallel op
    (the parent's OpenMP thread pool does not exist in the child). One thread avoids that pool; this changes only
    the child's own torch setting. A lock held by another parent thread at fork time would never be released in the
    child, so every calculator gets a new one.
    """
    for calc in list(_CALCULATORS):
        calc._lock = threading.RLock()
    if _TORCH_POOL_MAY_EXIST and torch.get_num_threads() > 1:
        torch.set_num_threads(1)


def _register_calculator(calc: MLCalculator) -> None:
    global _TORCH_POOL_MAY_EXIST
    _TORCH_POOL_MAY_EXIST = True
    _CALCULATORS.add(calc)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

#: atoms closer than this (Å) are rejected as unphysical input
MIN_INTERATOMIC_DISTANCE = 0.1

OC20_ENERGY_NOTE = (
    "Checkpoints trained on OC20 S2EF predict adsorption-referenced energies (total energy minus the clean slab "
    "and gas-phase references of the training data), not DFT total energies; compare energies only between "
    "structures with the same composition and reference."
)
OC22_ENERGY_NOTE = (
    "This checkpoint predicts DFT total energies (OC22 models are trained on total energies), not adsorption "
    "energies: an adsorption energy needs the clean slab and gas-phase references computed with the same model."
)
IS2RE_NOTE = (
    "Energy-only (IS2RE) checkpoint: it predicts the relaxed energy directly from the initial structure; it has no "
    "forces (regress_forces: False), so it cannot drive relaxations or MD."
)
ENERGY_NOTES = {"adsorption": OC20_ENERGY_NOTE, "total": OC22_ENERGY_NOTE}


def energy_kind(model: MLModel) -> str | None:
    """What a checkpoint's energy is: "adsorption" (OC20, ODAC), "total" (OC22) or None when not known.

    From the registry facts of a checkpoint loaded by name, an mlcalc file's ``energy_kind`` metadata, or a fairchem
    file's training data format (``oc22_lmdb`` = OC22 total energies; other fairchem files are OC20-style)."""
    meta = getattr(model, "metadata", None) or {}
    pre = meta.get("pretrained")
    if isinstance(pre, dict) and pre.get("energy"):
        return str(pre["energy"])
    if meta.get("energy_kind"):
        return str(meta["energy_kind"])
    if meta.get("source") == "fairchem":
        return "total" if "oc22" in str(meta.get("dataset_format") or "").lower() else "adsorption"
    return None


DIRECT_FORCES_NOTE = (
    "This checkpoint predicts forces directly (not as -dE/dx): fine for BFGS/FIRE relaxations and thermostatted "
    "MD, but forces are not energy-conserving, so NVE MD drifts and no stress is available."
)
NO_STRESS_DIRECT_MESSAGE = (
    "stress is not available: this checkpoint predicts forces directly (direct_forces=True), so there is no "
    "energy derivative with respect to strain; relax positions only (no cell filter, no NPT), or use a "
    "gradient-force checkpoint (direct_forces: False) for stress and cell relaxations"
)
_NO_CELL_MESSAGE = "stress needs a 3-D cell (nonzero volume); this structure's cell has rank {rank}"
QINT_UNTAGGED_MESSAGE = (
    "GemNet-OC quadruplet interaction is OFF for this structure: no atom carries one of the checkpoint's qint_tags "
    "%s (all tags: %s), so its quadruplet messages are zero and results differ from a tagged structure. Tag atoms "
    "as in OC20 before calling the calculator: 0 = fixed sub-surface/bulk, 1 = surface, 2 = adsorbate "
    "(atoms.set_tags(...)); files read with ase.io.read (CIF, POSCAR, xyz) have all tags 0. Logged once per "
    "calculator."
)


#: torch's float32 matmul precision words, as ``torch.set_float32_matmul_precision`` takes them
MATMUL_PRECISIONS = ("highest", "high", "medium")
#: held while a calculator's evaluation runs, so a precision set for one calculator never leaks into another's
_PRECISION_LOCK = threading.RLock()


@contextmanager
def matmul_precision(precision: str, device: torch.device | str | None = None) -> Iterator[None]:
    """Run the block with ``torch.set_float32_matmul_precision(precision)`` and restore the previous setting.

    Process-wide torch state, so the block holds a process-wide lock: no other mlcalc evaluation (of any
    calculator, in any thread) runs with a precision it did not ask for. With "medium" on a CPU ``device`` that
    multiplies bfloat16 natively, the block also runs the linear layers in bfloat16 (``mlcalc.precision``; torch's
    setting alone changes nothing on CPUs)."""
    if precision not in MATMUL_PRECISIONS:
        raise ValueError(f"matmul_precision must be one of {MATMUL_PRECISIONS}, got {precision!r}")
    on_cpu = device is not None and torch.device(device).type == "cpu"
    cpu_bf16 = precision == "medium" and on_cpu and cpu_has_bfloat16()
    with _PRECISION_LOCK:
        previous = torch.get_float32_matmul_precision()
        if previous != precision:
            torch.set_float32_matmul_precision(precision)
        try:
            with Bfloat16Linears() if cpu_bf16 else nullcontext():
                yield
        finally:
            if torch.get_float32_matmul_precision() != previous:
                torch.set_float32_matmul_precision(previous)


def resolve_dtype(dtype: torch.dtype | str | type | np.dtype) -> torch.dtype:
    """torch.float32/float64, numpy's float32/float64 (type or dtype) or the strings 'float32'/'float64'.

    Strings also accept 'fp32'/'fp64', 'single'/'double' and a 'torch.' prefix.
    """
    if isinstance(dtype, str):
        table = {
            "float32": torch.float32, "fp32": torch.float32, "single": torch.float32, "float": torch.float32,
            "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
        }
        key = dtype.lower().removeprefix("torch.").removeprefix("numpy.").removeprefix("np.")
        if key not in table:
            raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
        return table[key]
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        return dtype
    try:
        np_dtype = np.dtype(dtype)
    except TypeError:
        raise ValueError(f"dtype must be torch.float32 or torch.float64 (or numpy's), got {dtype!r}") from None
    table_np = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}
    if np_dtype not in table_np:
        raise ValueError(f"dtype must be float32 or float64, got numpy {np_dtype}")
    return table_np[np_dtype]


def resolve_device(device: torch.device | str) -> torch.device:
    """'auto' picks cuda when available, else cpu; anything torch.device accepts otherwise ('cpu', 'cuda:1')."""
    if isinstance(device, str) and device.strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        hint = " (for an NVIDIA GPU write 'cuda')" if str(device).strip().lower().startswith("gpu") else ""
        raise ValueError(
            f"unknown device {device!r}{hint}; use 'auto', 'cpu', 'cuda', 'cuda:N' or another torch device name"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' requested but torch reports no CUDA device; use device='cpu' or 'auto'")
    return dev


def validate_atoms(atoms: Atoms, max_atomic_number: int = 118) -> None:
    """Raise ValueError naming the problem for input no model can evaluate sensibly."""
    if len(atoms) == 0:
        raise ValueError("the Atoms object is empty (0 atoms)")
    numbers = np.asarray(atoms.numbers)
    bad = np.where((numbers < 1) | (numbers > max_atomic_number))[0]
    if bad.size:
        names = sorted({chemical_symbols[z] if 0 <= z < len(chemical_symbols) else str(z) for z in numbers[bad]})
        raise ValueError(
            f"element(s) {', '.join(names)} (atom indices {bad.tolist()[:10]}) outside the model's range "
            f"Z = 1..{max_atomic_number}"
        )
    pos = np.asarray(atoms.positions, dtype=np.float64)
    finite = np.isfinite(pos).all(axis=1)
    if not finite.all():
        raise ValueError(f"positions of atoms {np.where(~finite)[0].tolist()[:10]} are NaN or inf")
    pbc = np.asarray(atoms.pbc, dtype=bool)
    check_cell(np.asarray(atoms.cell.array, dtype=np.float64), pbc, "Atoms")
    if len(atoms) > 1 or pbc.any():
        from mlcalc.graph import candidate_pairs

        # the graph room's cluster-aware search (cost follows the atoms, not the box), unfiltered so that exact
        # duplicates (d = 0) are seen; a 1 Å radius keeps its cells coarse (a 0.1 Å grid over a box would be huge)
        i, j, s, d = candidate_pairs(pos, atoms.cell.array, pbc, 1.0, include_overlaps=True)
        close = (d < MIN_INTERATOMIC_DISTANCE) & (i <= j)  # each pair once (both directions are listed)
        if close.any():
            k = int(np.lexsort((j, i, np.where(close, d, np.inf)))[0])
            raise ValueError(
                f"atoms {int(i[k])} and {int(j[k])} are {d[k]:.4f} Å apart (image {s[k].tolist()}), closer than "
                f"{MIN_INTERATOMIC_DISTANCE} Å: the structure is unphysical (duplicated atom?)"
            )


def evaluate_model(
    model: MLModel,
    graph: AtomGraph,
    stress: bool = False,
    create_graph: bool = False,
    forward: Callable[[AtomGraph], dict[str, torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """Denormalised energy (B,) eV, forces (N, 3) eV/Å and, if asked and possible, stress (B, 3, 3) eV/Å³.

    The one force/stress path of mlcalc (the calculator, ``predict`` and training all call it): direct-force models
    return their force head; gradient models give forces = -dE/dpos and stress = (1/V) dE/dε from a symmetric
    zero-valued strain ε applied to positions and cell (autograd). Denormalisation as fairchem: energy = raw *
    std + mean, forces = raw forces * f_std + f_mean; then the per-element references of the model (if any) are
    added to the energy (sum over atoms of ``model.element_references[Z]``, constant in positions, so forces and
    stress are unchanged). Energy-only models (``regress_forces`` False, IS2RE) return the energy alone.
    ``graph`` must already be on the model's device and dtype.

    ``create_graph=True`` keeps the autograd graph of every output (training: losses on forces and stress are
    differentiated with respect to the parameters); inference leaves it False. Training and inference share
    this one force/stress path, so they cannot drift apart.

    With ``stress``, structures of the batch without a 3-D cell get a meaningless (finite) stress entry: the
    caller keeps stress only for structures whose cell has rank 3.
    """
    m = model
    run = m if forward is None else forward  # ``forward``: e.g. a torch.compile'd model.forward
    e_mean, e_std = m.normalizers.get("energy", (0.0, 1.0))
    f_mean, f_std = m.normalizers.get("forces", (0.0, 1.0))
    e_ref = _reference_energy(m, graph)
    if not getattr(m, "regress_forces", True):  # energy-only (IS2RE) model
        with torch.set_grad_enabled(create_graph):
            out = run(graph)
        return {"energy": out["energy"] * e_std + e_mean + e_ref}
    if m.direct_forces:
        with torch.set_grad_enabled(create_graph):
            out = run(graph)
        return {"energy": out["energy"] * e_std + e_mean + e_ref, "forces": out["forces"] * f_std + f_mean}
    with torch.enable_grad():
        pos = graph.pos.detach().requires_grad_(True)
        inputs = [pos]
        if stress:
            strain = torch.zeros((graph.num_graphs, 3, 3), dtype=pos.dtype, device=pos.device, requires_grad=True)
            sym = 0.5 * (strain + strain.transpose(1, 2))
            eye = torch.eye(3, dtype=pos.dtype, device=pos.device)
            deform = eye + sym
            pos_s = torch.bmm(pos.unsqueeze(1), gather(deform, graph.batch)).squeeze(1)  # deterministic backward
            cell_s = torch.bmm(graph.cell, deform)
            inputs.append(strain)
        else:
            pos_s, cell_s = pos, graph.cell
        g = replace(graph, pos=pos_s, cell=cell_s)
        raw = run(g)["energy"]
        grads = torch.autograd.grad(raw.sum(), inputs, allow_unused=True, create_graph=create_graph)
    dpos = grads[0] if grads[0] is not None else torch.zeros_like(pos)
    energy = (raw if create_graph else raw.detach()) * e_std + e_mean + e_ref
    result = {"energy": energy, "forces": -dpos * f_std + f_mean}
    if stress:
        dstrain = grads[1] if grads[1] is not None else torch.zeros_like(strain)
        volume = torch.linalg.det(graph.cell).abs()
        volume = torch.where(volume > 0, volume, torch.ones_like(volume))  # no cell: entry discarded by caller
        result["stress"] = dstrain * e_std / volume.view(-1, 1, 1)
    return result



def _reference_energy(model: MLModel, graph: AtomGraph) -> torch.Tensor | float:
    """(B,) sum of the model's per-element energy references over each structure's atoms, or 0.0 without them.

    Raises ValueError naming the elements that have no reference when the model has references for others."""
    refs = getattr(model, "element_references", None)
    if not refs:
        return 0.0
    table = torch.full((max(max(refs), int(graph.numbers.max())) + 1,), float("nan"), dtype=torch.float64)
    for z, e in refs.items():
        table[int(z)] = float(e)
    per_atom = table.to(graph.numbers.device)[graph.numbers]
    missing = torch.isnan(per_atom)
    if bool(missing.any()):
        zs = sorted({chemical_symbols[int(z)] for z in graph.numbers[missing].tolist()})
        raise ValueError(f"the checkpoint has no element reference energy for {', '.join(zs)}")
    total = torch.zeros(graph.num_graphs, dtype=torch.float64, device=graph.numbers.device)
    total.index_add_(0, graph.batch, per_atom)
    return total.to(graph.pos.dtype)

class MLCalculator(Calculator):
    """ASE calculator for any mlcalc model.

    Args:
        model: an ``MLModel`` instance or the path of a checkpoint (fairchem v1 or mlcalc format).
        device: "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...
        dtype: torch.float32 (default) or torch.float64 (or the strings); per instance, never global.
        matmul_precision: "highest" (default: float32 matmuls), "high" (TF32 on CUDA; float32 on CPU) or "medium"
            (CUDA: bfloat16 matmuls with float32 accumulation; CPUs with AVX512-BF16 or AMX-BF16: the linear
            layers run as bfloat16 products with float32 accumulation, ``mlcalc.precision``; everything else
            stays float32); torch's ``set_float32_matmul_precision`` words. "medium" moves energies by ~1e-2 eV
            and forces by 1-4e-2 eV/Å on the shipped checkpoints (docs/performance.md): for screening, not for
            converged forces or MD; it is faster only for large models (OC20 sizes: 1.3-1.6x on an AVX512-BF16 CPU).
            Per instance: set for the duration of
            each evaluation and restored after, under a process-wide lock (evaluations of calculators in different
            threads run one at a time). No effect on float64 calculators. ``benchmarks/precision.py`` measures
            what each mode costs in accuracy.
        compile: run the model's forward through ``torch.compile(dynamic=True)`` (TorchInductor): edge, triplet and
            atom counts are symbolic, so new structures do not recompile; elementwise chains are fused. The first
            call compiles (tens of seconds to minutes on a CPU; needs a C++ compiler); results equal eager within
            float32 rounding. Off by default.
        skin: Å, neighbour reuse for MD and relaxations (0, the default: a fresh graph every call). With skin > 0
            the candidate pairs within cutoff + skin are kept and reused until an atom has moved skin/2 or the
            cell, pbc or atoms change (``mlcalc.graph.reuse.NeighborCache``, a Verlet-list skin); the graph and
            the results are bit-identical to skin=0. 1-2 Å suits MD. ``neighbor_stats`` counts builds and reuses.
        check_memory: before each evaluation, compare the model's estimate of the call's peak memory with what the
            device has free and raise MemoryError naming the system's size when it cannot fit (``mlcalc.memory``;
            on Linux an out-of-memory CPU process is otherwise killed without a Python error). On by default.

    Results (ASE units, float64 numpy): energy and free_energy (eV), forces (N, 3) eV/Å, and for models whose
    forces are -dE/dx, stress (Voigt xx yy zz yz xz xy, eV/Å³) from the strain derivative when the cell is 3-D.
    The model is copied when it must change device or dtype, so one model can serve several calculators.

    Structures may be ase.Atoms or pymatgen Structure/Molecule (converted). A checkpoint whose metadata lists
    ``elements`` (mlcalc files) refuses other elements. One calculator may be shared by several threads (each call
    is atomic: a result always belongs to the Atoms it was asked for); a child process forked after a calculator
    was made gets one torch intra-op thread (the parent's OpenMP pool would hang it) and fresh calculator locks.

    Parity with fairchem 1.10 holds for graphs without exact distance ties at the max_neighbors boundary. With
    such ties (perfect lattices, ideal slabs from ase.build) mlcalc keeps a canonical choice (nearest, then lower
    source index, then cell offset) where fairchem keeps what its unstable sort returns, so the energies differ.
    """

    implemented_properties: ClassVar[list[str]] = ["energy", "free_energy", "forces", "stress"]
    #: registry names a named calculator accepts (empty: any model)
    model_names: ClassVar[tuple[str, ...]] = ()
    extra_notes: ClassVar[tuple[str, ...]] = ()
    #: structures per batched graph in ``predict`` unless told otherwise
    default_batch_size: ClassVar[int] = 32

    def __init__(
        self,
        model: MLModel | str | os.PathLike,
        device: torch.device | str = "auto",
        dtype: torch.dtype | str | type | np.dtype = torch.float32,
        *,
        skin: float = 0.0,
        matmul_precision: str = "highest",
        compile: bool = False,
        check_memory: bool = True,
        **kwargs: Any,
    ) -> None:
        from mlcalc.graph.reuse import NeighborCache

        if matmul_precision not in MATMUL_PRECISIONS:
            raise ValueError(f"matmul_precision must be one of {MATMUL_PRECISIONS}, got {matmul_precision!r}")
        self.matmul_precision = matmul_precision
        self.compile = bool(compile)
        self.check_memory = bool(check_memory)
        self._compiled_forward: Callable[[AtomGraph], dict[str, torch.Tensor]] | None = None
        skin = float(skin)
        if not np.isfinite(skin) or skin < 0:
            raise ValueError(f"skin must be a finite distance >= 0 in Å (0: no neighbour reuse), got {skin}")
        super().__init__(**kwargs)
        self.skin = skin
        #: candidate pairs kept between calls (None when skin is 0); graphs of single structures only
        self.neighbor_cache: NeighborCache | None = NeighborCache(skin) if skin > 0 else None
        #: {"builds": candidate searches, "reuses": graphs served from stored candidates} for single structures
        self.neighbor_stats: dict[str, int] = (
            self.neighbor_cache.stats if self.neighbor_cache is not None else {"builds": 0, "reuses": 0}
        )
        self._lock = threading.RLock()
        self._warned_untagged = False
        _register_calculator(self)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        if isinstance(model, (str, os.PathLike)):
            model = load_model(model)
        if not isinstance(model, MLModel):
            raise TypeError(f"model must be an mlcalc MLModel or a checkpoint path, got {type(model).__name__}")
        if self.model_names and model.registry_name.lower() not in {n.lower() for n in self.model_names}:
            raise ValueError(
                f"{type(self).__name__} expects a {'/'.join(self.model_names)} model, got {model.registry_name!r}"
            )
        if _needs_copy(model, self.device, self.dtype):
            model = copy.deepcopy(model).to(device=self.device, dtype=self.dtype)
        self.model = model.eval()
        self.implemented_properties = list(model.implemented_properties)
        self.elements = _metadata_elements(model)
        notes = list(self.extra_notes)
        kind = energy_kind(model)
        if kind in ENERGY_NOTES:
            notes.append(ENERGY_NOTES[kind])
        if not getattr(model, "regress_forces", True):
            notes.append(IS2RE_NOTE)
        elif model.direct_forces:
            notes.append(DIRECT_FORCES_NOTE)
        self.info: dict[str, Any] = {
            "model": model.registry_name,
            "checkpoint": getattr(model, "checkpoint_path", None),
            "cutoff": model.cutoff,
            "max_neighbors": model.max_neighbors,
            "direct_forces": model.direct_forces,
            "energy": kind,
            "pretrained": (getattr(model, "metadata", None) or {}).get("pretrained", {}).get("name"),
            "elements": sorted(self.elements, key=atomic_numbers.get) if self.elements else None,
            "max_atomic_number": model.max_elements,
            "device": str(self.device),
            "matmul_precision": self.matmul_precision,
            "dtype": str(self.dtype).removeprefix("torch."),
            "implemented_properties": list(self.implemented_properties),
            "normalizers": dict(getattr(model, "normalizers", {})),
            "notes": notes,
        }

    # -- pickling / copying: a lock is per process and per object ------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_lock", None)
        state["_compiled_forward"] = None  # compiled code is per process; rebuilt on first use
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()
        _register_calculator(self)

    # -- graph ---------------------------------------------------------------------------------------------
    def build_graph(self, atoms: Atoms | list[Atoms]) -> AtomGraph:
        """The graph the model asks for, on this calculator's device and dtype.

        Recentred in float64 before the cast (``AtomGraph.recentered``): positions are wrapped / translated next to
        the origin with offsets adjusted, so float32 edge vectors do not depend on where the atoms sit (unwrapped
        trajectories, huge boxes); ``graph.pos`` is therefore not ``atoms.positions``, but forces and stress by
        autograd are unchanged. With ``skin`` > 0 a single structure's graph comes from the neighbour cache
        (identical to the fresh build, candidate search skipped while no atom moved skin/2); lists are built fresh.
        """
        m = self.model
        cache = getattr(self, "neighbor_cache", None)
        if isinstance(atoms, Atoms) and cache is not None:
            with self._lock:
                graph = cache.graph(atoms, m.cutoff, m.max_neighbors, m.strict_max_neighbors)
        else:
            # on CUDA the candidate search runs on the device (mlcalc's torch cell list, same canonical graph)
            search_device = self.device if self.device.type == "cuda" else None
            graph = radius_graph(
                atoms, m.cutoff, m.max_neighbors, m.strict_max_neighbors, dtype=torch.float64, recenter=True,
                device=search_device,
            )
            stats = getattr(self, "neighbor_stats", None)
            if isinstance(atoms, Atoms) and stats is not None:
                with self._lock:
                    stats["builds"] += 1
        return graph.to(device=self.device, dtype=self.dtype)

    def check_atoms(self, atoms: Atoms) -> None:
        """ValueError for input the model cannot evaluate (empty, unknown elements, NaN, bad cell, overlaps).

        Elements: the checkpoint's ``elements`` metadata when it has one (mlcalc files), else the model's Z range.
        """
        validate_atoms(atoms, self.model.max_elements)
        if self.elements:
            symbols = np.asarray(atoms.get_chemical_symbols())
            bad = np.where(~np.isin(symbols, sorted(self.elements)))[0]
            if bad.size:
                names = sorted(set(symbols[bad].tolist()), key=atomic_numbers.get)
                known = sorted(self.elements, key=atomic_numbers.get)
                raise ValueError(
                    f"element(s) {', '.join(names)} (atom indices {bad.tolist()[:10]}) not covered by this "
                    f"checkpoint, which lists elements {known} in its metadata"
                )

    def _warn_if_untagged(self, atoms: Atoms) -> None:
        """One warning per calculator when a tag-restricted quadruplet interaction (GemNet-OC) finds no tagged atom."""
        m = self.model
        qint_tags = getattr(m, "qint_tags", None)
        if self._warned_untagged or not getattr(m, "use_quad", False) or qint_tags is None:
            return
        wanted = [int(t) for t in torch.as_tensor(qint_tags).flatten().tolist()]
        tags = np.asarray(atoms.get_tags())
        if not np.isin(tags, wanted).any():
            self._warned_untagged = True
            logger.warning(QINT_UNTAGGED_MESSAGE, wanted, sorted(set(tags.tolist())))

    def _as_input_atoms(self, atoms: Any) -> Atoms | None:
        """Atoms as given, pymatgen converted; TypeError (state untouched) for anything else."""
        if atoms is None or isinstance(atoms, Atoms):
            return atoms
        try:
            return as_atoms(atoms)
        except TypeError:
            raise TypeError(
                f"{type(self).__name__} needs an ase.Atoms (or a pymatgen Structure/Molecule, converted), got "
                f"{type(atoms).__module__}.{type(atoms).__name__}"
            ) from None

    def require_properties(self, properties: Sequence[str]) -> None:
        """PropertyNotImplementedError, saying why, for the first of ``properties`` this model cannot give."""
        missing = [p for p in properties if p not in self.implemented_properties]
        if missing:
            raise PropertyNotImplementedError(self._missing_property_message(missing[0]))

    def _missing_property_message(self, name: str) -> str:
        if not getattr(self.model, "regress_forces", True):
            return (
                f"{name} is not available: this is an energy-only (IS2RE) checkpoint that predicts the relaxed "
                "energy from the initial structure (regress_forces: False); it has no forces, so it cannot drive a "
                "relaxation or MD. Use an S2EF checkpoint for forces."
            )
        if name == "stress" and self.model.direct_forces:
            return NO_STRESS_DIRECT_MESSAGE
        if name == "stress":
            return f"stress is not available from this {self.model.registry_name} model (its forces are not -dE/dx)"
        return f"{name!r} is not available from this model (it gives {self.implemented_properties})"

    # -- ASE's interface: every call is atomic under the calculator's lock ----------------------------------
    def get_property(self, name: str, atoms: Atoms | None = None, allow_calculation: bool = True) -> Any:
        """ASE's get_property, made atomic (state check, compute, result read under one lock).

        Accepts pymatgen structures; a failed calculation leaves no stale atoms/results behind.
        """
        atoms = self._as_input_atoms(atoms)
        if name not in self.implemented_properties:
            raise PropertyNotImplementedError(self._missing_property_message(name))
        with self._lock:
            if atoms is None and self.atoms is None:
                raise ValueError(f"no structure to evaluate: pass an Atoms object (calc.get_property({name!r}, atoms))")
            target = atoms if atoms is not None else self.atoms
            if name == "stress" and target.cell.rank < 3:  # refused before any state changes (cached results stay)
                raise PropertyNotImplementedError(_NO_CELL_MESSAGE.format(rank=target.cell.rank))
            try:
                return super().get_property(name, atoms, allow_calculation)
            except BaseException:
                self.atoms = None
                self.results = {}
                raise

    def calculation_required(self, atoms: Atoms, properties: Sequence[str]) -> bool:
        with self._lock:
            return super().calculation_required(self._as_input_atoms(atoms), properties)

    def reset(self) -> None:
        # Calculator.__init__ calls reset() before the lock exists
        lock = self.__dict__.get("_lock")
        if lock is None:
            super().reset()
            return
        with lock:
            super().reset()

    def check_state(self, atoms: Atoms, tol: float = 1e-15) -> list[str]:
        """ASE's change detection plus tags (GemNet-OC's quadruplet graph depends on them)."""
        changes = super().check_state(atoms, tol)
        if self.atoms is not None and "tags" not in changes:
            old, new = self.atoms.get_tags(), atoms.get_tags()
            if old.shape != new.shape or not np.array_equal(old, new):
                changes.append("tags")
        return changes

    # -- evaluation ----------------------------------------------------------------------------------------
    def _forward(self) -> Callable[[AtomGraph], dict[str, torch.Tensor]] | None:
        """The model's forward compiled with ``torch.compile(dynamic=True)`` when ``compile`` (built on first use,
        per calculator: the shared model object is not modified), else None (eager)."""
        if not self.compile:
            return None
        if self._compiled_forward is None:
            self._compiled_forward = torch.compile(self.model.forward, dynamic=True)
        return self._compiled_forward

    def evaluate(self, graph: AtomGraph, stress: bool = False, create_graph: bool = False) -> dict[str, torch.Tensor]:
        """``evaluate_model`` with this calculator's model: denormalised energy (B,), forces (N, 3), stress.

        Runs under this calculator's ``matmul_precision`` (restored afterwards). A system whose estimated peak
        exceeds the free memory (``check_memory``), or that runs out of memory (CPU allocator or CUDA), raises
        MemoryError naming the size of the system, not torch's allocator message."""
        if self.check_memory:
            check_fits(self.model, graph, self.device, self.dtype)
        try:
            with matmul_precision(self.matmul_precision, self.device):
                return evaluate_model(self.model, graph, stress=stress, create_graph=create_graph,
                                      forward=self._forward())
        except RuntimeError as err:  # torch.OutOfMemoryError (CUDA) and the CPU allocator's RuntimeError
            text = str(err)
            if not (isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in text
                    or "out of memory" in text.lower()):
                raise
            raise MemoryError(
                f"{self.model.registry_name} ran out of memory on {graph.num_atoms} atoms in {graph.num_graphs} "
                f"structure(s) with {graph.num_edges} edges within {self.model.cutoff:g} Å on {self.device} "
                f"({self.dtype}): use smaller batches (predict(batch_size=...)), fewer atoms per structure or a "
                f"device with more memory (allocator: {' '.join(text.split())[:200]})"
            ) from err

    def calculate(
        self,
        atoms: Atoms | None = None,
        properties: list[str] | None = None,
        system_changes: list[str] = all_changes,
    ) -> None:
        """Compute energy, free_energy, forces (and stress when available) for ``atoms`` into ``self.results``."""
        properties = properties or ["energy"]
        atoms = self._as_input_atoms(atoms)
        for p in properties:
            if p not in self.implemented_properties:
                raise PropertyNotImplementedError(self._missing_property_message(p))
        with self._lock:
            if atoms is None and self.atoms is None:
                raise ValueError("no structure to evaluate: pass an Atoms object")
            try:
                self._calculate_locked(atoms, properties, system_changes)
            except BaseException:
                # Calculator.calculate already stored these atoms: keeping them with the previous results would
                # hand those results out for this structure later
                self.atoms = None
                self.results = {}
                raise

    def _calculate_locked(self, atoms: Atoms | None, properties: list[str], system_changes: list[str]) -> None:
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        self.check_atoms(atoms)
        want_stress = "stress" in self.implemented_properties and atoms.cell.rank == 3
        self.require_properties(properties)
        if "stress" in properties and not want_stress:
            raise PropertyNotImplementedError(_NO_CELL_MESSAGE.format(rank=atoms.cell.rank))
        self._warn_if_untagged(atoms)
        graph = self.build_graph(atoms)
        out = self.evaluate(graph, stress=want_stress)
        energy = float(out["energy"].double().sum().item())
        results: dict[str, Any] = {"energy": energy, "free_energy": energy}
        if "forces" in out:
            results["forces"] = out["forces"].detach().double().cpu().numpy().copy()
        if want_stress:
            s = out["stress"][0].detach().double().cpu().numpy()
            results["stress"] = full_3x3_to_voigt_6_stress(s)
        self.results = results

    def predict(self, structures: Iterable[Any], batch_size: int | None = None) -> list[dict[str, Any]]:
        """Evaluate several structures (Atoms or pymatgen) in batched graphs; per-structure float64 results.

        Args:
            structures: ase.Atoms or pymatgen Structure/Molecule objects (an empty list gives []).
            batch_size: structures per batched graph (default ``default_batch_size``); large lists are split.

        Each result holds energy, free_energy, forces (not for energy-only IS2RE models) and, for gradient-force
        models and structures with a 3-D cell, stress (also when the batch mixes molecules and bulk cells). All
        inputs are validated first.
        """
        single = isinstance(structures, Atoms) or type(structures).__module__.startswith("pymatgen.")
        if single or isinstance(structures, (str, bytes)) or not hasattr(structures, "__iter__"):
            raise TypeError(
                f"predict takes a list of structures, got {type(structures).__name__}; for one structure use "
                "predict([structure]) or atoms.calc = calc"
            )
        batch_size = self.default_batch_size if batch_size is None else int(batch_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        atoms_list = [self._as_input_atoms(s) for s in structures]
        for k, a in enumerate(atoms_list):
            try:
                self.check_atoms(a)
            except ValueError as err:
                raise ValueError(f"structure {k}: {err}") from None
        results: list[dict[str, Any]] = []
        with self._lock:
            for start in range(0, len(atoms_list), batch_size):
                results.extend(self._predict_batch(atoms_list[start : start + batch_size]))
        return results

    def _predict_batch(self, structures: list[Atoms]) -> list[dict[str, Any]]:
        has_cell = [a.cell.rank == 3 for a in structures]
        stress = "stress" in self.implemented_properties and any(has_cell)
        for a in structures:
            self._warn_if_untagged(a)
        graph = self.build_graph(list(structures))
        out = self.evaluate(graph, stress=stress)
        forces = out["forces"].detach().double().cpu().numpy() if "forces" in out else None
        energies = out["energy"].detach().double().cpu().numpy()
        bounds = np.cumsum([0] + [len(a) for a in structures])
        results = []
        for k in range(len(structures)):
            e = float(energies[k])
            r: dict[str, Any] = {"energy": e, "free_energy": e}
            if forces is not None:
                r["forces"] = forces[bounds[k] : bounds[k + 1]].copy()
            if stress and has_cell[k]:
                r["stress"] = full_3x3_to_voigt_6_stress(out["stress"][k].detach().double().cpu().numpy())
            results.append(r)
        return results


def _metadata_elements(model: MLModel) -> frozenset[str] | None:
    """The element symbols a checkpoint's metadata lists (mlcalc files: ``elements``), None when it lists none."""
    listed = (getattr(model, "metadata", None) or {}).get("elements")
    if not listed:
        return None
    symbols = set()
    for el in listed:
        if isinstance(el, (int, np.integer)) and 0 < int(el) < len(chemical_symbols):
            symbols.add(chemical_symbols[int(el)])
        elif isinstance(el, str) and el in atomic_numbers:
            symbols.add(el)
        else:
            raise ValueError(f"checkpoint metadata lists an unknown element {el!r} in 'elements'")
    return frozenset(symbols)


def _needs_copy(model: MLModel, device: torch.device, dtype: torch.dtype) -> bool:
    tensors = list(model.parameters()) + [b for b in model.buffers()]
    for t in tensors:
        if t.device.type != device.type or (device.index is not None and t.device.index != device.index):
            return True
        if t.is_floating_point() and t.dtype != dtype:
            return True
    return False


class GemNetOCCalculator(MLCalculator):
    """GemNet-OC (fairchem v1 checkpoints, e.g. ``gemnet_oc_base_s2ef_all_md.pt``) as an ASE calculator.

    Same arguments as MLCalculator. Energies and forces are denormalised exactly as fairchem does. OC20 energies
    are adsorption energies. Direct-force checkpoints (``direct_forces: True``, most released ones) are not
    energy-conserving (fine for BFGS and thermostatted MD, drift in NVE) and have no stress; gradient-force
    checkpoints give forces = -dE/dx and stress.

    Limits of parity and of invariance (as in fairchem): with exact distance ties at the max_neighbors boundary
    mlcalc's canonical choice of neighbours differs from fairchem's arbitrary one; and because the main graph is
    symmetrised by keeping edges with source < target and adding their reverses, a graph truncated by
    max_neighbors depends on the atom order (permuting the atoms of a slab can move the energy by eV with
    truncation). Quadruplets are built only on atoms whose tag is in ``qint_tags`` (OC20: 1 surface, 2 adsorbate).
    """

    model_names = ("gemnet_oc",)


class ESCNCalculator(MLCalculator):
    """eSCN (fairchem v1 checkpoints) as an ASE calculator: energy, free_energy, forces (direct head, no stress).

    Edge frames use a constant auxiliary vector instead of fairchem's random one, so results are deterministic.
    OC20 energies are adsorption energies; direct forces are not energy-conserving (NVE drifts).
    """

    model_names = ("escn",)


class SCNCalculator(MLCalculator):
    """SCN (fairchem v1 checkpoints) as an ASE calculator: energy, free_energy, forces (direct head, no stress).

    Deterministic edge frames as for eSCN. SCN is only approximately rotation-equivariant. OC20 energies are
    adsorption energies; direct forces are not energy-conserving (NVE drifts).
    """

    model_names = ("scn",)


class SphereNetCalculator(MLCalculator):
    """Periodic SphereNet as an ASE calculator: energy, free_energy, forces = -dE/dx and stress."""

    model_names = ("spherenet",)


#: the named calculator of each model family (registry name -> class); other models get MLCalculator
FAMILY_CALCULATORS: tuple[type[MLCalculator], ...] = (
    GemNetOCCalculator,
    ESCNCalculator,
    SCNCalculator,
    SphereNetCalculator,
)


def calculator_class_for(model_name: str) -> type[MLCalculator]:
    """The family calculator for a model registry name (``gemnet_oc`` -> GemNetOCCalculator), else MLCalculator."""
    from mlcalc.models.base import get_model_class

    try:
        canonical = get_model_class(model_name).registry_name.lower()
    except ValueError:
        canonical = model_name.lower()
    for cls in FAMILY_CALCULATORS:
        if canonical in {n.lower() for n in cls.model_names}:
            return cls
    return MLCalculator


def load_calculator(
    model: MLModel | str | os.PathLike,
    device: torch.device | str = "auto",
    dtype: torch.dtype | str | type | np.dtype = torch.float32,
    **kwargs: Any,
) -> MLCalculator:
    """The family calculator (GemNetOCCalculator, ESCNCalculator, ...) for a checkpoint or model, with its notes."""
    if isinstance(model, (str, os.PathLike)):
        model = load_model(model)
    if not isinstance(model, MLModel):
        raise TypeError(f"model must be an mlcalc MLModel or a checkpoint path, got {type(model).__name__}")
    return calculator_class_for(model.registry_name)(model, device=device, dtype=dtype, **kwargs)
