"""``prune``: one-shot post-training pruning — gates set from their scores, then calibration and shrink."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn

from .allocation.allocate import allocate as allocate_units
from .allocation.allocate import allocate_share
from .allocation.budget import Budget, BudgetResult, budget_from, check_min_keep, resolve_allocation
from .allocation.importance import check_selection
from .allocation.latency import compare_latency
from .bake import convert_from_fermi
from .calibration.engine import check_ridge
from .calibration.from_stats import calibrate_from_grams
from .config import FermiConfig
from .convert import convert_to_fermi
from .core.batches import as_batches, call_model, check_batches_finite, first_sample
from .core.layouts import weight_axes
from .core.modules import swap_modules
from .core.state import detach_state, get_state
from .methods.registry import method_of
from .report import FermiReport


#: how ``prune`` chooses the units to remove when ``selection`` is not given: the one the README's budget
#: table (``benchmarks/results/budget_minilm.json``) ranks first
DEFAULT_SELECTION = "obs"
#: how ``prune`` allocates a budget across gates when ``allocation`` is not given: ``"auto"`` is global for a
#: cost budget (MACs, parameters, latency) and uniform for a share of units -- what that table ranks first
DEFAULT_ALLOCATION = "auto"


@torch.no_grad()
def prune(
    model: nn.Module,
    calibration_data: Any,
    config: FermiConfig | None = None,
    *,
    target_sparsity: float | None = None,
    example_inputs: Any = None,
    ridge: float = 1e-2,
    shrink: bool = True,
    refine_steps: int = 0,
    calibrate_layers: str = "pruned",
    residual: bool = True,
    budget: Budget | str | None = None,
    allocation: str = DEFAULT_ALLOCATION,
    selection: str | None = None,
    min_keep: float | int = 0.1,
    calibration: str = "sequential",
    progress: bool = True,
) -> FermiReport:
    """Prune ``model`` in place with no training budget, and return the report.

    Every structured gate is set at the score quantile that removes ``target_sparsity`` of its units (the
    Fermi gates at the end of annealing, with the scores the weights have now), the hard decisions are baked,
    the model is shrunk, and the layers that lost inputs are re-fitted by ridge regression on
    ``calibration_data`` toward the dense model's outputs. Default config: channels and heads.
    ``example_inputs`` default to the first sample of ``calibration_data``.

    ``refine_steps > 0`` first runs :func:`fermigates.refine_gates` for that many steps on
    ``calibration_data``: with the weights frozen, the gates learn which units to keep (the same share).
    ``calibrate_layers="all"`` re-fits every layer, not only those that lost inputs (see
    :func:`convert_from_fermi`); ``residual=False`` fits projections that feed a residual stream to their own
    dense output instead of to output + residual drift (see :func:`convert_from_fermi`).

    ``budget`` (a :class:`fermigates.Budget` or ``"macs:0.5"`` / ``"params:0.7"`` / ``"units:0.5"`` /
    ``"latency:0.5"``: the fraction kept, MACs counted and latency measured per forward of ``example_inputs``,
    latency on this machine with the current thread count) replaces ``target_sparsity``: units are
    chosen across all gates (``allocation="global"``) or as one share of every gate (``"uniform"``);
    ``"auto"`` (default) is global for a MAC / parameter / latency budget and uniform for ``units:``, every
    gate keeping at least ``min_keep`` of its units (a fraction, or a count; never fewer than one).
    ``report.budget`` says what was requested, predicted and measured on the shrunk model. Without
    ``budget=`` and ``target_sparsity=``, ``config.budget`` applies when it is set.
    ``selection``: which units go -- ``"obs"`` (output error estimated from calibration statistics: OBS on
    the input Gram of a single consuming Linear, else activation-aware) or ``"magnitude"`` (weight scores);
    default :data:`DEFAULT_SELECTION`. With ``refine_steps`` the refinement starts from that selection.
    ``calibration``: ``"sequential"`` (default) re-fits the layers that lost inputs in a forward of the pruned
    model, in network order, so each also absorbs the drift of the layers before it; ``"one-pass"`` re-fits
    them from the input Grams the OBS selection pass already gathered on the dense model (toward each layer's
    own dense output): no second forward, slightly lower fidelity (see the README's budget table). One-pass
    needs ``selection="obs"``, ``calibrate_layers="pruned"`` and ``nn.Linear`` layers; ``residual`` does not
    apply to it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_ridge(ridge)
    config = config or FermiConfig(granularity=("channel", "head"))
    budget = budget_from(budget, target_sparsity, config, "prune")
    if target_sparsity is not None:
        config = dataclasses.replace(config, target_sparsity=target_sparsity, budget=None)
    if not config.structured:
        raise ValueError("prune() is structured pruning: use granularity 'channel' and/or 'head'")
    if not isinstance(refine_steps, int) or isinstance(refine_steps, bool) or refine_steps < 0:
        raise ValueError(f"refine_steps must be an int >= 0, got {refine_steps!r}")
    if calibrate_layers not in ("pruned", "all"):
        raise ValueError(f"calibrate_layers must be 'pruned' or 'all', got {calibrate_layers!r}")
    selection = check_selection(DEFAULT_SELECTION if selection is None else selection)
    allocation = resolve_allocation(allocation, budget)
    check_min_keep(min_keep)
    if calibration not in ("sequential", "one-pass"):
        raise ValueError(f"calibration must be 'sequential' or 'one-pass', got {calibration!r}")
    one_pass = calibration == "one-pass"
    if one_pass and (selection != "obs" or calibrate_layers != "pruned" or refine_steps):
        raise ValueError("calibration='one-pass' fits from the OBS selection pass's statistics: it needs "
                         "selection='obs', calibrate_layers='pruned' and no refine_steps")
    if budget is not None:
        if refine_steps:
            raise ValueError("refine_steps keeps each gate's own share and cannot meet a budget: use one or "
                             "the other")
    batches = as_batches(calibration_data, 32, None, name="calibration_data")  # read once: a generator is used up
    check_batches_finite(batches, "calibration_data")
    first = first_sample(batches[0])
    example = first if example_inputs is None else example_inputs
    was_training = model.training
    model.eval()
    try:
        call_model(model, first)  # a batch the model rejects fails here, before anything is changed
    except Exception as err:
        model.train(was_training)
        raise ValueError(f"the model rejects the first calibration batch: {type(err).__name__}: {err}") from err
    convert_to_fermi(model, config, example_inputs=example, progress=progress)
    method = method_of(model)
    # the selection pass keeps the dense outputs of the layers calibration will fit, so it need not rerun them
    state = get_state(model)
    state.record_reference = None if one_pass else "all" if calibrate_layers == "all" else "consumers"
    state.collect_grams = one_pass
    refined = budget_result = None
    try:
        if budget is not None:
            budget_result = allocate(model, budget, example_inputs=example,
                                     data=batches if selection == "obs" else None, allocation=allocation,
                                     selection=selection, min_keep=min_keep, ridge=ridge, progress=progress)
        elif refine_steps:
            refined = method.refine(model, batches, steps=refine_steps, target_sparsity=config.target_sparsity,
                                    init="obs" if selection == "obs" else "scores", progress=progress)
        else:
            target = method.allocatable(model)
            method.set_keep(model, allocate_share(target, config.target_sparsity, selection=selection,
                                                  data=batches, ridge=ridge, progress=progress))
        if one_pass:
            grams, dense = state.selection_grams or {}, _lost_inputs(model, method)
            missing = [n for n in dense if n not in grams]
            if missing:
                raise ValueError(f"calibration='one-pass' re-fits nn.Linear layers from the selection pass's input "
                                 f"Grams; {missing[:3]} have none (not nn.Linear): use calibration='sequential'")
            state.selection_grams = None
            report = convert_from_fermi(model, shrink=shrink, example_inputs=example, progress=progress)
            for name, (weight, bias, kept_in, _) in list(dense.items()):
                kept = report.kept.get(name)
                dense[name] = (weight, bias, kept_in if kept is None or kept[0] is None else kept[0],
                               None if kept is None else kept[1])
            report.calibration = calibrate_from_grams(model, grams, dense, ridge=ridge, n_batches=len(batches))
            report.reference = "dense"
        else:
            report = convert_from_fermi(model, shrink=shrink, calibration_data=batches, reference="dense",
                                        ridge=ridge, calibrate_layers=calibrate_layers, residual=residual,
                                        example_inputs=example, progress=progress)
    except BaseException:
        unconvert(model)  # convert_from_fermi undoes itself; this undoes the conversion: the model as it was
        raise
    finally:
        model.train(was_training)
    report.refine = refined
    if budget_result is not None:
        before, after = ((report.macs_before, report.macs_after) if budget_result.kind == "macs" else
                         (report.params_before, report.params_after) if budget_result.kind == "params" else
                         (None, None))
        if budget_result.kind == "latency":
            dense, budget_result.latency.dense_model = budget_result.latency.dense_model, None
            timed = compare_latency({"before": lambda: call_model(dense, example),
                                     "after": lambda: call_model(model, example)})
            before, after = timed["before"], timed["after"]
            report.latency_ms = {k: 1e3 * v for k, v in timed.items()}
        budget_result.measured = after / before if before else budget_result.predicted
        report.budget = budget_result
    return report


@torch.no_grad()
def allocate(model: nn.Module, budget: Budget | str, *, example_inputs: Any, data: list | None = None,
             allocation: str = "global", selection: str = "obs", min_keep: float | int = 0.1,
             ridge: float = 1e-2, progress: bool = False) -> BudgetResult:
    """Choose which units of a converted ``model`` to keep to meet ``budget`` (see
    :func:`fermigates.allocation.allocate`) and freeze that choice through the model's method: the bake then
    shrinks exactly it. Returns how the budget was met."""
    method = method_of(model)
    keep, result = allocate_units(method.allocatable(model), budget, example_inputs=example_inputs, data=data,
                                  allocation=allocation, selection=selection, min_keep=min_keep, ridge=ridge,
                                  progress=progress)
    method.set_keep(model, keep)
    return result


def _lost_inputs(model: nn.Module, method: Any) -> dict[str, tuple]:
    """The layers whose decisions remove input columns: ``{name: (weight, bias, kept_in, None)}``, copies of
    their dense weights (the bake zeroes and shrinks them)."""
    decisions = method.decisions(model)
    graph = get_state(model).graph
    lost: dict[str, set[int]] = {}
    for group in graph.groups:
        keep = decisions.kept.get(group.id)
        if keep is None or bool(keep.all()):
            continue
        for member in group.members:
            if member.role == "consumer":
                lost.setdefault(member.module, set()).update(member.index[~keep.cpu()].reshape(-1).tolist())
    modules = dict(model.named_modules())
    out = {}
    for name, cols in lost.items():
        module = modules[name]
        n_in = module.weight.shape[weight_axes(module)[0]]
        kept = torch.tensor(sorted(set(range(n_in)) - cols), dtype=torch.long)
        bias = getattr(module, "bias", None)
        out[name] = (module.weight.detach().clone(), None if bias is None else bias.detach().clone(), kept, None)
    return out


def unconvert(model: nn.Module) -> None:
    """Undo a conversion: put the original modules back and drop the conversion record (nothing was baked)."""
    swap_modules(model, method_of(model).unconvert(model))
    detach_state(model)
