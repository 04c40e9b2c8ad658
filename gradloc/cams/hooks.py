"""Hooks and model state: forward hooks removed in ``finally``, eval mode with every training flag restored, a
module's input recorded."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

from torch import Tensor, nn


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


class ModuleInput:
    """Context manager recording what a module receives (a forward pre-hook, removed on exit): e.g. the
    pooled features entering a network's final linear layer. :meth:`take` returns the first positional input
    of the first call since the previous :meth:`take` (the first forward pass of a batch: with a test-time
    flip the mirrored pass comes second)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._value: Tensor | None = None

    def _hook(self, _module: nn.Module, args: tuple[Tensor, ...]) -> None:
        if self._value is None:
            self._value = args[0].detach()

    def take(self) -> Tensor | None:
        """The recorded input (detached; None when the module did not run), and forget it."""
        value, self._value = self._value, None
        return value

    def __enter__(self) -> ModuleInput:
        self._handle = self.module.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()
