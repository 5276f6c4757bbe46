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


def fermi_trainer_callback(model: nn.Module, *args: Any, **kwargs: Any):
    """Moved: :func:`fermigates.fermi_trainer_callback` (kept here for old imports)."""
    from fermigates.methods.fermi.trainer import fermi_trainer_callback as callback

    return callback(model, *args, **kwargs)
