"""Allocation: budgets (MACs, parameters, units, latency), the cost model over dependency-graph groups,
importance, and the uniform / global solvers. Works on the unit groups a structured method offers
(:class:`~fermigates.allocation.units.UnitGroup`), never on a method's layers."""

from .allocate import allocate, allocate_share, share_removed
from .budget import Budget, BudgetResult, budget_from, check_min_keep, resolve_allocation, unit_floor
from .cost import CostModel
from .importance import SELECTIONS, consumers, ranked_importance
from .units import Allocatable, UnitGroup, keep_masks

__all__ = [
    "Allocatable", "Budget", "BudgetResult", "CostModel", "SELECTIONS", "UnitGroup", "allocate", "allocate_share",
    "budget_from", "check_min_keep", "consumers", "keep_masks", "ranked_importance", "resolve_allocation",
    "share_removed", "unit_floor",
]
