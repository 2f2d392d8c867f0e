"""Model interface and registry shared by every mlcalc model."""

from __future__ import annotations

import inspect
import logging
import numbers
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mlcalc.graph import AtomGraph

logger = logging.getLogger(__name__)

MODEL_REGISTRY: dict[str, type[MLModel]] = {}


def register_model(*names: str):
    """Class decorator: register a model under one or more names (fairchem's names included)."""

    def deco(cls: type[MLModel]) -> type[MLModel]:
        for name in names:
            MODEL_REGISTRY[name.lower()] = cls
        cls.registry_name = names[0]
        return cls

    return deco


def get_model_class(name: str) -> type[MLModel]:
    """The registered class for ``name`` (case-insensitive); ValueError listing the known names otherwise."""
    import mlcalc.models  # noqa: F401  (fills the registry)

    try:
        return MODEL_REGISTRY[name.lower()]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {sorted(MODEL_REGISTRY)}") from None


class MLModel(nn.Module):
    """Base class of mlcalc models.

    A model declares the graph it needs (``cutoff`` Å, ``max_neighbors``, ``strict_max_neighbors``); the
    calculator builds that graph and calls ``forward(graph)``, which returns ``{"energy": (B,)}`` and, for
    direct-force models, ``"forces": (N, 3)`` — raw (normalised) model outputs. ``normalizers`` holds
    ``{"energy": (mean, std), "forces": (mean, std)}`` as Python floats, applied by the calculator.
    """

    registry_name: ClassVar[str] = ""
    cutoff: float
    max_neighbors: int | None = None
    strict_max_neighbors: bool = True
    direct_forces: bool = False
    #: False for energy-only models (IS2RE: relaxed energy from the initial structure; no forces, no stress)
    regress_forces: bool = True
    #: largest atomic number the model accepts
    max_elements: int = 118
    #: whether forces = -dE/dpos so stress from the strain derivative is meaningful
    supports_stress: bool = True

    def __init__(self) -> None:
        super().__init__()
        self.hparams: dict[str, Any] = {}
        self.normalizers: dict[str, tuple[float, float]] = {}
        #: per-element energy references, atomic number -> eV, added to the denormalised energy (fairchem's
        #: ``elementrefs`` / a linear reference fitted on the training set); empty = none
        self.element_references: dict[int, float] = {}

    @property
    def chunk_size(self) -> int | None:
        """Rows processed at once in the model's memory-heavy loops (edges, triplets or padded rows, per model);
        None = all at once. Models without chunked loops ignore it."""
        return self.__dict__.get("_chunk_size")

    @chunk_size.setter
    def chunk_size(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
            raise ValueError(f"chunk_size must be a positive integer or None, got {value!r}")
        self.__dict__["_chunk_size"] = None if value is None else int(value)

    def estimate_memory(self, graph: AtomGraph) -> int | None:
        """Estimated peak bytes one energy + forces evaluation of ``graph`` adds, in float32 (None: no estimate).

        Used by the calculator to refuse a system that cannot fit (``mlcalc.memory.check_fits``); models fit it to
        ``benchmarks/memory.py`` measurements (resident memory, allocator overhead included)."""
        return None

    def capture_hparams(self, frame_locals: dict[str, Any]) -> None:
        """Record the constructor arguments (call as ``self.capture_hparams(locals())`` in ``__init__``)."""
        sig = inspect.signature(type(self).__init__)
        self.hparams = {
            k: frame_locals[k]
            for k, p in sig.parameters.items()
            if k != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and k in frame_locals
        }

    @classmethod
    def from_config(cls, hparams: dict[str, Any]) -> MLModel:
        """Build from a (fairchem) hyperparameter dict; unknown keys are ignored with one log line."""
        sig = inspect.signature(cls.__init__)
        accepts_kwargs = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
        known = {k: v for k, v in hparams.items() if k in sig.parameters or accepts_kwargs}
        unknown = sorted(set(hparams) - set(known))
        if unknown:
            logger.info("%s: ignoring unknown config keys %s", cls.__name__, unknown)
        return cls(**known)

    def load_checkpoint_state(
        self, state_dict: dict[str, Tensor], scale_dict: dict[str, float] | None = None
    ) -> None:
        """Load a (prefix-stripped) state_dict; models with extra conventions (scale factors) override this."""
        if scale_dict:
            raise ValueError(f"{type(self).__name__} does not use scale factors, but the checkpoint has some")
        self.load_state_dict(state_dict, strict=True)

    def forward(self, graph: AtomGraph) -> dict[str, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def implemented_properties(self) -> list[str]:
        if not self.regress_forces:
            return ["energy", "free_energy"]
        props = ["energy", "free_energy", "forces"]
        if not self.direct_forces and self.supports_stress:
            props.append("stress")
        return props

    def param_dtype(self) -> torch.dtype:
        for p in self.parameters():
            return p.dtype
        for b in self.buffers():
            if b.is_floating_point():
                return b.dtype
        return torch.float64
