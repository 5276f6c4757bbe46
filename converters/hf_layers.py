"""Hugging Face transformers: the gated twin of GPT-2's ``Conv1D`` and a ``Trainer`` callback.

Nothing here imports transformers at import time: the twin class is built the first time a ``Conv1D`` is
converted, and the callback class the first time ``fermi_trainer_callback`` is called.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn as nn

from . import registry

CONV1D_NAME = "transformers.pytorch_utils.Conv1D"


@functools.lru_cache(maxsize=None)
def _conv1d_twin_class(base: type) -> type:
    from fermigates.methods.fermi.layers import GatedMixin

    class FermiConv1D(GatedMixin, base):
        """transformers ``Conv1D`` (weight stored as (in, out)) with Fermi-gated weights."""

        _in_axis, _out_axis = 0, 1

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            size_out = x.size()[:-1] + (self.nf,)
            x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.gated_weight())
            return x.view(size_out)

        def __repr__(self) -> str:
            return f"FermiConv1D(nf={self.nf}, nx={self.nx}, {self._gate_repr()})"

    return FermiConv1D


def _conv1d_twin(module: nn.Module) -> nn.Module:
    from fermigates.methods.fermi.layers import make_twin

    return make_twin(module, _conv1d_twin_class(type(module)))


registry.register(registry.TWINS, CONV1D_NAME, _conv1d_twin)


def fermi_trainer_callback(
    model: nn.Module,
    temperature: tuple[float, float] = (1.0, 0.01),
    schedule: str = "exponential",
    target_sparsity: float | None = None,
    sparsity_schedule: str = "cubic",
    total_steps: int | None = None,
    **schedule_kwargs: Any,
):
    """A ``transformers.TrainerCallback`` that anneals the gates of ``model`` after every optimizer step.

    It does what ``FermiAnnealer`` does around the optimizer: sets ``T`` and steers ``mu`` from the step
    count. ``total_steps`` defaults to the Trainer's ``max_steps``. Pass it as
    ``Trainer(..., callbacks=[fermi_trainer_callback(model)])``.
    """
    from transformers import TrainerCallback

    from fermigates.methods.fermi.anneal import AnnealSchedule
    from fermigates.state import fermi_state

    config = fermi_state(model).config
    sparsity = config.target_sparsity if target_sparsity is None else target_sparsity

    class FermiCallback(TrainerCallback):
        def __init__(self) -> None:
            self.schedule: AnnealSchedule | None = None

        def _ensure(self, state) -> AnnealSchedule:
            if self.schedule is None:
                steps = total_steps or state.max_steps
                if not steps or steps < 1:
                    raise ValueError("fermi_trainer_callback needs total_steps (the Trainer's max_steps is unknown)")
                self.schedule = AnnealSchedule(
                    int(steps), tuple(temperature), schedule, sparsity, sparsity_schedule, **schedule_kwargs
                )
            return self.schedule

        def on_train_begin(self, args, state, control, **kwargs):
            self._ensure(state).apply(model, state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            self._ensure(state).apply(model, state.global_step)

    return FermiCallback()
