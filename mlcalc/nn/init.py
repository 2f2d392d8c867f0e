"""Skipping random weight initialisation while a model is built only to receive checkpoint weights.

``skip_init()`` is a context manager: inside it, ``init_skipped()`` is True (a ``contextvars`` flag the models'
own initialisers consult, e.g. GemNet-OC's ``he_orthogonal_init``, SphereNet's ``glorot_orthogonal_``), and a
torch function mode turns torch's random initialisers into no-ops, so ``torch.nn.Linear`` / ``torch.nn.Embedding``
(whose constructors call ``kaiming_uniform_`` / ``uniform_`` / ``normal_``) are built without drawing numbers.
``nn.init.orthogonal_`` does not dispatch to torch function modes (only its inner ``normal_`` is skipped, its QR
still runs), so initialisers built on it must check ``init_skipped()`` themselves, as the models' helpers do.
Parameters are then allocated but uninitialised: load every one of them afterwards (``load_state_dict(strict=True)``).

Nothing global changes: the flag is per context and the torch function mode is per thread, both restored on exit.
Deterministic construction-time work (buffers such as sphere points, Wigner J matrices, Bessel zeros, and
``zeros_`` / ``fill_`` / ``torch.tensor`` values) still runs as usual.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

_SKIP_INIT: ContextVar[bool] = ContextVar("mlcalc_skip_init", default=False)

#: torch calls that fill a tensor with random numbers; inside ``skip_init`` they return the tensor unchanged
RANDOM_INITIALISERS: frozenset[Callable[..., Any]] = frozenset(
    {
        torch.Tensor.uniform_,
        torch.Tensor.normal_,
        nn.init.uniform_,
        nn.init.normal_,
        nn.init.kaiming_uniform_,
        nn.init.kaiming_normal_,
        nn.init.xavier_uniform_,
        nn.init.xavier_normal_,
        nn.init.trunc_normal_,
    }
)


def init_skipped() -> bool:
    """True inside ``skip_init()``: initialisers should leave their tensor as allocated and return it."""
    return _SKIP_INIT.get()


class _SkipRandomInit(TorchFunctionMode):
    """Torch function mode that turns the calls in ``RANDOM_INITIALISERS`` into no-ops returning their tensor."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func in RANDOM_INITIALISERS:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


@contextmanager
def skip_init() -> Iterator[None]:
    """Build modules without random initialisation (their weights are about to be overwritten by a checkpoint).

    Example::

        with skip_init():
            model = GemNetOC.from_config(hparams)
        model.load_state_dict(state_dict, strict=True)
    """
    token = _SKIP_INIT.set(True)
    try:
        with _SkipRandomInit():
            yield
    finally:
        _SKIP_INIT.reset(token)
