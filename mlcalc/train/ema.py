"""Exponential moving average of a model's trainable parameters, kept as buffers of a small module."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class EMA(nn.Module):
    """Shadow copies ``s <- d s + (1 - d) p`` of the trainable parameters of ``model``.

    The decay ramps up as fairchem's ``ExponentialMovingAverage``: ``d = min(decay, (1 + n) / (10 + n))`` after n
    updates, so early averages are not dominated by the random initialisation. Shadows and the update count are
    buffers, so ``state_dict()`` saves them with the training state. ``swapped_in(model)`` puts the averages into
    the model for validation and export and restores the raw weights afterwards; a guard flag refuses nesting.

    Args:
        model: the model whose parameters (those with ``requires_grad``) are averaged; its layout is fixed.
        decay: in (0, 1), e.g. 0.999.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        for k, name in enumerate(self.names):
            self.register_buffer(f"shadow_{k}", dict(model.named_parameters())[name].detach().clone())
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self._active = False

    def _pairs(self, model: nn.Module) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        params = dict(model.named_parameters())
        for k, name in enumerate(self.names):
            yield getattr(self, f"shadow_{k}"), params[name]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One averaging step after an optimizer step (refused while the averages are swapped in)."""
        if self._active:
            raise RuntimeError("EMA.update called while the EMA weights are swapped into the model")
        self.num_updates += 1
        n = float(self.num_updates.item())
        d = min(self.decay, (1.0 + n) / (10.0 + n))
        for shadow, param in self._pairs(model):
            shadow.lerp_(param.detach(), 1.0 - d)

    @contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[nn.Module]:
        """Context in which ``model`` holds the averaged weights; the raw weights come back on exit."""
        if self._active:
            raise RuntimeError("the EMA weights are already swapped in")
        backup = []
        with torch.no_grad():
            for shadow, param in self._pairs(model):
                backup.append(param.detach().clone())
                param.copy_(shadow)
        self._active = True
        try:
            yield model
        finally:
            with torch.no_grad():
                for (_, param), raw in zip(self._pairs(model), backup, strict=True):
                    param.copy_(raw)
            self._active = False

    @property
    def active(self) -> bool:
        """True while the averages are in the model."""
        return self._active
