"""Hooks and model state: forward hooks removed in ``finally``, eval mode with every training flag restored."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

from torch import nn


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put the model in eval mode; restore every module's own training flag on exit (also on errors)."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


@contextlib.contextmanager
def forward_hooks(hooks: Sequence[tuple[nn.Module, Callable[..., object]]]) -> Iterator[None]:
    """Register forward hooks for the duration of the block; remove all of them in ``finally``."""
    handles = []
    try:
        for module, hook in hooks:
            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
