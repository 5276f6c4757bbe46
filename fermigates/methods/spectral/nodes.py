"""Nodes of a spectral model: which dependency-graph groups the eigenvalues can judge, each node's importance
from the eigenvalues, and the input masks that remove decided nodes.

A *node* is a unit of a prunable channel group of the dependency graph (an MLP neuron, say). It is judged by the
eigenvalues attached to it: the end eigenvalue of every spectral layer that *produces* it (the node's incoming
scale) and, when start eigenvalues train, the start eigenvalue of every spectral layer that *consumes* it. Where
two spectral layers share a node both sets judge it (``link_mode``); a set that is constant over the group
(start eigenvalues never trained are all 0) carries no order and is left out. Each set is divided by its mean
magnitude over the group, so that scores are comparable across groups (a global budget ranks them together).

A group is offered to the shared allocation only when every layer that consumes its nodes is a spectral twin
(removing a node masks their input columns, exactly what the shared shrink then cuts) and some eigenvalues can
judge it. Residual streams and anything else the graph pins are never offered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .layers import SpectralMixin


@dataclass
class NodeGroup:
    """One dependency-graph group of nodes a spectral model can remove."""

    id: int
    n_units: int
    #: the kept count is a multiple of this (``FermiConfig.round_to``)
    step: int
    label: str
    #: ``(module name, "end" | "start", index (n_units, width))``: the eigenvalues that judge each node
    judges: list[tuple[str, str, torch.Tensor]]
    #: ``(module name, input-column index (n_units, width))`` of every layer that reads the nodes
    consumers: list[tuple[str, torch.Tensor]]
    #: per judge, the mean |lambda| its nodes started from (end) or its layer's (start): the penalty's scale
    scales: list[float] = field(default_factory=list)


def describe(group) -> str:
    producers = [m.module for m in group.members if m.role == "producer"]
    shown = ", ".join(producers[:3]) + (f" +{len(producers) - 3}" if len(producers) > 3 else "")
    return f"{group.kind} group {group.id} ({group.n_units} units; {shown or 'no producer'})"


def unit_step(group, round_to: int) -> int:
    """Units per rounding step so that every member's kept width is a multiple of ``round_to`` channels."""
    step = 1
    for member in group.members:
        if member.role != "attention":
            step = math.lcm(step, round_to // math.gcd(round_to, member.width))
    return step


def node_groups(graph, spectral: set[str], config, train_start: bool,
                skipped: list[tuple[str, str]]) -> list[NodeGroup]:
    """The channel groups of ``graph`` whose nodes spectral layers (``spectral``: their names) can judge and
    remove; why each other group is left whole goes to ``skipped``."""
    out = []
    for group in graph.groups:
        if group.kind not in config.granularities:
            continue
        label = describe(group)
        if not group.prunable:
            skipped.append((label, group.reason or "not prunable"))
            continue
        if group.n_units < max(config.min_units, 1):
            skipped.append((label, f"fewer than min_units={config.min_units} units"))
            continue
        consumers = [m for m in group.members if m.role == "consumer"]
        if not consumers:
            skipped.append((label, "no consumer layer reads its channels"))
            continue
        outside = [m.module for m in consumers if m.module not in spectral]
        if outside:
            skipped.append((label, f"consumer {outside[0]!r} is not a spectral layer"))
            continue
        judges = [(m.module, "end", m.index.long()) for m in group.members
                  if m.role == "producer" and m.module in spectral]
        if train_start:
            judges += [(m.module, "start", m.index.long()) for m in consumers]
        if not judges:
            skipped.append((label, "no spectral layer produces its nodes (their end eigenvalues judge them): "
                                   "convert its producer too, or train start eigenvalues (train_start=True)"))
            continue
        step = unit_step(group, config.round_to) if config.round_to > 1 else 1
        out.append(NodeGroup(group.id, group.n_units, step, label, judges,
                             [(m.module, m.index.long()) for m in consumers]))
    return out


@torch.no_grad()
def node_scores(modules: dict[str, nn.Module], group: NodeGroup, link_mode: str) -> torch.Tensor:
    """Importance of each node of ``group`` from the eigenvalues that judge it (larger is kept); float32, CPU."""
    sets = []
    for name, side, index in group.judges:
        twin: SpectralMixin = modules[name]
        lam = (twin.eig_end if side == "end" else twin.eig_start).detach().abs().float().cpu()
        per_node = lam[index.cpu()].mean(dim=1)
        if bool((per_node == per_node[0]).all()):  # constant: no order (e.g. start eigenvalues never trained)
            continue
        sets.append(per_node / per_node.mean().clamp_min(1e-30))
    if not sets:
        return torch.ones(group.n_units)
    stacked = torch.stack(sets)
    if link_mode == "and":
        return stacked.min(dim=0).values
    if link_mode == "or":
        return stacked.max(dim=0).values
    return stacked.mean(dim=0)


@torch.no_grad()
def input_masks(modules: dict[str, nn.Module], groups: list[NodeGroup],
                keep: dict[int, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    """The input mask of every consumer twin when the nodes ``keep`` (group id -> bool per node) are kept:
    ``None`` where nothing it reads is removed."""
    masks: dict[str, torch.Tensor | None] = {}
    for group in groups:
        for name, _ in group.consumers:
            masks.setdefault(name, None)
    for group in groups:
        mask = keep.get(group.id)
        if mask is None or bool(mask.all()):
            continue
        removed = ~mask.bool().cpu()
        for name, index in group.consumers:
            twin: SpectralMixin = modules[name]
            current = masks[name]
            if current is None:
                current = torch.ones(twin.n_in, dtype=twin.base.dtype, device=twin.base.device)
            current[index[removed].reshape(-1).to(current.device)] = 0
            masks[name] = current
    return masks


@torch.no_grad()
def set_scales(modules: dict[str, nn.Module], groups: list[NodeGroup]) -> None:
    """Record each judge's starting magnitude (see :attr:`NodeGroup.scales`)."""
    for group in groups:
        group.scales = []
        for name, side, index in group.judges:
            twin: SpectralMixin = modules[name]
            end = twin.eig_end.detach().abs().float()
            scale = end[index.to(end.device)].mean() if side == "end" else end.mean()
            group.scales.append(max(float(scale), 1e-12))


def eigenvalue_penalty(modules: dict[str, nn.Module], groups: list[NodeGroup]) -> torch.Tensor:
    """The L1 penalty on the eigenvalues that judge nodes: per judge the mean |lambda| of its nodes over the
    magnitude they started from, averaged over judges and groups (1 at conversion for the end eigenvalues)."""
    terms = []
    for group in groups:
        for (name, side, index), scale in zip(group.judges, group.scales):
            twin: SpectralMixin = modules[name]
            lam = twin.eig_end if side == "end" else twin.eig_start
            terms.append(lam[index.reshape(-1).to(lam.device)].abs().mean() / scale)
    return torch.stack(terms).mean()
