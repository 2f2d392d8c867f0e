"""Checkpoint files: fairchem (all v1 layouts) and mlcalc's own format. Always ``weights_only=True``."""

from __future__ import annotations

import logging
import math
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

MLCALC_FORMAT = "mlcalc-checkpoint"
MLCALC_FORMAT_VERSION = 1


@dataclass
class CheckpointData:
    """What inference needs from a checkpoint file.

    normalizers: ``{"energy": (mean, std), "forces": (mean, std)}`` as exact Python floats (missing = identity).
    state_dict: parameter tensors with fairchem's ``module.`` prefixes removed.
    scale_dict: GemNet-style ``{module path: scale}`` kept outside the state_dict (legacy files), else None.
    """

    model_name: str
    hparams: dict[str, Any]
    state_dict: dict[str, Tensor]
    scale_dict: dict[str, float] | None = None
    normalizers: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: per-element energy references (atomic number -> eV) added after denormalisation (mlcalc files)
    element_references: dict[int, float] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    source_format: str = "fairchem"


#: globals a weights_only load may additionally resolve: numpy scalars/arrays/dtypes (released checkpoints keep
#: metrics as numpy floats). Rebuilding these runs no user code.
_NUMPY_GLOBAL_PREFIXES = ("numpy.dtype", "numpy.dtypes.", "numpy.ndarray")
_NUMPY_GLOBAL_NAMES = {
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
}


def _is_numpy_data_global(name: str) -> bool:
    return name in _NUMPY_GLOBAL_NAMES or name.startswith(_NUMPY_GLOBAL_PREFIXES)


def _resolve_global(name: str) -> Any:
    import importlib

    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


#: first bytes of the files torch.save writes: a zip archive (torch >= 1.6) or a pickle (protocol 2+, older torch)
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")


def is_torch_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts like a file written by ``torch.save`` (zip archive or legacy pickle stream)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    return head.startswith(_TORCH_MAGIC)


def _describe_non_torch_file(path: Path) -> str:
    """A short description of what a file that is not a torch checkpoint looks like (empty, text, binary)."""
    with open(path, "rb") as fh:
        head = fh.read(256)
    if not head:
        return "the file is empty"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:
        return "it is a binary file of another kind"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"it looks like a text file, first line {first[:60]!r}"


def _load_weights_only(path: str | os.PathLike) -> Any:
    """torch.load with weights_only=True; numpy scalars/arrays are allowed, any other pickled object is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if not is_torch_file(path):
        raise ValueError(
            f"{path} is not a torch checkpoint ({_describe_non_torch_file(path)}); pass a .pt/.pth file written by "
            "fairchem or mlcalc.save_model"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first_error = str(err).splitlines()[0]
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"{path} is not a readable torch checkpoint (truncated or corrupt?): {err}") from None
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as err:  # noqa: BLE001 - the pickle stream itself is unreadable
        raise ValueError(f"{path} is not a readable torch checkpoint (truncated or corrupt?): {first_error}") from err
    unsafe = [n for n in names if not _is_numpy_data_global(n)]
    if names and not unsafe:
        import numpy as np

        allowed = [_resolve_global(n) for n in names]
        allowed += [t for t in vars(np.dtypes).values() if isinstance(t, type) and issubclass(t, np.dtype)]
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    raise ValueError(
        f"refusing to load {path}: it contains pickled Python objects beyond tensors, numpy data and plain "
        f"containers ({', '.join(unsafe) or first_error}); mlcalc loads checkpoints with weights_only=True so "
        "that opening a file can never execute code"
    )


def strip_module_prefix(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Keys with every leading ``module.`` (DataParallel / DDP wrappers) removed."""
    out = {}
    for key, value in state_dict.items():
        while key.startswith("module."):
            key = key[len("module.") :]
        out[key] = value
    return out


def _as_float(x: Any) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def _fairchem_normalizers(ckpt: dict[str, Any], config: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """Energy/force normalisers from the checkpoint's ``normalizers`` entry (legacy or Normalizer form) only.

    As fairchem 1.10's OCPCalculator (inference-only trainer): the config's ``normalize_labels`` / ``target_mean``
    values are never used; an empty entry means no normalisation. A file without the entry whose config asks for
    normalised labels is refused (fairchem raises KeyError on it), since its energies would be on the wrong scale.
    """
    if "normalizers" not in ckpt:
        ds = config.get("dataset") or {}
        if isinstance(ds, list):
            ds = ds[0] if ds else {}
        if isinstance(ds, dict) and isinstance(ds.get("train"), dict):
            ds = ds["train"]
        if isinstance(ds, dict) and ds.get("normalize_labels"):
            raise ValueError(
                "checkpoint has no 'normalizers' entry although its config trained on normalised labels "
                "(normalize_labels: True); fairchem 1.10 cannot load it either (KeyError: 'normalizers')"
            )
    raw = ckpt.get("normalizers") or {}
    out: dict[str, tuple[float, float]] = {}
    for name, legacy in (("energy", "target"), ("forces", "grad_target")):
        entry = raw.get(name, raw.get(legacy))
        if entry is None:
            continue
        std = entry.get("rmsd", entry.get("std"))
        if "mean" not in entry or std is None:
            raise ValueError(f"checkpoint normalizer {name!r} lacks mean/std: keys {sorted(entry)}")
        out[name] = (_as_float(entry["mean"]), _as_float(std))
    for name, (mean, std) in out.items():
        if not (math.isfinite(mean) and math.isfinite(std)) or std == 0:
            raise ValueError(f"checkpoint normalizer {name!r} is unusable: mean={mean}, std={std}")
    return out


def _fairchem_element_references(ckpt: dict[str, Any]) -> dict[int, float]:
    """Per-element energy references of a fairchem >= 1.1 file (``elementrefs``), atomic number -> eV.

    fairchem stores ``{"energy": {"element_references": tensor}}`` (index = atomic number, index 0 unused) and adds
    ``sum_i refs[Z_i]`` to each structure's energy after denormalisation (``ocp_trainer._denorm_preds``); the
    values are taken as stored (float32 in fitted files). Older files have no entry (or an empty one): no references.
    """
    refs = ckpt.get("elementrefs") or {}
    out: dict[int, float] = {}
    for key, state in refs.items():
        if key != "energy":
            raise ValueError(
                f"checkpoint has element references for {key!r}; mlcalc applies them to the energy only"
            )
        table = state.get("element_references") if isinstance(state, dict) else None
        if not isinstance(table, Tensor) or table.dim() != 1:
            raise ValueError("checkpoint elementrefs['energy'] has no 1-D 'element_references' tensor")
        values = table.detach().cpu().tolist()
        if not all(math.isfinite(v) for v in values):
            raise ValueError("checkpoint elementrefs['energy'] holds non-finite values")
        out = {z: float(v) for z, v in enumerate(values) if z >= 1}
    return out


def _dataset_format(config: dict[str, Any]) -> str | None:
    """The training data format a fairchem config names (``trajectory_lmdb``, ``oc22_lmdb``, ``lmdb``, ...)."""
    task = config.get("task")
    if isinstance(task, dict) and isinstance(task.get("dataset"), str):
        return task["dataset"]
    ds = config.get("dataset")
    if isinstance(ds, list):
        ds = ds[0] if ds else None
    if isinstance(ds, dict):
        for cand in (ds, ds.get("train")):
            if isinstance(cand, dict) and isinstance(cand.get("format"), str):
                return cand["format"]
    return None


def read_checkpoint(path: str | os.PathLike) -> CheckpointData:
    """Read a fairchem v1 checkpoint (legacy, new, ``module.`` prefixes, ``scale_dict``) or an mlcalc file.

    ``path`` may also be a released checkpoint name (``mlcalc.pretrained.available()``): its cached file is used,
    downloaded first when missing. Raises FileNotFoundError for a missing file that is not a registry name.
    """
    return _read_resolved(path)[1]


def _read_resolved(path: str | os.PathLike) -> tuple[Path, CheckpointData]:
    """(file path, contents) of a checkpoint file or released name; a name's registry facts go to the metadata."""
    from mlcalc import pretrained

    resolved, entry = pretrained.resolve(path)
    data = _read_checkpoint_file(resolved)
    if entry is not None:
        data.metadata["pretrained"] = entry.as_dict()
    return resolved, data


def _read_checkpoint_file(path: Path) -> CheckpointData:
    ckpt = _load_weights_only(path)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: expected a checkpoint dict, got {type(ckpt).__name__}")
    if ckpt.get("format") == MLCALC_FORMAT:
        return CheckpointData(
            model_name=ckpt["model"],
            hparams=dict(ckpt["hparams"]),
            state_dict=dict(ckpt["state_dict"]),
            normalizers={k: (float(v[0]), float(v[1])) for k, v in ckpt.get("normalizers", {}).items()},
            metadata=dict(ckpt.get("metadata", {})),
            element_references={int(z): float(e) for z, e in (ckpt.get("element_references") or {}).items()},
            source_format="mlcalc",
        )
    if "state_dict" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{path}: not a fairchem or mlcalc checkpoint (keys: {sorted(ckpt)[:10]})")
    config = ckpt["config"]
    model_cfg = config.get("model")
    if isinstance(model_cfg, dict):  # new layout: model: {name, ...hparams}
        hparams = {k: v for k, v in model_cfg.items() if k != "name"}
        name = model_cfg["name"]
    elif isinstance(model_cfg, str):  # legacy layout: model + model_attributes
        name = model_cfg
        hparams = dict(config.get("model_attributes") or {})
    else:
        raise ValueError(f"{path}: cannot find the model name in config['model'] ({model_cfg!r})")
    scale_dict = ckpt.get("scale_dict")
    if scale_dict is not None:
        scale_dict = {k: _as_float(v) for k, v in scale_dict.items()}
    scale_file = hparams.get("scale_file")
    if isinstance(scale_file, str) and not Path(scale_file).exists():
        logger.info("ignoring scale_file %r (not present; scale factors are taken from the checkpoint)", scale_file)
    metadata = {
        "source": "fairchem",
        "dataset_format": _dataset_format(config),
        "trainer": config.get("trainer"),
        "task": config.get("task"),
        "epoch": ckpt.get("epoch"),
    }
    return CheckpointData(
        model_name=str(name),
        hparams=hparams,
        state_dict=strip_module_prefix(ckpt["state_dict"]),
        scale_dict=scale_dict,
        normalizers=_fairchem_normalizers(ckpt, config),
        element_references=_fairchem_element_references(ckpt),
        metadata=metadata,
    )


def load_model(path: str | os.PathLike) -> nn.Module:
    """Build the model a checkpoint describes and load its weights and normalisers (CPU, float32 weights).

    ``path``: a checkpoint file (fairchem v1 or mlcalc) or a released checkpoint name such as
    ``"GemNet-OC-S2EF-OC20-All+MD"`` (``mlcalc.pretrained``: fetched into the cache once, verified on every use).

    The model is built without random initialisation (``mlcalc.nn.init.skip_init``): every weight comes from the
    checkpoint (strict loading), so drawing random numbers first would only cost time (2-3 s for GemNet-OC).
    """
    from mlcalc.models.base import get_model_class
    from mlcalc.nn.init import skip_init

    path, data = _read_resolved(path)
    cls = get_model_class(data.model_name)
    with skip_init():
        model = cls.from_config(data.hparams)
    if data.source_format == "mlcalc":
        model.load_state_dict(data.state_dict, strict=True)
    else:
        model.load_checkpoint_state(data.state_dict, data.scale_dict)
    model.normalizers = dict(data.normalizers)
    model.element_references = dict(data.element_references)
    model.metadata = dict(data.metadata)
    model.checkpoint_path = str(path)
    model.eval()
    return model


def save_model(model: nn.Module, path: str | os.PathLike, **metadata: Any) -> None:
    """Write ``model`` in mlcalc's format: name, hyperparameters, state_dict, normalisers and metadata.

    Metadata defaults: elements (the model's max atomic number), cutoff (Å), units, mlcalc version; keyword
    arguments (e.g. ``training_data="OC20 S2EF all+MD"``) are added. Values must be plain Python data.
    """
    from mlcalc import __version__

    name = getattr(model, "registry_name", "")
    if not name:
        raise ValueError(f"{type(model).__name__} is not a registered mlcalc model; cannot save it")
    meta: dict[str, Any] = {
        "max_atomic_number": int(getattr(model, "max_elements", 118)),
        "cutoff": float(model.cutoff),
        "units": {"energy": "eV", "length": "Angstrom", "forces": "eV/Angstrom"},
        "mlcalc_version": __version__,
        "direct_forces": bool(model.direct_forces),
    }
    meta.update(getattr(model, "metadata", {}) or {})
    meta.update(metadata)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload = {
        "format": MLCALC_FORMAT,
        "format_version": MLCALC_FORMAT_VERSION,
        "model": name,
        "hparams": dict(model.hparams),
        "state_dict": state,
        "normalizers": {k: [float(m), float(s)] for k, (m, s) in getattr(model, "normalizers", {}).items()},
        "element_references": {int(z): float(e) for z, e in (getattr(model, "element_references", {}) or {}).items()},
        "metadata": meta,
    }
    torch.save(payload, Path(path))
