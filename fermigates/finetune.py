"""``fine_tune``: a training loop for the common cases — labels or distillation, annealed gates or plain weights.

A converted model is fine-tuned under :class:`~fermigates.FermiAnnealer` (its sparsity term added to the loss,
decisions frozen for the last part of the run); a plain (baked, shrunk or dense) model is fine-tuned as it is.
The loss is the task loss when batches carry labels, otherwise distillation toward a teacher: by default the
model itself as it was when ``fine_tune`` started (gates open), i.e. the original network.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .calibration.engine import _batches, _device, check_batches_finite
from .losses import DISTILL, _call, _split, _task_loss, distill_loss
from .methods.fermi.anneal import FermiAnnealer
from .methods.fermi.model import all_gates, disable_gates
from .methods.fermi.prior import INITS, resolve_init
from .state import _STATE_ATTR

@dataclass
class TrainLog:
    """One row per logged step: step, loss, and for gated models T, sparsity and undecided units (after a
    ``bake_when_decided`` bake: the baked decisions' values, and ``baked: 1.0``)."""

    rows: list[dict[str, float]] = field(default_factory=list)
    distill: str | None = None
    #: the bake's FermiReport when ``fine_tune(..., bake_when_decided=True)`` baked during the run
    report: Any = None

    def to_dict(self) -> dict[str, Any]:
        return {"distill": self.distill, "rows": self.rows}

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
) -> TrainLog:
    """Fine-tune ``model`` in place for ``steps`` optimizer steps over ``data`` (cycled), and return the log.

    Args:
        data: a DataLoader or an iterable of batches: ``(inputs, labels)`` tuples, bare input tensors, or
            Hugging Face style dicts (``labels`` key optional). Re-iterated when exhausted.
        optimizer: an optimizer class / factory called as ``optimizer(params, lr=lr, weight_decay=...)``, or an
            optimizer already built on the model's parameters; default ``torch.optim.AdamW``.
        loss_fn: ``loss_fn(outputs, labels) -> loss``; default cross-entropy on the logits (or the HF
            model's own ``loss`` when the batch has labels).
        distill: ``"logits"`` or ``"hidden"``: train toward ``teacher``'s outputs instead of labels. Default:
            labels when the batches have them, else ``"logits"`` for outputs with ``logits``, ``"hidden"``
            otherwise (e.g. a sentence encoder's last hidden state).
        teacher: the model to distil from; default a frozen copy of ``model`` as it is now, gates open.
        anneal: for a converted model, wrap the optimizer in :class:`FermiAnnealer` (``True``, or a dict of its
            keyword arguments); ``False`` trains the gated model without annealing. Ignored for plain models.
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
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if distill is not None and distill not in DISTILL:
        raise ValueError(f"distill must be None or one of {DISTILL}, got {distill!r}")
    if isinstance(data, (torch.Tensor, Mapping, str, bytes)) or not isinstance(data, Iterable):
        raise TypeError(f"data must be a DataLoader or an iterable of batches, got {type(data).__name__}")
    first = next(iter(data), None)
    if first is None:
        raise ValueError("data is empty: it yielded no batch")
    device = _device(model)
    _, labels = _split(first)
    if distill is None and labels is None:
        with torch.no_grad():
            out = _call(model.eval(), _split(first)[0], device)
        distill = "logits" if getattr(out, "logits", None) is not None or isinstance(out, torch.Tensor) else "hidden"
    own_teacher = distill is not None and teacher is None
    if own_teacher:
        teacher = copy.deepcopy(model)
        if getattr(teacher, _STATE_ATTR, None) is not None:
            disable_gates(teacher)
    if teacher is not None:
        teacher.eval().requires_grad_(False)

    params = [p for p in model.parameters() if p.requires_grad]
    if isinstance(optimizer, torch.optim.Optimizer):
        opt = optimizer
    else:
        opt = (optimizer or torch.optim.AdamW)(params, lr=lr, weight_decay=weight_decay)
    converted = getattr(model, _STATE_ATTR, None) is not None
    if bake_when_decided and not (converted and anneal is not False):
        raise ValueError("bake_when_decided=True needs a converted model trained with the annealer (anneal=True)")
    builds_annealer = converted and anneal is not False and not isinstance(opt, FermiAnnealer)
    anneal_kwargs = dict(anneal) if isinstance(anneal, dict) else {}
    if "init" in anneal_kwargs:  # FermiAnnealer's own keyword, passed through anneal={...}
        if init != "auto":
            raise ValueError("init given twice: as init= and in anneal={'init': ...}; pass one")
        init = anneal_kwargs.pop("init")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if init == "auto":  # the training batches stand in for calibration data (``data`` is never None here)
        init = resolve_init(model, init, data) if builds_annealer else "scores"
    if init != "scores" and not builds_annealer:
        raise ValueError(f"init={init!r} sets where the annealer starts: it needs a converted model, anneal=True "
                         "and no FermiAnnealer passed as optimizer (pass init= to that FermiAnnealer instead)")
    calib = None
    if bake_when_decided or init != "scores":
        calib = list(calibration_data) if calibration_data is not None else list(itertools.islice(data, 8))
        if calibration_data is None:  # the training batches stand in: name them as the user passed them
            check_batches_finite(_batches(calib, 64, None, "data"), "data")
    annealer = None
    if converted and anneal is not False:
        kwargs = {**anneal_kwargs, "init": init}
        if init != "scores":
            kwargs["calibration_data"] = calib
        annealer = opt if isinstance(opt, FermiAnnealer) else FermiAnnealer(opt, model, total_steps=steps, **kwargs)
        opt = annealer
    if not bake_when_decided:
        calib = None

    log = TrainLog(distill=distill)
    after_bake = None
    batches = itertools.chain.from_iterable(itertools.repeat(data))  # re-iterates a DataLoader every epoch
    model.train()
    bar = tqdm(range(1, steps + 1), desc="fine-tuning", disable=not progress, leave=False)
    for step in bar:
        inputs, labels = _split(next(batches))
        out = _call(model, inputs, device)
        if distill is not None:
            with torch.no_grad():
                target = _call(teacher, inputs, device)
            mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
            loss = distill_loss(out, target, distill, mask)
        elif loss_fn is not None:
            loss = loss_fn(out, labels)
        else:
            loss = _task_loss(out, labels)
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(f"fine_tune step {step}: the loss is {float(loss.detach())}; nothing was stepped "
                                     "(lower lr, or check the batch)")
        total = loss + annealer.sparsity_loss().to(loss.device) if annealer is not None else loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        if (calib is not None and annealer is not None and not own_teacher
                and annealer.step_count + 1 >= annealer.schedule.hard_step):
            soft = copy.deepcopy(model)  # the model as trained, the moment before its decisions freeze
        opt.step()
        if calib is not None and annealer is not None and annealer.decided:
            stats = annealer.stats()  # the decisions the bake fixes: the rows after it carry them on
            after_bake = {k: stats[k] for k in ("temperature", "sparsity", "target_sparsity", "undecided")}
            after_bake["baked"] = 1.0
            reference = teacher if own_teacher else soft
            opt, annealer = _bake_and_continue(model, reference, calib, lr, weight_decay, optimizer, log), None
            del reference
        if step % log_every == 0 or step == steps:
            row = {"step": step, "loss": float(loss.detach())}
            if annealer is not None:
                stats = annealer.stats()
                row.update({k: stats[k] for k in ("temperature", "sparsity", "target_sparsity", "undecided")})
            elif after_bake is not None:
                row.update(after_bake)
            log.rows.append(row)
            bar.set_postfix({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in row.items() if k != "step"})
    model.eval()
    return log


def _bake_and_continue(model, reference, calib, lr, weight_decay, optimizer, log) -> torch.optim.Optimizer:
    """Bake ``model`` calibrated toward ``reference`` (the soft model as trained, or the teacher); a new
    optimizer on the small model's parameters."""
    from .bake import convert_from_fermi

    for gate in all_gates(reference):
        gate.decided = None
    log.report = convert_from_fermi(model, calibration_data=calib, reference=reference, progress=False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if isinstance(optimizer, torch.optim.Optimizer):  # a user's optimizer: same hyper-parameters, new params
        return type(optimizer)(params, **optimizer.defaults)
    return (optimizer or torch.optim.AdamW)(params, lr=lr, weight_decay=weight_decay)
