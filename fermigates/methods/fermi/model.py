"""The gates of a converted model: enumerating them, and contexts that switch them hard or open."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn as nn

from ...state import fermi_state
from .layers import weight_probability, GatedMixin, GroupGate, is_gated


def gated_modules(model: nn.Module) -> dict[str, GatedMixin]:
    return {n: m for n, m in model.named_modules() if is_gated(m)}


def all_gates(model: nn.Module) -> list:
    """Every distinct gate of a converted model (weight gates and group gates)."""
    seen: dict[int, Any] = {}
    for module in gated_modules(model).values():
        if module.weight_gate is not None:
            seen.setdefault(id(module.weight_gate), module.weight_gate)
        for slot in module._slots:
            seen.setdefault(id(slot.gate), slot.gate)
    return list(seen.values())


def _distinct_gates(model: nn.Module):
    """``(gate, weight-owning module or None)`` for every distinct gate, in module order."""
    seen: set[int] = set()
    for module in gated_modules(model).values():
        if module.weight_gate is not None and id(module.weight_gate) not in seen:
            seen.add(id(module.weight_gate))
            yield module.weight_gate, module
        for slot in module._slots:
            if id(slot.gate) not in seen:
                seen.add(id(slot.gate))
                yield slot.gate, None


def gate_scores(model: nn.Module) -> list[tuple[Any, torch.Tensor]]:
    """``(gate, normalised unit scores)`` for every gate: what each gate's ``mu`` is compared with."""
    out = []
    for gate, owner in _distinct_gates(model):
        score = owner.weight.detach().abs().float().flatten() if owner is not None else gate.score().detach()
        out.append((gate, gate.normalised(score)))
    return out


def soft_probabilities(model: nn.Module) -> list[tuple[Any, torch.Tensor]]:
    """``(gate, soft retention probability of its units)``, with gradients to weights and ``mu``."""
    return [
        (gate, weight_probability(gate, owner.weight) if owner is not None else gate.probability())
        for gate, owner in _distinct_gates(model)
    ]


def _group_keep(model: nn.Module) -> dict[int, torch.Tensor]:
    keep: dict[int, torch.Tensor] = {}
    for module in gated_modules(model).values():
        for slot in module._slots:
            gate: GroupGate = slot.gate
            if gate.group_id is not None and gate.group_id not in keep:
                keep[gate.group_id] = gate.keep_units().cpu()
    return keep


@contextlib.contextmanager
def _gates_set(model: nn.Module, attr: str, value: bool) -> Iterator[nn.Module]:
    gates = all_gates(model)
    previous = [getattr(g, attr) for g in gates]
    for g in gates:
        setattr(g, attr, value)
    try:
        yield model
    finally:
        for g, v in zip(gates, previous):
            setattr(g, attr, v)


def hard_gates(model: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
    """Within this context the gates of ``model`` apply their hard decisions (``P >= 0.5`` -> 1, else 0):
    the model computes what ``convert_from_fermi(model, shrink=False)`` would bake."""
    fermi_state(model)  # a clear error for a model that was never converted
    return _gates_set(model, "hard", True)


def gates_open(model: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
    """Within this context every gate of ``model`` passes everything (P = 1): the dense function."""
    return _gates_set(model, "enabled", False)


def disable_gates(model: nn.Module) -> None:
    """Open every gate of a converted model (P = 1): it then computes the dense function."""
    for gate in all_gates(model):
        gate.enabled = False


@torch.no_grad()
def freeze_decisions(model: nn.Module) -> None:
    """Freeze every gate's current hard decision: from now on the gates apply (and bake) exactly it. Gates
    already frozen keep their decision."""
    for gate, owner in _distinct_gates(model):
        if gate.decided is None:
            gate.decided = gate.keep(owner.weight.abs() if owner is not None else gate.score()).clone()
