"""Temperature and sparsity schedules, and ``FermiAnnealer``, the optimizer wrapper that applies them.

After every optimizer step the annealer

1. sets ``T`` on every gate from the temperature schedule (linear, exponential or cosine), and
2. steers each gate's learned ``mu`` into a band around the threshold that removes the scheduled fraction of
   its units: ``mu`` is clamped between the score quantiles at ``s(t) - b(t)`` and ``s(t) + b(t)``. Inside
   the band ``mu`` moves with its gradients; the band ``b(t)`` narrows to zero when the sparsity ramp ends,
   so the run ends exactly at the requested sparsity. ``s(t)`` follows its own schedule, by default the
   cubic one of gradual pruning (Zhu & Gupta, 2017).
3. from ``hard_after`` (by default where the ramp ends) every gate's decision is **frozen**: the gates apply
   their hard 0/1 decision in every forward, and the network trains for the rest of the run as exactly the
   model that :func:`fermigates.convert_from_fermi` will bake (the final fine-tuning phase of gradual
   pruning). No unit is left undecided at the end, whatever the temperature.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from ...allocation.budget import (
    Budget,
    BudgetResult,
    budget_from,
    check_min_keep,
    check_sparsity,
    resolve_allocation,
    unit_floor,
)
from ...allocation.cost import CostModel
from ...allocation.importance import magnitude
from ...allocation.solve import solve
from ...core.batches import (
    as_batches,
    call_model,
    check_batches_finite,
    max_relative_diff,
    output_tensors,
)
from ...core.state import get_state
from ...core.wrapping import WrappingOptimizer
from .gates import check_temperature, kth_quantile
from .lagrangian import LagrangianSteer
from .model import (
    all_gates,
    allocatable,
    distinct_gates,
    gate_scores,
    hard_gates,
    soft_probabilities,
    structured_gates,
    undecided_units,
    unit_groups,
)
from .prior import INITS, resolve_init, set_rank_prior
from .ranking import IMPORTANCES, Ranked, TaylorTracker, obs_ranking, write_orders
from .refit import InputRecorder, calibrate_decisions, open_reference

TEMPERATURE_SCHEDULES = ("linear", "exponential", "cosine")
SPARSITY_SCHEDULES = ("cubic", "linear", "constant")
STEERS = ("band", "lagrangian")


def temperature_at(progress: float, start: float, end: float, schedule: str = "exponential") -> float:
    """Temperature after ``progress`` (0..1) of the run."""
    p = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        return start + (end - start) * p
    if schedule == "exponential":
        return start * (end / start) ** p
    if schedule == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * p))
    raise ValueError(f"schedule must be one of {TEMPERATURE_SCHEDULES}, got {schedule!r}")


def sparsity_at(progress: float, final: float, schedule: str = "cubic", initial: float = 0.0) -> float:
    """Scheduled fraction of units removed after ``progress`` (0..1) of the sparsity ramp."""
    p = min(max(progress, 0.0), 1.0)
    if schedule == "cubic":
        return final + (initial - final) * (1.0 - p) ** 3
    if schedule == "linear":
        return initial + (final - initial) * p
    if schedule == "constant":
        return final
    raise ValueError(f"sparsity_schedule must be one of {SPARSITY_SCHEDULES}, got {schedule!r}")


@dataclass
class AnnealSchedule:
    """Everything that decides ``T`` and the sparsity band at a given step.

    ``ramp`` is the fraction of ``total_steps`` by whose end sparsity has risen and the band has narrowed;
    afterwards the target is held (the rest of the run fine-tunes at the final sparsity). The rise starts after
    ``ramp_start`` of the run (default 0; the annealer sets it when it first records the inputs it ranks on). ``tolerance`` is the half-width of
    the band, in sparsity points, at the start of the ramp. ``hard_after`` is the fraction of the run after
    which decisions are frozen and the gates are hard (None: where the ramp ends; 1.0: never during the run).
    """

    total_steps: int
    temperature: tuple[float, float] = (1.0, 0.01)
    schedule: str = "exponential"
    target_sparsity: float | dict[str, float] = 0.5
    sparsity_schedule: str = "cubic"
    initial_sparsity: float = 0.0
    ramp: float = 0.25
    tolerance: float = 0.05
    hard_after: float | None = None
    ramp_start: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.total_steps, int) or isinstance(self.total_steps, bool) or self.total_steps < 1:
            raise ValueError(f"total_steps must be a positive int, got {self.total_steps!r}")
        if not isinstance(self.temperature, (tuple, list)) or len(self.temperature) != 2:
            raise ValueError(f"temperature must be a pair (T_start, T_end), got {self.temperature!r}")
        self.temperature = (
            check_temperature(self.temperature[0], "temperature[0] (T_start)"),
            check_temperature(self.temperature[1], "temperature[1] (T_end)"),
        )
        temperature_at(0.0, *self.temperature, self.schedule)
        sparsity_at(0.0, 0.0, self.sparsity_schedule)
        check_sparsity(self.target_sparsity)
        if not 0.0 <= self.initial_sparsity < 1.0:
            raise ValueError(f"initial_sparsity must be in [0, 1), got {self.initial_sparsity!r}")
        if not 0.0 < self.ramp <= 1.0:
            raise ValueError(f"ramp must be in (0, 1], got {self.ramp!r}")
        if not (isinstance(self.ramp_start, (int, float)) and 0.0 <= self.ramp_start < self.ramp):
            raise ValueError(f"ramp_start must be in [0, ramp) = [0, {self.ramp}), got {self.ramp_start!r}")
        if not 0.0 <= self.tolerance < 1.0:
            raise ValueError(f"tolerance must be in [0, 1), got {self.tolerance!r}")
        if self.hard_after is not None and not (isinstance(self.hard_after, (int, float))
                                                and self.ramp <= self.hard_after <= 1.0):
            raise ValueError(f"hard_after must be None or in [ramp, 1] = [{self.ramp}, 1] (decisions freeze after "
                             f"the sparsity ramp), got {self.hard_after!r}")

    @property
    def hard_step(self) -> int:
        """The first step at which decisions are frozen (``total_steps + 1``: never during the run)."""
        frac = self.ramp if self.hard_after is None else self.hard_after
        return self.total_steps + 1 if frac >= 1.0 else max(1, math.ceil(frac * self.total_steps))

    def temperature_at(self, step: int) -> float:
        return temperature_at(step / self.total_steps, *self.temperature, self.schedule)

    def final_sparsity(self, kind: str | None = None) -> float:
        """The target of gates of ``kind`` ("weight", "channel", "head"); the largest one if None."""
        if not isinstance(self.target_sparsity, dict):
            return float(self.target_sparsity)
        if kind is None:
            return max(self.target_sparsity.values(), default=0.0)
        return float(self.target_sparsity.get(kind, 0.0))

    def sparsity_at(self, step: int, kind: str | None = None, final: float | None = None) -> float:
        progress = self.ramp_progress(step)
        final = self.final_sparsity(kind) if final is None else final
        return sparsity_at(progress, final, self.sparsity_schedule, min(self.initial_sparsity, final))

    @staticmethod
    def gate_final(gate: nn.Module) -> float | None:
        """The share a budget assigned to this gate (see ``FermiAnnealer(budget=...)``), or None."""
        return getattr(gate, "budget_share", None)

    def ramp_progress(self, step: int) -> float:
        """How far the sparsity ramp is at ``step``: 0 until ``ramp_start``, 1 from its end on."""
        start, end = self.ramp_start * self.total_steps, self.ramp * self.total_steps
        return min(max((step - start) / (end - start), 0.0), 1.0)

    def band_at(self, step: int) -> float:
        return self.tolerance * (1.0 - self.ramp_progress(step))

    @torch.no_grad()
    def apply(self, model: nn.Module, step: int, clamp: bool = True) -> None:
        """Set ``T`` and clamp ``mu`` of every gate of ``model`` for ``step`` (``clamp=False``: during the ramp
        only ``T``; the levels are steered otherwise, e.g. by a Lagrangian)."""
        temperature, band = self.temperature_at(step), self.band_at(step)
        if step >= self.hard_step:
            for gate, owner in distinct_gates(model):
                gate.set_temperature(temperature)
                if gate.decided is None:
                    raw = owner.weight.detach().abs() if owner is not None else gate.score().detach()
                    final = self.gate_final(gate)
                    pin_to_quantile(gate, gate.normalised(raw.float().flatten()),
                                     self.final_sparsity(gate.kind) if final is None else final)
                    gate.decided = gate.keep(raw).clone()
            return
        for gate in all_gates(model):
            gate.decided = None  # a resumed or rewound run decides again when it gets there
        for gate, scores in gate_scores(model):
            gate.set_temperature(temperature)
            if not clamp:
                continue
            target = self.sparsity_at(step, gate.kind, self.gate_final(gate))
            if band > 0:
                probe = _probe(gate, scores)
                lo = kth_quantile(probe, target - band) if target - band > 0 else -math.inf
                hi = kth_quantile(probe, target + band) if target + band < 1 else math.inf
                gate.mu.clamp_(lo, hi)
            else:
                pin_to_quantile(gate, scores, target)


#: how many times a budget is re-allocated across the gates (from the current scores) before decisions freeze
BUDGET_UPDATES = 20


class BudgetSteer:
    """Per-gate shares that meet a MAC / parameter / unit budget, from the gates' current normalised scores."""

    def __init__(self, model: nn.Module, budget: Any, allocation: str, min_keep: float, example: Any,
                 ranked: Ranked | None = None) -> None:
        self.budget = Budget.parse(budget)
        if self.budget.kind == "latency":
            raise ValueError("FermiAnnealer(budget=) takes 'macs', 'params' or 'units': a latency budget is measured "
                             "on shrunk candidates, which fermigates.prune does")
        if allocation not in ("global", "uniform"):
            raise ValueError(f"allocation must be 'auto', 'global' or 'uniform', got {allocation!r}")
        check_min_keep(min_keep)
        state = get_state(model)
        self.model, self.allocation = model, allocation
        target = allocatable(model)
        self.gates = target.groups
        example = state.example_inputs if example is None else example
        if example is None and self.budget.kind == "macs":
            raise ValueError("a MAC budget needs example inputs: pass example_inputs= to FermiAnnealer or to "
                             "convert_to_fermi")
        self.steps = [g.step for g in self.gates]
        self.floors = [unit_floor(g.n_units, min_keep, st) for g, st in zip(self.gates, self.steps)]
        self.cost = CostModel(target, example)
        self.result: Any = None
        #: the one-shot pruner's importance (OBS on calibration data) when the annealer has it: what a global
        #: allocation compares across gates, as ``prune`` does; else the gates' normalised scores
        self.ranked = ranked
        kind, fraction = self.budget.kind, self.budget.fraction
        floor_kept = self.cost.kept(kind, [g.n_units - f for g, f in zip(self.gates, self.floors)])
        if floor_kept > fraction * 1.02:
            raise ValueError(f"budget {kind} kept {fraction:g} cannot be met: with every gate at its floor "
                             f"(min_keep={min_keep!r}) the model keeps {floor_kept:.4f} of its {kind}")

    def maybe_update(self, step: int, hard_step: int) -> None:
        """Re-allocate at ``BUDGET_UPDATES`` points of the ramp (and on the first call, e.g. after a resume),
        never once the decisions are frozen."""
        if step >= hard_step:
            return
        every = max(1, hard_step // BUDGET_UPDATES)
        if step % every == 0 or step == hard_step - 1 or self.result is None:
            self.update()

    @torch.no_grad()
    def update(self, ranked: Ranked | None = None) -> None:
        """Re-allocate from ``ranked`` (an importance ranking of every gate's units, e.g. refreshed OBS), else from
        the ranking given at construction, else from the gates' current normalised scores."""
        if ranked is not None:
            self.ranked = ranked
        groups = unit_groups(self.model)
        ranked = magnitude(groups) if self.ranked is None else self.ranked
        kind, fraction = self.budget.kind, self.budget.fraction
        removed = solve(kind, fraction, self.allocation, groups, self.steps, self.floors, self.cost, ranked)
        selection = "magnitude (scores)" if self.ranked is None else "obs (calibration data)"
        result = BudgetResult(kind, fraction, self.cost.kept(kind, removed), self.allocation, selection,
                              self.cost.counted_on if kind == "macs" else "over the whole model"
                              if kind == "params" else "over the gated units")
        by_id = {g.group_id: g for g, owner in distinct_gates(self.model) if owner is None}
        for group, r in zip(groups, removed):
            by_id[group.id].budget_share = (r + 0.5) / group.n_units if r else 0.0  # floor(share * n) == r exactly
            result.kept[group.label] = (group.n_units - r, group.n_units)
        self.result = result
        get_state(self.model).budget_result = result  # the bake reports it


#: ``FermiAnnealer(calibrate=...)``: ``"auto"`` (``"ramp"`` with calibration data, channel / head gates and a cold
#: start, else never), never, when the decisions freeze, or also at points of the ramp
CALIBRATE = ("auto", None, "freeze", "ramp")
#: ``calibrate="auto"`` calibrates on the ramp only from this starting temperature down: warmer, nearly every unit
#: is soft while the sparsity ramps (P about 0.5), so the hard decisions it fits are not the network being trained
#: (measured: docs/anneal-ablations.md)
COLD_START = 0.01
#: ``FermiAnnealer(calibrate_toward=...)``: the original network (as the annealer found it), the current weights
#: with every gate open, the gated model as trained
CALIBRATE_TOWARD = ("dense", "open", "trained")
#: ``fine_tune``'s annealer options when it distils toward the original network: cut at the first step by the
#: one-shot order and allocation, ridge-calibrate the layers that lost inputs toward the original, train the cut
#: model. Toward its own original network the one-shot order is already the target's and a soft phase only loses
#: what the closed-form calibration gives (measured on MiniLM: docs/anneal-ablations.md)
CUT_FIRST: dict = {"temperature": (1e-4, 1e-4), "sparsity_schedule": "constant", "ramp": 0.01, "calibrate": "freeze",
                   "calibrate_toward": "dense"}
#: with ``calibrate="ramp"``, how many times the layers that lost inputs are re-fitted before the freeze
RAMP_CALIBRATIONS = 4
#: without calibration data, the annealer keeps the inputs of this many training forwards to rank and calibrate on
RECORD_BATCHES = 8

#: how many times during the ramp each ``importance`` re-ranks the units (an OBS ranking costs a forward pass
#: over the calibration data; a Taylor ranking is free)
RERANKS = {"obs": 4, "taylor": 10}


#: above this many units the band edges are read from a fixed random sample of the scores (exact quantiles of
#: millions of weights at every step would cost more than the training step); the final target is exact.
PROBE_SIZE = 65_536


def _probe(gate: nn.Module, scores: torch.Tensor) -> torch.Tensor:
    n = scores.numel()
    if n <= PROBE_SIZE:
        return scores
    index = getattr(gate, "_probe_index", None)
    if index is None:  # a gate's unit count never changes while it is converted
        generator = torch.Generator().manual_seed(n)  # deterministic: a resumed run draws the same sample
        index = torch.randperm(n, generator=generator)[:PROBE_SIZE].to(scores.device)
        gate._probe_index = index
    return scores[index]


def pin_to_quantile(gate: nn.Module, scores: torch.Tensor, target: float) -> None:
    """Put ``mu`` where ``floor(target * n)`` units fall below it; left alone if it is there already
    (checked in O(n), so the exact O(n) selection runs only when the weights moved a unit across)."""
    n = scores.numel()
    k = min(int(math.floor(target * n)), n - 1)
    mu = gate.mu.float()
    below = int((scores < mu).sum())
    if below == k or (below < k and int((scores <= mu).sum()) > k):  # exact, or mu sits on tied scores
        return
    gate.mu.fill_(float(scores.kthvalue(k + 1).values))


def sparsity_loss(model: nn.Module, schedule: AnnealSchedule, step: int, weight: float = 1.0) -> torch.Tensor:
    """The annealer's regulariser at ``step`` (see :meth:`FermiAnnealer.sparsity_loss`)."""
    total, count = None, 0
    if step < schedule.hard_step:
        for gate, p in soft_probabilities(model):
            target_density = 1.0 - schedule.sparsity_at(step, gate.kind)
            excess = torch.relu(p.float().mean() - target_density) * p.numel()
            total = excess if total is None else total + excess
            count += p.numel()
    if total is None:
        return torch.zeros(())
    return weight * total / count


@torch.no_grad()
def anneal_stats(model: nn.Module, schedule: AnnealSchedule, step: int) -> dict[str, float]:
    """Step, temperature, scheduled and actual sparsity, undecided units, whether decisions are frozen."""
    kept = total = 0
    scheduled, steered = 0.0, False
    for gate, owner in distinct_gates(model):
        keep = gate.keep(owner.weight.abs() if owner is not None else gate.score())
        kept += int(keep.sum())
        total += keep.numel()
        share = schedule.gate_final(gate)
        steered = steered or share is not None
        scheduled += keep.numel() * schedule.sparsity_at(step, gate.kind, share)
    return {
        "step": step,
        "temperature": schedule.temperature_at(step),
        # with a budget every gate has its own share: the scheduled fraction of all gated units
        "target_sparsity": scheduled / max(total, 1) if steered else schedule.sparsity_at(step),
        "sparsity": 1.0 - kept / max(total, 1),
        "undecided": undecided_units(model),
        "decided": float(step >= schedule.hard_step),
    }


def _is_sharded(p: torch.Tensor) -> bool:
    """A DTensor parameter (FSDP2 ``fully_shard`` / tensor parallel) holds only a shard of the weight."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(p, DTensor)


def _gate_tensors(gate: nn.Module, what: str) -> list[torch.Tensor]:
    params = [p for p in (gate.mu, gate.mu_offset) if p is not None]
    return [p.detach() if what == "data" else p.grad for p in params if what == "data" or p.grad is not None]


def _check_finite(gates: list, what: str, step: int) -> None:
    """Raise if a gate's Fermi level (``what="data"``) or its gradient (``"grad"``) is NaN / inf."""
    values = [t.flatten() for g in gates for t in _gate_tensors(g, what)]
    if not values or bool(torch.isfinite(torch.cat(values)).all()):
        return
    bad = next(g for g in gates if not all(bool(torch.isfinite(t).all()) for t in _gate_tensors(g, what)))
    name = getattr(bad, "label", None) or f"{bad.kind} gate ({bad.n_units} units)"
    if what == "grad":
        raise FloatingPointError(
            f"FermiAnnealer step {step}: the gradient of {name} is NaN/inf (the loss was NaN/inf); the step was "
            "refused and nothing changed: lower the learning rate or check the batch")
    raise FloatingPointError(f"FermiAnnealer step {step}: the Fermi level of {name} became NaN/inf in the "
                             "optimizer step; lower the learning rate or exclude the gates from weight decay")


def _check_init(init: str, calibration_data: Any) -> None:
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if init == "obs" and calibration_data is None:
        raise ValueError("init='obs' ranks the units on calibration inputs: pass calibration_data= (a few "
                         "batches of training inputs)")


def calibration_batches(calibration_data: Any) -> list | None:
    """``calibration_data`` as checked batches (None stays None)."""
    if calibration_data is None:
        return None
    batches = as_batches(calibration_data, 64, None, "calibration_data")
    check_batches_finite(batches, "calibration_data")
    return batches


def set_start(model: nn.Module, init: str, calibration_data: Any, min_keep: float,
              ranked: Ranked | None = None, progress: bool = False) -> list[torch.Tensor]:
    """Apply ``init`` (see ``FermiAnnealer``); the per-unit levels it created, for the optimizer. ``ranked``: the
    OBS ranking of the calibration data when already computed; ``progress``: bars while it is computed."""
    _check_init(init, calibration_data)
    init = resolve_init(model, init, calibration_data)
    if init == "scores":
        return []
    check_min_keep(min_keep)
    batches = calibration_data if ranked is not None else calibration_batches(calibration_data)
    return set_rank_prior(model, batches, min_keep, ranked=ranked, progress=progress)


def _move_to_own_group(optimizer: Optimizer, params: list[torch.Tensor], lr: float) -> None:
    """Take ``params`` out of the optimizer's groups and give them a group of their own (``lr``, no weight decay)."""
    ids = {id(p) for p in params}
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in ids]
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
    optimizer.add_param_group({"params": list(params), "lr": lr, "weight_decay": 0.0})


def _add_params(optimizer: Optimizer, params: list[torch.Tensor]) -> None:
    """Give ``optimizer`` the per-unit levels in a group of their own without weight decay (taken out of the
    groups that hold them already: a model whose state dict brought its levels along before the optimizer was
    built gets the same groups as the run it resumes)."""
    if not params:
        return
    ids = {id(p) for p in params}
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in ids]
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
    optimizer.add_param_group({"params": list(params), "weight_decay": 0.0})


def _record_steps(schedule: AnnealSchedule) -> int:
    """Training steps whose inputs are recorded (and ranked on) before the sparsity rises, when there is no
    calibration data: 10% of the ramp, at least 1 and at most :data:`RECORD_BATCHES`."""
    return min(RECORD_BATCHES, max(1, round(0.1 * schedule.ramp * schedule.total_steps)))


class AnnealControl:
    """What an anneal does around the optimizer's steps, shared by :class:`FermiAnnealer` and the Trainer callback:
    where each channel / head gate's units start (``init``), how they are ranked and steered while the sparsity
    ramps (``importance``, ``steer``, a ``budget``), and the calibration when the decisions freeze
    (``calibrate``). The arguments are :class:`FermiAnnealer`'s.

    Everything that can refuse the arguments runs before the model is changed. ``levels`` are the per-unit Fermi
    levels it created, for the optimizer. :meth:`bind` attaches the schedule (known later in a Trainer):
    without calibration data it then records the inputs of the first training forwards to rank on.
    """

    def __init__(self, model: nn.Module, *, budget: Any, allocation: str, min_keep: float, example_inputs: Any,
                 init: str, calibration_data: Any, importance: str, steer: str,
                 calibrate: str | None, calibrate_toward: str, schedule: AnnealSchedule | None = None,
                 progress: bool = False, temperature: tuple[float, float] | None = None) -> None:
        _check_init(init, calibration_data)
        if importance not in IMPORTANCES:
            raise ValueError(f"importance must be one of {IMPORTANCES}, got {importance!r}")
        if calibrate not in CALIBRATE:
            raise ValueError(f"calibrate must be one of {CALIBRATE}, got {calibrate!r}")
        if calibrate_toward not in CALIBRATE_TOWARD:
            raise ValueError(f"calibrate_toward must be one of {CALIBRATE_TOWARD}, got {calibrate_toward!r}")
        if steer not in STEERS:
            raise ValueError(f"steer must be one of {STEERS}, got {steer!r}")
        check_min_keep(min_keep)
        structured = bool(structured_gates(model))
        if calibrate == "auto":  # measured with a cold start: +2.6 pt cosine on MiniLM, level on MobileNetV2
            t_start = (schedule.temperature if schedule is not None else temperature or (1.0,))[0]
            cold = isinstance(t_start, (int, float)) and t_start <= COLD_START
            calibrate = "ramp" if structured and calibration_data is not None and cold else None
        if (importance != "magnitude" or calibrate) and not structured:
            raise ValueError("importance= and calibrate= act on channel and head gates: convert with "
                             "granularity 'channel' and/or 'head'")
        self.model, self.init, self.importance, self.steer = model, init, importance, steer
        self.calibrate, self.calibrate_toward = calibrate, calibrate_toward
        #: the original network, the calibration's reference with ``calibrate_toward="dense"``
        self.original = open_reference(model) if calibrate and calibrate_toward == "dense" else None
        self.min_keep = min_keep
        # without calibration data the inputs of the first training forwards stand in for it (see bind)
        self.may_record = structured and calibration_data is None and (
            init == "auto" or importance == "obs" or calibrate is not None) and (
            schedule is None or _record_steps(schedule) < schedule.ramp * schedule.total_steps)
        wants_obs = structured and calibration_data is not None and (
            resolve_init(model, init, calibration_data) == "obs" or importance == "obs" or budget is not None)
        batches = calibration_batches(calibration_data) if (wants_obs or calibrate) else None
        # one pass serves all three
        ranked = obs_ranking(model, batches, min_keep, progress=progress) if wants_obs else None
        if allocation == "auto":  # global by the one-shot importance where there is one (prune's rule), else uniform
            ranks = wants_obs or self.may_record
            allocation = resolve_allocation("auto", Budget.parse(budget)) if budget is not None and ranks \
                else "uniform"
        self.budget = None if budget is None else BudgetSteer(model, budget, allocation, min_keep, example_inputs,
                                                               ranked=ranked)
        self.levels = set_start(model, init, batches if wants_obs else calibration_data, min_keep, ranked=ranked)
        if (importance != "magnitude" or (self.may_record and init == "auto")) and not self.levels:
            # re-ranking (or a start ranked on recorded inputs) writes into per-unit levels, zero until then
            self.levels = [g.add_unit_levels().requires_grad_(True) for g in structured_gates(model)]
        self.batches: list | None = batches
        self.recorder: InputRecorder | None = None
        self.late_start = False
        self.record_steps = 0
        self.tracker = TaylorTracker(model) if importance == "taylor" else None
        self.lagrangian = LagrangianSteer() if steer == "lagrangian" else None
        self.schedule: AnnealSchedule | None = None
        #: the calibration reports of ``calibrate``, one per calibration (the last one: at the freeze)
        self.calibrations: list = []
        if schedule is not None:
            self.bind(schedule)

    def bind(self, schedule: AnnealSchedule) -> None:
        """Attach the schedule. Without calibration data, when the ramp is long enough, the sparsity starts rising
        only after the inputs of ``min(8, 10% of the ramp)`` training steps have been recorded and ranked on."""
        self.schedule = schedule
        steps = _record_steps(schedule)
        if self.may_record and steps < schedule.ramp * schedule.total_steps:
            schedule.ramp_start = max(schedule.ramp_start, steps / schedule.total_steps)
            self.record_steps = max(steps, math.floor(schedule.ramp_start * schedule.total_steps))
            self.recorder = InputRecorder(self.model, RECORD_BATCHES)
            self.batches = self.recorder.batches
            self.late_start = self.init == "auto"
        elif self.importance == "obs" and self.batches is None:
            raise ValueError("importance='obs' re-ranks the units on calibration inputs: pass calibration_data= (a "
                             "few batches of training inputs)")

    @property
    def budget_result(self) -> Any:
        return None if self.budget is None else self.budget.result

    def _targets(self, step: int) -> list[float]:
        s = self.schedule
        return [s.sparsity_at(step, gate.kind, s.gate_final(gate)) for gate, _ in distinct_gates(self.model)]

    def steer_to(self, step: int) -> None:
        """Rank and steer for ``step`` (before the model is annealed to it)."""
        hard = self.schedule.hard_step
        if self.late_start and step >= self.record_steps and self.batches:
            self.late_start = False  # the start calibration data would have given, on the recorded inputs
            ranked = obs_ranking(self.model, list(self.batches), self.min_keep)
            write_orders(structured_gates(self.model), ranked)
            if self.budget is not None:
                self.budget.update(ranked)
        if self.importance != "magnitude" and 0 < step < hard and step % max(1, hard // RERANKS[self.importance]) == 0:
            self._rerank()
        if self.budget is not None and (self.budget.ranked is None or self.budget.result is None):
            self.budget.maybe_update(step, hard)  # scores move: re-allocate; an importance ranking: once

    @torch.no_grad()
    def _rerank(self) -> None:
        if self.importance == "obs":
            if not self.batches:
                return
            ranked = obs_ranking(self.model, list(self.batches), self.min_keep)
            if self.budget is not None and self.budget.ranked is not None:
                self.budget.update(ranked)
        elif self.tracker is not None and self.tracker.ready():
            ranked = self.tracker.ranked()
        else:
            return
        write_orders(structured_gates(self.model), ranked)

    def _calibrates_at(self, step: int) -> bool:
        hard = self.schedule.hard_step
        if self.calibrate is None or step > hard or not self.batches:
            return False
        if step == hard:
            return True
        if self.calibrate != "ramp":
            return False
        start = math.floor(self.schedule.ramp_start * self.schedule.total_steps)
        points = {start + round(k * (hard - start) / RAMP_CALIBRATIONS) for k in range(1, RAMP_CALIBRATIONS)}
        return step in points

    def _reference(self) -> nn.Module:
        if self.calibrate_toward == "dense":
            return self.original
        if self.calibrate_toward == "open":
            return open_reference(self.model)
        return copy.deepcopy(self.model).eval().requires_grad_(False)  # the gated model as trained

    def apply(self, step: int) -> None:
        """Anneal the model to ``step`` (temperature, levels, the freeze), calibrating where ``calibrate`` says."""
        calibrates = self._calibrates_at(step)
        reference = self._reference() if calibrates else None  # taken before the model moves to ``step``
        lagrangian = self.lagrangian is not None and step < self.schedule.hard_step
        if lagrangian:
            self.lagrangian.place(self.model, self._targets(step))
        self.schedule.apply(self.model, step, clamp=not lagrangian)
        if calibrates:
            report = calibrate_decisions(self.model, list(self.batches), reference)
            if report is not None:
                self.calibrations.append(report)
        if step >= self.schedule.hard_step:
            if self.recorder is not None:
                self.recorder.close()
            self.original = None  # no calibration after the freeze: the copy is not needed any more

    def after_optimizer_step(self, step: int) -> None:
        """Everything after the optimizer stepped to ``step``: the multipliers, steering, the anneal."""
        if self.lagrangian is not None:
            self.lagrangian.ascend()
        self.steer_to(step)
        self.apply(step)

    def loss(self, step: int, weight: float) -> torch.Tensor:
        """The term added to the loss at ``step`` (the sparsity term, or the Lagrangian when ``steer`` says so)."""
        if self.lagrangian is not None:
            if step >= self.schedule.hard_step:
                return torch.zeros(())
            return weight * self.lagrangian.loss(self.model, self._targets(step))
        return sparsity_loss(self.model, self.schedule, step, weight)

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.lagrangian is not None:
            out["lagrangian"] = self.lagrangian.state_dict()
        if self.tracker is not None:
            out["taylor"] = [t.clone() for t in self.tracker.scores]
            out["taylor_seen"] = list(self.tracker.seen)
        return out

    def load_state_dict(self, state: dict[str, Any], step: int) -> None:
        if step >= self.record_steps:
            self.late_start = False  # the run being resumed already ranked its units: keep its levels
        if self.lagrangian is not None and "lagrangian" in state:
            self.lagrangian.load_state_dict(state["lagrangian"])
        if self.tracker is not None and "taylor" in state:
            self.tracker.scores = [t.clone() for t in state["taylor"]]
            self.tracker.seen = list(state["taylor_seen"])
        if self.budget is not None and step < self.schedule.hard_step:
            self.budget.update()  # the shares of the restored scores (or of the ranking)


class FermiAnnealer(WrappingOptimizer):
    """Wraps any torch optimizer: ``step()`` steps it, then anneals the gates of ``model``.

    Behaves as the wrapped optimizer for LR schedulers and trainers (``param_groups``, ``state``,
    ``zero_grad``); ``state_dict()`` adds the step count so an interrupted run resumes exactly.
    ``budget`` / ``target_sparsity`` default to the model's ``FermiConfig`` (its ``budget`` when set, else its
    ``target_sparsity``).

    ``init`` says in which order each channel / head gate's units start: ``"scores"`` by their weight scores,
    ``"obs"`` as the one-shot pruner (:func:`fermigates.prune`) ranks them on ``calibration_data``, written into
    trainable per-unit Fermi levels that are added to ``optimizer`` (see :mod:`fermigates.methods.fermi.prior`);
    ``"auto"`` (default) is ``"obs"`` when ``calibration_data`` is given and the model has channel / head gates,
    else ``"scores"``.

    While the sparsity ramps, ``importance`` says how each channel / head gate's units are ranked:
    ``"magnitude"`` (default) by their scores as the weights train (from the start ``init`` gave them);
    ``"obs"`` re-ranks them as the one-shot pruner would on the current weights and ``calibration_data``, a few
    times during the ramp; ``"taylor"`` re-ranks them by the first-order Taylor importance of their gates,
    ``E[(dL/dP)^2]``, accumulated from the training steps (see :mod:`fermigates.methods.fermi.ranking`).
    ``steer`` says how the levels follow the schedule: ``"band"`` (default) clamps them into a band around the
    scheduled quantile; ``"lagrangian"`` lets them move with their gradients under a Lagrangian on the expected
    sparsity (:mod:`fermigates.methods.fermi.lagrangian`; ``sparsity_loss()`` then returns that term).
    ``ramp_start``: the fraction of the run trained dense before the sparsity starts rising (a warm-up; the
    ramp still ends at ``ramp``).
    ``level_lr``: the learning rate of the Fermi levels (``mu`` and per-unit offsets), in a group of their own
    without weight decay; None (default): the wrapped optimizer's own.
    With ``budget=`` and ``calibration_data``, the budget is allocated by the importance the one-shot pruner
    uses (OBS on the calibration data, on one scale across gates), as ``prune`` does; without calibration data
    by the gates' normalised scores. ``allocation``: ``"auto"`` (default) is ``"global"`` (across gates) for a
    MAC / parameter budget where the units are ranked on data (calibration data, or the recorded inputs), else
    ``"uniform"`` (every gate its share); ``"global"`` / ``"uniform"`` force one.
    ``calibrate``: ``"auto"`` (default) is ``"ramp"`` when ``calibration_data`` is given, the model has
    channel / head gates and the temperature starts at 0.01 or below (few units soft while the sparsity ramps),
    else None (never); ``"freeze"`` re-fits the layers that lost inputs (ridge regression, as ``convert_from_fermi``
    calibrates) in place when the decisions freeze, ``"ramp"`` also at 4 points of the ramp; toward
    ``calibrate_toward``: ``"dense"`` the original network (a copy kept until the freeze), ``"open"`` the current
    weights with every gate open, ``"trained"`` the gated model as trained. It uses ``calibration_data``, else
    the recorded inputs. The parameters stay the same objects, so the optimizer goes on with them.
    Without ``calibration_data`` (and with channel / head gates) the annealer keeps the inputs of the first
    training forwards (up to 8) and, after ``min(8, 10% of the ramp)`` steps at full width, ranks the units on
    them as it would on calibration data (``init="auto"``); the sparsity starts rising then.
    Under DistributedDataParallel build the annealer before wrapping the model (DDP synchronises only the
    parameters it saw when it was built), with the same calibration batches on every process.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        model: nn.Module,
        total_steps: int,
        temperature: tuple[float, float] = (1.0, 0.01),
        schedule: str = "exponential",
        target_sparsity: float | None = None,
        sparsity_schedule: str = "cubic",
        *,
        ramp: float = 0.25,
        tolerance: float = 0.05,
        sparsity_weight: float = 1.0,
        hard_after: float | None = None,
        ramp_start: float = 0.0,
        budget: Any = None,
        allocation: str = "auto",
        min_keep: float = 0.1,
        example_inputs: Any = None,
        init: str = "auto",
        calibration_data: Any = None,
        importance: str = "magnitude",
        steer: str = "band",
        level_lr: float | None = None,
        calibrate: str | None = "auto",
        calibrate_toward: str = "dense",
        progress: bool = False,
    ) -> None:
        if isinstance(temperature, (int, float, str)) or not isinstance(temperature, (tuple, list)):
            raise TypeError(f"temperature must be a pair (T_start, T_end), e.g. (1.0, 0.01), got {temperature!r}")
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, FermiAnnealer):
            raise TypeError("optimizer is already a FermiAnnealer; wrap the inner optimizer once")
        state = get_state(model)
        if state.method != "fermi":
            raise ValueError(f"model was converted with method={state.config.method!r}, which has no Fermi gates to "
                             "anneal: train it with fermigates.make_optimizer(model) (its own optimizer)")
        if any(_is_sharded(p) for p in model.parameters()):
            raise TypeError(
                "FermiAnnealer needs whole weights: FSDP2 (fully_shard) shards them, so a gate's score and its "
                "quantiles would be computed on one shard. Train with torch.nn.parallel.DistributedDataParallel "
                "(or accelerate's DDP) instead, where every process holds the full model")
        if level_lr is not None and not (isinstance(level_lr, (int, float)) and not isinstance(level_lr, bool)
                                         and math.isfinite(level_lr) and level_lr > 0):
            raise ValueError(f"level_lr must be None or a finite number > 0, got {level_lr!r}")
        budget = budget_from(budget, target_sparsity, state.config, "FermiAnnealer")
        if target_sparsity is None:  # with a budget the gates get their own shares: the config's is a placeholder
            target_sparsity = 0.5 if state.config.target_sparsity is None else state.config.target_sparsity
        self._wrap(optimizer)
        self.model = model
        # everything that can refuse the arguments runs before the model gets new per-unit levels
        self.schedule = AnnealSchedule(
            total_steps, tuple(temperature), schedule, target_sparsity, sparsity_schedule,
            ramp=ramp, tolerance=tolerance, hard_after=hard_after, ramp_start=ramp_start,
        )
        if not isinstance(sparsity_weight, (int, float)) or isinstance(sparsity_weight, bool) \
                or not math.isfinite(sparsity_weight) or sparsity_weight < 0:
            raise ValueError(f"sparsity_weight must be a finite number >= 0, got {sparsity_weight!r}")
        self.control = AnnealControl(model, budget=budget, allocation=allocation, min_keep=min_keep,
                                     example_inputs=example_inputs, init=init, calibration_data=calibration_data,
                                     importance=importance, steer=steer, calibrate=calibrate,
                                     calibrate_toward=calibrate_toward, schedule=self.schedule, progress=progress)
        _add_params(optimizer, self.control.levels)
        if level_lr is not None:
            _move_to_own_group(optimizer, [t for g in all_gates(model) for t in (g.mu, g.mu_offset)
                                           if t is not None], float(level_lr))
        self.level_lr = level_lr
        self.sparsity_weight = float(sparsity_weight)
        self.step_count = 0
        self.control.steer_to(0)
        self.control.apply(0)

    @property
    def budget(self) -> BudgetSteer | None:
        return self.control.budget

    @property
    def calibrations(self) -> list:
        """With ``calibrate``: the report of every calibration so far (the last one at the freeze)."""
        return self.control.calibrations

    @property
    def budget_result(self) -> Any:
        """With ``budget=``: the latest :class:`fermigates.BudgetResult` (requested, predicted, units kept)."""
        return None if self.budget is None else self.budget.result

    # -- delegation ---------------------------------------------------------------------------
    def step(self, closure: Callable[[], float] | None = None) -> Any:
        gates = all_gates(self.model)
        _check_finite(gates, "grad", self.step_count)  # a NaN loss: refuse before anything moves
        loss = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        self.step_count += 1
        _check_finite(gates, "data", self.step_count)
        self.control.after_optimizer_step(self.step_count)
        return loss

    # -- what the annealer adds ---------------------------------------------------------------
    @property
    def temperature(self) -> float:
        return self.schedule.temperature_at(self.step_count)

    @property
    def target_sparsity(self) -> float:
        """The scheduled sparsity at the current step (of the most pruned granularity)."""
        return self.schedule.sparsity_at(self.step_count)

    @property
    def decides_next_step(self) -> bool:
        """True when the next ``step()`` freezes the decisions (the last step of the soft phase)."""
        return self.step_count + 1 >= self.schedule.hard_step

    @property
    def decided(self) -> bool:
        """True once the hard phase has begun: every gate applies (and will bake) a frozen 0/1 decision."""
        return self.step_count >= self.schedule.hard_step

    def undecided_units(self, eps: float = 0.01) -> int:
        """Units whose retention probability is neither below ``eps`` nor above ``1 - eps`` (0 once decided)."""
        return undecided_units(self.model, eps)

    @torch.no_grad()
    def soft_hard_gap(self, inputs: Any) -> float:
        """Largest relative difference between the model's outputs as trained now and with hard gates (what
        baking gives), on ``inputs`` (a tensor, a tuple of positional args or a dict of kwargs)."""
        was = self.model.training
        self.model.eval()
        try:
            trained = output_tensors(call_model(self.model, inputs))
            with hard_gates(self.model):
                hard = output_tensors(call_model(self.model, inputs))
        finally:
            self.model.train(was)
        return max_relative_diff(trained, hard)

    def stats(self) -> dict[str, float]:
        """What a training log wants at this step: T, target and actual sparsity, undecided units."""
        return anneal_stats(self.model, self.schedule, self.step_count)

    def sparsity_loss(self) -> torch.Tensor:
        """Regulariser to add to the loss: how far the gates' expected density exceeds the scheduled density.

        ``sparsity_weight * sum_g n_g * relu(mean(P_g) - (1 - s(t))) / sum_g n_g``; it pushes ``mu`` up and the
        scores of units near the threshold down, so units leave smoothly instead of being cut. Zero (and
        without gradient) once the decisions are frozen.
        """
        return self.control.loss(self.step_count, self.sparsity_weight)

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "step_count": self.step_count,
            "schedule": asdict(self.schedule),
            "sparsity_weight": self.sparsity_weight,
            # frozen decisions, so a run resumed in its hard phase applies exactly the same masks
            "decided": [None if g.decided is None else g.decided.cpu() for g in all_gates(self.model)],
            **self.control.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key in ("optimizer", "step_count", "schedule"):
            if key not in state_dict:
                raise KeyError(f"FermiAnnealer state_dict has no {key!r}: was it saved by FermiAnnealer.state_dict()?")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        schedule = dict(state_dict["schedule"])
        schedule["temperature"] = tuple(schedule["temperature"])
        self.schedule = AnnealSchedule(**schedule)
        self.sparsity_weight = float(state_dict.get("sparsity_weight", self.sparsity_weight))
        self.step_count = int(state_dict["step_count"])
        self.control.schedule = self.schedule
        self.control.load_state_dict(state_dict, self.step_count)
        decided = state_dict.get("decided")
        gates = all_gates(self.model)
        if decided is not None and len(decided) != len(gates):
            raise ValueError(f"FermiAnnealer state_dict holds decisions for {len(decided)} gates, the model has "
                             f"{len(gates)}: was it saved from another model?")
        for gate, mask in zip(gates, decided or [None] * len(gates)):
            gate.decided = None if mask is None else mask.to(gate.mu.device)
        self.control.apply(self.step_count)

    def __repr__(self) -> str:
        s = self.schedule
        return (
            f"FermiAnnealer({type(self.optimizer).__name__}, step {self.step_count}/{s.total_steps}, "
            f"T={self.temperature:.4g}, target sparsity {self.target_sparsity:.3f} -> {s.target_sparsity!r})"
        )
