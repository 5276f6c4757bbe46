"""Temperature and sparsity schedules, and ``FermiAnnealer``, the optimizer wrapper that applies them.

After every optimizer step the annealer

1. sets ``T`` on every gate from the temperature schedule (linear, exponential or cosine), and
2. steers each gate's learned ``mu`` into a band around the threshold that removes the scheduled fraction of
   its units: ``mu`` is clamped between the score quantiles at ``s(t) - b(t)`` and ``s(t) + b(t)``. Inside
   the band ``mu`` moves with its gradients; the band ``b(t)`` narrows to zero when the sparsity ramp ends,
   so the run ends exactly at the requested sparsity. ``s(t)`` follows its own schedule, by default the
   cubic one of gradual pruning (Zhu & Gupta, 2017).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.optim import Optimizer

from ...state import fermi_state
from .model import gate_scores, soft_probabilities
from ...config import check_sparsity
from .gates import check_temperature, kth_quantile

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
    the band, in sparsity points, at the start of the ramp.
    """

    total_steps: int
    temperature: tuple[float, float] = (1.0, 0.01)
    schedule: str = "exponential"
    target_sparsity: float | dict[str, float] = 0.5
    sparsity_schedule: str = "cubic"
    initial_sparsity: float = 0.0
    ramp: float = 0.75
    tolerance: float = 0.05

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

    def temperature_at(self, step: int) -> float:
        return temperature_at(step / self.total_steps, *self.temperature, self.schedule)

    def final_sparsity(self, kind: str | None = None) -> float:
        """The target of gates of ``kind`` ("weight", "channel", "head"); the largest one if None."""
        if not isinstance(self.target_sparsity, dict):
            return float(self.target_sparsity)
        if kind is None:
            return max(self.target_sparsity.values(), default=0.0)
        return float(self.target_sparsity.get(kind, 0.0))

    def sparsity_at(self, step: int, kind: str | None = None) -> float:
        progress = step / (self.ramp * self.total_steps)
        final = self.final_sparsity(kind)
        return sparsity_at(progress, final, self.sparsity_schedule, min(self.initial_sparsity, final))

    def band_at(self, step: int) -> float:
        progress = min(step / (self.ramp * self.total_steps), 1.0)
        return self.tolerance * (1.0 - progress)

    @torch.no_grad()
    def apply(self, model: nn.Module, step: int) -> None:
        """Set ``T`` and clamp ``mu`` of every gate of ``model`` for ``step``."""
        temperature, band = self.temperature_at(step), self.band_at(step)
        for gate, scores in gate_scores(model):
            gate.set_temperature(temperature)
            target = self.sparsity_at(step, gate.kind)
            if band > 0:
                probe = _probe(gate, scores)
                lo = kth_quantile(probe, target - band) if target - band > 0 else -math.inf
                hi = kth_quantile(probe, target + band) if target + band < 1 else math.inf
                gate.mu.clamp_(lo, hi)
            else:
                _pin_to_quantile(gate, scores, target)


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


def _pin_to_quantile(gate: nn.Module, scores: torch.Tensor, target: float) -> None:
    """Put ``mu`` where ``floor(target * n)`` units fall below it; left alone if it is there already
    (checked in O(n), so the exact O(n) selection runs only when the weights moved a unit across)."""
    n = scores.numel()
    k = min(int(math.floor(target * n)), n - 1)
    mu = gate.mu.float()
    below = int((scores < mu).sum())
    if below == k or (below < k and int((scores <= mu).sum()) > k):  # exact, or mu sits on tied scores
        return
    gate.mu.fill_(float(scores.kthvalue(k + 1).values))


class FermiAnnealer(Optimizer):
    """Wraps any torch optimizer: ``step()`` steps it, then anneals the gates of ``model``.

    Behaves as the wrapped optimizer for LR schedulers and trainers (``param_groups``, ``state``,
    ``zero_grad``); ``state_dict()`` adds the step count so an interrupted run resumes exactly.
    ``target_sparsity`` defaults to the one in the model's ``FermiConfig``.
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
        ramp: float = 0.75,
        tolerance: float = 0.05,
        sparsity_weight: float = 1.0,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, FermiAnnealer):
            raise TypeError("optimizer is already a FermiAnnealer; wrap the inner optimizer once")
        state = fermi_state(model)
        if target_sparsity is None:
            target_sparsity = state.config.target_sparsity
        self.optimizer = optimizer
        self.model = model
        self.schedule = AnnealSchedule(
            total_steps, tuple(temperature), schedule, target_sparsity, sparsity_schedule,
            ramp=ramp, tolerance=tolerance,
        )
        if sparsity_weight < 0:
            raise ValueError(f"sparsity_weight must be >= 0, got {sparsity_weight!r}")
        self.sparsity_weight = float(sparsity_weight)
        self.step_count = 0
        # what torch.optim.Optimizer.__init__ would set, for hooks and LR schedulers
        self._optimizer_step_pre_hooks: dict = OrderedDict()
        self._optimizer_step_post_hooks: dict = OrderedDict()
        self._optimizer_state_dict_pre_hooks: dict = OrderedDict()
        self._optimizer_state_dict_post_hooks: dict = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: dict = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: dict = OrderedDict()
        self.schedule.apply(model, 0)

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
        loss = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        self.step_count += 1
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

    def sparsity_loss(self) -> torch.Tensor:
        """Regulariser to add to the loss: how far the gates' expected density exceeds the scheduled density.

        ``sparsity_weight * sum_g n_g * relu(mean(P_g) - (1 - s(t))) / sum_g n_g``; it pushes ``mu`` up and the
        scores of units near the threshold down, so units leave smoothly instead of being cut.
        """
        total, count = None, 0
        for gate, p in soft_probabilities(self.model):
            target_density = 1.0 - self.schedule.sparsity_at(self.step_count, gate.kind)
            excess = torch.relu(p.float().mean() - target_density) * p.numel()
            total = excess if total is None else total + excess
            count += p.numel()
        if total is None:
            return torch.zeros(())
        return self.sparsity_weight * total / count

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "step_count": self.step_count,
            "schedule": asdict(self.schedule),
            "sparsity_weight": self.sparsity_weight,
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
        self.schedule.apply(self.model, self.step_count)

    def __repr__(self) -> str:
        s = self.schedule
        return (
            f"FermiAnnealer({type(self.optimizer).__name__}, step {self.step_count}/{s.total_steps}, "
            f"T={self.temperature:.4g}, target sparsity {self.target_sparsity:.3f} -> {s.target_sparsity!r})"
        )
