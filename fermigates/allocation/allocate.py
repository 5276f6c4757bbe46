"""Allocation: which units of every group to keep, for a budget or for one share of every group.

Works on the :class:`~fermigates.allocation.units.Allocatable` a structured method offers and returns keep masks
per dependency-graph group id; writing them back into the model is the method's job (``Method.set_keep``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .budget import Budget, BudgetResult, check_min_keep, describe_inputs, resolve_allocation, round_removed, unit_floor
from .cost import CostModel
from .importance import check_selection, ranked_importance
from .solve import latency_closed_loop, solve
from .units import Allocatable, UnitGroup, keep_masks

__all__ = ["allocate", "allocate_share", "share_removed"]


@torch.no_grad()
def allocate(
    target: Allocatable,
    budget: Budget | str,
    *,
    example_inputs: Any,
    data: list | None = None,
    allocation: str = "global",
    selection: str = "obs",
    min_keep: float | int = 0.1,
    ridge: float = 1e-2,
    progress: bool = False,
) -> tuple[dict[int, torch.Tensor], BudgetResult]:
    """Keep masks (group id -> bool per unit) that meet ``budget``, and how it was met.

    ``allocation``: ``"global"`` (units ranked across groups by importance per unit of cost), ``"uniform"``
    (the same share of every group) or ``"auto"`` (see :func:`resolve_allocation`). ``selection``: ``"obs"``
    (needs ``data``: calibration batches) or ``"magnitude"``. ``min_keep``: every group keeps at least this
    fraction (float) or count (int) of its units, and never fewer than one. The budget is met as closely as the
    units allow (within 2% for models with more than a few dozen units); the result says what was predicted.
    """
    budget = Budget.parse(budget)
    allocation = resolve_allocation(allocation, budget)
    check_selection(selection)
    check_min_keep(min_keep)
    groups = target.groups
    steps = [max(1, int(g.step)) for g in groups]
    floors = [unit_floor(g.n_units, min_keep, s) for g, s in zip(groups, steps)]
    cost = CostModel(target, example_inputs)
    kind, fraction = budget.kind, budget.fraction
    if kind == "latency":
        cost.measure_latency(target.model, example_inputs, steps, floors)
    ranked = ranked_importance(target, floors, selection, data, ridge, progress)

    floor_kept = cost.kept(kind, [g.n_units - f for g, f in zip(groups, floors)])
    if kind != "latency" and floor_kept > fraction * 1.02:  # a latency floor is checked by timing it
        raise ValueError(f"budget {kind} kept {fraction:g} cannot be met: with every gate at its floor "
                         f"(min_keep={min_keep!r}) the model keeps {floor_kept:.4f} of its {kind}; prune more "
                         f"granularities, lower min_keep or ask for a larger budget")

    def solve_at(aim: float) -> list[int]:
        return solve(kind, aim, allocation, groups, steps, floors, cost, ranked)

    removed = solve_at(fraction)
    measured = None
    if kind == "latency":
        removed, measured = latency_closed_loop(groups, ranked, cost, solve_at, fraction, floors)
    counted = {"macs": cost.counted_on, "params": "over the whole model", "units": "over the gated units",
               "latency": f"per forward of {describe_inputs(example_inputs)} on this machine, "
                          f"{getattr(cost.latency, 'measured_on', '')}"}[kind]
    result = BudgetResult(kind, fraction, cost.kept(kind, removed), allocation, selection, counted,
                          latency=cost.latency if kind == "latency" else None)
    result.measured = measured
    for g, r in zip(groups, removed):
        result.kept[g.label or str(g.id)] = (g.n_units - r, g.n_units)
    return keep_masks(groups, ranked, removed), result


def share_removed(groups: list[UnitGroup], sparsity: float | dict[str, float]) -> list[int]:
    """Units each group removes for a target share (one fraction, or one per kind: ``{"channel": 0.5}``):
    ``floor(share * n)``, at least one unit kept, the kept count rounded up to the group's step."""
    out = []
    for g in groups:
        share = float(sparsity.get(g.kind, 0.0)) if isinstance(sparsity, dict) else float(sparsity)
        removed = min(int(math.floor(share * g.n_units)), g.n_units - 1)
        out.append(round_removed(removed, g.n_units, max(1, int(g.step))))
    return out


@torch.no_grad()
def allocate_share(target: Allocatable, sparsity: float | dict[str, float], *, selection: str = "obs",
                   data: list | None = None, ridge: float = 1e-2, progress: bool = False) -> dict[int, torch.Tensor]:
    """Keep masks that remove the same share of every group (see :func:`share_removed`), the units chosen by
    ``selection`` (``"obs"`` on ``data``, or the method's own scores)."""
    check_selection(selection)
    removed = share_removed(target.groups, sparsity)
    floors = [max(g.n_units - r, 1) for g, r in zip(target.groups, removed)]
    ranked = ranked_importance(target, floors, selection, data if selection == "obs" else None, ridge, progress)
    return keep_masks(target.groups, ranked, removed)
