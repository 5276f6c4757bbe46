"""Which units of a structured gate go first, while the anneal runs: orders written into per-unit Fermi levels.

A gate keeps the units whose normalised score ``score / scale - offset`` lies above its Fermi level. An order
of removal is written into the per-unit offsets (:meth:`FermiGate.add_unit_levels`) so that the unit to go first
gets the gate's smallest normalised score, the next one the second smallest, and so on: the distribution of the
gate's normalised scores does not change, so the annealer's schedule and band act as before; only which unit
holds which score does. Orders come from

* ``"obs"``: the one-shot pruner's importance (:func:`fermigates.allocation.importance.ranked_importance`: OBS on
  the calibration inputs' Gram matrix where a gate feeds one Linear, activation-aware energy elsewhere), on the
  weights as they are when it is computed;
* ``"taylor"``: the first-order Taylor importance of each unit's gate, ``E[(dL/dP_u)^2]`` (Molchanov et al.
  2019), accumulated from the gradients of the training steps themselves (:class:`TaylorTracker`): no extra
  data or forward passes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...allocation.budget import unit_floor
from ...allocation.importance import ranked_importance
from .layers import PROBABILITY_HOOKS
from .model import allocatable, structured_gates

#: how units are ranked while the sparsity ramps (see ``FermiAnnealer(importance=...)``)
IMPORTANCES = ("magnitude", "obs", "taylor")

Ranked = list[tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def obs_ranking(model: nn.Module, batches: list[Any], min_keep: float = 0.1, ridge: float = 1e-2,
                progress: bool = False) -> Ranked:
    """Per structured gate: ``(removal order, non-decreasing importance)`` as :func:`fermigates.prune` ranks them
    (units a greedy OBS never reaches, the gate's floor, at infinite importance); ``progress``: bars."""
    target = allocatable(model)
    floors = [unit_floor(g.n_units, min_keep, g.step) for g in target.groups]
    return ranked_importance(target, floors, "obs", batches, ridge, progress)


@torch.no_grad()
def offsets_for(gate: nn.Module, order: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
    """The per-unit offsets that make ``gate``'s units rank in ``order`` (first removed first). Units whose
    ``importance`` is infinite (never reached by a greedy search) keep their score order among themselves."""
    base = (gate.score().detach() / gate.scale).float().cpu()
    order = order.cpu()
    if importance is not None:
        finite = torch.isfinite(importance.cpu())
        rest = order[~finite]
        order = torch.cat([order[finite], rest[base[rest].argsort(stable=True)]])
    wanted = torch.empty_like(base)
    wanted[order] = base.sort().values
    return base - wanted


@torch.no_grad()
def write_orders(gates: list[nn.Module], ranked: Ranked) -> list[nn.Parameter]:
    """Write every gate's order (all computed before any is written) into its per-unit offsets, created where the
    gate had none; returns the offsets (trainable)."""
    levels = [offsets_for(g, order, value) for g, (order, value) in zip(gates, ranked)]
    out = []
    for g, level in zip(gates, levels):
        offset = g.add_unit_levels()
        offset.copy_(level.to(offset.device))
        offset.requires_grad_(True)
        out.append(offset)
    return out


class TaylorTracker:
    """Accumulates ``E[(dL/dP_u)^2]`` for every unit of every structured gate from the training backward passes.

    Hooks the gates' soft probabilities (:meth:`GroupGate.probability`): each backward through them adds the
    squared gradient of the loss with respect to each unit's retention probability to an exponential moving
    average. ``ranked()`` gives each gate's units by that importance (smallest first). Gradients stop once the
    decisions are frozen (the hard phase does not read the soft probabilities).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9) -> None:
        self.gates = structured_gates(model)
        if not self.gates:
            raise ValueError("importance='taylor' ranks channel and head gates: convert with granularity 'channel' "
                             "and/or 'head'")
        self.decay = decay
        self.scores = [torch.zeros(g.n_units) for g in self.gates]
        self.seen = [0] * len(self.gates)
        for i, gate in enumerate(self.gates):
            PROBABILITY_HOOKS[gate] = self._hook(i)

    def _hook(self, i: int):
        def attach(p: torch.Tensor) -> None:
            p.register_hook(lambda grad: self._add(i, grad))
        return attach

    @torch.no_grad()
    def _add(self, i: int, grad: torch.Tensor) -> None:
        sq = grad.detach().float().square().cpu()
        self.scores[i] = sq if self.seen[i] == 0 else self.decay * self.scores[i] + (1 - self.decay) * sq
        self.seen[i] += 1

    def ready(self) -> bool:
        """True once every gate has seen a gradient."""
        return all(self.seen)

    def ranked(self) -> Ranked:
        out = []
        for score in self.scores:
            order = score.double().argsort(stable=True)
            out.append((order, score.double()[order]))
        return out

    def close(self) -> None:
        for gate in self.gates:
            PROBABILITY_HOOKS.pop(gate, None)
