"""Structured gates: one ``GroupGate`` per coupled channel / head group of the dependency graph."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch.nn as nn

from .gates import FermiGate
from ...core.layouts import weight_axes
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
    """Build the graph, create a gate per prunable group and twins for its consumers (model untouched)."""
    graph = build_dependency_graph(model, state.example_inputs, progress=state.progress)
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
        untargeted = [c.module for c in consumers if c.module not in targets]
        if untargeted:
            summary.skipped.append((label, f"consumer {untargeted[0]!r} is not targeted"))
            continue
        chosen.append(group)

    for group in chosen:
        for member in group.members:
            if member.role == "consumer" and member.module not in twins:
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
        gate.label = _describe(group)
        gate.to(producers[0][0].weight.device)
        first = True
        for member in group.members:
            if member.role == "consumer":
                twins[member.module].add_slot(gate, member.index.long(), owner=first)
                first = False
        summary.n_gates += 1
        summary.n_units += group.n_units
