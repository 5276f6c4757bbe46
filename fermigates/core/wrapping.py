"""The base of the optimizers a method wraps around the user's own (an annealer): the user's optimizer does the
parameter updates, and the wrapper is a ``torch.optim.Optimizer`` that LR schedulers and hooks accept."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from torch.optim import Optimizer

__all__ = ["WrappingOptimizer"]


class WrappingOptimizer(Optimizer):
    """Delegates ``param_groups``, ``state``, ``defaults``, ``zero_grad`` and ``add_param_group`` to the wrapped
    ``self.optimizer``; subclasses call :meth:`_wrap` in ``__init__`` and define ``step``."""

    optimizer: Optimizer

    def _wrap(self, optimizer: Optimizer) -> None:
        self.optimizer = optimizer
        # what torch.optim.Optimizer.__init__ would set, for hooks and LR schedulers
        self._optimizer_step_pre_hooks: dict = OrderedDict()
        self._optimizer_step_post_hooks: dict = OrderedDict()
        self._optimizer_state_dict_pre_hooks: dict = OrderedDict()
        self._optimizer_state_dict_post_hooks: dict = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: dict = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: dict = OrderedDict()

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @property
    def state(self) -> dict:  # type: ignore[override]
        return self.optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)
