"""Where an anneal starts: per-unit Fermi levels that put the one-shot pruner's ranking into the gates.

By default the annealer ranks a gate's units by their weight scores. ``init="obs"`` ranks them as
:func:`fermigates.prune` does (OBS on the calibration inputs' Gram matrix where a gate feeds one Linear, the
activation-aware energy elsewhere), and writes that ranking into per-unit offsets of the Fermi level
(:meth:`FermiGate.add_unit_levels`): the unit the one-shot pruner would remove first gets the smallest
normalised score of its gate, and so on. The distribution of each gate's normalised scores is unchanged, so the
annealer's quantile band and sparsity schedule behave exactly as before; only the order differs. The offsets
stay trainable: annealing starts from the one-shot choice and can still move units across.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ...allocation.budget import unit_floor
from ...allocation.importance import ranked_importance
from .model import allocatable, structured_gates

INITS = ("auto", "scores", "obs")


def resolve_init(model: nn.Module, init: str, calibration_data: Any) -> str:
    """``init`` with ``"auto"`` made concrete: ``"obs"`` where there are calibration inputs and channel / head
    gates to rank, else ``"scores"``."""
    if init != "auto":
        return init
    return "obs" if calibration_data is not None and structured_gates(model) else "scores"


@torch.no_grad()
def set_rank_prior(model: nn.Module, batches: list[Any], min_keep: float | int = 0.1,
                   ridge: float = 1e-2, progress: bool = False) -> list[nn.Parameter]:
    """Set every structured gate's per-unit offsets so its units rank as the one-shot OBS selection ranks them;
    return the offsets (trainable parameters, created where the gate had none)."""
    gates = structured_gates(model)
    if not gates:
        raise ValueError("init='obs' ranks channel and head gates: convert with granularity 'channel' and/or "
                         "'head' (weight gates have no one-shot ranking; use init='scores')")
    target = allocatable(model)
    floors = [unit_floor(g.n_units, min_keep, g.step) for g in target.groups]
    ranked = ranked_importance(target, floors, "obs", batches, ridge, progress)
    offsets, wanted_all = [], []
    for g, (order, value) in zip(gates, ranked):
        base = (g.score().detach() / g.scale).float().cpu()
        finite = torch.isfinite(value)
        # the units a greedy OBS never reaches (the gate's floor) keep their score order among themselves
        rest = order[~finite]
        order = torch.cat([order[finite], rest[base[rest].argsort(stable=True)]])
        wanted = torch.empty_like(base)
        wanted[order] = base.sort().values
        wanted_all.append(base - wanted)
    for g, level in zip(gates, wanted_all):  # nothing is written before every gate is ranked
        offset = g.add_unit_levels()
        offset.copy_(level.to(offset.device))
        offset.requires_grad_(True)
        offsets.append(offset)
    return offsets
