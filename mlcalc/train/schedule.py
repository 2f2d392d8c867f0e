"""Learning-rate schedule (linear warm-up, then cosine, plateau or constant) with a plain state_dict."""

from __future__ import annotations

import math
from typing import Any

import torch


class LRSchedule:
    """Sets ``optimizer``'s learning rate every step.

    ``lr(step) = base_lr * factor``: during the first ``warmup_steps`` steps the factor rises linearly from
    ``warmup_factor`` to 1; then ``cosine`` decays it to ``min_lr_ratio`` at ``total_steps`` (half a cosine),
    ``plateau`` multiplies it by ``plateau_factor`` after ``plateau_patience`` validations without improvement
    (``step_metric``), ``constant`` keeps 1. ``state_dict`` / ``load_state_dict`` hold step count and plateau state.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        kind: str,
        total_steps: int,
        warmup_steps: int = 0,
        warmup_factor: float = 0.2,
        min_lr_ratio: float = 0.01,
        plateau_factor: float = 0.5,
        plateau_patience: int = 5,
    ) -> None:
        if kind not in ("cosine", "plateau", "constant"):
            raise ValueError(f"unknown scheduler {kind!r}")
        self.optimizer = optimizer
        self.kind = kind
        self.total_steps = max(int(total_steps), 1)
        self.warmup_steps = int(warmup_steps)
        self.warmup_factor = float(warmup_factor)
        self.min_lr_ratio = float(min_lr_ratio)
        self.plateau_factor = float(plateau_factor)
        self.plateau_patience = int(plateau_patience)
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.step_count = 0
        self.plateau_scale = 1.0
        self.plateau_best = math.inf
        self.plateau_bad = 0
        self._apply()

    def factor(self) -> float:
        """Current multiplier of the base learning rate."""
        s = self.step_count
        if s < self.warmup_steps:
            return self.warmup_factor + (1.0 - self.warmup_factor) * s / self.warmup_steps
        if self.kind == "cosine":
            span = max(self.total_steps - self.warmup_steps, 1)
            t = min((s - self.warmup_steps) / span, 1.0)
            return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
        if self.kind == "plateau":
            return self.plateau_scale
        return 1.0

    def _apply(self) -> None:
        f = self.factor()
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * f

    def step(self) -> None:
        """After each optimizer step."""
        self.step_count += 1
        self._apply()

    def step_metric(self, value: float) -> None:
        """After each validation (plateau only): count validations without improvement and reduce the rate."""
        if self.kind != "plateau":
            return
        if value < self.plateau_best:
            self.plateau_best, self.plateau_bad = value, 0
        else:
            self.plateau_bad += 1
            if self.plateau_bad > self.plateau_patience:
                self.plateau_scale *= self.plateau_factor
                self.plateau_bad = 0
        self._apply()

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "step_count": self.step_count,
            "plateau_scale": self.plateau_scale,
            "plateau_best": self.plateau_best,
            "plateau_bad": self.plateau_bad,
            "base_lrs": list(self.base_lrs),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["kind"] != self.kind:
            raise ValueError(f"scheduler state is for {state['kind']!r}, this run uses {self.kind!r}")
        self.step_count = int(state["step_count"])
        self.plateau_scale = float(state["plateau_scale"])
        self.plateau_best = float(state["plateau_best"])
        self.plateau_bad = int(state["plateau_bad"])
        self.base_lrs = [float(x) for x in state["base_lrs"]]
        self._apply()
