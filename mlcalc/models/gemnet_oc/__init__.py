"""GemNet-OC (fairchem ``gemnet_oc``) in pure PyTorch."""

from mlcalc.models.gemnet_oc.model import GemNetOC

__all__ = ["GemNetOC"]
