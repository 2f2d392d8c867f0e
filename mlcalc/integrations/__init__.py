"""Adapters that plug mlcalc models into other engines (TorchSim); each needs its own optional extra."""
