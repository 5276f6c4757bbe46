"""Hugging Face ``Trainer`` integration: a callback that does what ``FermiAnnealer`` does around the optimizer."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ...allocation.budget import budget_from
from ...core.state import get_state
from .anneal import AnnealSchedule, BudgetSteer, anneal_stats, set_start, sparsity_loss


def fermi_trainer_callback(
    model: nn.Module,
    temperature: tuple[float, float] = (1.0, 0.01),
    schedule: str = "exponential",
    target_sparsity: float | None = None,
    sparsity_schedule: str = "cubic",
    total_steps: int | None = None,
    *,
    sparsity_weight: float = 1.0,
    budget: Any = None,
    allocation: str = "uniform",
    min_keep: float | int = 0.1,
    example_inputs: Any = None,
    init: str = "auto",
    calibration_data: Any = None,
    **schedule_kwargs: Any,
):
    """A ``transformers.TrainerCallback`` that anneals the gates of ``model`` like :class:`FermiAnnealer`.

    Before every optimizer step it adds the gradient of the sparsity term (``sparsity_weight *
    sparsity_loss``) to the gates and weights, after every step it sets ``T``, steers ``mu`` and, from the
    hard phase on, freezes the decisions; every Trainer log line gets ``fermi/temperature``,
    ``fermi/sparsity``, ``fermi/target_sparsity`` and ``fermi/undecided``. The schedule is a function of the
    Trainer's ``global_step``, so a run resumed from a Trainer checkpoint continues where it was (a run
    resumed inside its hard phase decides again from the loaded weights). Under ``accelerate`` / DDP every
    process computes the same schedule from the same synchronised weights. ``total_steps`` defaults to the
    Trainer's ``max_steps``. ``budget`` / ``allocation`` / ``min_keep`` steer the gates to a MAC, parameter
    or unit budget as in :class:`FermiAnnealer` (default: the model's ``FermiConfig.budget``, when set); the
    shares are re-allocated from the current scores, so a resumed run steers on from its loaded weights.
    ``calibration_data`` (a few batches of training inputs) starts the anneal from the one-shot pruner's order of
    units (``init="auto"`` or ``"obs"``, as in :class:`FermiAnnealer`); the per-unit levels are set when the callback is made, so they are
    parameters of ``model`` by the time ``trainer.train()`` builds its optimizer.
    Use: ``Trainer(..., callbacks=[fermigates.fermi_trainer_callback(model)])``.
    """
    from transformers import TrainerCallback

    config = get_state(model).config
    budget = budget_from(budget, target_sparsity, config, "fermi_trainer_callback")
    sparsity = target_sparsity if target_sparsity is not None else (
        0.5 if config.target_sparsity is None else config.target_sparsity)  # with a budget: a placeholder
    steer = None if budget is None else BudgetSteer(model, budget, allocation, min_keep, example_inputs)
    if not isinstance(temperature, (tuple, list)):
        raise TypeError(f"temperature must be a pair (T_start, T_end), e.g. (1.0, 0.01), got {temperature!r}")
    if sparsity_weight < 0:
        raise ValueError(f"sparsity_weight must be >= 0, got {sparsity_weight!r}")
    set_start(model, init, calibration_data, min_keep)

    class FermiCallback(TrainerCallback):
        """Anneals Fermi gates inside a ``transformers.Trainer`` (see :func:`fermi_trainer_callback`)."""

        def __init__(self) -> None:
            self.schedule: AnnealSchedule | None = None

        def _ensure(self, state) -> AnnealSchedule:
            if self.schedule is None:
                steps = total_steps or state.max_steps
                if not steps or steps < 1:
                    raise ValueError("fermi_trainer_callback needs total_steps (the Trainer's max_steps is unknown)")
                self.schedule = AnnealSchedule(
                    int(steps), tuple(temperature), schedule, sparsity, sparsity_schedule, **schedule_kwargs
                )
            return self.schedule

        def _apply(self, state) -> None:
            schedule = self._ensure(state)
            if steer is not None:
                steer.maybe_update(state.global_step, schedule.hard_step)
            schedule.apply(model, state.global_step)

        @property
        def budget_result(self) -> Any:
            """With a budget: the latest :class:`fermigates.BudgetResult` (requested, predicted, units kept)."""
            return None if steer is None else steer.result

        def on_train_begin(self, args, state, control, **kwargs):
            self._apply(state)

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if sparsity_weight == 0:
                return
            with torch.enable_grad():
                loss = sparsity_loss(model, self._ensure(state), state.global_step, sparsity_weight)
                if loss.requires_grad:
                    loss.backward()

        def on_step_end(self, args, state, control, **kwargs):
            self._apply(state)

        def on_log(self, args, state, control, logs=None, **kwargs):
            stats = anneal_stats(model, self._ensure(state), state.global_step)
            extra = {f"fermi/{k}": stats[k] for k in ("temperature", "sparsity", "target_sparsity", "undecided")}
            if logs is not None:
                logs.update(extra)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(extra)

    return FermiCallback()
