"""``ActivationAnnealer``: the optimizer wrapper that drives the removed activations' ``a`` to 0.

The same three ideas as the Fermi annealer, applied to non-linearities:

1. **a schedule**: over the first ``ramp`` of the run the number of activations chosen for removal rises from 0
   to its final value along ``sparsity_schedule`` (cubic by default, as gradual pruning does); at a few points of
   the ramp the annealer measures, on a few batches, how much removing each remaining activation alone would
   change the model's output, and adds the cheapest ones (with a MAC / parameter budget: the most MACs saved by
   the merges they enable per unit of that distortion; with a latency budget: the final count is the shortest
   prefix of that order whose baked, merged model measures fast enough). A chosen unit's ``a`` then fades from 1
   to 0 over ``fade`` of the run (``schedule``: linear, cosine or exponential);
2. **a sparsity-like term**, :meth:`ActivationAnnealer.sparsity_loss`: ``sparsity_weight`` times the mean ``a``
   of the chosen units, which pulls a learnable ``a`` down ahead of its cap (zero, without gradient, for
   scheduled ``a``, which has none);
3. **the decision frozen before the end**: from ``hard_after`` (default: the end of the ramp plus the fade) every
   chosen unit is exactly the identity and every other one exactly what it bakes to (the original activation by
   default), so the model trained for the rest of the run is the model the bake merges.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from ...allocation.budget import Budget, BudgetResult, budget_from, describe_inputs
from ...core.batches import as_batches, check_batches_finite, split_batch
from ...core.state import get_state
from ...core.wrapping import WrappingOptimizer
from .model import removed, units
from .select import MergePlan, by_budget, by_count, by_latency, distortion
from .units import FADES, fade

SPARSITY_SCHEDULES = ("cubic", "linear", "constant")
#: how many times the chosen set grows during the ramp (each a measurement of every remaining unit)
SELECTIONS = 8
#: batches the distortion of a unit is measured on
PROBE_BATCHES = 2


def ramp_fraction(progress: float, schedule: str) -> float:
    """The share of the final removals made after ``progress`` (0..1) of the ramp."""
    p = min(max(progress, 0.0), 1.0)
    if schedule == "cubic":
        return 1.0 - (1.0 - p) ** 3
    if schedule == "linear":
        return p
    if schedule == "constant":
        return 1.0
    raise ValueError(f"sparsity_schedule must be one of {SPARSITY_SCHEDULES}, got {schedule!r}")


def _fraction(value: Any, name: str, low: float, high: float, closed_low: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and \
        (low <= value if closed_low else low < value) and value <= high
    if not ok:
        raise ValueError(f"{name} must be a number in {'[' if closed_low else '('}{low}, {high}], got {value!r}")
    return float(value)


class ActivationAnnealer(WrappingOptimizer):
    """Wraps any torch optimizer: ``step()`` steps it, then moves the converted activations' ``a``.

    What is removed: ``n_remove`` activations, or the fraction ``target_sparsity`` of them, or what meets
    ``budget`` (``"units:0.5"`` keeps half of them; ``"macs:0.7"`` / ``"params:0.7"`` keeps that share of the
    model's MACs / parameters after the merges the removals enable; ``"latency:0.7"`` that share of the measured
    time of the baked, merged model on the example inputs, batch as given). Defaults: the model's
    ``FermiConfig`` (``budget``, else ``target_sparsity``) and ``method_options.n_remove``.
    ``calibration_data``: a few training batches the distortion is measured on (default: the conversion's example
    inputs). ``init`` is accepted for recipes: ``"scores"`` chooses without data (the units whose removal saves
    most first), anything else measures the distortion. ``temperature`` has no meaning here and must be left at
    its default.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        model: nn.Module,
        total_steps: int,
        *,
        target_sparsity: float | None = None,
        n_remove: int | None = None,
        budget: Any = None,
        ramp: float = 0.5,
        sparsity_schedule: str = "cubic",
        fade: float = 0.2,
        schedule: str = "linear",
        sparsity_weight: float = 1.0,
        hard_after: float | None = None,
        init: str = "auto",
        calibration_data: Any = None,
        example_inputs: Any = None,
        temperature: tuple[float, float] = (1.0, 0.01),
        selections: int = SELECTIONS,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, ActivationAnnealer):
            raise TypeError("optimizer is already an ActivationAnnealer; wrap the inner optimizer once")
        state = get_state(model)
        self.units = units(model)
        if not self.units:
            raise ValueError(f"{type(model).__name__} has no converted activations: convert it with "
                             "FermiConfig(method='activation', granularity='unit')")
        if not isinstance(total_steps, int) or isinstance(total_steps, bool) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
        if tuple(temperature) != (1.0, 0.01):
            raise ValueError("temperature applies to Fermi gates; the activation annealer fades a instead (set ramp, "
                             "fade and schedule)")
        self.ramp = _fraction(ramp, "ramp", 0.0, 1.0)
        self.fade = _fraction(fade, "fade", 0.0, 1.0, closed_low=True)
        if sparsity_schedule not in SPARSITY_SCHEDULES:
            raise ValueError(f"sparsity_schedule must be one of {SPARSITY_SCHEDULES}, got {sparsity_schedule!r}")
        if schedule not in FADES:
            raise ValueError(f"schedule must be one of {FADES} (the shape of a removed unit's fade), got {schedule!r}")
        if not isinstance(sparsity_weight, (int, float)) or isinstance(sparsity_weight, bool) or \
                not math.isfinite(sparsity_weight) or sparsity_weight < 0:
            raise ValueError(f"sparsity_weight must be a finite number >= 0, got {sparsity_weight!r}")
        end = min(1.0, self.ramp + self.fade) if hard_after is None else hard_after
        self.hard_after = _fraction(end, "hard_after", 0.0, 1.0)
        if self.hard_after < self.ramp:
            raise ValueError(f"hard_after must be in [ramp, 1] = [{self.ramp}, 1], got {hard_after!r}")
        if isinstance(selections, bool) or not isinstance(selections, int) or selections < 1:
            raise ValueError(f"selections must be an int >= 1, got {selections!r}")
        options = state.extra["options"]
        self.mode, self.when = options.alpha, options.merge
        self.total_steps, self.sparsity_schedule, self.schedule = total_steps, sparsity_schedule, schedule
        self.sparsity_weight, self.init, self.selections = float(sparsity_weight), init, selections
        self.example = example_inputs if example_inputs is not None else state.example_inputs
        n = len(self.units)
        if n_remove is None and options.n_remove is not None and target_sparsity is None and budget is None:
            n_remove = options.n_remove
        if n_remove is not None:
            if isinstance(n_remove, bool) or not isinstance(n_remove, int) or not 0 <= n_remove <= n:
                raise ValueError(f"n_remove must be an int in [0, {n}] (the model has {n} converted activations), "
                                 f"got {n_remove!r}")
            if budget is not None or target_sparsity is not None:
                raise ValueError("give one of n_remove=, target_sparsity= and budget=")
            self.budget: Budget | None = None
        else:
            self.budget = budget_from(budget, target_sparsity, state.config, "ActivationAnnealer")
            if self.budget is None:
                s = state.config.target_sparsity if target_sparsity is None else target_sparsity
                s = 0.5 if s is None else s
                if isinstance(s, dict) or isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s < 1:
                    raise ValueError(f"target_sparsity must be the fraction of activations removed, in [0, 1), "
                                     f"got {s!r}")
                n_remove = int(math.floor(s * n + 1e-9))
        if self.budget is not None and self.budget.kind == "units":
            n_remove = int(math.floor((1.0 - self.budget.fraction) * n + 1e-9))
            self.budget = None
        self.final_count = n_remove  # None: set by the budget
        self._wrap(optimizer)
        self.model = model
        self.probe = self._probe_batches(calibration_data)
        self.plan: MergePlan | None = None
        self.result: BudgetResult | None = None
        if self.budget is not None:
            if self.example is None:
                raise ValueError(f"budget={str(self.budget)!r} needs example inputs: pass example_inputs= here or "
                                 "to convert_to_fermi")
            self.plan = MergePlan(model, self.example, self.when)
        self.chosen: OrderedDict[str, int] = OrderedDict()  # unit -> step it was chosen at
        self.step_count = 0
        if self.mode != "fixed":
            self._prepare()
            self._apply()

    # -- schedule ---------------------------------------------------------------------------------------------------
    @property
    def ramp_steps(self) -> int:
        return max(1, math.ceil(self.ramp * self.total_steps))

    @property
    def hard_step(self) -> int:
        return max(1, math.ceil(self.hard_after * self.total_steps))

    @property
    def fade_steps(self) -> float:
        return self.fade * self.total_steps

    def _selection_steps(self) -> list[int]:
        every = self.ramp_steps / self.selections
        return sorted({min(self.ramp_steps, max(1, round(every * (j + 1)))) for j in range(self.selections)})

    def _probe_batches(self, data: Any) -> list:
        if data is not None:
            batches = as_batches(data, 32, PROBE_BATCHES, "calibration_data")
            check_batches_finite(batches, "calibration_data")
            return [b if isinstance(b, dict) else split_batch(b)[0] for b in batches]
        return [self.example] if self.example is not None else []

    def _prepare(self) -> None:
        """The final count of a latency budget: measured on baked, merged candidates before training starts."""
        if self.budget is None or self.budget.kind != "latency":
            return
        names = list(self.units)
        err = self._costs(names)
        order = by_budget([], names, err, self.plan, "macs", 0.0)
        order += by_count([n for n in names if n not in order], err, len(names))
        count, ratio = by_latency(self.model, self.example, order, self.budget.fraction, self.when)
        self.final_count = count
        self.latency_order = order
        self.result = BudgetResult("latency", self.budget.fraction, ratio, "greedy", "measured output distortion",
                                   f"measured on {describe_inputs(self.example)}")

    def _costs(self, names: list[str]) -> dict[str, float]:
        if not names:
            return {}
        if self.init == "scores" or not self.probe:
            if self.plan is None:
                return {n: float(i) for i, n in enumerate(names)}
            gain = {n: 1.0 - self.plan.kept({n}, "macs") for n in names}
            return {n: 1.0 / (1e-9 + gain[n]) for n in names}
        return distortion(self.model, names, self.probe)

    def _select(self, step: int) -> None:
        """Grow the chosen set to what the schedule asks at ``step``."""
        frac = ramp_fraction(step / self.ramp_steps, self.sparsity_schedule)
        left = [n for n in self.units if n not in self.chosen]
        if not left:
            return
        if self.budget is None or self.budget.kind == "latency":
            k = int(math.floor(frac * self.final_count + 1e-9)) - len(self.chosen)
            if k <= 0:
                return
            if self.budget is not None:  # latency: the measured order's prefix
                new = [n for n in self.latency_order if n not in self.chosen][:k]
            elif k >= len(left):  # every remaining one: nothing to measure
                new = left
            else:
                new = by_count(left, self._costs(left), k)
        else:
            target = 1.0 - frac * (1.0 - self.budget.fraction)
            if self.plan.kept(set(self.chosen), self.budget.kind) <= target:
                return
            err = self._costs(left)
            new = by_budget(list(self.chosen), left, err, self.plan, self.budget.kind, target)
            self.result = BudgetResult(self.budget.kind, self.budget.fraction,
                                       self.plan.kept(set(self.chosen) | set(new), self.budget.kind), "greedy",
                                       "measured output distortion" if self.probe else "merge savings",
                                       f"per forward of {describe_inputs(self.example)}" if self.budget.kind == "macs"
                                       else "over the whole model")
        for name in new:
            self.chosen[name] = step
            self.units[name].pa_removed = True

    @torch.no_grad()
    def _apply(self) -> None:
        """Write every unit's ``a`` (and its decision) for the current step."""
        step = self.step_count
        if step < self.hard_step and step in set(self._selection_steps()) | {0}:
            self._select(step)
        hard = step >= self.hard_step
        for name, u in self.units.items():
            if name in self.chosen:
                cap = 0.0 if hard or self.fade_steps == 0 else \
                    fade((step - self.chosen[name]) / self.fade_steps, self.schedule)
                if self.mode == "learnable" and cap > 0.0:
                    u.pa_alpha.clamp_(0.0, cap)
                else:
                    u.pa_alpha.fill_(cap)
                u.pa_fixed = 0.0 if cap == 0.0 else None
                u.pa_removed = True
            elif self.mode == "learnable":
                u.pa_alpha.clamp_(0.0, 1.0)
                if hard and u.pa_keep == "original":  # kept units bake to the stock activation
                    u.pa_alpha.fill_(1.0)
                    u.pa_fixed = 1.0
            elif hard and u.pa_keep == "original" and u.pa_fixed != 1.0:
                u.pa_alpha.fill_(1.0)
                u.pa_fixed = 1.0

    # -- optimizer delegation ---------------------------------------------------------------------------------------
    def step(self, closure: Callable[[], float] | None = None) -> Any:
        if self.step_count >= self.hard_step:  # frozen decisions: a no longer moves
            for name, u in self.units.items():
                if u.pa_alpha.requires_grad and (name in self.chosen or u.pa_keep == "original"):
                    u.pa_alpha.grad = None
        loss = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        self.step_count += 1
        if self.mode != "fixed":
            self._apply()
        return loss

    # -- what the annealer adds -------------------------------------------------------------------------------------
    @property
    def decided(self) -> bool:
        """True once the decisions are frozen: every chosen unit is the identity, every other one what it bakes to."""
        return self.mode == "fixed" or self.step_count >= self.hard_step

    @property
    def decides_next_step(self) -> bool:
        return self.mode != "fixed" and self.step_count + 1 >= self.hard_step

    @property
    def budget_result(self) -> BudgetResult | None:
        """With a MAC / parameter / latency budget: the latest prediction (or measurement) of what it keeps."""
        return self.result

    @property
    def target_sparsity(self) -> float:
        """The scheduled fraction of activations removed at the current step."""
        if self.final_count is None:
            return len(self.chosen) / len(self.units)
        frac = ramp_fraction(self.step_count / self.ramp_steps, self.sparsity_schedule)
        return math.floor(frac * self.final_count + 1e-9) / len(self.units)

    def sparsity_loss(self) -> torch.Tensor:
        """``sparsity_weight`` times the mean ``a`` of the units chosen for removal (learnable ``a`` only; zero,
        without gradient, otherwise and once the decisions are frozen)."""
        if self.mode != "learnable" or self.step_count >= self.hard_step or not self.chosen:
            return torch.zeros(())
        total = sum(self.units[n].pa_alpha.sum() for n in self.chosen)
        count = sum(self.units[n].pa_alpha.numel() for n in self.chosen)
        return self.sparsity_weight * total / count

    @torch.no_grad()
    def stats(self) -> dict[str, float]:
        n = len(self.units)
        gone = sum(1 for u in self.units.values() if u.pa_fixed == 0.0 or (u.pa_removed and
                                                                             not bool(u.pa_alpha.any())))
        fading = sum(1 for name in self.chosen if bool(self.units[name].pa_alpha.any()))
        return {"step": self.step_count, "sparsity": gone / n, "target_sparsity": self.target_sparsity,
                "undecided": float(fading), "decided": float(self.decided),
                "mean_alpha": float(sum(float(u.pa_alpha.float().mean()) for u in self.units.values()) / n)}

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "step_count": self.step_count,
                "chosen": list(self.chosen.items()), "final_count": self.final_count}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key in ("optimizer", "step_count", "chosen"):
            if key not in state_dict:
                raise KeyError(f"ActivationAnnealer state_dict has no {key!r}: was it saved by "
                               "ActivationAnnealer.state_dict()?")
        unknown = [n for n, _ in state_dict["chosen"] if n not in self.units]
        if unknown:
            raise ValueError(f"ActivationAnnealer state_dict names activations this model lacks: {unknown[:4]}")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.step_count = int(state_dict["step_count"])
        self.final_count = state_dict.get("final_count", self.final_count)
        self.chosen = OrderedDict((n, int(s)) for n, s in state_dict["chosen"])
        for name, u in self.units.items():
            u.pa_removed = name in self.chosen
        if self.mode != "fixed":
            self._apply()

    def __repr__(self) -> str:
        return (f"ActivationAnnealer({type(self.optimizer).__name__}, step {self.step_count}/{self.total_steps}, "
                f"{len(self.chosen)} of {len(self.units)} activations chosen for removal, "
                f"{len(removed(self.model))} decided)")
