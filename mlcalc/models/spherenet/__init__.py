"""Periodic SphereNet potential (``SphereNet``, registered as "spherenet", "SphereNet", "SphereNetPeriodic")."""

from mlcalc.models.spherenet.model import SphereNet

__all__ = ["SphereNet"]
