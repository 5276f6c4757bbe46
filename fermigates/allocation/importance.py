"""Importance of every unit of every group: a removal order and a non-decreasing cost per position.

Like Torch-Pruning's ``Importance``, a selection is a function of a group that returns one score per unit;
here each group also gets the greedy order in which its units go. ``"magnitude"`` ranks by the method's own
scores (:attr:`UnitGroup.scores`). ``"obs"`` is the output error a unit's removal causes, estimated from
calibration statistics taken in one pass of the dense model: greedy Optimal Brain Surgeon on the input Gram
matrix when one ``nn.Linear`` consumes the units one column each (MLP neurons) or a block of columns each
(attention heads, block OBS on the output projection), else the activation-aware estimate
``sum_j ||W[:, j]||² E[x_j²]`` over the unit's input columns of every consumer. The consumers are read from the
dependency graph, never from a method's layers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration.engine import residual_key
from ..calibration.ridge import is_supported
from ..calibration.selection import input_stats, obs_group_removal_order, obs_removal_order, output_energy
from ..core.layouts import weight_axes
from ..core.registry import residual_sources
from ..core.state import ReferenceRecord
from .units import Allocatable, UnitGroup

__all__ = ["SELECTIONS", "consumers", "ranked_importance"]

SELECTIONS = ("obs", "magnitude")
#: how the energy of a residual stream is measured for the relative OBS costs (see calibration.input_stats):
#: the median channel, so that a few channels of massive activations (a pre-norm decoder's attention sinks,
#: constant across tokens) do not make every layer after them look free (SmolLM2 at macs:0.75, see docs/results.md)
STREAM_ENERGY = "median"

Ranked = list[tuple[torch.Tensor, torch.Tensor]]


def consumers(target: Allocatable) -> dict[int, list[tuple[str, nn.Module, torch.Tensor]]]:
    """Group id -> ``[(module name, module, column index per unit)]`` of every layer that reads its units, in
    module order."""
    modules = dict(target.model.named_modules())
    order = {name: i for i, name in enumerate(modules)}
    groups = {g.id: g for g in target.graph.groups}
    out: dict[int, list] = {}
    for g in target.groups:
        members = [m for m in groups[g.id].members if m.role == "consumer"]
        members.sort(key=lambda m: order.get(m.module, 1 << 30))
        out[g.id] = [(m.module, modules[m.module], m.index.long()) for m in members]
    return out


def _single_linear(users: list, width: int | None = 1) -> bool:
    """One ``nn.Linear`` consumer whose every input column belongs to one unit (``width`` columns per unit;
    ``None``: more than one, as an attention head's)."""
    if len(users) != 1:
        return False
    _, module, index = users[0]
    per_unit = index.shape[1]
    return (isinstance(module, nn.Linear) and index.numel() == module.in_features
            and (per_unit > 1 if width is None else per_unit == width))


def magnitude(groups: list[UnitGroup]) -> Ranked:
    """Each group's units in the order of their scores (smallest first), the scores as the cost."""
    out = []
    for g in groups:
        if g.scores is None:
            raise ValueError(f"selection='magnitude' ranks by the method's own scores, and {g.label or g.id} has "
                             "none: use selection='obs' with calibration data")
        score = g.scores.detach().double().cpu()
        order = score.argsort(stable=True)
        out.append((order, score[order]))
    return out


@torch.no_grad()
def ranked_importance(target: Allocatable, floors: list[int], selection: str, batches: list | None,
                      ridge: float, progress: bool = False) -> Ranked:
    """Per group: ``(removal order of its units, non-decreasing importance at each position)``; ``progress``
    shows bars for the selection pass and the ranking."""
    groups, model, state = target.groups, target.model, target.state
    if selection == "magnitude" or batches is None:
        return magnitude(groups)
    uses = consumers(target)
    obs_groups = {i for i, g in enumerate(groups) if _single_linear(uses[g.id])}
    # heads: block OBS on the output projection's columns, on the neurons' scale (globally comparable)
    block_groups = {i for i, g in enumerate(groups) if _single_linear(uses[g.id], width=None)}
    gram_names = sorted({uses[groups[i].id][0][0] for i in obs_groups | block_groups})
    moment_names = sorted({name for i, g in enumerate(groups) if i not in obs_groups | block_groups
                           for name, _, _ in uses[g.id]})
    if state.collect_grams:  # one-pass calibration fits every Linear consumer from these
        gram_names = sorted({*gram_names, *(name for users in uses.values() for name, module, _ in users
                                            if isinstance(module, nn.Linear))})
    record: list[str] = []
    if state.record_reference:
        record = sorted({name for users in uses.values() for name, _, _ in users})
        if state.record_reference == "all":
            record = [name for name, m in model.named_modules() if is_supported(m) or name in record]
    sources = residual_sources(model)
    residuals = {residual_key(n): src for n, src in sources.items() if n in record} if record else {}
    # the error of a layer that adds into a residual stream is judged against that stream's energy (a pre-norm
    # decoder's stream grows with depth: an absolute error starves its early layers)
    streams = {n: sources[n] for n in gram_names if n in sources}
    energies: dict[str, float] = {}
    with target.dense():
        grams, moments, outputs = input_stats(model, batches, gram_names, moment_names, record=record,
                                              record_inputs=residuals, progress=progress, energies=energies,
                                              energy_inputs=streams, energy_statistic=STREAM_ENERGY)
    check_stats_finite({**grams, **moments})
    if state.collect_grams:
        state.selection_grams = grams
    if outputs is not None:
        state.reference_record = ReferenceRecord(list(batches), outputs,
                                                 ReferenceRecord.tensor_versions(model, target.own_tensors))
    # OBS costs are squared output errors per calibration row, comparable across layers (measured on MiniLM:
    # better global allocations than costs relative to each layer's own output); one scale for all of them,
    # the mean output energy of their layers, puts them near the activation-aware scores' (energy fractions)
    searched = [uses[groups[i].id][0] for i in sorted(obs_groups | block_groups)]
    scale = max(sum(output_energy(m, grams[n]) for n, m, _ in searched) / max(len(searched), 1), 1e-30)
    per_layer = {n: max(e, 1e-30) for n, e in energies.items()} if len(energies) == len(streams) else {}
    out = []
    for i, g in enumerate(tqdm(groups, desc="ranking units (OBS)", unit="group", disable=not progress, leave=False)):
        users = uses[g.id]
        if i in obs_groups:
            name, module, index = users[0]
            cols, cost = obs_removal_order(module, grams[name], g.n_units - floors[i], ridge=ridge)
            unit_of = torch.empty(module.in_features, dtype=torch.long)
            unit_of[index[:, 0].cpu()] = torch.arange(g.n_units)
            order, value = _with_rest(unit_of[cols.cpu()], cost / per_layer.get(name, scale), g.n_units)
        elif i in block_groups:
            name, module, index = users[0]
            removed, cost = obs_group_removal_order(module, grams[name], index.cpu(), g.n_units - floors[i],
                                                    ridge=ridge)
            order, value = _with_rest(removed, cost / per_layer.get(name, scale), g.n_units)
        else:
            value = torch.zeros(g.n_units, dtype=torch.float64)
            for name, module, index in users:
                w = module.weight.detach()
                in_axis = weight_axes(module)[0]
                col = w.movedim(in_axis, 0).reshape(w.shape[in_axis], -1).double().square().sum(1)
                energy = col * moments[name].double().to(col.device)
                value += (energy[index.reshape(-1)].reshape(index.shape).sum(1)
                          / energy.sum().clamp_min(1e-30)).cpu()
            order = value.argsort(stable=True)
            value = value[order]
        out.append((order, torch.cummax(value, 0).values))
    return out


def check_stats_finite(stats: dict[str, torch.Tensor]) -> None:
    """Refuse input statistics that overflowed (NaN / inf), naming the first layer: the units could not be
    ranked, and nothing was decided."""
    for name, value in stats.items():
        if not bool(torch.isfinite(value).all()):
            raise ValueError(
                f"the calibration inputs of {name!r} are too large to rank units on: their second moments "
                "overflow (NaN/inf; the data, or the activations it produces, exceed about 1e19); nothing was "
                "changed: scale the calibration data to the range the model was trained on")


def _with_rest(removed: torch.Tensor, cost: torch.Tensor, n_units: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The greedy removal order followed by the units it never reached (its floor), at infinite cost."""
    rest = torch.ones(n_units, dtype=torch.bool)
    rest[removed] = False
    order = torch.cat([removed, rest.nonzero().flatten()])
    value = torch.cat([cost, torch.full((int(rest.sum()),), float("inf"), dtype=torch.float64)])
    return order, value


def check_selection(selection: Any) -> str:
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be 'obs' or 'magnitude', got {selection!r}")
    return selection
