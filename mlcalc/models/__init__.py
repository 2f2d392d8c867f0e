"""Model room: model classes and the name -> class registry."""

from mlcalc.models.base import MODEL_REGISTRY, MLModel, get_model_class, register_model
from mlcalc.models.escn import ESCN
from mlcalc.models.gemnet_oc import GemNetOC
from mlcalc.models.lennard_jones import LennardJones
from mlcalc.models.scn import SCN
from mlcalc.models.spherenet import SphereNet

__all__ = [
    "ESCN",
    "GemNetOC",
    "MODEL_REGISTRY",
    "LennardJones",
    "MLModel",
    "SCN",
    "SphereNet",
    "get_model_class",
    "register_model",
]
