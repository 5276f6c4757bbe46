"""Budgets users think in ("keep 50% of the MACs"), and how a converted model's units are chosen to meet one.

A :class:`Budget` is the fraction of the model's MACs, parameters or gated units that is *kept*. The cost of
a decision is predicted exactly, without shrinking anything: for every module the MACs (measured once on the
example inputs with :func:`fermigates.count_macs`) and parameters scale with the kept fraction of each of its
channel axes (output rows, input columns, per-channel axis, heads) that the dependency graph's groups touch.

Allocation (:func:`allocate`): every structured gate gets a removal order of its units and a non-decreasing
importance per position; ``"global"`` removes the units of least importance per unit of cost across all gates
(never below each gate's floor ``min_keep``) until the budget is met; ``"uniform"`` removes the same share of
every gate. Importance (``selection``): ``"magnitude"`` is the unit's score over its gate's mean score;
``"obs"`` is the output error its removal causes, relative to the consuming layer's output energy, estimated
from calibration statistics -- greedy Optimal Brain Surgeon on the input Gram matrix when one ``nn.Linear``
consumes the units one column each (MLP neurons), else the activation-aware estimate
``sum_j ||W[:, j]||² E[x_j²]`` over the unit's input columns of every consumer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["Budget", "BudgetResult", "allocate"]

_KINDS = ("macs", "params", "units", "latency")


@dataclass(frozen=True)
class Budget:
    """What a pruned model keeps: exactly one of ``macs``, ``params``, ``units``, ``latency`` as a fraction in
    (0, 1].

    ``Budget(macs=0.5)``: keep 50% of the MACs of one forward pass on the example inputs ("2x fewer MACs");
    ``Budget(params=0.7)``: keep 70% of the parameters; ``Budget(units=0.5)``: keep half of the gated units
    (channels / neurons / heads), allocated across layers; ``Budget(latency=0.5)``: half the measured time of
    one forward on the example inputs on this machine (per-layer latency tables, see
    :mod:`fermigates.latency`). Strings ``"macs:0.5"`` parse to the same.
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


# -- the cost model ---------------------------------------------------------------------------------------------
def _describe_inputs(example: Any) -> str:
    if isinstance(example, torch.Tensor):
        return f"Tensor{list(example.shape)}"
    if isinstance(example, dict):
        return ", ".join(f"{k}{list(v.shape)}" for k, v in example.items() if isinstance(v, torch.Tensor))
    if isinstance(example, (tuple, list)):
        return ", ".join(_describe_inputs(v) for v in example)
    return type(example).__name__


class _CostModel:
    """Predicted MACs / parameters of the model as a function of how many units each gate removes."""

    def __init__(self, model: nn.Module, gates: list, graph: Any, example: Any) -> None:
        from .methods.fermi.layers import weight_axes
        from .methods.fermi.model import gates_open
        from .report import count_parameters
        from .surgery.macs import macs_by_module

        with gates_open(model):
            self.macs_by_module = macs_by_module(model, example)
        self.total_macs = sum(self.macs_by_module.values())
        self.total_params = count_parameters(model)
        self.total_units = sum(g.n_units for g in gates)
        self.latency: Any = None
        self.counted_on = f"per forward of {_describe_inputs(example)}"
        modules = dict(model.named_modules())
        groups = {grp.id: grp for grp in graph.groups}
        # (module, axis) -> total width, and per gate -> [(module, axis, width per unit)]
        self.width: dict[tuple[str, str], int] = {}
        self.touch: list[list[tuple[str, str, int]]] = []
        for gate in gates:
            touches = []
            for member in groups[gate.group_id].members:
                module = modules[member.module]
                axis = {"producer": "out", "consumer": "in", "passthrough": "chan", "attention": "heads"}[member.role]
                if member.role == "passthrough" and member.param is not None:
                    axis = f"param:{member.param}:{member.axis}"
                    total = getattr(module, member.param).shape[member.axis]
                elif axis in ("out", "in"):
                    in_axis, out_axis = weight_axes(module)
                    total = module.weight.shape[out_axis if axis == "out" else in_axis]
                elif axis == "chan":
                    total = (getattr(module, "num_features", None) or getattr(module, "out_channels", None)
                             or module.weight.shape[0])
                else:
                    total = gate.n_units
                self.width[(member.module, axis)] = int(total)
                touches.append((member.module, axis, member.width))
            self.touch.append(touches)
        # parameters of each touched module and the axes each one spans
        self.params: dict[str, list[tuple[int, tuple[str, ...]]]] = {}
        for name in {m for m, _ in self.width}:
            module = modules[name]
            axes = {a for m, a in self.width if m == name}
            entries = []
            for pname, p in module.named_parameters(recurse=False):
                if pname.rsplit(".", 1)[-1] == "mu":
                    continue
                spans: tuple[str, ...] = ()
                if any(a.startswith(f"param:{pname}:") for a in axes):
                    spans = tuple(a for a in axes if a.startswith(f"param:{pname}:"))
                elif "chan" in axes:
                    spans = ("chan",) if p.dim() >= 1 else ()
                elif pname == "weight":
                    spans = tuple(a for a in ("out", "in") if a in axes)
                elif pname == "bias" and "out" in axes:
                    spans = ("out",)
                entries.append((p.numel(), spans))
            self.params[name] = entries

    def _fractions(self, removed: list[int]) -> dict[tuple[str, str], float]:
        lost: dict[tuple[str, str], int] = {}
        for touches, r in zip(self.touch, removed):
            for module, axis, width in touches:
                lost[(module, axis)] = lost.get((module, axis), 0) + r * width
        return {key: 1.0 - lost.get(key, 0) / self.width[key] for key in self.width}

    def measure_latency(self, model: nn.Module, example: Any, steps: list[int], floors: list[int]) -> Any:
        """Per-layer latency tables for the modules the gates change (see :mod:`fermigates.latency`)."""
        from .latency import build_latency_model

        step: dict[tuple[str, str], int] = {}
        floor: dict[tuple[str, str], int] = {}
        for touches, s, f in zip(self.touch, steps, floors):
            for module, axis, width in touches:
                key = (module, axis)
                step[key] = s * width if key not in step else 1
                floor[key] = f * width if key not in floor else 1
        dense = _plain_copy(model)
        self.latency = build_latency_model(dense, example, dict(self.width), step, floor)
        self.latency.dense_model = dense
        self.latency_example = example
        return self.latency

    def kept(self, kind: str, removed: list[int]) -> float:
        """The fraction of ``kind`` kept when gate ``i`` removes ``removed[i]`` units."""
        if kind == "units":
            return 1.0 - sum(removed) / max(self.total_units, 1)
        frac = self._fractions(removed)
        if kind == "latency":
            return self.latency.predict(frac) / max(self.latency.total, 1e-12)
        by_module: dict[str, list[float]] = {}
        for (module, axis), f in frac.items():
            by_module.setdefault(module, []).append(f)
        if kind == "macs":
            lost = 0.0
            for module, fs in by_module.items():
                lost += self.macs_by_module.get(module, 0) * (1.0 - math.prod(fs))
            return 1.0 - lost / max(self.total_macs, 1)
        lost = 0.0
        for module, entries in self.params.items():
            for numel, spans in entries:
                lost += numel * (1.0 - math.prod(frac[(module, a)] for a in spans))
        return 1.0 - lost / max(self.total_params, 1)

    def unit_cost(self, kind: str, i: int) -> float:
        """What removing one unit of gate ``i`` saves, at dense widths (for ranking across gates)."""
        base = [0] * len(self.touch)
        base[i] = 1
        return max(1.0 - self.kept(kind, base), 1e-12)


def _plain_copy(model: nn.Module) -> nn.Module:
    """A copy of a converted model as the plain dense network (no gates, no hook): what it is timed as."""
    import copy

    from .oneshot import _unconvert

    dense = copy.deepcopy(model)
    _unconvert(dense)
    return dense.eval()


def _keep_masks(gates: list, ranked: list, removed: list[int]) -> list[torch.Tensor]:
    masks = []
    for g, (order, _), r in zip(gates, ranked, removed):
        keep = torch.ones(g.n_units, dtype=torch.bool)
        keep[order[:r]] = False
        masks.append(keep)
    return masks


#: a latency budget is re-measured on the shrunk candidate until it lands this close (relative), at most
#: ``LATENCY_ROUNDS`` times (and as many again when the level has to be bracketed by the floor)
LATENCY_TOLERANCE = 0.025
LATENCY_ROUNDS = 6


def _latency_closed_loop(model: nn.Module, gates: list, ranked: list, cost: "_CostModel", solve: Any,
                         target: float, floor_units: list[int]) -> tuple[list[int], float]:
    """Tables rank the units; the level is set by timing the shrunk candidate against the dense model.

    Per-layer tables interpolate between measured widths and miss what a kernel does at the widths in
    between (vector-width padding, a change of algorithm) and what the whole model pays besides its layers,
    so each candidate allocation is shrunk (on a copy) and timed round-robin against the dense model. The
    table-level ``aim`` is searched against the measured time: multiplicative steps until the target is
    bracketed, then safeguarded secant steps inside the bracket (the measured time is monotone in ``aim`` but
    far from proportional to it, so plain multiplicative correction can oscillate).
    """
    import copy

    from .latency import compare_latency
    from .state import fermi_state
    from .surgery.shrink import shrink_model
    from .surgery.verify import call_model

    state = fermi_state(model)
    dense = cost.latency.dense_model
    example = cost.latency_example
    timed_once: dict[tuple[int, ...], float] = {}

    def measure(removed: list[int]) -> float:
        key = tuple(removed)
        if key not in timed_once:
            keep = {g.group_id: m for g, m in zip(gates, _keep_masks(gates, ranked, removed))}
            candidate = copy.deepcopy(dense)
            shrink_model(candidate, state.graph, keep)
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


# -- importance -------------------------------------------------------------------------------------------------
def _consumers(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, Any]]]:
    from .methods.fermi.model import gated_modules

    uses: dict[int, list] = {}
    for name, module in gated_modules(model).items():
        for slot in module._slots:
            uses.setdefault(id(slot.gate), []).append((name, module, slot))
    return uses


def _single_linear(users: list, width: int | None = 1) -> bool:
    """One ``nn.Linear`` consumer whose every input column belongs to one unit (``width`` columns per unit;
    ``None``: more than one, as an attention head's)."""
    if len(users) != 1:
        return False
    _, module, slot = users[0]
    per_unit = slot.index.shape[1]
    return (isinstance(module, nn.Linear) and slot.index.numel() == module.in_features
            and (per_unit > 1 if width is None else per_unit == width))


@torch.no_grad()
def _importance(model: nn.Module, gates: list, floors: list[int], selection: str, batches: list | None,
                ridge: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per gate: ``(removal order of its units, non-decreasing importance at each position)``."""
    from .methods.fermi.model import gates_open

    if selection == "magnitude" or batches is None:
        out = []
        for g in gates:
            score = g.normalised(g.score().detach()).double().cpu()
            order = score.argsort(stable=True)
            out.append((order, score[order]))
        return out
    from .calibration.selection import input_stats, obs_group_removal_order, obs_removal_order, output_energy

    uses = _consumers(model)
    obs_gates = {i for i, g in enumerate(gates) if _single_linear(uses.get(id(g), []))}
    # heads: block OBS on the output projection's columns, on the neurons' scale (globally comparable)
    group_gates = {i for i, g in enumerate(gates) if _single_linear(uses.get(id(g), []), width=None)}
    gram_names = sorted({uses[id(gates[i])][0][0] for i in obs_gates | group_gates})
    moment_names = sorted({name for i, g in enumerate(gates) if i not in obs_gates | group_gates
                           for name, _, _ in uses[id(g)]})
    from .methods.fermi.model import all_gates
    from .state import ReferenceRecord, fermi_state

    state = fermi_state(model)
    if state.collect_grams:  # one-pass calibration fits every Linear consumer from these
        gram_names = sorted({*gram_names, *(name for users in uses.values() for name, module, _ in users
                                            if isinstance(module, nn.Linear))})
    record: list[str] = []
    if state.record_reference:
        from .calibration.ridge import is_supported

        record = sorted({name for users in uses.values() for name, _, _ in users})
        if state.record_reference == "all":
            record = [name for name, m in model.named_modules() if is_supported(m) or name in record]
    residuals = {}
    if record:
        from fermigates.converters import residual_sources

        from .calibration.engine import residual_key

        residuals = {residual_key(n): src for n, src in residual_sources(model).items() if n in record}
    with gates_open(model):
        grams, moments, outputs = input_stats(model, batches, gram_names, moment_names, record=record,
                                              record_inputs=residuals)
    if state.collect_grams:
        state.selection_grams = grams
    if outputs is not None:
        gate_list = list(all_gates(model))
        state.reference_record = ReferenceRecord(list(batches), outputs,
                                                 ReferenceRecord.tensor_versions(model, gate_list))
    # OBS costs are squared output errors per calibration row, comparable across layers (measured on MiniLM:
    # better global allocations than costs relative to each layer's own output); one scale for all of them,
    # the mean output energy of their layers, puts them near the activation-aware scores' (energy fractions)
    searched = [uses[id(gates[i])][0] for i in sorted(obs_gates | group_gates)]
    scale = max(sum(output_energy(m, grams[n]) for n, m, _ in searched) / max(len(searched), 1), 1e-30)
    out = []
    for i, g in enumerate(gates):
        users = uses[id(g)]
        if i in obs_gates:
            name, module, slot = users[0]
            n_remove = g.n_units - floors[i]
            cols, cost = obs_removal_order(module, grams[name], n_remove, ridge=ridge)
            unit_of = torch.empty(module.in_features, dtype=torch.long)
            unit_of[slot.index[:, 0].cpu()] = torch.arange(g.n_units)
            removed = unit_of[cols.cpu()]
            rest = torch.ones(g.n_units, dtype=torch.bool)
            rest[removed] = False
            order = torch.cat([removed, rest.nonzero().flatten()])
            value = torch.cat([cost / scale, torch.full((int(rest.sum()),), float("inf"), dtype=torch.float64)])
        elif i in group_gates:
            name, module, slot = users[0]
            removed, cost = obs_group_removal_order(module, grams[name], slot.index.cpu(), g.n_units - floors[i],
                                                    ridge=ridge)
            rest = torch.ones(g.n_units, dtype=torch.bool)
            rest[removed] = False
            order = torch.cat([removed, rest.nonzero().flatten()])
            value = torch.cat([cost / scale, torch.full((int(rest.sum()),), float("inf"), dtype=torch.float64)])
        else:
            value = torch.zeros(g.n_units, dtype=torch.float64)
            for name, module, slot in users:
                w = module.weight.detach()
                in_axis = module._in_axis
                col = w.movedim(in_axis, 0).reshape(w.shape[in_axis], -1).double().square().sum(1)
                energy = col * moments[name].double().to(col.device)
                value += (energy[slot.index.reshape(-1)].reshape(slot.index.shape).sum(1)
                          / energy.sum().clamp_min(1e-30)).cpu()
            order = value.argsort(stable=True)
            value = value[order]
        out.append((order, torch.cummax(value, 0).values))
    return out


# -- allocation -------------------------------------------------------------------------------------------------
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


def _round_removed(removed: int, n: int, step: int) -> int:
    """Units removed once the kept count is rounded up to a multiple of ``step`` (at most ``n``)."""
    kept = n - removed
    return n - min(n, -(-kept // step) * step) if step > 1 else removed


def _floor(n: int, min_keep: float | int, step: int) -> int:
    k = math.ceil(min_keep * n) if isinstance(min_keep, float) else int(min_keep)
    k = max(1, min(n, k))
    return min(n, -(-k // step) * step)


def _check_min_keep(min_keep: Any) -> None:
    ok = (isinstance(min_keep, float) and 0 < min_keep <= 1) or (
        isinstance(min_keep, int) and not isinstance(min_keep, bool) and min_keep >= 1)
    if not ok:
        raise ValueError(f"min_keep must be a fraction in (0, 1] or a unit count >= 1 kept by every gate, "
                         f"got {min_keep!r}")


def _solve(kind: str, target: float, allocation: str, gates: list, steps: list[int], floors: list[int],
           cost: "_CostModel", ranked: list) -> list[int]:
    """Units each gate removes so that the predicted ``kind`` kept is closest to ``target``."""
    def removed_for(raw: list[int]) -> list[int]:
        return [min(_round_removed(r, g.n_units, s), g.n_units - f)
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


@torch.no_grad()
def allocate(
    model: nn.Module,
    budget: Budget | str,
    *,
    example_inputs: Any,
    data: list | None = None,
    allocation: str = "global",
    selection: str = "obs",
    min_keep: float | int = 0.1,
    ridge: float = 1e-2,
) -> BudgetResult:
    """Choose which units every structured gate of a converted ``model`` keeps to meet ``budget``, and freeze
    that choice (``gate.decided``): ``convert_from_fermi`` then bakes and shrinks exactly it.

    ``allocation``: ``"global"`` (units ranked across gates by importance per unit of cost), ``"uniform"``
    (the same share of every gate) or ``"auto"`` (see :func:`resolve_allocation`). ``selection``: ``"obs"``
    (needs ``data``: calibration batches) or ``"magnitude"``. ``min_keep``: every gate keeps at least this fraction (float) or count (int) of its
    units, and never fewer than one. The budget is met as closely as the units allow (within 2% for models
    with more than a few dozen units); the result says what was predicted.
    """
    from .methods.fermi.model import _distinct_gates
    from .state import fermi_state

    budget = Budget.parse(budget)
    allocation = resolve_allocation(allocation, budget)
    if selection not in ("obs", "magnitude"):
        raise ValueError(f"selection must be 'obs' or 'magnitude', got {selection!r}")
    _check_min_keep(min_keep)
    state = fermi_state(model)
    gates = [g for g, owner in _distinct_gates(model) if owner is None and getattr(g, "group_id", None) is not None]
    if not gates:
        raise ValueError("a budget needs channel or head gates: convert with granularity 'channel' and/or 'head' "
                         "(nothing prunable was found otherwise; see fermigates.summary(model))")
    steps = [max(1, int(getattr(g, "round_to", 1))) for g in gates]
    floors = [_floor(g.n_units, min_keep, s) for g, s in zip(gates, steps)]
    cost = _CostModel(model, gates, state.graph, example_inputs)
    kind, target = budget.kind, budget.fraction
    if kind == "latency":
        cost.measure_latency(model, example_inputs, steps, floors)
    ranked = _importance(model, gates, floors, selection, data, ridge)

    floor_kept = cost.kept(kind, [g.n_units - f for g, f in zip(gates, floors)])
    if kind != "latency" and floor_kept > target * 1.02:  # a latency floor is checked by timing it
        raise ValueError(f"budget {kind} kept {target:g} cannot be met: with every gate at its floor "
                         f"(min_keep={min_keep!r}) the model keeps {floor_kept:.4f} of its {kind}; prune more "
                         f"granularities, lower min_keep or ask for a larger budget")
    def solve(aim: float) -> list[int]:
        return _solve(kind, aim, allocation, gates, steps, floors, cost, ranked)

    removed = solve(target)
    measured = None
    if kind == "latency":
        removed, measured = _latency_closed_loop(model, gates, ranked, cost, solve, target, floors)
    predicted = cost.kept(kind, removed)
    counted = {"macs": cost.counted_on, "params": "over the whole model", "units": "over the gated units",
               "latency": f"per forward of {_describe_inputs(example_inputs)} on this machine, "
                          f"{getattr(cost.latency, 'measured_on', '')}"}[kind]
    result = BudgetResult(kind, target, predicted, allocation, selection, counted,
                          latency=cost.latency if kind == "latency" else None)
    result.measured = measured
    for g, (order, _), r in zip(gates, ranked, removed):
        keep = torch.ones(g.n_units, dtype=torch.bool)
        keep[order[:r]] = False
        g.decided = None
        g.decided = keep.to(g.mu.device)
        result.kept[getattr(g, "label", str(g.group_id))] = (g.n_units - r, g.n_units)
    return result


@torch.no_grad()
def select_share(model: nn.Module, data: list, *, ridge: float = 1e-2) -> int:
    """Keep, in every structured gate, as many units as its current hard decision keeps, chosen by OBS /
    activation-aware importance instead of by score; freezes the choice. Returns the number of gates."""
    from .methods.fermi.model import _distinct_gates

    gates = [g for g, owner in _distinct_gates(model) if owner is None and getattr(g, "group_id", None) is not None]
    counts = [int(g.keep(g.score()).sum()) for g in gates]
    floors = [max(c, 1) for c in counts]
    ranked = _importance(model, gates, floors, "obs", data, ridge)
    for g, (order, _), c in zip(gates, ranked, counts):
        keep = torch.ones(g.n_units, dtype=torch.bool)
        keep[order[: g.n_units - c]] = False
        g.decided = None
        g.decided = keep.to(g.mu.device)
    return len(gates)
