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

import math
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.optim import Optimizer

from ...allocation.budget import Budget, BudgetResult, budget_from, check_min_keep, check_sparsity, unit_floor
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
from .gates import check_temperature, kth_quantile
from .model import (
    all_gates,
    allocatable,
    distinct_gates,
    gate_scores,
    hard_gates,
    soft_probabilities,
    undecided_units,
    unit_groups,
)
from .prior import INITS, resolve_init, set_rank_prior

TEMPERATURE_SCHEDULES = ("linear", "exponential", "cosine")
SPARSITY_SCHEDULES = ("cubic", "linear", "constant")


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

    ``ramp`` is the fraction of ``total_steps`` over which sparsity rises and the band narrows; afterwards the
    target is held (the rest of the run fine-tunes at the final sparsity). ``tolerance`` is the half-width of
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
        progress = step / (self.ramp * self.total_steps)
        final = self.final_sparsity(kind) if final is None else final
        return sparsity_at(progress, final, self.sparsity_schedule, min(self.initial_sparsity, final))

    @staticmethod
    def gate_final(gate: nn.Module) -> float | None:
        """The share a budget assigned to this gate (see ``FermiAnnealer(budget=...)``), or None."""
        return getattr(gate, "budget_share", None)

    def band_at(self, step: int) -> float:
        progress = min(step / (self.ramp * self.total_steps), 1.0)
        return self.tolerance * (1.0 - progress)

    @torch.no_grad()
    def apply(self, model: nn.Module, step: int) -> None:
        """Set ``T`` and clamp ``mu`` of every gate of ``model`` for ``step``."""
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

    def __init__(self, model: nn.Module, budget: Any, allocation: str, min_keep: float | int, example: Any) -> None:
        self.budget = Budget.parse(budget)
        if self.budget.kind == "latency":
            raise ValueError("FermiAnnealer(budget=) takes 'macs', 'params' or 'units': a latency budget is measured "
                             "on shrunk candidates, which fermigates.prune does")
        if allocation not in ("global", "uniform"):
            raise ValueError(f"allocation must be 'global' or 'uniform', got {allocation!r}")
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
    def update(self) -> None:
        groups = unit_groups(self.model)
        ranked = magnitude(groups)
        kind, fraction = self.budget.kind, self.budget.fraction
        removed = solve(kind, fraction, self.allocation, groups, self.steps, self.floors, self.cost, ranked)
        result = BudgetResult(kind, fraction, self.cost.kept(kind, removed), self.allocation, "magnitude (scores)",
                              self.cost.counted_on if kind == "macs" else "over the whole model"
                              if kind == "params" else "over the gated units")
        by_id = {g.group_id: g for g, owner in distinct_gates(self.model) if owner is None}
        for group, r in zip(groups, removed):
            by_id[group.id].budget_share = (r + 0.5) / group.n_units if r else 0.0  # floor(share * n) == r exactly
            result.kept[group.label] = (group.n_units - r, group.n_units)
        self.result = result
        get_state(self.model).budget_result = result  # the bake reports it


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


def set_start(model: nn.Module, init: str, calibration_data: Any, min_keep: float | int,
              progress: bool = False) -> list[torch.Tensor]:
    """Apply ``init`` (see ``FermiAnnealer``); the per-unit levels it created, for the optimizer."""
    _check_init(init, calibration_data)
    init = resolve_init(model, init, calibration_data)
    if init == "scores":
        return []
    check_min_keep(min_keep)
    batches = as_batches(calibration_data, 64, None, "calibration_data")
    check_batches_finite(batches, "calibration_data")
    return set_rank_prior(model, batches, min_keep, progress=progress)


def _add_params(optimizer: Optimizer, params: list[torch.Tensor]) -> None:
    """Give ``optimizer`` the parameters it does not hold yet (new per-unit levels), without weight decay."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    new = [p for p in params if id(p) not in held]
    if new:
        optimizer.add_param_group({"params": new, "weight_decay": 0.0})


class FermiAnnealer(Optimizer):
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
        budget: Any = None,
        allocation: str = "uniform",
        min_keep: float | int = 0.1,
        example_inputs: Any = None,
        init: str = "auto",
        calibration_data: Any = None,
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
        _check_init(init, calibration_data)
        budget = budget_from(budget, target_sparsity, state.config, "FermiAnnealer")
        if target_sparsity is None:  # with a budget the gates get their own shares: the config's is a placeholder
            target_sparsity = 0.5 if state.config.target_sparsity is None else state.config.target_sparsity
        self.optimizer = optimizer
        self.model = model
        # everything that can refuse the arguments runs before the model gets new per-unit levels
        self.schedule = AnnealSchedule(
            total_steps, tuple(temperature), schedule, target_sparsity, sparsity_schedule,
            ramp=ramp, tolerance=tolerance, hard_after=hard_after,
        )
        if not isinstance(sparsity_weight, (int, float)) or isinstance(sparsity_weight, bool) \
                or not math.isfinite(sparsity_weight) or sparsity_weight < 0:
            raise ValueError(f"sparsity_weight must be a finite number >= 0, got {sparsity_weight!r}")
        self.budget = None if budget is None else BudgetSteer(model, budget, allocation, min_keep, example_inputs)
        _add_params(optimizer, set_start(model, init, calibration_data, min_keep, progress))
        self.sparsity_weight = float(sparsity_weight)
        self.step_count = 0
        # what torch.optim.Optimizer.__init__ would set, for hooks and LR schedulers
        self._optimizer_step_pre_hooks: dict = OrderedDict()
        self._optimizer_step_post_hooks: dict = OrderedDict()
        self._optimizer_state_dict_pre_hooks: dict = OrderedDict()
        self._optimizer_state_dict_post_hooks: dict = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: dict = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: dict = OrderedDict()
        self._steer()
        self.schedule.apply(model, 0)

    def _steer(self) -> None:
        """Re-allocate the budget across gates from the current scores, until the decisions freeze."""
        if self.budget is not None:
            self.budget.maybe_update(self.step_count, self.schedule.hard_step)

    @property
    def budget_result(self) -> Any:
        """With ``budget=``: the latest :class:`fermigates.BudgetResult` (requested, predicted, units kept)."""
        return None if self.budget is None else self.budget.result

    # -- delegation ---------------------------------------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @property
    def state(self) -> dict:  # type: ignore[override]
        return self.optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def step(self, closure: Callable[[], float] | None = None) -> Any:
        gates = all_gates(self.model)
        _check_finite(gates, "grad", self.step_count)  # a NaN loss: refuse before anything moves
        loss = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        self.step_count += 1
        _check_finite(gates, "data", self.step_count)
        self._steer()
        self.schedule.apply(self.model, self.step_count)
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
        return sparsity_loss(self.model, self.schedule, self.step_count, self.sparsity_weight)

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "step_count": self.step_count,
            "schedule": asdict(self.schedule),
            "sparsity_weight": self.sparsity_weight,
            # frozen decisions, so a run resumed in its hard phase applies exactly the same masks
            "decided": [None if g.decided is None else g.decided.cpu() for g in all_gates(self.model)],
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
        if self.budget is not None and self.step_count < self.schedule.hard_step:
            self.budget.update()  # the shares of the restored scores
        decided = state_dict.get("decided")
        gates = all_gates(self.model)
        if decided is not None and len(decided) != len(gates):
            raise ValueError(f"FermiAnnealer state_dict holds decisions for {len(decided)} gates, the model has "
                             f"{len(gates)}: was it saved from another model?")
        for gate, mask in zip(gates, decided or [None] * len(gates)):
            gate.decided = None if mask is None else mask.to(gate.mu.device)
        self.schedule.apply(self.model, self.step_count)

    def __repr__(self) -> str:
        s = self.schedule
        return (
            f"FermiAnnealer({type(self.optimizer).__name__}, step {self.step_count}/{s.total_steps}, "
            f"T={self.temperature:.4g}, target sparsity {self.target_sparsity:.3f} -> {s.target_sparsity!r})"
        )
