"""Solvers: how many units each group removes so that a budget is met.

``"uniform"`` removes the same share of every group; ``"global"`` removes the units of least importance per unit
of cost across all groups (never below each group's floor) until the budget is met. A latency budget is
closed-loop: the tables rank, timing the shrunk candidate sets the level.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from ..core.batches import call_model
from ..surgery.shrink import shrink_model
from .budget import round_removed
from .cost import CostModel
from .latency import compare_latency
from .units import UnitGroup, keep_masks

__all__ = ["solve", "latency_closed_loop", "LATENCY_TOLERANCE", "LATENCY_ROUNDS"]


def solve(kind: str, target: float, allocation: str, gates: list[UnitGroup], steps: list[int], floors: list[int],
          cost: CostModel, ranked: list) -> list[int]:
    """Units each gate removes so that the predicted ``kind`` kept is closest to ``target``."""
    def removed_for(raw: list[int]) -> list[int]:
        return [min(round_removed(r, g.n_units, s), g.n_units - f)
                for r, g, s, f in zip(raw, gates, steps, floors)]

    def solve(target: float) -> list[int]:
        """Units each gate removes so that the predicted ``kind`` kept is closest to ``target``."""
        if allocation == "uniform":
            def at(share: float) -> list[int]:
                return removed_for([math.floor(share * g.n_units) for g in gates])
            lo, hi = 0.0, 1.0  # share removed: kept fraction is non-increasing in it
            for _ in range(40):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if cost.kept(kind, at(mid)) > target else (lo, mid)
            above, below = at(lo), at(hi)
            candidates = [above, below]
            # with rounding, gates of equal width step together and the kept fraction jumps: move the gates
            # one at a time from the share above the target to the one below it, keeping the closest
            mixed = list(above)
            for i in range(len(gates)):
                if mixed[i] != below[i]:
                    mixed[i] = below[i]
                    candidates.append(list(mixed))
                    if cost.kept(kind, mixed) <= target:
                        break
        else:
            unit = [cost.unit_cost(kind, i) for i in range(len(gates))]
            mean = sum(unit) / len(unit)
            entries = []
            for i, ((order, value), g) in enumerate(zip(ranked, gates)):
                priority = value[: g.n_units - floors[i]] / (unit[i] / mean)
                entries += [(float(p), i) for p in priority]
            entries.sort(key=lambda e: e[0])
            owner = [i for _, i in entries]

            def at_k(k: int) -> list[int]:
                raw = [0] * len(gates)
                for i in owner[:k]:
                    raw[i] += 1
                return removed_for(raw)
            lo, hi = 0, len(owner)  # smallest prefix whose cost is at or below the target
            if cost.kept(kind, at_k(hi)) > target:
                lo = hi
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (mid + 1, hi) if cost.kept(kind, at_k(mid)) > target else (lo, mid)
            # the prefix before ``lo`` is above the target: fill it with the later units that still fit (a unit
            # too costly for what is left, e.g. a whole head, is skipped for cheaper ones)
            raw = [0] * len(gates)
            for i in owner[: max(lo - 1, 0)]:
                raw[i] += 1
            for i in owner[max(lo - 1, 0):]:
                raw[i] += 1
                if cost.kept(kind, removed_for(raw)) < target:
                    raw[i] -= 1
            candidates = [removed_for(raw), at_k(lo)]
        return min(candidates, key=lambda r: abs(cost.kept(kind, r) - target))
    return solve(target)


#: a latency budget is re-measured on the shrunk candidate until it lands this close (relative), at most
#: ``LATENCY_ROUNDS`` times (and as many again when the level has to be bracketed by the floor)
LATENCY_TOLERANCE = 0.025
LATENCY_ROUNDS = 6


def latency_closed_loop(gates: list[UnitGroup], ranked: list, cost: CostModel, solve: Any, target: float,
                        floor_units: list[int]) -> tuple[list[int], float]:
    """Tables rank the units; the level is set by timing the shrunk candidate against the dense model.

    Per-layer tables interpolate between measured widths and miss what a kernel does at the widths in
    between (vector-width padding, a change of algorithm) and what the whole model pays besides its layers,
    so each candidate allocation is shrunk (on a copy) and timed round-robin against the dense model. The
    table-level ``aim`` is searched against the measured time: multiplicative steps until the target is
    bracketed, then safeguarded secant steps inside the bracket (the measured time is monotone in ``aim`` but
    far from proportional to it, so plain multiplicative correction can oscillate).
    """
    graph = cost.target.graph
    dense = cost.latency.dense_model
    example = cost.latency_example
    timed_once: dict[tuple[int, ...], float] = {}

    def measure(removed: list[int]) -> float:
        key = tuple(removed)
        if key not in timed_once:
            candidate = copy.deepcopy(dense)
            shrink_model(candidate, graph, keep_masks(gates, ranked, removed))
            timed = compare_latency({"dense": lambda: call_model(dense, example),
                                     "candidate": lambda: call_model(candidate, example)})
            timed_once[key] = timed["candidate"] / timed["dense"]
        return timed_once[key]

    best: tuple[float, list[int], float] | None = None
    lo: tuple[float, float] | None = None  # (aim, measured) at or below the target: fast enough
    hi: tuple[float, float] | None = None  # (aim, measured) above it: too slow

    def secant() -> float:
        """The aim where the line through the bracket ends meets the target, kept off the ends."""
        (a0, g0), (a1, g1) = lo, hi
        aim = a0 + (target - g0) * (a1 - a0) / (g1 - g0) if g1 > g0 else (a0 + a1) / 2
        return min(max(aim, a0 + 0.1 * (a1 - a0)), a1 - 0.1 * (a1 - a0))

    def search(aim: float, rounds: int) -> None:
        nonlocal best, lo, hi
        for _ in range(rounds):
            removed = solve(aim)
            got = measure(removed)
            miss = abs(got - target) / target
            if best is None or miss < best[0]:
                best = (miss, removed, got)
            if miss <= LATENCY_TOLERANCE:
                return
            if got > target:
                hi = (aim, got) if hi is None or aim < hi[0] else hi
            else:
                lo = (aim, got) if lo is None or aim > lo[0] else lo
            if lo is not None and hi is not None:
                if hi[0] - lo[0] < 1e-6:
                    return  # the units allow nothing in between
                aim = secant()
            else:
                aim = min(1.0, max(1e-4, aim * target / got))

    search(target, LATENCY_ROUNDS)
    if lo is None and best[0] > LATENCY_TOLERANCE:  # never fast enough: is the target reachable at all?
        floors = [g.n_units - f for g, f in zip(gates, floor_units)]
        at_floor = measure(floors)
        if at_floor > target * (1 + 2 * LATENCY_TOLERANCE):
            raise ValueError(f"budget latency kept {target:g} cannot be met: with every gate at its floor the "
                             f"model measured {at_floor:.3f} of the dense latency here (the rest is time pruning "
                             "does not change: call overhead, memory-bound layers); ask for a larger budget, lower "
                             "min_keep or time a larger batch (example_inputs)")
        if abs(at_floor - target) / target < best[0]:
            best = (abs(at_floor - target) / target, floors, at_floor)
        if best[0] > LATENCY_TOLERANCE and at_floor <= target:
            floor_aim = cost.kept("latency", floors)
            lo = (floor_aim, at_floor)
            if hi is not None and hi[0] > floor_aim:
                search(secant(), LATENCY_ROUNDS)
    return best[1], best[2]
