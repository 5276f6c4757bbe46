"""Calibration inside a run: the inputs of the training forwards kept as calibration data, and a ridge re-fit of
the layers that lost inputs, written into the gated model in place when the decisions freeze.

``InputRecorder`` keeps the inputs of the first few training forwards of a converted model (a forward pre-hook):
the annealer ranks the units on them when it was given no ``calibration_data``, so that a loop that never passes
calibration data still starts from the one-shot pruner's order, and calibrates on them.

``calibrate_decisions`` is what ``convert_from_fermi(calibration_data=...)`` does to a copy, brought back into the
model being trained: a copy is baked with the current hard decisions and shrunk, the layers that lost inputs are
re-fitted toward a reference (ridge regression, :func:`fermigates.calibration.engine.calibrate`), and their new
weights are written into the kept rows / columns of the gated model's own parameters (the same Parameter
objects: an optimizer holding them keeps working). The columns of removed units are left as they were: the
frozen decisions mask them.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ...calibration.engine import calibrate
from ...core.layouts import weight_axes
from ...core.registry import apply_config_updates
from ...core.state import get_state
from ...surgery.shrink import shrink_model
from .model import disable_gates, gated_modules, group_keep, structured_gates, unconverted_copy


def _detached(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def _gathered(batch: Any) -> Any:
    """``batch`` joined along its first dimension with the other processes' (in rank order) when
    ``torch.distributed`` runs several; None when any process's batch is None or they cannot be joined (the same
    answer on every process)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return batch
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, None if batch is None else _cpu(batch))
    if any(p is None for p in parts):
        return None
    try:
        if isinstance(parts[0], Mapping):
            return {k: torch.cat([p[k] for p in parts]).to(batch[k].device) if isinstance(parts[0][k], torch.Tensor)
                    else parts[0][k] for k in parts[0]}
        return torch.cat(parts).to(batch.device)
    except (RuntimeError, KeyError, TypeError):
        return None


def _cpu(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.cpu()
    return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class InputRecorder:
    """Keeps the inputs of the first ``max_batches`` forwards of ``model`` that run with gradients (its training
    forwards), as batches ``fermigates`` reads anywhere: a tensor, or a mapping of keyword arguments.

    A forward with other arguments (several positional tensors) stops the recording: its batches could not be
    replayed. ``close()`` removes the hook; a deep copy of the model never records (the hook checks identity).
    """

    def __init__(self, model: nn.Module, max_batches: int = 8) -> None:
        self.batches: list[Any] = []
        self.max_batches = max_batches
        self.unusable = False
        ref = weakref.ref(model)
        recorder = weakref.ref(self)

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            rec = recorder()
            if rec is not None and module is ref():
                rec._record(args, kwargs)

        self._handle = model.register_forward_pre_hook(hook, with_kwargs=True)

    @property
    def full(self) -> bool:
        return len(self.batches) >= self.max_batches or self.unusable

    def _record(self, args: tuple, kwargs: dict) -> None:
        if self.full or not torch.is_grad_enabled():
            return
        if len(args) == 1 and isinstance(args[0], torch.Tensor) and not kwargs:
            batch: Any = _detached(args[0])
        elif not args and kwargs:
            batch = {k: _detached(v) for k, v in kwargs.items()}
        elif len(args) == 1 and isinstance(args[0], Mapping) and not kwargs:
            batch = {k: _detached(v) for k, v in args[0].items()}
        else:
            batch = None
        batch = _gathered(batch)  # under DDP every process ranks on the global batch, so all decide alike
        if batch is None:
            self.unusable = True
        else:
            self.batches.append(batch)
        if self.full:
            self.close()

    def close(self) -> None:
        self._handle.remove()


def _write_back(full: nn.Module, small: nn.Module, kept_in: torch.Tensor | None,
                kept_out: torch.Tensor | None) -> None:
    """Write ``small``'s weight and bias (the shrunk layer) into the kept rows / columns of ``full``."""
    in_axis, out_axis = weight_axes(full)
    w, s = full.weight, small.weight
    device = w.device
    rows = (torch.arange(w.shape[out_axis]) if kept_out is None else kept_out.long().cpu()).to(device)
    groups = getattr(full, "groups", 1)
    if groups == 1:
        cols = (torch.arange(w.shape[in_axis]) if kept_in is None else kept_in.long().cpu()).to(device)
    elif w.shape[in_axis] == s.shape[in_axis]:  # grouped / depthwise: the per-group input width is unchanged
        cols = torch.arange(w.shape[in_axis], device=device)
    else:
        raise ValueError(f"cannot write a calibrated grouped layer back ({type(full).__name__}, groups={groups})")
    view = w.data.movedim((out_axis, in_axis), (0, 1))
    view[rows[:, None], cols[None, :]] = s.data.movedim((out_axis, in_axis), (0, 1)).to(w.dtype)
    if full.bias is not None and small.bias is not None:
        full.bias.data[rows] = small.bias.data.to(full.bias.dtype)


def open_reference(model: nn.Module) -> nn.Module:
    """A frozen copy of a converted model with every gate open: its current weights, no unit removed."""
    ref = copy.deepcopy(model)
    disable_gates(ref)
    return ref.eval().requires_grad_(False)


@torch.no_grad()
def calibrate_decisions(model: nn.Module, batches: list[Any], reference: nn.Module, ridge: float = 1e-2) -> Any:
    """Re-fit, in place, the layers of a converted ``model`` whose inputs lost units under its current hard
    decisions (frozen or not), toward ``reference``'s outputs (see the module docstring). Returns the calibration
    report, or None when nothing was removed. On any error nothing is changed."""
    if not structured_gates(model):
        raise ValueError("calibrate_decisions re-fits the consumers of channel / head gates: the model has none")
    keep = group_keep(model)
    if all(bool(mask.all()) for mask in keep.values()):
        return None
    graph = get_state(model).graph
    twins = set(gated_modules(model))
    clone = unconverted_copy(model)
    result = shrink_model(clone, graph, keep)
    apply_config_updates(clone)
    targets = {name: (ch.kept_in, ch.kept_out) for name, ch in result.changes.items()
               if ch.kept_in is not None and name in twins}
    if not targets:
        return None
    was = model.training
    report = calibrate(clone, batches, reference=reference, targets=targets, ridge=ridge, progress=False)
    model.train(was)
    modules, small = dict(model.named_modules()), dict(clone.named_modules())
    saved = {n: (modules[n].weight.detach().clone(),
                 None if modules[n].bias is None else modules[n].bias.detach().clone()) for n in targets}
    try:
        for name, (kept_in, kept_out) in targets.items():
            _write_back(modules[name], small[name], kept_in, kept_out)
    except BaseException:
        for name, (weight, bias) in saved.items():
            modules[name].weight.data.copy_(weight)
            if bias is not None:
                modules[name].bias.data.copy_(bias)
        raise
    return report
