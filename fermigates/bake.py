"""``convert_from_fermi``: bake hard gates into plain layers, shrink, calibrate, and report."""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from .state import _STATE_ATTR, fermi_state
from .convert import _swap
from .calibration.engine import _batches, _feed, calibrate, check_batches_finite
from .methods.fermi.model import _group_keep, all_gates, disable_gates, gated_modules, hard_gates, soft_probabilities
from .surgery.verify import SHRINK_RTOL, _restore, _snapshot, call_model, max_relative_diff, output_tensors
from .report import FermiReport, compute_sparsity, count_parameters

_logger = logging.getLogger(__name__)


#: a baked model farther than this from the trained one (relative, on the example inputs) gets a warning
TRAINED_GAP_WARN = 1e-3
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

    ``reference``: ``"trained"`` fits toward the model as it was trained (its gates as they are now), and the
    calibration is undone if it does not bring the baked model closer to it; ``"dense"`` toward the model with
    every gate open (the original network: right when the weights were never trained, as in one-shot pruning
    or after :func:`fermigates.refine_gates`); ``"auto"`` (default) is ``"trained"`` when a gated weight
    changed since conversion (an optimizer step) and ``"dense"`` otherwise; or any ``nn.Module`` with the same
    layer names.

    A transaction: data and gates are checked first (empty, NaN / inf, batches the model rejects), and on any
    error the model is left converted, exactly as it was. The report's ``kept`` holds the kept input / output
    indices of every shrunk layer; ``trained_vs_baked`` how far the baked model is from the trained one.
    """
    if calibrate_layers not in ("pruned", "all"):
        raise ValueError(f"calibrate_layers must be 'pruned' or 'all', got {calibrate_layers!r}")
    if not (isinstance(reference, nn.Module) or reference in REFERENCES):
        raise ValueError(f"reference must be one of {REFERENCES} or an nn.Module, got {reference!r}")
    if reference is model:
        raise ValueError("reference must be another module than model (a copy of it before pruning)")
    state = fermi_state(model)
    if getattr(state.config, "method", "fermi") != "fermi":  # weight-level methods bake by themselves
        from .methods.registry import get_method

        return get_method(state.config.method).bake(model, calibration_data=calibration_data,
                                                    example_inputs=example_inputs)
    if calibration_data is not None and not state.config.structured:
        raise ValueError(
            "calibration_data needs structured gates (granularity 'channel' or 'head'): calibration re-fits the "
            "layers that lost input channels; unstructured (granularity='weight') masks are baked without it"
        )
    check_gates_finite(model)
    if reference == "auto":
        reference = "trained" if state.weights_changed(model) else "dense"
    example = example_inputs if example_inputs is not None else state.example_inputs
    batches = None
    if calibration_data is not None:
        batches = _batches(calibration_data, 32, None, name="calibration_data")
        check_batches_finite(batches, "calibration_data")
    was_training = model.training
    model.eval()
    try:
        if batches is not None:
            try:
                _feed(model, batches[0])
            except Exception as err:
                raise ValueError("the model rejects calibration_data batch 0 (nothing was baked): "
                                 f"{type(err).__name__}: {err}") from err
        trained_vs_baked = _trained_gap(model, example)
        ref_module, ref_name = _reference(model, reference, batches)
        record = state.reference_record
        state.reference_record = None
        recorded = (record.outputs if record is not None and ref_name == "dense"
                    and record.valid_for(model, batches, list(all_gates(model))) else None)
        snapshot = _snapshot(model)
        zeroed: list = []
        try:
            report = _bake(model, state, example, batches, ref_module, ref_name, ridge, calibrate_layers, shrink,
                           progress, zeroed, recorded, residual)
        except BaseException:
            for weight, where, values in reversed(zeroed):
                weight.data[where] = values
            _restore(snapshot)
            raise
    finally:
        model.train(was_training)
    report.trained_vs_baked = trained_vs_baked
    return report


def check_gates_finite(model: nn.Module) -> None:
    """Raise ``ValueError`` naming the first gate whose Fermi level (or unit offsets) is NaN / inf."""
    for gate in all_gates(model):
        for p in (gate.mu, gate.mu_offset):
            if p is not None and not bool(torch.isfinite(p).all()):
                name = getattr(gate, "label", None) or f"{gate.kind} gate ({gate.n_units} units)"
                raise ValueError(f"the Fermi level of {name} is NaN/inf (a NaN loss step?): nothing was baked; "
                                 "restore the model from a checkpoint taken before the NaN")


def _trained_gap(model: nn.Module, example: Any) -> float | None:
    """How far the hard (baked) outputs are from the outputs as trained; refuses non-finite hard outputs."""
    if example is None:
        return None
    trained = output_tensors(call_model(model, example))
    with hard_gates(model):
        hard = output_tensors(call_model(model, example))
    if not all(bool(torch.isfinite(t).all()) for t in hard):
        raise ValueError("the hard-gated model gives NaN/inf outputs on the example inputs: nothing was baked")
    gap = max_relative_diff(trained, hard)
    if gap > TRAINED_GAP_WARN:
        undecided = sum(int(((p > 0.01) & (p < 0.99)).sum()) for _, p in soft_probabilities(model))
        warnings.warn(
            f"fermigates: the baked model differs from the trained one by {gap:.3g} (relative, on the example "
            f"inputs; {undecided} units still undecided, 0.01 < P < 0.99): train the last part of the run with "
            "decided gates (FermiAnnealer's hard phase, hard_after=...) so that the model you train is the one "
            "you bake", stacklevel=3)
    return gap


def _reference(model: nn.Module, reference: Any, batches: list | None) -> tuple[nn.Module | None, str | None]:
    if batches is None:
        return None, None
    if isinstance(reference, nn.Module):
        return reference, "module"
    ref = copy.deepcopy(model)
    if reference == "dense":
        disable_gates(ref)
    return ref, reference


def _bake(model, state, example, batches, reference, ref_name, ridge, calibrate_layers, shrink, progress,
          zeroed, recorded=None, residual=True) -> FermiReport:
    sparsity = compute_sparsity(model)
    params_before = count_parameters(model)
    macs_before = _count_macs(model, example)
    keep = _group_keep(model)
    twins = gated_modules(model)
    masks = {name: twin.hard_mask() for name, twin in twins.items()}  # decide all before zeroing any
    for name, twin in twins.items():
        if masks[name] is not None:
            where = ~masks[name].expand_as(twin.weight)
            zeroed.append((twin.weight, where, twin.weight.detach()[where].clone()))
    _swap(model, {id(t): t.to_plain(masks[name]) for name, t in twins.items()})
    delattr(model, _STATE_ATTR)
    model._forward_pre_hooks.pop(state.hook_id, None)
    report = FermiReport(sparsity=sparsity, params_before=params_before, params_after=params_before)

    changes: dict[str, Any] = {}
    if state.config.structured and shrink and keep:
        changes = _shrink_checked(model, state.graph, keep, example, report)
    report.kept = {name: (ch.kept_in, ch.kept_out) for name, ch in changes.items()}

    if reference is not None:
        if calibrate_layers == "all" and not changes:
            warnings.warn("fermigates: calibrate_layers='all' applies to a shrunk model; nothing was shrunk, so "
                          "only the hard-masked layers are calibrated", stacklevel=3)
        # unshrunk: calibrate finds the hard-masked layers itself (whole input columns zeroed)
        targets = _calibration_targets(model, twins, changes, calibrate_layers) if changes else None
        guard = ref_name == "trained"
        before = _fidelity(model, reference, batches) if guard else None
        saved = {n: [p.detach().clone() for p in m.parameters(recurse=False)] for n, m in model.named_modules()
                 if targets is None or n in targets} if guard else {}
        report.calibration = calibrate(
            model, batches, reference=reference, targets=targets, ridge=ridge, progress=progress, recorded=recorded,
            residual=residual)
        report.reference = ref_name
        if guard:
            after = _fidelity(model, reference, batches)
            if not after < before:
                modules = dict(model.named_modules())
                for n, values in saved.items():
                    for p, v in zip(modules[n].parameters(recurse=False), values):
                        p.copy_(v)
                report.calibration_reverted = (
                    f"calibration did not improve the baked model (task loss on labelled calibration batches, else "
                    f"relative error against the trained model: {before:.4g} -> {after:.4g}); undone")
                _logger.info("fermigates: %s", report.calibration_reverted)

    report.params_after = count_parameters(model)
    report.macs_before = macs_before
    report.macs_after = _count_macs(model, example) if macs_before is not None else None
    return report


def _fidelity(model: nn.Module, reference: nn.Module, batches: list) -> float:
    """What calibration must not make worse: the task loss on the calibration batches when they carry labels,
    else the relative squared error of ``model``'s outputs against ``reference``'s."""
    from .losses import _call, _split, _task_loss

    if all(_split(b)[1] is not None for b in batches):
        device = next(model.parameters()).device
        # a mapping batch keeps its labels, so a Hugging Face model computes its own (shifted, masked) loss
        return sum(float(_task_loss(_call(model, b if isinstance(b, Mapping) else _split(b)[0], device),
                                    _split(b)[1])) for b in batches) / len(batches)
    err = norm = 0.0
    for batch in batches:
        outs, refs = output_tensors(_feed(model, batch)), output_tensors(_feed(reference, batch))
        for o, r in zip(outs, refs):
            err += float((o.float() - r.float()).pow(2).sum())
            norm += float(r.float().pow(2).sum())
    return err / max(norm, 1e-30)


def _shrink_checked(model: nn.Module, graph: Any, keep: dict, example: Any, report: FermiReport) -> dict:
    from .surgery.shrink import shrink_model

    masked = output_tensors(call_model(model, example)) if example is not None else None
    snapshot = _snapshot(model)
    try:
        result = shrink_model(model, graph, keep)
    except Exception as err:  # noqa: BLE001 - a failed shrink leaves the correct masked model
        _restore(snapshot)
        report.not_shrunk.append(("model", f"shrink failed and was undone: {type(err).__name__}: {err}"))
        warnings.warn(f"fermigates: shrink failed and was undone ({err}); the model stays hard-masked")
        return {}
    if masked is not None:
        diff = max_relative_diff(masked, output_tensors(call_model(model, example)))
        report.max_abs_diff = diff
        if not diff <= SHRINK_RTOL:
            _restore(snapshot)
            report.not_shrunk.append(
                ("model", f"shrunk outputs differ from the hard-masked ones by {diff:.3g} (> {SHRINK_RTOL}); undone")
            )
            warnings.warn(f"fermigates: shrunk model differs from the masked one ({diff:.3g}); shrink undone")
            return {}
    report.shrunk = True
    from .converters import apply_hf_config_updates

    apply_hf_config_updates(model)  # per-layer head counts etc., so generate() / caches see the new shapes
    report.not_shrunk.extend((f"group {gid}", why) for gid, why in getattr(result, "skipped", []))
    for name, change in result.changes.items():
        report.shapes.append((name, _shape_text(change, before=True), _shape_text(change, before=False)))
    return result.changes


def _shape_text(change: Any, before: bool) -> str:
    attrs = change.attrs_before if before and hasattr(change, "attrs_before") else change.attrs
    if before and not hasattr(change, "attrs_before"):
        return "-"
    return ", ".join(f"{k}={v}" for k, v in attrs.items())


def _calibration_targets(model: nn.Module, twins: dict[str, nn.Module], changes: dict, scope: str) -> dict:
    """Layers to re-fit: the consumers that lost input channels; with ``scope="all"`` every Linear / Conv
    whose weight is its own (tied or shared weights would change elsewhere too)."""
    targets = {name: (ch.kept_in, ch.kept_out) for name, ch in changes.items()
               if ch.kept_in is not None and name in twins}
    if scope == "all":
        from .calibration.ridge import is_supported

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
        from .surgery.shrink import count_macs
    except ImportError:
        return None
    try:
        return int(count_macs(model, example))
    except Exception as err:  # noqa: BLE001 - a report without MACs is still a report
        _logger.warning("could not count MACs: %s", err)
        return None
