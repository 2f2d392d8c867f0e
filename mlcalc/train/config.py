"""Training configuration: one flat set of keys, read from YAML / TOML / JSON, the same names as the CLI flags.

Keys (defaults in brackets; paths are relative to the current working directory):

Run
    output_dir ["runs/train"]: where ``latest.pt`` (training state), ``best_model.pt`` (the exported model, mlcalc
        format), ``log.csv`` / ``log.jsonl`` and ``config.json`` go.
    seed [0]: model initialisation, batch order (epoch e is shuffled with seed + e), so a run is reproducible.
    device ["cpu"]: "cpu", "cuda", "cuda:1" or "auto" (cuda when available). dtype ["float32"]: or "float64".
Model
    model [None]: registry name ("gemnet_oc", "escn", "scn", "spherenet", ...) for a new model built with
        ``get_model_class(model).from_config(model_hparams)``; model_hparams [{}].
    init_checkpoint [None]: fine-tune: start from any file ``mlcalc.load_model`` reads (fairchem v1 files included);
        then ``model`` may be omitted (or must name the same model) and ``model_hparams`` must be empty.
    freeze [[]]: fnmatch patterns of parameter names (``"atom_emb.*"``, ``"int_blocks.0.*"``) kept fixed; each pattern
        must match at least one parameter.
    element_references ["auto"]: "fit" for a new model, "keep" when fine-tuning. "fit": per-element energies
        (least squares of the training energies on the composition) become ``model.element_references`` (added by
        the calculator after denormalisation) and the energy normaliser's mean is 0, so the network learns an
        extensive residual (a per-structure mean would ask identical atoms for different energies in structures
        of different sizes); "keep": the init checkpoint's; "none": no references (fairchem's OC20 convention: a
        per-structure mean). Elements seen only in the validation data get a reference of 0.
    normalizers ["fit"]: "fit" (energy mean and scale, force scale from the training set; see ``fit_normalizers``),
        "keep" (the init checkpoint's) or ``{"energy": [mean, std], "forces": [mean, std]}``.
Data (ASE databases with energy and forces, e.g. from ``mlcalc data``)
    train_data (required), train_select ["split=train"]: an ase.db query ("" = all rows).
    val_data [train_data], val_select ["split=val"]. max_train, max_val [None]: use the first n rows only.
Loss (in normalised units, as fairchem: errors divided by the normaliser's std)
    energy_coefficient [1.0], force_coefficient [10.0]; energy_loss ["mae"] or "mse"; energy_per_atom [True]:
    energy error divided by the atom count; force_loss ["l2mae"] (mean over atoms of |F_pred - F|), "mae" (mean over
    components) or "mse"; force_atoms ["all"] or "free" (atoms not fixed by FixAtoms, as OC20's train_on_free_atoms).
Optimisation
    epochs [100]; batch_size [8]; eval_batch_size [16]; optimizer ["adamw"]; lr [1e-3]; weight_decay [0.0];
    amsgrad [False]; grad_clip [10.0] (max global gradient norm, None = off); ema_decay [0.999] (None = no EMA).
    scheduler ["cosine"], "plateau" or "constant"; warmup_steps [0], warmup_factor [0.2] (linear warm-up of the
    learning rate from warmup_factor * lr); min_lr_ratio [0.01] (cosine floor); plateau_factor [0.5],
    plateau_patience [5] (epochs without improvement of ``metric`` before the rate is multiplied by the factor).
Validation and stopping
    metric ["loss"]: "loss" (validation loss), "energy_mae", "energy_per_atom_mae" or "forces_mae" (lower is better);
    early_stopping_patience [None]: stop after this many validations without improvement by more than min_delta
    [0.0]; val_every [1] (epochs); log_format ["csv"] or "jsonl".

A resumed run must have the same configuration, except the keys in ``RESUMABLE_KEYS`` (device).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

#: keys that may differ between a run and its resumption
RESUMABLE_KEYS = frozenset({"device"})

_CHOICES = {
    "dtype": ("float32", "float64"),
    "energy_loss": ("mae", "mse"),
    "force_loss": ("l2mae", "mae", "mse"),
    "force_atoms": ("all", "free"),
    "optimizer": ("adamw",),
    "scheduler": ("cosine", "plateau", "constant"),
    "metric": ("loss", "energy_mae", "energy_per_atom_mae", "forces_mae"),
    "log_format": ("csv", "jsonl"),
}


_NUMERIC: dict[str, type] = {
    **{k: int for k in ("seed", "max_train", "max_val", "epochs", "batch_size", "eval_batch_size", "warmup_steps")},
    **{k: int for k in ("plateau_patience", "early_stopping_patience", "val_every")},
    **{k: float for k in ("energy_coefficient", "force_coefficient", "lr", "weight_decay", "grad_clip", "ema_decay")},
    **{k: float for k in ("warmup_factor", "min_lr_ratio", "plateau_factor", "min_delta")},
}


@dataclass
class TrainConfig:
    """All settings of a training or fine-tuning run (see the module docstring for the meaning of each key)."""

    train_data: str = ""
    output_dir: str = "runs/train"
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    model: str | None = None
    model_hparams: dict[str, Any] = field(default_factory=dict)
    init_checkpoint: str | None = None
    freeze: list[str] = field(default_factory=list)
    normalizers: Any = "fit"
    element_references: str = "auto"
    train_select: str = "split=train"
    val_data: str | None = None
    val_select: str = "split=val"
    max_train: int | None = None
    max_val: int | None = None
    energy_coefficient: float = 1.0
    force_coefficient: float = 10.0
    energy_loss: str = "mae"
    energy_per_atom: bool = True
    force_loss: str = "l2mae"
    force_atoms: str = "all"
    epochs: int = 100
    batch_size: int = 8
    eval_batch_size: int = 16
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    amsgrad: bool = False
    grad_clip: float | None = 10.0
    ema_decay: float | None = 0.999
    scheduler: str = "cosine"
    warmup_steps: int = 0
    warmup_factor: float = 0.2
    min_lr_ratio: float = 0.01
    plateau_factor: float = 0.5
    plateau_patience: int = 5
    metric: str = "loss"
    early_stopping_patience: int | None = None
    min_delta: float = 0.0
    val_every: int = 1
    log_format: str = "csv"

    def __post_init__(self) -> None:
        self._coerce()
        self.validate()

    def _coerce(self) -> None:
        """Numbers given as strings (PyYAML reads ``1e-3`` as a string) become numbers; ValueError if not."""
        for f in fields(self):
            value = getattr(self, f.name)
            kind = _NUMERIC.get(f.name)
            if kind is None or value is None or isinstance(value, bool):
                continue
            try:
                setattr(self, f.name, kind(float(value)) if kind is int else kind(value))
            except (TypeError, ValueError):
                raise ValueError(f"{f.name} must be a number, got {value!r}") from None
            if kind is int and float(value) != int(float(value)):
                raise ValueError(f"{f.name} must be an integer, got {value!r}")

    # -- construction --------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a mapping; ValueError naming unknown keys (typos) and bad values."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training config key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> TrainConfig:
        """Read a .yaml/.yml (needs PyYAML), .toml (tomllib, or tomli before Python 3.11) or .json file.

        Raises FileNotFoundError, ImportError (missing parser, with the package to install) or ValueError.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"training config not found: {path}")
        return cls.from_dict(read_mapping(path))

    def to_dict(self) -> dict[str, Any]:
        """Plain-data copy of every key (what the training state and the exported checkpoint store)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def replace(self, **changes: Any) -> TrainConfig:
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    # -- checks --------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """ValueError for inconsistent or out-of-range settings."""
        if not self.train_data:
            raise ValueError("train_data (an ASE database of labelled structures) is required")
        for key, choices in _CHOICES.items():
            if getattr(self, key) not in choices:
                raise ValueError(f"{key} must be one of {choices}, got {getattr(self, key)!r}")
        if self.init_checkpoint is None and not self.model:
            raise ValueError("give either model (a registry name, with model_hparams) or init_checkpoint")
        if self.init_checkpoint is not None and self.model_hparams:
            raise ValueError("model_hparams cannot be changed when fine-tuning from init_checkpoint")
        if self.element_references not in ("auto", "fit", "keep", "none"):
            raise ValueError(
                f"element_references must be 'auto', 'fit', 'keep' or 'none', got {self.element_references!r}"
            )
        if isinstance(self.normalizers, str):
            if self.normalizers not in ("fit", "keep"):
                raise ValueError(f"normalizers must be 'fit', 'keep' or a dict, got {self.normalizers!r}")
            if self.normalizers == "keep" and self.init_checkpoint is None:
                raise ValueError("normalizers='keep' needs an init_checkpoint to keep them from")
        elif isinstance(self.normalizers, dict):
            for name, value in self.normalizers.items():
                if name not in ("energy", "forces") or len(value) != 2 or float(value[1]) <= 0:
                    raise ValueError(f"normalizers[{name!r}] must be [mean, std > 0], got {value!r}")
        else:
            raise ValueError(f"normalizers must be 'fit', 'keep' or a dict, got {self.normalizers!r}")
        positive = ("epochs", "batch_size", "eval_batch_size", "val_every")
        for key in positive:
            if int(getattr(self, key)) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError("lr must be > 0, weight_decay and warmup_steps >= 0")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or None, got {self.ema_decay}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip}")
        if self.energy_coefficient < 0 or self.force_coefficient < 0:
            raise ValueError("energy_coefficient and force_coefficient must be >= 0")

    def differences(self, other: TrainConfig | dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """{key: (self's value, other's value)} for keys that differ, ignoring ``RESUMABLE_KEYS``."""
        mine, theirs = self.to_dict(), other.to_dict() if isinstance(other, TrainConfig) else dict(other)
        keys = (set(mine) | set(theirs)) - RESUMABLE_KEYS
        return {k: (mine.get(k), theirs.get(k)) for k in sorted(keys) if mine.get(k) != theirs.get(k)}


def read_mapping(path: Path) -> dict[str, Any]:
    """The top-level mapping of a YAML, TOML or JSON file."""
    suffix = path.suffix.lower()
    text = path.read_text()
    if suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as err:
            raise ImportError("YAML training configs need PyYAML: pip install pyyaml (or use .toml / .json)") from err
        data = yaml.safe_load(text)
    elif suffix == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.10
            try:
                import tomli as tomllib
            except ImportError as err:
                raise ImportError("TOML configs on Python 3.10 need tomli: pip install tomli") from err
        data = tomllib.loads(text)
    elif suffix == ".json":
        data = json.loads(text)
    else:
        raise ValueError(f"{path}: unsupported config format {suffix!r} (use .yaml, .yml, .toml or .json)")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the config must be a mapping of keys to values, got {type(data).__name__}")
    return data
