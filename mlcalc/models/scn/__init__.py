"""Spherical Channel Network (SCN), fairchem-core 1.10 compatible."""

from mlcalc.models.scn.model import SCN

SphericalChannelNetwork = SCN

__all__ = ["SCN", "SphericalChannelNetwork"]
