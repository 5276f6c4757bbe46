"""Running a model on example inputs and comparing outputs; snapshots that undo an edit of a model."""

from __future__ import annotations

import copy
from typing import Any, Iterable

import torch
import torch.nn as nn


def _copy_module_dict(module: nn.Module) -> dict:
    """A shallow copy of a module's ``__dict__`` whose containers (params, buffers, hooks) are new dicts."""
    return {k: (type(v)(v) if isinstance(v, dict) else v) for k, v in module.__dict__.items()}


#: shrunk and hard-masked outputs may differ by float reassociation only: relative to the output's scale
SHRINK_RTOL = 1e-4


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Run ``model`` on example inputs given as a tensor, a tuple of positional args or a dict of kwargs."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def output_tensors(out: Any) -> list[torch.Tensor]:
    """The floating-point tensors of a model output (tensor, tuple, dict or HF ModelOutput), in order."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict) or hasattr(out, "to_tuple"):
        items: Iterable[Any] = out.values()
    elif isinstance(out, (tuple, list)):
        items = out
    else:
        return []
    return [t for item in items for t in output_tensors(item)]


def max_relative_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Largest ``|a - b| / max(1, max|a|)`` over paired tensors; inf when the structures differ or any value
    is NaN / inf (two NaN outputs are not "equal")."""
    if len(a) != len(b):
        return float("inf")
    worst = 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape or not (bool(torch.isfinite(x).all()) and bool(torch.isfinite(y).all())):
            return float("inf")
        scale = max(1.0, float(x.abs().max())) if x.numel() else 1.0
        worst = max(worst, float((x.float() - y.float()).abs().max()) / scale if x.numel() else 0.0)
    return worst


def _snapshot(model: nn.Module) -> list[tuple[Any, dict]]:
    """References to every module's state (and an HF config's), enough to undo a shrink."""
    snap: list[tuple[Any, dict]] = [(m, _copy_module_dict(m)) for m in model.modules()]
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "__dict__"):
        snap.append((config, copy.deepcopy(config.__dict__)))
    return snap


def _restore(snapshot: list[tuple[Any, dict]]) -> None:
    for obj, state in snapshot:
        obj.__dict__.clear()
        obj.__dict__.update(state)
