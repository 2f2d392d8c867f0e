"""Loading GemNet-OC checkpoints: fairchem state_dict keys and fitted scale factors.

Scale factors live either in the state_dict (``<module path>.scale_factor``, new layout) or in a separate
``{module path: value}`` dict (legacy ``checkpoint["scale_dict"]`` or a ``scale_file``). A value of 0 means
'not fitted' and multiplies by 1.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from mlcalc.checkpoint import strip_module_prefix
from mlcalc.models.gemnet_oc.layers import ScaleFactor

logger = logging.getLogger(__name__)

SCALE_SUFFIX = ".scale_factor"


def read_scale_file(scale_file: str | dict | None) -> dict[str, float] | None:
    """Scale values from a dict, a .json or a .pt file; None (with a log line) when the file does not exist —
    the values are then expected in the checkpoint."""
    if not scale_file:
        return None
    if isinstance(scale_file, dict):
        return {k: float(v) for k, v in scale_file.items()}
    path = Path(scale_file)
    if not path.is_file():
        logger.info("GemNetOC: scale_file %s not found; expecting the scale factors in the checkpoint", scale_file)
        return None
    if path.suffix == ".json":
        values = json.loads(path.read_text())
        values.pop("comment", None)
    elif path.suffix == ".pt":
        values = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"unsupported scale file extension {path.suffix!r} (use .json or .pt)")
    return {k: float(v) for k, v in values.items()}


def _scale_modules(model: nn.Module) -> dict[str, ScaleFactor]:
    """Every path (shared modules under each of their names) -> ScaleFactor module."""
    return {
        name: module for name, module in model.named_modules(remove_duplicate=False) if isinstance(module, ScaleFactor)
    }


def apply_scale_dict(model: nn.Module, scale_dict: dict[str, float]) -> None:
    """Set scale factors from ``{module path: value}``; every scale factor of the model needs a value."""
    modules = _scale_modules(model)
    covered = set()
    for name, value in scale_dict.items():
        if name not in modules:
            logger.warning("GemNetOC: scale factor %s not found in the model, ignored", name)
            continue
        with torch.no_grad():
            modules[name].scale_factor.fill_(float(value))
        covered.add(id(modules[name]))
    missing = sorted({name for name, mod in modules.items() if id(mod) not in covered})
    if missing:
        raise ValueError(f"scale values missing for {missing}")


def load_gemnet_state(model: nn.Module, state_dict: dict[str, Tensor], scale_dict: dict[str, float] | None) -> None:
    """Load a (prefix-stripped) fairchem GemNet-OC state_dict and its scale factors into ``model``.

    Every model tensor must be present except ``*.scale_factor`` entries, which may instead come from
    ``scale_dict`` (or the model's ``scale_file``); unexpected keys are an error.
    """
    state_dict = strip_module_prefix(state_dict)
    own = model.state_dict()
    unexpected = sorted(set(state_dict) - set(own))
    missing = sorted(set(own) - set(state_dict))
    missing_weights = [k for k in missing if not k.endswith(SCALE_SUFFIX)]
    if unexpected or missing_weights:
        raise ValueError(
            "GemNet-OC checkpoint does not match the model built from its config: "
            f"missing keys {missing_weights[:10]}{' ...' if len(missing_weights) > 10 else ''}, "
            f"unexpected keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}"
        )
    for key, value in state_dict.items():
        if value.shape != own[key].shape:
            raise ValueError(
                f"shape mismatch for {key}: checkpoint {tuple(value.shape)}, model {tuple(own[key].shape)}"
            )
    model.load_state_dict(state_dict, strict=False)
    if scale_dict:
        apply_scale_dict(model, scale_dict)
    elif missing:
        scale_file = getattr(model, "scale_file", None)
        values = read_scale_file(scale_file)
        if values is None and scale_file:
            raise ValueError(
                f"the checkpoint has no scale factors and scale_file {scale_file!r} does not exist; "
                "GemNet-OC would silently give wrong results"
            )
        if values is not None:
            apply_scale_dict(model, values)
        else:
            logger.warning("GemNetOC: the checkpoint has no scale factors; using 1 (unfitted) for all of them")
