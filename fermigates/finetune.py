"""``fine_tune``: a training loop for the common cases — labels or distillation, annealed gates or plain weights.

A converted model is fine-tuned under :class:`~fermigates.FermiAnnealer` (its sparsity term added to the loss,
decisions frozen for the last part of the run); a plain (baked, shrunk or dense) model is fine-tuned as it is.
The loss is the task loss when batches carry labels, otherwise distillation toward a teacher: by default the
model itself as it was when ``fine_tune`` started (gates open), i.e. the original network.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .bake import convert_from_fermi
from .core.batches import (
    BatchStream,
    as_batches,
    call_inputs,
    check_batches_finite,
    device_of,
    split_batch,
)
from .core.modules import restore, snapshot
from .core.state import find_state
from .losses import DISTILL, distill_loss, task_loss
from .methods.registry import method_of

@dataclass
class TrainLog:
    """One row per logged step: step, loss, and for gated models T, sparsity and undecided units (after a
    ``bake_when_decided`` bake: the baked decisions' values, and ``baked: 1.0``)."""

    rows: list[dict[str, float]] = field(default_factory=list)
    distill: str | None = None
    #: the bake's FermiReport when ``fine_tune(..., bake_when_decided=True)`` baked during the run
    report: Any = None
    #: how a budget was met (a :class:`fermigates.BudgetResult`) when the method's optimizer steered to one
    budget: Any = None
    #: the step at which the method's optimizer froze its decisions (None: not during the run)
    decided_at: int | None = None

    def to_dict(self) -> dict[str, Any]:
        budget = None if self.budget is None else {
            "kind": self.budget.kind, "requested": self.budget.requested, "predicted": self.budget.predicted,
            "allocation": self.budget.allocation}
        return {"distill": self.distill, "rows": self.rows, "budget": budget, "decided_at": self.decided_at}

    def save(self, path: str | Path) -> Path:
        """Write the log as JSON (what ``fermigates report`` plots as the run's curves)."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @property
    def final_loss(self) -> float | None:
        return self.rows[-1]["loss"] if self.rows else None


def fine_tune(
    model: nn.Module,
    data: Iterable[Any],
    *,
    steps: int,
    lr: float = 1e-3,
    optimizer: Callable[..., torch.optim.Optimizer] | torch.optim.Optimizer | None = None,
    weight_decay: float = 0.0,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    distill: str | None = None,
    teacher: nn.Module | None = None,
    anneal: bool | dict[str, Any] = True,
    bake_when_decided: bool = False,
    calibration_data: Any = None,
    init: str = "auto",
    log_every: int = 10,
    progress: bool = True,
    on_decided: Callable[[nn.Module, int], Any] | None = None,
) -> TrainLog:
    """Fine-tune ``model`` in place for ``steps`` optimizer steps over ``data`` (cycled), and return the log.

    Args:
        data: a DataLoader or an iterable of batches: ``(inputs, labels)`` tuples, bare input tensors, or
            Hugging Face style dicts (``labels`` key optional). A list or a DataLoader is re-read every epoch; a
            one-shot iterator (a generator) with fewer batches than ``steps`` stops with an error saying so. No
            batch is lost to looking at the first ones (calibration, the choice of loss).
        optimizer: an optimizer class / factory called as ``optimizer(params, lr=lr, weight_decay=...)``, or an
            optimizer already built on the model's parameters; default ``torch.optim.AdamW``.
        loss_fn: ``loss_fn(outputs, labels) -> loss``; default cross-entropy on the logits (or the HF
            model's own ``loss`` when the batch has labels).
        distill: ``"logits"`` or ``"hidden"``: train toward ``teacher``'s outputs instead of labels. Default:
            labels when the batches have them, else ``"logits"`` for outputs with ``logits``, ``"hidden"``
            otherwise (e.g. a sentence encoder's last hidden state).
        teacher: the model to distil from; default a frozen copy of ``model`` as it is now, gates open.
        anneal: for a converted model, train with its method's optimizer (``True``, or a dict of that
            optimizer's keyword arguments: :class:`FermiAnnealer`'s for the Fermi method, which wraps
            ``optimizer``); ``False`` trains the converted model with ``optimizer`` alone. Ignored for plain
            models. The method may set defaults of its own for the objective (``Method.fine_tune_options``):
            distilling toward the original network (no labels, no ``teacher`` given), the Fermi method with
            channel / head gates cuts at the first step by the one-shot order and allocation, re-fits the layers
            that lost inputs toward the original, and trains the cut model (toward the original the one-shot
            order is already the target's, and a soft phase measured worse: docs/anneal-ablations.md); any of
            those keywords given in ``anneal={...}`` replaces the whole preset.
        bake_when_decided: for a converted model: as soon as the annealer freezes the decisions, bake and
            shrink the model (:func:`fermigates.convert_from_fermi`), ridge-calibrated on ``calibration_data``
            (default: the first 8 training batches) toward the model as trained just before the freeze, and
            fine-tune the small plain model for the rest of the run (a fresh optimizer). The model returned is
            then already baked; the bake's report is ``log.report``. When distilling from the default teacher
            (the original network) the calibration fits toward the teacher instead: that is what the loss asks
            the student to match.
        calibration_data: the batches ``init="obs"`` ranks units on and ``bake_when_decided`` calibrates on
            (default: the first 8 training batches).
        init: for a converted model with channel / head gates: ``"scores"`` starts the anneal from the weight
            scores' order of units, ``"obs"`` from the order in which the one-shot pruner
            (:func:`fermigates.prune`) would remove them on ``calibration_data`` (see ``FermiAnnealer(init=)``).
            ``"auto"`` (default): ``"obs"`` when the annealer is built here and the model has channel / head
            gates, else ``"scores"``.
        log_every: a log row every this many steps (and at the last).
        on_decided: called as ``on_decided(model, step)`` once, right after the step at which the method's
            optimizer froze its decisions (after the bake when ``bake_when_decided``): the model is then the cut
            one, e.g. to evaluate it before the rest of the run recovers what the cut lost.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if distill is not None and distill not in DISTILL:
        raise ValueError(f"distill must be None or one of {DISTILL}, got {distill!r}")
    stream = BatchStream(data, "data")
    first = stream.peek(1)
    if not first:
        raise ValueError("data is empty: it yielded no batch")
    was_training = model.training
    saved = snapshot(model)  # a failure before the first step leaves the model as it was
    try:
        return _fine_tune(model, stream, first[0], steps=steps, lr=lr, optimizer=optimizer,
                          weight_decay=weight_decay, loss_fn=loss_fn, distill=distill, teacher=teacher,
                          anneal=anneal, bake_when_decided=bake_when_decided, calibration_data=calibration_data,
                          init=init, log_every=log_every, progress=progress, saved=saved, on_decided=on_decided)
    except BaseException:
        model.train(was_training)
        raise


def _fine_tune(model, stream, first, *, steps, lr, optimizer, weight_decay, loss_fn, distill, teacher, anneal,
               bake_when_decided, calibration_data, init, log_every, progress, saved, on_decided) -> TrainLog:
    device = device_of(model)
    converted = find_state(model) is not None
    method = method_of(model) if converted else None
    try:
        _, labels = split_batch(first)
        if distill is None and labels is None:
            with torch.no_grad():
                out = call_inputs(model.eval(), split_batch(first)[0], device)
            distill = ("logits" if getattr(out, "logits", None) is not None or isinstance(out, torch.Tensor)
                       else "hidden")
        own_teacher = distill is not None and teacher is None
        if own_teacher:
            teacher = copy.deepcopy(model)
            if converted:
                method.make_dense(teacher)
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        opt, trainer = _optimizer(model, method, stream, steps=steps, lr=lr, optimizer=optimizer,
                                  weight_decay=weight_decay, anneal=anneal, init=init,
                                  objective="original" if own_teacher else "task",
                                  calibration_data=calibration_data, bake_when_decided=bake_when_decided,
                                  progress=progress)
    except BaseException:
        restore(saved)
        raise
    calib = _calibration(stream, calibration_data) if bake_when_decided else None

    log = TrainLog(distill=distill)
    after_bake = None
    model.train()
    bar = tqdm(range(1, steps + 1), desc="fine-tuning", disable=not progress, leave=False)
    for step in bar:
        inputs, labels = split_batch(next(stream))
        out = call_inputs(model, inputs, device)
        if distill is not None:
            with torch.no_grad():
                target = call_inputs(teacher, inputs, device)
            mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
            loss = distill_loss(out, target, distill, mask)
        elif loss_fn is not None:
            loss = loss_fn(out, labels)
        else:
            loss = task_loss(out, labels)
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(f"fine_tune step {step}: the loss is {float(loss.detach())}; nothing was stepped "
                                     "(lower lr, or check the batch)")
        regularizer = getattr(trainer, "sparsity_loss", None)
        total = loss + regularizer().to(loss.device) if regularizer is not None else loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        if calib is not None and trainer is not None and not own_teacher and getattr(trainer, "decides_next_step", False):
            soft = copy.deepcopy(model)  # the model as trained, the moment before its decisions freeze
        opt.step()
        if calib is not None and trainer is not None and getattr(trainer, "decided", False):
            after_bake = {k: v for k, v in _stats(trainer).items() if k in _DECISION_STATS}
            after_bake["baked"] = 1.0
            log.budget = getattr(trainer, "budget_result", None)
            reference = teacher if own_teacher else soft
            opt, trainer = _bake_and_continue(model, reference, calib, lr, weight_decay, optimizer, log), None
            del reference
        if on_decided is not None and log.decided_at is None and (
                after_bake is not None or getattr(trainer, "decided", False)):
            log.decided_at = step
            on_decided(model, step)
            model.train()
        if step % log_every == 0 or step == steps:
            row = {"step": step, "loss": float(loss.detach())}
            if trainer is not None:
                row.update({k: v for k, v in _stats(trainer).items() if k in _DECISION_STATS})
            elif after_bake is not None:
                row.update(after_bake)
            log.rows.append(row)
            bar.set_postfix({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in row.items() if k != "step"})
    if trainer is not None:
        log.budget = getattr(trainer, "budget_result", None)
    if log.report is not None and log.budget is not None:
        log.report.budget = log.budget
    model.eval()
    return log


#: the statistics of a method's optimizer that a log row carries
_DECISION_STATS = ("temperature", "sparsity", "target_sparsity", "undecided")


def _stats(trainer: Any) -> dict[str, float]:
    stats = getattr(trainer, "stats", None)
    return stats() if callable(stats) else {}


def _calibration(stream: BatchStream, calibration_data: Any) -> list:
    """The calibration batches: ``calibration_data``, else the first 8 training batches (still trained on)."""
    if calibration_data is not None:
        return list(calibration_data)
    calib = stream.peek(8)
    check_batches_finite(as_batches(calib, 64, None, "data"), "data")  # named as the user passed them
    return calib


def _optimizer(model, method, stream, *, steps, lr, optimizer, weight_decay, anneal, init, objective,
               calibration_data, bake_when_decided, progress) -> tuple[torch.optim.Optimizer, Any]:
    """``(the optimizer to step, the method's optimizer or None)``."""
    anneal_kwargs = dict(anneal) if isinstance(anneal, dict) else {}
    if "init" in anneal_kwargs:  # the method optimizer's own keyword, passed through anneal={...}
        if init != "auto":
            raise ValueError("init given twice: as init= and in anneal={'init': ...}; pass one")
        init = anneal_kwargs.pop("init")
    given = optimizer if isinstance(optimizer, torch.optim.Optimizer) else None
    uses_method = method is not None and anneal is not False and not (given is not None and method.is_method_optimizer(given))
    if bake_when_decided and not (method is not None and anneal is not False):
        raise ValueError("bake_when_decided=True needs a converted model trained with its method's optimizer "
                         "(anneal=True)")
    if init != "auto" and not uses_method:
        raise ValueError(f"init={init!r} sets where the method's optimizer starts: it needs a converted model, "
                         "anneal=True and no method optimizer (e.g. a FermiAnnealer) passed as optimizer (pass init= "
                         "to that optimizer instead)")
    if not uses_method:
        if given is not None:
            opt = given
        else:
            params = [p for p in model.parameters() if p.requires_grad]
            opt = (optimizer or torch.optim.AdamW)(params, lr=lr, weight_decay=weight_decay)
        trainer = opt if method is not None and anneal is not False else None
        if bake_when_decided and not hasattr(trainer, "decided"):
            raise ValueError("bake_when_decided=True needs an optimizer that freezes the decisions (e.g. "
                             "FermiAnnealer)")
        return opt, trainer
    options = {**anneal_kwargs, **({"init": init} if init != "auto" else {})}
    preset = method.fine_tune_options(model, objective=objective)
    if not set(preset) & set(options):  # a preset is all or nothing: used when none of its keys was given
        options = {**preset, **options}
    # the method checks these when it uses them (the Fermi method ranks units on them for its start)
    calib = list(calibration_data) if calibration_data is not None else stream.peek(8)
    if method.wraps_optimizer:
        if given is None:
            params = [p for p in model.parameters() if p.requires_grad]
            given = (optimizer or torch.optim.AdamW)(params, lr=lr, weight_decay=weight_decay)
        opt = method.optimizer(model, total_steps=steps, base=given, calibration_data=calib, progress=progress,
                               **options)
    else:
        if optimizer is not None:
            raise ValueError(f"method={method.name!r} trains with its own optimizer: pass no optimizer= (or "
                             "anneal=False to train the converted model with yours)")
        opt = method.optimizer(model, lr=lr, total_steps=steps, calibration_data=calib, progress=progress,
                               **options)
    if bake_when_decided and not hasattr(opt, "decided"):
        raise ValueError(f"bake_when_decided=True needs a method whose decisions freeze during the run; "
                         f"method={method.name!r} decides at every step")
    return opt, opt


def _bake_and_continue(model, reference, calib, lr, weight_decay, optimizer, log) -> torch.optim.Optimizer:
    """Bake ``model`` calibrated toward ``reference`` (the soft model as trained, or the teacher); a new
    optimizer on the small model's parameters."""
    log.report = convert_from_fermi(model, calibration_data=calib, reference=reference, progress=False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if isinstance(optimizer, torch.optim.Optimizer):  # a user's optimizer: same hyper-parameters, new params
        return type(optimizer)(params, **optimizer.defaults)
    return (optimizer or torch.optim.AdamW)(params, lr=lr, weight_decay=weight_decay)
