"""What allocation works on: groups of units a structured method offers, and the few views of the model it needs.

Allocation never knows which method decides: a method describes each dependency-graph group it can cut as a
:class:`UnitGroup` (how many units, the rounding step, its own score per unit) and hands over an
:class:`Allocatable` (the groups plus ways to see the model as the dense network). Allocation returns a keep
mask per group id; the method writes it back (``Method.set_keep``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class UnitGroup:
    """One group of units that are kept or removed together across the model (a dependency-graph group)."""

    #: the dependency-graph group id (``graph.groups[id]``)
    id: int
    n_units: int
    #: the kept count is a multiple of this (channel rounding), at most ``n_units``
    step: int = 1
    #: "channel" or "head"
    kind: str = "channel"
    #: how reports name the group
    label: str = ""
    #: the method's own importance of each unit (larger is kept), comparable across groups; what
    #: ``selection="magnitude"`` ranks by. ``None``: the method has none (data-driven selection only)
    scores: torch.Tensor | None = None


@dataclass
class Allocatable:
    """A converted model as allocation sees it."""

    model: nn.Module
    groups: list[UnitGroup]
    #: the dependency graph the groups belong to
    graph: Any
    #: the conversion record (``core.state.ConversionState``): example inputs and the selection pass's options
    state: Any
    #: ``with dense():`` the model computes the original dense function
    dense: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    #: an unconverted copy of the dense network (what latency is measured on)
    plain_copy: Callable[[], nn.Module] | None = None
    #: tensors that exist only while the model is converted (left out of parameter counts and version checks)
    own_tensors: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.groups:
            raise ValueError("a budget needs channel or head units: convert with granularity 'channel' and/or "
                             "'head' (nothing prunable was found otherwise; see fermigates.summary(model))")

    @property
    def ids(self) -> list[int]:
        return [g.id for g in self.groups]


def keep_masks(groups: list[UnitGroup], ranked: list[tuple[torch.Tensor, torch.Tensor]],
               removed: list[int]) -> dict[int, torch.Tensor]:
    """Group id -> bool keep mask when group ``i`` removes the first ``removed[i]`` units of its order."""
    masks = {}
    for g, (order, _), r in zip(groups, ranked, removed):
        keep = torch.ones(g.n_units, dtype=torch.bool)
        keep[order[:r]] = False
        masks[g.id] = keep
    return masks
