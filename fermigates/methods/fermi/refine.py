"""Gate-only refinement: with the weights frozen, learn *which* channels and heads to keep.

One-shot pruning ranks units by their weight scores. With a short gradient run on calibration data the
gates can do better: every structured gate gets per-unit Fermi levels (:meth:`FermiGate.add_unit_levels`),
each gate's ``mu`` stays pinned at the quantile that removes the target fraction of its units, and the
offsets are trained to make the soft-gated model reproduce the dense model's outputs while ``T`` is annealed
toward the hard decision. Only the offsets receive gradients; no weight changes.
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ...calibration.selection import input_gram, select_channels_obs
from ...core.batches import as_batches, attention_mask, check_batches_finite, feed, output_tensors
from ...core.state import get_state
from .anneal import AnnealSchedule, pin_to_quantile
from .model import distinct_gates, gated_modules, gates_open, hard_gates

__all__ = ["refine_gates", "RefineResult"]


@dataclass
class RefineResult:
    """What :func:`refine_gates` did: losses (relative squared error to the dense outputs) and decisions."""

    steps: int
    #: hard-gated output error with units ranked by score alone, and after refinement
    loss_start: float
    loss_end: float
    units: int
    #: units whose keep/remove decision differs from ranking by score alone
    changed: int
    losses: list[float] = field(default_factory=list, repr=False)

    def __str__(self) -> str:
        return (f"gate refinement: {self.steps} steps, output error {self.loss_start:.4g} -> {self.loss_end:.4g}, "
                f"{self.changed}/{self.units} unit decisions changed from the score ranking")


def _row_mask(batch: Any, out: torch.Tensor) -> torch.Tensor | None:
    """Attention mask broadcastable to ``out`` (padding excluded from the loss), when the batch has one."""
    mask = attention_mask(batch)
    if mask is None or out.dim() < 2 or tuple(mask.shape) != tuple(out.shape[: mask.dim()]):
        return None
    return mask.to(out.device, out.dtype).reshape(*mask.shape, *([1] * (out.dim() - mask.dim())))


def _relative_error(out: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``||out - ref||² / ||ref||²`` over the rows ``mask`` keeps."""
    diff, energy = (out.float() - ref.float()).square(), ref.float().square()
    if mask is not None:
        diff, energy = diff * mask, energy * mask
    return diff.sum() / energy.sum().clamp_min(1e-12)


def refine_gates(
    model: nn.Module,
    data: Any,
    *,
    steps: int = 64,
    lr: float = 0.05,
    temperature: tuple[float, float] = (0.1, 1e-3),
    target_sparsity: float | dict[str, float] | None = None,
    match: str = "layers",
    init: str = "scores",
    progress: bool = True,
) -> RefineResult:
    """Train the structured gates of a converted ``model`` on ``data`` with the weights frozen.

    The loss is the relative squared error between the gated model's floating-point outputs and the dense
    model's (padding excluded through an ``attention_mask``); with ``match="layers"`` (default) also the
    outputs of every layer that consumes gated channels, so the kept units are ones whose loss the layer can
    see (and that :func:`fermigates.calibrate` can then best repair); ``match="output"``: the outputs only. Every channel/head gate keeps exactly its
    share ``target_sparsity`` (default: the model's config) at every step; the gradient decides which units
    are in that share. ``T`` goes from ``temperature[0]`` to ``temperature[1]`` (exponential); at the end the
    gates hold hard decisions ready for :func:`fermigates.convert_from_fermi`. ``data`` as for calibration.
    Weight-granularity gates are left as they are.

    ``init="obs"`` starts each gate whose units are the inputs of one ``nn.Linear`` (e.g. MLP neurons) from
    the units greedy Optimal Brain Surgeon removal would keep, given that layer's input Gram matrix on
    ``data``: the choice a later ridge calibration can best repair. ``steps=0`` then keeps that choice.
    """
    state = get_state(model)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if init not in ("scores", "obs"):
        raise ValueError(f"init must be 'scores' or 'obs', got {init!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    gates = [g for g, owner in distinct_gates(model) if owner is None]
    if not gates:
        raise ValueError("model has no channel or head gates to refine: convert it with granularity 'channel' "
                         "and/or 'head'")
    if match not in ("layers", "output"):
        raise ValueError(f"match must be 'layers' or 'output', got {match!r}")
    target = state.config.target_sparsity if target_sparsity is None else target_sparsity
    schedule = AnnealSchedule(max(steps, 1), tuple(temperature), "exponential", target, "constant", tolerance=0.0,
                              hard_after=1.0)
    batches = as_batches(data, batch_size=32, max_batches=None)
    check_batches_finite(batches, "data")
    consumers = [m for m in gated_modules(model).values() if m._slots] if match == "layers" else []
    seen: list[torch.Tensor] = []

    def record(module: nn.Module, args: Any, out: torch.Tensor) -> None:
        seen.append(out)

    def run(batch: Any) -> list[torch.Tensor]:
        seen.clear()
        outs = output_tensors(feed(model, batch))
        return outs + list(seen)

    def error(outs: list[torch.Tensor], refs: list[torch.Tensor], batch: Any) -> torch.Tensor:
        if len(outs) != len(refs):
            raise RuntimeError("the model returned a different number of outputs than in the dense pass")
        return sum(_relative_error(o, r, _row_mask(batch, o)) for o, r in zip(outs, refs)) / len(outs)

    with torch.no_grad():
        scores = [g.score() for g in gates]  # the weights are frozen: the scores cannot change

    def pin(step: int) -> None:
        with torch.no_grad():
            for g, score in zip(gates, scores):
                g.set_temperature(schedule.temperature_at(step))
                pin_to_quantile(g, g.normalised(score), schedule.sparsity_at(step, g.kind))

    def hard_error() -> float:
        with torch.no_grad(), hard_gates(model):
            return sum(float(error(run(b), r, b)) for b, r in zip(batches, refs)) / len(batches)

    was_training = model.training
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    saved = [(g, g.mu_offset, g.mu.detach().clone(), g.temperature.clone(), g.decided) for g in gates]
    handles = [m.register_forward_hook(record) for m in consumers]
    try:
        for g in gates:
            g.decided = None  # refinement decides again
        model.eval()
        with torch.no_grad(), gates_open(model):
            refs = [[t.detach() for t in run(b)] for b in batches]
        pin(max(steps, 1))
        baseline = [g.keep_units().clone() for g in gates]
        loss_start = hard_error()
        for p, _ in frozen:
            p.requires_grad_(False)
        if init == "obs" and not _obs_levels(model, gates, batches, schedule):
            warnings.warn("refine_gates(init='obs'): no gate feeds exactly one nn.Linear column per unit; "
                          "starting from the score ranking", stacklevel=2)
        # per-unit levels are what the steps train (none for steps=0, unless init='obs' wrote its choice in them)
        offsets = [g.add_unit_levels().requires_grad_(True) for g in gates] if steps else []
        opt = torch.optim.Adam(offsets, lr=lr) if offsets else None
        pin(0)
        losses = []
        bar = tqdm(range(steps), desc="refining gates", disable=not progress, leave=False)
        for step, i in zip(bar, itertools.cycle(range(len(batches)))):
            opt.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss = error(run(batches[i]), refs[i], batches[i])
                loss.backward()
            opt.step()
            pin(step + 1)
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4g}", T=f"{schedule.temperature_at(step + 1):.3g}")
        pin(max(steps, 1))
        with torch.no_grad():
            for g in gates:  # the refined decision is final: the model computes (and bakes) exactly it
                g.decided = g.keep_units().clone()
        changed = sum(int((g.keep_units() != b).sum()) for g, b in zip(gates, baseline))
        loss_end = hard_error()
    except BaseException:
        with torch.no_grad():
            for g, offset, mu, temperature, decided in saved:
                g.decided = decided
                g.mu_offset = offset
                g.mu.copy_(mu)
                g.temperature.copy_(temperature)
        raise
    finally:
        for h in handles:
            h.remove()
        seen.clear()
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.train(was_training)
    return RefineResult(steps, loss_start, loss_end, sum(g.n_units for g in gates), changed, losses)


@torch.no_grad()
def _obs_levels(model: nn.Module, gates: list, batches: list, schedule: AnnealSchedule) -> int:
    """Per-unit levels that put the units greedy OBS keeps above the threshold; returns how many gates."""
    uses: dict[int, list] = {}
    for name, module in gated_modules(model).items():
        for slot in module._slots:
            uses.setdefault(id(slot.gate), []).append((name, module, slot))
    chosen = {}
    for g in gates:
        users = uses.get(id(g), [])
        if len(users) != 1:
            continue
        name, module, slot = users[0]
        removed = math.floor(schedule.final_sparsity(g.kind) * g.n_units)
        if (isinstance(module, nn.Linear) and slot.index.shape[1] == 1 and slot.index.numel() == module.in_features
                and 0 < removed < g.n_units):
            chosen[name] = (g, module, slot, removed)
    if not chosen:
        return 0
    with gates_open(model):
        grams = input_gram(model, batches, list(chosen))
    for name, (g, module, slot, removed) in chosen.items():
        kept_cols = select_channels_obs(module, grams[name], g.n_units - removed)
        unit_of = torch.empty(module.in_features, dtype=torch.long)
        unit_of[slot.index[:, 0].cpu()] = torch.arange(g.n_units)
        keep = torch.zeros(g.n_units, dtype=torch.bool)
        keep[unit_of[kept_cols.cpu()]] = True
        base = (g.score() / g.scale).float().cpu()
        wanted = keep.float() + 0.01 * base / base.max().clamp_min(1e-30)  # score order breaks ties
        g.add_unit_levels().copy_((base - wanted).to(g.mu.device))
    return len(chosen)
