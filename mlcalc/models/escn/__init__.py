"""eSCN (fairchem-core 1.10 compatible) in pure PyTorch."""

from mlcalc.models.escn.model import ESCN

__all__ = ["ESCN"]
