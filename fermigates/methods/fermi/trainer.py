"""Hugging Face ``Trainer`` integration: a callback that does what ``FermiAnnealer`` does around the optimizer."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...allocation.budget import budget_from
from ...core.state import get_state
from .anneal import AnnealControl, AnnealSchedule, anneal_stats


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
    allocation: str = "auto",
    min_keep: float = 0.1,
    example_inputs: Any = None,
    init: str = "auto",
    calibration_data: Any = None,
    importance: str = "magnitude",
    steer: str = "band",
    calibrate: str | None = "auto",
    calibrate_toward: str = "dense",
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
    parameters of ``model`` by the time ``trainer.train()`` builds its optimizer. Without calibration data the
    inputs of the first training forwards are ranked on, as :class:`FermiAnnealer` does. ``importance``,
    ``steer``, ``calibrate`` and ``calibrate_toward`` are :class:`FermiAnnealer`'s.
    Use: ``Trainer(..., callbacks=[fermigates.fermi_trainer_callback(model)])``.
    """
    from transformers import TrainerCallback

    config = get_state(model).config
    budget = budget_from(budget, target_sparsity, config, "fermi_trainer_callback")
    sparsity = target_sparsity if target_sparsity is not None else (
        0.5 if config.target_sparsity is None else config.target_sparsity)  # with a budget: a placeholder
    if not isinstance(temperature, (tuple, list)):
        raise TypeError(f"temperature must be a pair (T_start, T_end), e.g. (1.0, 0.01), got {temperature!r}")
    if sparsity_weight < 0:
        raise ValueError(f"sparsity_weight must be >= 0, got {sparsity_weight!r}")
    if total_steps is not None:  # refuse bad schedule arguments now, not when training starts
        AnnealSchedule(int(total_steps), tuple(temperature), schedule, sparsity, sparsity_schedule, **schedule_kwargs)
    control = AnnealControl(model, budget=budget, allocation=allocation, min_keep=min_keep,
                            example_inputs=example_inputs, init=init, calibration_data=calibration_data,
                            importance=importance, steer=steer, calibrate=calibrate,
                            calibrate_toward=calibrate_toward, temperature=tuple(temperature))

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
                control.bind(self.schedule)
            return self.schedule

        @property
        def budget_result(self) -> Any:
            """With a budget: the latest :class:`fermigates.BudgetResult` (requested, predicted, units kept)."""
            return control.budget_result

        @property
        def calibrations(self) -> list:
            """With ``calibrate``: the report of every calibration so far (the last one at the freeze)."""
            return control.calibrations

        def on_train_begin(self, args, state, control_, **kwargs):
            self._ensure(state)
            control.steer_to(state.global_step)
            control.apply(state.global_step)

        def on_pre_optimizer_step(self, args, state, control_, **kwargs):
            if sparsity_weight == 0:
                return
            self._ensure(state)
            with torch.enable_grad():
                loss = control.loss(state.global_step, sparsity_weight)
                if loss.requires_grad:
                    loss.backward()

        def on_step_end(self, args, state, control_, **kwargs):
            self._ensure(state)
            control.after_optimizer_step(state.global_step)

        def on_log(self, args, state, control_, logs=None, **kwargs):
            stats = anneal_stats(model, self._ensure(state), state.global_step)
            extra = {f"fermi/{k}": stats[k] for k in ("temperature", "sparsity", "target_sparsity", "undecided")}
            if logs is not None:
                logs.update(extra)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(extra)

    return FermiCallback()
