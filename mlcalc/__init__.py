"""mlcalc: ASE calculators for GemNet-OC, eSCN, SCN and periodic SphereNet in pure PyTorch."""

__version__ = "0.1.0"

from mlcalc.calculator import (  # noqa: E402
    ESCNCalculator,
    GemNetOCCalculator,
    MLCalculator,
    SCNCalculator,
    SphereNetCalculator,
    load_calculator,
)
from mlcalc.checkpoint import load_model, read_checkpoint, save_model  # noqa: E402
from mlcalc.graph import AtomGraph, radius_graph  # noqa: E402
from mlcalc.tags import tag_adsorbate_slab  # noqa: E402

__all__ = [
    "AtomGraph",
    "ESCNCalculator",
    "GemNetOCCalculator",
    "MLCalculator",
    "SCNCalculator",
    "SphereNetCalculator",
    "__version__",
    "load_calculator",
    "load_model",
    "radius_graph",
    "read_checkpoint",
    "save_model",
    "tag_adsorbate_slab",
]
