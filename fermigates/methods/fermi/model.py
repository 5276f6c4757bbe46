"""The gates of a converted model: enumerating them, and contexts that switch them hard or open."""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterator

import torch
import torch.nn as nn

from ...allocation.units import Allocatable, UnitGroup
from ...core.modules import swap_modules
from ...core.state import detach_state, get_state
from .layers import GatedMixin, GroupGate, is_gated, weight_probability


def gated_modules(model: nn.Module) -> dict[str, GatedMixin]:
    return {n: m for n, m in model.named_modules() if is_gated(m)}


def all_gates(model: nn.Module) -> list:
    """Every distinct gate of a converted model (weight gates and group gates)."""
    seen: dict[int, Any] = {}
    for module in gated_modules(model).values():
        if module.weight_gate is not None:
            seen.setdefault(id(module.weight_gate), module.weight_gate)
        for slot in module.group_slots():
            seen.setdefault(id(slot.gate), slot.gate)
    return list(seen.values())


def distinct_gates(model: nn.Module):
    """``(gate, weight-owning module or None)`` for every distinct gate, in module order."""
    seen: set[int] = set()
    for module in gated_modules(model).values():
        if module.weight_gate is not None and id(module.weight_gate) not in seen:
            seen.add(id(module.weight_gate))
            yield module.weight_gate, module
        for slot in module.group_slots():
            if id(slot.gate) not in seen:
                seen.add(id(slot.gate))
                yield slot.gate, None


def gate_scores(model: nn.Module) -> list[tuple[Any, torch.Tensor]]:
    """``(gate, normalised unit scores)`` for every gate: what each gate's ``mu`` is compared with."""
    out = []
    for gate, owner in distinct_gates(model):
        score = owner.weight.detach().abs().float().flatten() if owner is not None else gate.score().detach()
        out.append((gate, gate.normalised(score)))
    return out


def soft_probabilities(model: nn.Module) -> list[tuple[Any, torch.Tensor]]:
    """``(gate, soft retention probability of its units)``, with gradients to weights and ``mu``."""
    return [
        (gate, weight_probability(gate, owner.weight) if owner is not None else gate.probability())
        for gate, owner in distinct_gates(model)
    ]


def group_keep(model: nn.Module) -> dict[int, torch.Tensor]:
    keep: dict[int, torch.Tensor] = {}
    for module in gated_modules(model).values():
        for slot in module.group_slots():
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
    get_state(model)  # a clear error for a model that was never converted
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
    for gate, owner in distinct_gates(model):
        if gate.decided is None:
            gate.decided = gate.keep(owner.weight.abs() if owner is not None else gate.score()).clone()


# -- what the shared pipeline asks of the Fermi method ------------------------------------------------------------
def structured_gates(model: nn.Module) -> list[GroupGate]:
    """The channel / head gates of ``model`` (those a budget or a one-shot ranking can speak for), in order."""
    return [g for g, owner in distinct_gates(model) if owner is None and getattr(g, "group_id", None) is not None]


@torch.no_grad()
def unit_groups(model: nn.Module) -> list[UnitGroup]:
    """Every structured gate as allocation's unit group, scored by its normalised weight scores (offsets included)."""
    return [UnitGroup(g.group_id, g.n_units, max(1, int(g.round_to)), g.kind, getattr(g, "label", str(g.group_id)),
                      g.normalised(g.score().detach()).detach()) for g in structured_gates(model)]


@torch.no_grad()
def set_keep(model: nn.Module, keep: dict[int, torch.Tensor]) -> None:
    """Freeze each structured gate's decision to ``keep[group_id]`` (gates not named keep their own)."""
    for g in structured_gates(model):
        mask = keep.get(g.group_id)
        if mask is not None:
            g.decided = None
            g.decided = mask.to(device=g.mu.device, dtype=torch.bool)


def own_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The gates' own parameters and buffers (Fermi levels, offsets, temperatures, scales)."""
    return [t for g in all_gates(model) for t in (*g.parameters(), *g.buffers())]


@torch.no_grad()
def undecided_units(model: nn.Module, eps: float = 0.01) -> int:
    """Units of ``model`` whose retention probability lies strictly between ``eps`` and ``1 - eps``."""
    return sum(int(((p > eps) & (p < 1 - eps)).sum()) for _, p in soft_probabilities(model))


def original_modules(model: nn.Module) -> dict[int, nn.Module]:
    """``id(twin) -> the plain module it replaced`` (the twins share their Parameters; nothing is zeroed)."""
    return {id(t): t.plain() for t in gated_modules(model).values()}


def unconverted_copy(model: nn.Module) -> nn.Module:
    """A deep copy of a converted model as the plain dense network (no gates, no hook)."""
    clone = copy.deepcopy(model)
    swap_modules(clone, original_modules(clone))
    detach_state(clone)
    return clone.eval()


def allocatable(model: nn.Module) -> Allocatable:
    """The model as allocation sees it: its structured gates as unit groups, gates-open as the dense network."""
    state = get_state(model)
    return Allocatable(model, unit_groups(model), state.graph, state, dense=lambda: gates_open(model),
                       plain_copy=lambda: unconverted_copy(model), own_tensors=own_tensors(model))
