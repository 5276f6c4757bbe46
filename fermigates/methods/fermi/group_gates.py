"""Structured gates: one ``GroupGate`` per coupled channel / head group of the dependency graph."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch.nn as nn

from .gates import FermiGate
from ...core.layouts import weight_axes
from ...core.registry import hidden_multiple
from ...surgery.graph import build_dependency_graph
from .layers import GroupGate, twin_factory

if TYPE_CHECKING:
    from ...core.state import ConversionState


def _describe(group) -> str:
    producers = [m.module for m in group.members if m.role == "producer"]
    shown = ", ".join(producers[:3]) + (f" +{len(producers) - 3}" if len(producers) > 3 else "")
    return f"{group.kind} group {group.id} ({group.n_units} units; {shown or 'no producer'})"


def _unit_step(group, round_to: int) -> int:
    """Units per rounding step so that every member's kept width is a multiple of ``round_to`` channels: a
    unit can span several channels (a group of a grouped conv, position ``j`` of every chunk), and different
    members may see it with different widths."""
    step = 1
    for member in group.members:
        if member.role != "attention":
            step = math.lcm(step, round_to // math.gcd(round_to, member.width))
    return step


def attach_group_gates(
    model: nn.Module,
    config: Any,
    targets: dict[str, nn.Module],
    twins: dict[str, nn.Module],
    state: "ConversionState",
) -> None:
    """Build the graph, create a gate per prunable group and twins for its consumers (model untouched).

    A residual stream's group (kind ``"hidden"``) is gated where the stream is written instead: on its producers'
    output rows (the embedding's columns, the projections that add into the stream), so that the stream itself
    is zero at a removed channel and the norms that read it see what the shrunk model computes."""
    graph = build_dependency_graph(model, state.example_inputs, progress=state.progress,
                                   hidden="hidden" in config.granularities)
    state.graph = graph
    modules = dict(model.named_modules())
    summary = state.summary
    chosen = []
    for group in graph.groups:
        if group.kind not in config.granularities:
            continue
        label = _describe(group)
        if not group.prunable:
            summary.skipped.append((label, group.reason or "not prunable"))
            continue
        if group.n_units < max(config.min_units, 1):
            summary.skipped.append((label, f"fewer than min_units={config.min_units} units"))
            continue
        consumers = [m for m in group.members if m.role == "consumer"]
        if not consumers:
            summary.skipped.append((label, "no consumer layer reads its channels"))
            continue
        gated = _gated_members(group)
        untargeted = [c.module for c in gated if c.module not in targets or twin_factory(modules[c.module]) is None]
        if untargeted:
            summary.skipped.append((label, f"{gated[0].role} {untargeted[0]!r} is not targeted"))
            continue
        chosen.append(group)

    for group in chosen:
        for member in _gated_members(group):
            if member.module not in twins:
                module = modules[member.module]
                twins[member.module] = twin_factory(module)(module)

    for group in chosen:
        scored = [m for m in group.members if m.role == "producer"] or [
            m for m in group.members if m.role == "consumer"
        ]
        producers = []
        for member in scored:
            module = twins.get(member.module, modules[member.module])
            in_axis, out_axis = weight_axes(module)
            axis = out_axis if member.role == "producer" else in_axis
            producers.append((module, axis, member.index.long()))
        probe = GroupGate(group.n_units, 1.0, 0.0, config.temperature, producers)
        init = FermiGate.for_scores(probe.score().detach(), config.temperature, config.mu_init)
        gate = GroupGate(group.n_units, init.scale.item(), init.mu.item(), config.temperature, producers)
        gate.group_id = group.id
        gate.kind = group.kind
        if group.kind == "channel" and config.round_to > 1:
            gate.round_to = _unit_step(group, config.round_to)
        if group.kind == "hidden":  # the family's config may only describe some widths
            gate.round_to = math.lcm(_unit_step(group, config.round_to), hidden_multiple(model))
        gate.label = _describe(group)
        gate.to(producers[0][0].weight.device)
        for i, member in enumerate(_gated_members(group)):
            twins[member.module].add_slot(gate, member.index.long(), owner=i == 0, rows=group.kind == "hidden")
        summary.n_gates += 1
        summary.n_units += group.n_units


def _gated_members(group) -> list:
    """Where a group's gate acts: its consumers' input columns, or a residual stream's producers' rows."""
    role = "producer" if group.kind == "hidden" else "consumer"
    return [m for m in group.members if m.role == role]
