"""Allocation: which units of every group to keep, for a budget or for one share of every group.

Works on the :class:`~fermigates.allocation.units.Allocatable` a structured method offers and returns keep masks
per dependency-graph group id; writing them back into the model is the method's job (``Method.set_keep``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..surgery.depth import block_importance, find_blocks
from .budget import Budget, BudgetResult, check_min_keep, describe_inputs, resolve_allocation, round_removed, unit_floor
from .cost import CostModel
from .importance import STREAM_ENERGY, check_selection, ranked_importance
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
    depth: bool | int = False,
    blocks_path: str | None = None,
) -> tuple[dict[int, torch.Tensor], BudgetResult]:
    """Keep masks (group id -> bool per unit) that meet ``budget``, and how it was met.

    ``allocation``: ``"global"`` (units ranked across groups by importance per unit of cost), ``"uniform"``
    (the same share of every group) or ``"auto"`` (see :func:`resolve_allocation`). ``selection``: ``"obs"``
    (needs ``data``: calibration batches) or ``"magnitude"``. ``min_keep``: every group keeps at least this
    fraction (float) or count (int) of its units, and never fewer than one. The budget is met as closely as the
    units allow (within 2% for models with more than a few dozen units); the result says what was predicted.

    Depth (whole blocks: decoder / encoder layers, ViT blocks, found by the family's registered block list or
    ``blocks_path``): a ``layers:`` budget removes that share of the blocks, those that change the residual
    stream least on ``data`` (``block_importance(metric="energy")``). ``depth=True`` makes removing blocks a
    choice inside a MAC / parameter budget: for every count of blocks that fits, the rest of the budget is
    allocated to units, and the plan of least predicted output error wins (blocks and units on one scale: the
    squared error each adds to the stream it writes, relative to that stream); ``depth=n`` removes exactly
    ``n`` blocks and allocates the rest. Depth needs ``selection="obs"`` and ``data``. The blocks chosen are in
    ``result.removed_blocks``; ``result.depth`` holds the scores and the candidates.
    """
    budget = Budget.parse(budget)
    allocation = resolve_allocation(allocation, budget)
    check_selection(selection)
    check_min_keep(min_keep)
    kind, fraction = budget.kind, budget.fraction
    depth = _check_depth(depth, kind, selection, data)
    groups = target.groups
    steps = [max(1, int(g.step)) for g in groups]
    floors = [unit_floor(g.n_units, min_keep, s) for g, s in zip(groups, steps)]
    cost = CostModel(target, example_inputs)
    blocks = None
    if kind == "layers" or depth is not False:
        blocks = _block_scores(target, cost, data, blocks_path, progress)
    if kind == "layers":
        return _layers_only(target, cost, blocks, fraction, allocation, selection)
    if kind == "latency":
        cost.measure_latency(target.model, example_inputs, steps, floors)
    ranked = ranked_importance(target, floors, selection, data, ridge, progress)

    floor_kept = cost.kept(kind, [g.n_units - f for g, f in zip(groups, floors)])
    if kind != "latency" and depth is False and floor_kept > fraction * 1.02:  # a latency floor is checked by timing it
        raise ValueError(f"budget {kind} kept {fraction:g} cannot be met: with every gate at its floor "
                         f"(min_keep={min_keep!r}) the model keeps {floor_kept:.4f} of its {kind}; prune more "
                         f"granularities, lower min_keep or ask for a larger budget")

    def solve_at(aim: float) -> list[int]:
        return solve(kind, aim, allocation, groups, steps, floors, cost, ranked)

    gone: list[int] = []
    if blocks is not None:
        removed, gone = _with_depth(blocks, depth, kind, fraction, allocation, groups, steps, floors, cost, ranked)
    else:
        removed = solve_at(fraction)
    measured = None
    if kind == "latency":
        removed, measured = latency_closed_loop(groups, ranked, cost, solve_at, fraction, floors)
    counted = {"macs": cost.counted_on, "params": "over the whole model", "units": "over the gated units",
               "latency": f"per forward of {describe_inputs(example_inputs)} on this machine, "
                          f"{getattr(cost.latency, 'measured_on', '')}"}[kind]
    result = BudgetResult(kind, fraction, cost.kept(kind, removed, gone), allocation, selection, counted,
                          latency=cost.latency if kind == "latency" else None)
    result.measured = measured
    inside = _groups_inside(cost, groups)
    for g, r, b in zip(groups, removed, inside):
        if b is None or b not in gone:
            result.kept[g.label or str(g.id)] = (g.n_units - r, g.n_units)
    if blocks is not None:
        result.removed_blocks, result.depth = sorted(gone), blocks
    return keep_masks(groups, ranked, removed), result


# ------------------------------------------------------------------------------------------------ depth
def _check_depth(depth: Any, kind: str, selection: str, data: Any) -> bool | int:
    if depth is not True and depth is not False and (not isinstance(depth, int) or depth < 0):
        raise ValueError(f"depth must be True (the number of blocks removed is chosen), False (none) or a "
                         f"count of blocks >= 0, got {depth!r}")
    if depth is not False and kind not in ("macs", "params"):
        raise ValueError(f"depth= applies to a 'macs:' or 'params:' budget, got a {kind!r} budget (a 'layers:' "
                         "budget removes blocks by itself)")
    if (depth is not False or kind == "layers") and (selection != "obs" or not data):
        raise ValueError("removing blocks is decided on calibration data (how much each block changes the "
                         "stream, on the scale of the units' OBS errors): pass calibration batches and "
                         "selection='obs'")
    return depth


def _block_scores(target: Allocatable, cost: CostModel, data: Any, path: str | None, progress: bool) -> dict:
    model = target.model
    path, container = find_blocks(model, path)
    cost.set_blocks(path, len(container))
    with target.dense():
        scores = block_importance(model, data, metric="energy", path=path, progress=progress,
                                  stream_energy=STREAM_ENERGY)
    return {"path": path, "scores": scores, "candidates": [], "chosen": 0}


def _layers_only(target: Allocatable, cost: CostModel, blocks: dict, fraction: float, allocation: str,
                 selection: str) -> tuple[dict[int, torch.Tensor], BudgetResult]:
    n = len(blocks["scores"])
    k = min(n - 1, int(round((1.0 - fraction) * n)))
    gone = sorted(sorted(range(n), key=lambda i: blocks["scores"][i])[:k])
    blocks["chosen"] = k
    result = BudgetResult("layers", fraction, (n - k) / n, allocation, selection, f"over the {n} blocks of "
                          f"{blocks['path']!r}", removed_blocks=gone, depth=blocks)
    masks = {g.id: torch.ones(g.n_units, dtype=torch.bool) for g in target.groups}
    return masks, result


def _groups_inside(cost: CostModel, groups: list[UnitGroup]) -> list[int | None]:
    """The block each group lies entirely inside (all the modules it touches), or None."""
    out: list[int | None] = []
    for touches in cost.touch[: len(groups)]:
        owners = {cost.block_of.get(module) for module, _, _ in touches}
        out.append(next(iter(owners)) if len(owners) == 1 and None not in owners else None)
    return out


def _with_depth(blocks: dict, depth: bool | int, kind: str, fraction: float, allocation: str,
                groups: list[UnitGroup], steps: list[int], floors: list[int], cost: CostModel,
                ranked: list) -> tuple[list[int], list[int]]:
    """Units removed per group and blocks removed: the candidate (count of blocks, rest of the budget on units)
    of least predicted error."""
    scores = blocks["scores"]
    n = len(scores)
    order = sorted(range(n), key=lambda i: scores[i])
    inside = _groups_inside(cost, groups)
    counts = [depth] if depth is not True else range(n)
    best: tuple[float, list[int], list[int]] | None = None
    for k in counts:
        if k >= n:
            raise ValueError(f"depth={k} removes every one of the {n} blocks of {blocks['path']!r}")
        gone = order[:k]
        view = cost.without(gone)
        if depth is True and view.kept(kind, [0] * len(groups)) < fraction * (1 - 0.02):
            break  # the blocks alone overshoot the budget; more blocks only overshoot more
        gone_set = set(gone)
        floors_k = [g.n_units if b in gone_set else f for g, f, b in zip(groups, floors, inside)]
        if view.kept(kind, [g.n_units - f for g, f in zip(groups, floors_k)]) > fraction * 1.02:
            blocks["candidates"].append({"blocks": sorted(gone), "predicted": None, "error": None})
            continue  # the units left cannot reach the budget with this few blocks gone
        removed = solve(kind, fraction, allocation, groups, steps, floors_k, view, ranked)
        error = sum(scores[i] for i in gone) + sum(float(value[:r].sum()) for (_, value), r in zip(ranked, removed))
        blocks["candidates"].append({"blocks": sorted(gone), "predicted": view.kept(kind, removed), "error": error})
        if best is None or error < best[0]:
            best = (error, removed, gone)
    if best is None:
        raise ValueError(f"budget {kind} kept {fraction:g} cannot be met with depth={depth!r}: see the candidates "
                         f"{blocks['candidates']}")
    blocks["chosen"] = len(best[2])
    return best[1], sorted(best[2])


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
