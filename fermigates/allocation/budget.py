"""Budgets users think in ("keep 50% of the MACs"): what a budget is, what meeting it gave, and the small rules
(floors, rounding, which allocation) every solver shares.

A :class:`Budget` is the fraction of the model's MACs, parameters or structured units that is *kept*.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Budget", "BudgetResult", "budget_from", "resolve_allocation", "check_min_keep"]

_KINDS = ("macs", "params", "units", "latency")
#: the granularities a conversion can gate: single weights, channels / neurons, attention heads, hidden size
GRANULARITIES = ("weight", "channel", "head", "hidden")


def check_sparsity(value: Any, granularities: tuple[str, ...] = GRANULARITIES) -> None:
    """``value`` is a fraction in [0, 1) or a dict of them keyed by granularity."""
    items = value.items() if isinstance(value, dict) else [(None, value)]
    for key, fraction in items:
        if key is not None and key not in granularities:
            raise ValueError(f"target_sparsity keys must be among the granularities {granularities}, got {key!r}")
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction < 1.0:
            raise ValueError(f"target_sparsity must be in [0, 1) (or a dict of such per granularity), got {value!r}")


@dataclass(frozen=True)
class Budget:
    """What a pruned model keeps: exactly one of ``macs``, ``params``, ``units``, ``latency`` as a fraction in
    (0, 1].

    ``Budget(macs=0.5)``: keep 50% of the MACs of one forward pass on the example inputs ("2x fewer MACs");
    ``Budget(params=0.7)``: keep 70% of the parameters; ``Budget(units=0.5)``: keep half of the gated units
    (channels / neurons / heads), allocated across layers; ``Budget(latency=0.5)``: half the measured time of
    one forward on the example inputs on this machine (per-layer latency tables, see
    :mod:`fermigates.allocation.latency`). Strings ``"macs:0.5"`` parse to the same.
    """

    macs: float | None = None
    params: float | None = None
    units: float | None = None
    latency: float | None = None

    def __post_init__(self) -> None:
        given = [(k, getattr(self, k)) for k in _KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"Budget takes exactly one of macs=, params=, units=, latency= (a fraction kept), "
                             f"got {given}")
        kind, value = given[0]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ValueError(f"Budget({kind}=...) must be the fraction kept, a number in (0, 1], got {value!r}")

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) is not None)

    def __str__(self) -> str:
        """``"macs:0.5"``: the form :meth:`parse` reads back (and a YAML recipe holds)."""
        return f"{self.kind}:{self.fraction:g}"

    @property
    def fraction(self) -> float:
        return float(getattr(self, self.kind))

    @classmethod
    def parse(cls, value: "Budget | str | dict") -> "Budget":
        """A :class:`Budget` from itself, ``"macs:0.5"`` or ``{"macs": 0.5}``."""
        if isinstance(value, Budget):
            return value
        if isinstance(value, dict):
            return cls(**value)
        if isinstance(value, str) and value.count(":") == 1:
            kind, number = (s.strip() for s in value.split(":"))
            if kind in _KINDS:
                try:
                    return cls(**{kind: float(number)})
                except ValueError as err:
                    if "fraction kept" in str(err) and "exactly one" not in str(err):
                        raise
        raise ValueError(f"budget must be a fermigates.Budget or a string like 'macs:0.5' / 'params:0.7' / "
                         f"'units:0.5' / 'latency:0.5' (the fraction kept), got {value!r}")


def budget_from(budget: "Budget | str | dict | None", target_sparsity: Any, config: Any, who: str) -> "Budget | None":
    """The budget ``who`` applies: its own ``budget=``, else ``config.budget`` when it was given no
    ``target_sparsity=`` either; both at once is an error."""
    if budget is not None and target_sparsity is not None:
        raise ValueError(f"give {who} either budget= or target_sparsity=, not both (a budget sets each gate's share)")
    if budget is None and target_sparsity is None:
        budget = config.budget
    return None if budget is None else Budget.parse(budget)


@dataclass
class BudgetResult:
    """How a budget was met: requested and predicted fractions, how the cost was counted, units kept."""

    kind: str
    requested: float
    predicted: float
    allocation: str
    selection: str
    #: what the MACs were counted on, e.g. "per forward of input_ids[1, 12] (one sample)"
    counted_on: str
    kept: dict[str, tuple[int, int]] = field(default_factory=dict)  # gate label -> (kept, total)
    #: the fraction measured on the shrunk model (MACs / parameters / latency), filled in by ``prune``
    measured: float | None = None
    #: for a latency budget: the per-layer latency tables and how they were measured
    latency: Any = None

    def __str__(self) -> str:
        got = f", measured {self.measured:.4f}" if self.measured is not None else ""
        return (f"budget {self.kind} kept {self.requested:.4f}: predicted {self.predicted:.4f}{got} "
                f"({self.allocation} allocation, {self.selection} selection; {self.kind} counted {self.counted_on})")


def describe_inputs(example: Any) -> str:
    if isinstance(example, torch.Tensor):
        return f"Tensor{list(example.shape)}"
    if isinstance(example, dict):
        return ", ".join(f"{k}{list(v.shape)}" for k, v in example.items() if isinstance(v, torch.Tensor))
    if isinstance(example, (tuple, list)):
        return ", ".join(describe_inputs(v) for v in example)
    return type(example).__name__


ALLOCATIONS = ("auto", "global", "uniform")


def resolve_allocation(allocation: str, budget: "Budget | None") -> str:
    """``allocation`` made concrete: ``"auto"`` is ``"global"`` for a MAC / parameter / latency budget (units
    ranked across layers by the output error per unit of cost) and ``"uniform"`` for a share of units, as
    measured best on MiniLM and MobileNetV2 (README, budgets)."""
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {', '.join(map(repr, ALLOCATIONS))}, got {allocation!r}")
    if allocation != "auto":
        return allocation
    return "uniform" if budget is None or budget.kind == "units" else "global"


def round_removed(removed: int, n: int, step: int) -> int:
    """Units removed once the kept count is rounded up to a multiple of ``step`` (at most ``n``)."""
    kept = n - removed
    return n - min(n, -(-kept // step) * step) if step > 1 else removed


def unit_floor(n: int, min_keep: float | int, step: int) -> int:
    k = math.ceil(min_keep * n) if isinstance(min_keep, float) else int(min_keep)
    k = max(1, min(n, k))
    return min(n, -(-k // step) * step)


def check_min_keep(min_keep: Any) -> None:
    ok = (isinstance(min_keep, float) and 0 < min_keep <= 1) or (
        isinstance(min_keep, int) and not isinstance(min_keep, bool) and min_keep >= 1)
    if not ok:
        raise ValueError(f"min_keep must be a fraction in (0, 1] or a unit count >= 1 kept by every gate, "
                         f"got {min_keep!r}")
