"""``convert_from_fermi``: bake a converted model's decisions into plain layers, shrink, calibrate, report.

Method-agnostic: the method gives its :class:`~fermigates.methods.base.Decisions` (plain replacements, entries
to zero, kept units per dependency-graph group) and this module does the rest, as a transaction.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from .calibration.engine import calibrate, check_ridge
from .calibration.ridge import is_supported
from .core.batches import (
    as_batches,
    call_inputs,
    call_model,
    check_batches_finite,
    device_of,
    feed,
    max_relative_diff,
    output_tensors,
    split_batch,
)
from .core.modules import restore, snapshot, swap_modules
from .core.registry import apply_config_updates, residual_sources
from .core.sparsity import count_parameters
from .core.state import detach_state, get_state
from .losses import task_loss
from .methods.registry import method_of
from .report import FermiReport
from .surgery.depth import find_blocks, remove_blocks, skipping
from .surgery.macs import count_macs
from .surgery.merge import merge_layers, record_replaced
from .surgery.shrink import shrink_model
from .surgery.verify import shrink_tolerance

_logger = logging.getLogger(__name__)


#: a baked model farther than this from the trained one (relative, on the example inputs) gets a warning
TRAINED_GAP_WARN = 1e-3
#: a baked model this close to the trained one is the trained one: calibrating toward it has nothing to fit
SAME_AS_TRAINED = 1e-6
REFERENCES = ("auto", "trained", "dense")


@torch.no_grad()
def convert_from_fermi(
    model: nn.Module,
    *,
    shrink: bool = True,
    calibration_data: Any = None,
    reference: str | nn.Module = "auto",
    ridge: float = 1e-2,
    calibrate_layers: str = "pruned",
    residual: bool = True,
    example_inputs: Any = None,
    progress: bool = True,
) -> FermiReport:
    """Turn a Fermi-gated model back into plain layers with the gates' hard decisions baked in.

    With structured gates and ``shrink=True`` the removed channels / heads are cut out of every layer that
    produces or consumes them, and the shrunk model is checked against the hard-masked one on the example
    inputs (if they differ, the shrink is undone and the report says why). With ``calibration_data`` the
    layers that lost inputs are re-fitted in closed form (ridge regression toward ``reference``'s outputs)
    and the result is written into their own weights; ``calibrate_layers="all"`` re-fits every Linear / Conv
    of the shrunk model (except shared / tied weights) in network order, so later layers also absorb the
    drift of their inputs.

    ``residual`` (default True): a projection whose output joins a residual stream (BERT ``output.dense``,
    LLaMA ``o_proj`` / ``down_proj``, GPT-2 ``c_proj``) is fitted so that output + residual matches the
    reference's, repairing the drift of the layers before it too (see :func:`fermigates.calibrate`).

    ``reference``: ``"trained"`` fits toward the model as it was trained (its gates as they are now); ``"dense"``
    toward the original network (every gate open: right when the weights were never trained, as in one-shot
    pruning or after :func:`fermigates.refine_gates`); ``"auto"`` (default) is ``"trained"`` when any weight of
    the network holds other values than at conversion (read from the weights themselves, so it holds through
    any optimizer, the Hugging Face ``Trainer``, copies, pickles and ``state_dict`` round trips) and ``"dense"``
    otherwise; or any ``nn.Module`` with the same layer names. A calibration is kept only where it does not
    make the model worse: toward the trained model or a given module it is undone if it does not bring the
    baked model closer to it, and on labelled calibration batches if it raises the task loss; every layer's
    solve is kept only if it fits that layer's target better than its weights did.

    A transaction: data and gates are checked first (empty, NaN / inf, batches the model rejects), and on any
    error the model is left converted, exactly as it was. The report's ``kept`` holds the kept input / output
    indices of every shrunk layer; ``trained_vs_baked`` how far the baked model is from the trained one.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a converted torch.nn.Module, got {type(model).__name__}")
    if calibrate_layers not in ("pruned", "all"):
        raise ValueError(f"calibrate_layers must be 'pruned' or 'all', got {calibrate_layers!r}")
    if not (isinstance(reference, nn.Module) or reference in REFERENCES):
        raise ValueError(f"reference must be one of {REFERENCES} or an nn.Module, got {reference!r}")
    if reference is model:
        raise ValueError("reference must be another module than model (a copy of it before pruning)")
    check_ridge(ridge)
    state = get_state(model)
    method = method_of(model)
    if calibration_data is not None and not method.structured(state.config):
        raise ValueError(
            "calibration_data needs structured decisions (granularity 'channel' or 'head'): calibration re-fits "
            "the layers that lost input channels; single-weight decisions (granularity='weight') leave every "
            "layer's shape and inputs as they were, so they are baked without it"
        )
    method.check_finite(model)
    if reference == "auto":
        reference = "trained" if state.weights_changed(model) else "dense"
    example = example_inputs if example_inputs is not None else state.example_inputs
    batches = None
    if calibration_data is not None:
        batches = as_batches(calibration_data, 32, None, name="calibration_data")
        check_batches_finite(batches, "calibration_data")
    was_training = model.training
    model.eval()
    try:
        if batches is not None:
            try:
                feed(model, batches[0])
            except Exception as err:
                raise ValueError("the model rejects calibration_data batch 0 (nothing was baked): "
                                 f"{type(err).__name__}: {err}") from err
        trained_vs_baked = _trained_gap(model, method, example)
        skipped = None
        if reference == "trained" and batches is not None and trained_vs_baked is not None \
                and trained_vs_baked <= SAME_AS_TRAINED:  # what the calibration would fit toward is the model baked
            skipped = (f"the baked model computes what the model as trained does (relative difference "
                       f"{trained_vs_baked:.2g} on the example inputs)")
            batches = None
        ref_module, ref_name = _reference(model, method, reference, batches)
        record = state.reference_record
        state.reference_record = None
        recorded = (record.outputs if record is not None and ref_name == "dense"
                    and record.valid_for(model, batches, method.own_tensors(model)) else None)
        saved = snapshot(model)
        zeroed: list = []
        try:
            report = _bake(model, method, state, example, batches, ref_module, ref_name, ridge, calibrate_layers,
                           shrink, progress, zeroed, recorded, residual)
        except BaseException:
            for tensor, where, values in reversed(zeroed):
                tensor.data[where] = values
            restore(saved)  # the modules, the conversion record and the method's hooks, as they were
            raise
    finally:
        model.train(was_training)
    report.trained_vs_baked = trained_vs_baked
    if skipped is not None:
        report.calibration_skipped, report.reference = skipped, "trained"
    return report


def _trained_gap(model: nn.Module, method: Any, example: Any) -> float | None:
    """How far the hard (baked) outputs are from the outputs as trained; refuses non-finite hard outputs."""
    if example is None:
        return None
    trained = output_tensors(call_model(model, example))
    with method.decided(model):
        hard = output_tensors(call_model(model, example))
    if not all(bool(torch.isfinite(t).all()) for t in hard):
        raise ValueError("the hard-gated model gives NaN/inf outputs on the example inputs: nothing was baked")
    gap = max_relative_diff(trained, hard)
    if gap > TRAINED_GAP_WARN:
        warnings.warn(
            f"fermigates: the baked model differs from the trained one by {gap:.3g} (relative, on the example "
            f"inputs; {method.undecided_units(model)} units still undecided): {method.undecided_advice}",
            stacklevel=3)
    return gap


def _reference(model: nn.Module, method: Any, reference: Any, batches: list | None
               ) -> tuple[nn.Module | None, str | None]:
    if batches is None:
        return None, None
    if isinstance(reference, nn.Module):
        return reference, "module"
    ref = copy.deepcopy(model)
    if reference == "dense":
        method.make_dense(ref)
    return ref, reference


def _bake(model, method, state, example, batches, reference, ref_name, ridge, calibrate_layers, shrink, progress,
          zeroed, recorded=None, residual=True) -> FermiReport:
    sparsity = method.sparsity(model)
    own = method.own_tensors(model)
    params_before = count_parameters(model, own)
    macs_before = _count_macs(model, example)
    decisions = method.decisions(model)
    twins = method.twins(model)
    twin_names = set(twins)
    for tensor, mask in decisions.zero:
        where = mask.expand_as(tensor) if mask.shape != tensor.shape else mask
        zeroed.append((tensor, where, tensor.detach()[where].clone()))
        tensor.data[where] = 0
    swap_modules(model, decisions.replacements)
    detach_state(model)
    # a replacement of another class than the twin stood for (an identity for a removed activation): recorded so
    # that a checkpoint rebuilds it in the stock model
    record_replaced(model, [name for name, twin in twins.items() if id(twin) in decisions.replacements and
                            type(decisions.replacements[id(twin)]) is not twin.plain_class])
    report = FermiReport(sparsity=sparsity, params_before=params_before, params_after=params_before)

    changes: dict[str, Any] = {}
    if decisions.kept and shrink:
        changes = _shrink_checked(model, state.graph, decisions.kept, example, report)
    report.kept = {name: (ch.kept_in, ch.kept_out) for name, ch in changes.items()}
    path, gone = state.remove_blocks or (None, [])
    writers = _stream_writers(model, path, gone)
    for name in writers:  # calibrated in place and not shrunk: put back if removing the blocks fails
        for p in model.get_submodule(name).parameters(recurse=False):
            zeroed.append((p, Ellipsis, p.detach().clone()))
    with skipping(model, gone, path=path) if gone else contextlib.nullcontext():
        _calibrate(model, report, twin_names, changes, batches, reference, ref_name, ridge, calibrate_layers,
                   progress, recorded, residual, writers, decisions.refit)
    if decisions.merges:  # after calibration, which matches layers to the reference by name
        report.merges = merge_layers(model, example, decisions.merges)
    if gone:
        report.removed_blocks = remove_blocks(model, gone, path=path)

    report.params_after = count_parameters(model)
    report.macs_before = macs_before
    report.macs_after = _count_macs(model, example) if macs_before is not None else None
    report.budget = state.budget_result
    if report.budget is not None and report.budget.kind in ("macs", "params"):
        before, after = ((report.macs_before, report.macs_after) if report.budget.kind == "macs"
                         else (report.params_before, report.params_after))
        report.budget.measured = after / before if before and after is not None else None
    return report


def _stream_writers(model: nn.Module, path: str | None, gone: list[int]) -> list[str]:
    """The layers that write the residual stream in the first block after each run of removed blocks: calibrated
    toward the dense stream, so that they absorb what the removed blocks added."""
    if not gone:
        return []
    n = len(find_blocks(model, path)[1])
    after = {i + 1 for i in gone if i + 1 not in gone and i + 1 < n}
    prefixes = tuple(f"{path}.{j}." for j in after)
    return [name for name in residual_sources(model) if name.startswith(prefixes)]


def _calibrate(model, report, twin_names, changes, batches, reference, ref_name, ridge, calibrate_layers, progress,
               recorded, residual, writers, refit) -> None:
    if reference is not None:
        if calibrate_layers == "all" and not changes:
            warnings.warn("fermigates: calibrate_layers='all' applies to a shrunk model; nothing was shrunk, so "
                          "only the hard-masked layers are calibrated", stacklevel=3)
        # unshrunk: calibrate finds the hard-masked layers itself (whole input columns zeroed)
        targets = _calibration_targets(model, twin_names, changes, calibrate_layers) if changes else None
        if refit:  # layers whose inputs changed without a shrink (after a removed non-linearity)
            targets = {**{n: (None, None) for n in refit}, **(targets or {})}
        labelled = all(split_batch(b)[1] is not None for b in batches)
        guard = ref_name in ("trained", "module") or labelled
        before = _fidelity(model, reference, batches, labelled) if guard else None
        saved = {n: [p.detach().clone() for p in m.parameters(recurse=False)] for n, m in model.named_modules()
                 if targets is None or n in targets or n in writers} if guard else {}
        report.calibration = calibrate(
            model, batches, reference=reference, targets=targets, ridge=ridge, progress=progress, recorded=recorded,
            residual=residual, also=writers)
        report.reference = ref_name
        if guard:
            after = _fidelity(model, reference, batches, labelled)
            what = ("the task loss on the labelled calibration batches" if labelled else
                    f"the relative error against the {'trained model' if ref_name == 'trained' else 'reference'}")
            report.calibration_check = {"measure": what, "toward": ref_name, "before": before, "after": after,
                                        "kept": after < before}
            if not after < before:
                modules = dict(model.named_modules())
                for n, values in saved.items():
                    for p, v in zip(modules[n].parameters(recurse=False), values):
                        p.copy_(v)
                report.calibration_reverted = (
                    f"calibration toward the {ref_name} model did not lower {what} ({before:.4g} -> {after:.4g}), so "
                    "the baked weights were kept as they were")
                _logger.info("fermigates: %s", report.calibration_reverted)


def _fidelity(model: nn.Module, reference: nn.Module, batches: list, labelled: bool) -> float:
    """What calibration must not make worse: the task loss on the calibration batches when they carry labels,
    else the relative squared error of ``model``'s outputs against ``reference``'s."""
    if labelled:
        device = device_of(model)
        # a mapping batch keeps its labels, so a Hugging Face model computes its own (shifted, masked) loss
        return sum(float(task_loss(call_inputs(model, b if isinstance(b, Mapping) else split_batch(b)[0], device),
                                   split_batch(b)[1])) for b in batches) / len(batches)
    err = norm = 0.0
    for batch in batches:
        outs, refs = output_tensors(feed(model, batch)), output_tensors(feed(reference, batch))
        for o, r in zip(outs, refs):
            err += float((o.float() - r.float()).pow(2).sum())
            norm += float(r.float().pow(2).sum())
    return err / max(norm, 1e-30)


def _shrink_checked(model: nn.Module, graph: Any, keep: dict, example: Any, report: FermiReport) -> dict:
    masked = output_tensors(call_model(model, example)) if example is not None else None
    saved = snapshot(model)
    try:
        result = shrink_model(model, graph, keep)
    except Exception as err:  # noqa: BLE001 - a failed shrink leaves the correct masked model
        restore(saved)
        report.not_shrunk.append(("model", f"shrink failed and was undone: {type(err).__name__}: {err}"))
        warnings.warn(f"fermigates: shrink failed and was undone ({err}); the model stays hard-masked")
        return {}
    if masked is not None:
        diff = max_relative_diff(masked, output_tensors(call_model(model, example)))
        report.max_abs_diff = diff
        tolerance = shrink_tolerance(len(result.changes))
        if not diff <= tolerance:
            restore(saved)
            report.not_shrunk.append(
                ("model", f"shrunk outputs differ from the hard-masked ones by {diff:.3g} (> {tolerance:.2g}); undone")
            )
            warnings.warn(f"fermigates: shrunk model differs from the masked one ({diff:.3g}); shrink undone")
            return {}
    report.shrunk = True
    apply_config_updates(model)  # per-layer head counts etc., so generate() / caches see the new shapes
    report.not_shrunk.extend((f"group {gid}", why) for gid, why in getattr(result, "skipped", []))
    for name, change in result.changes.items():
        report.shapes.append((name, _shape_text(change, before=True), _shape_text(change, before=False)))
    return result.changes


def _shape_text(change: Any, before: bool) -> str:
    attrs = change.attrs_before if before and hasattr(change, "attrs_before") else change.attrs
    if before and not hasattr(change, "attrs_before"):
        return "-"
    return ", ".join(f"{k}={v}" for k, v in attrs.items())


def _calibration_targets(model: nn.Module, twins: set[str], changes: dict, scope: str) -> dict:
    """Layers to re-fit: the consumers that lost input channels; with ``scope="all"`` every Linear / Conv
    whose weight is its own (tied or shared weights would change elsewhere too)."""
    targets = {name: (ch.kept_in, ch.kept_out) for name, ch in changes.items()
               if ch.kept_in is not None and name in twins}
    if scope == "all":
        owners: dict[int, int] = {}
        for module in model.modules():
            for p in module.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
        for name, module in model.named_modules():
            if is_supported(module) and name not in targets and owners.get(id(module.weight)) == 1:
                ch = changes.get(name)
                targets[name] = (ch.kept_in, ch.kept_out) if ch is not None else (None, None)
    return targets


def _count_macs(model: nn.Module, example: Any) -> int | None:
    if example is None:
        return None
    try:
        return int(count_macs(model, example))
    except Exception as err:  # noqa: BLE001 - a report without MACs is still a report
        _logger.warning("could not count MACs: %s", err)
        return None
