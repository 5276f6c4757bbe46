"""``convert_from_fermi``: bake hard gates into plain layers, shrink, calibrate, and report."""

from __future__ import annotations

import copy
import logging
import warnings
from typing import Any

import torch
import torch.nn as nn

from .state import _STATE_ATTR, fermi_state
from .convert import _swap
from .methods.fermi.model import gated_modules
from .methods.fermi.model import _group_keep, disable_gates
from .surgery.verify import SHRINK_RTOL, _restore, _snapshot, call_model, max_relative_diff, output_tensors
from .report import FermiReport, compute_sparsity, count_parameters

_logger = logging.getLogger(__name__)


@torch.no_grad()
def convert_from_fermi(
    model: nn.Module,
    *,
    shrink: bool = True,
    calibration_data: Any = None,
    ridge: float = 1e-2,
    calibrate_layers: str = "pruned",
    example_inputs: Any = None,
    progress: bool = True,
) -> FermiReport:
    """Turn a Fermi-gated model back into plain layers with the gates' hard decisions baked in.

    With structured gates and ``shrink=True`` the removed channels / heads are cut out of every layer that
    produces or consumes them, and the shrunk model is checked against the hard-masked one on the example
    inputs (if they differ, the shrink is undone and the report says why). With ``calibration_data`` the
    layers that lost inputs are re-fitted in closed form (ridge regression toward the dense model's outputs)
    and the result is written into their own weights; ``calibrate_layers="all"`` re-fits every Linear / Conv
    of the shrunk model (except shared / tied weights) in network order, so later layers also absorb the
    drift of their inputs. The model is modified in place; the report says what changed.
    """
    if calibrate_layers not in ("pruned", "all"):
        raise ValueError(f"calibrate_layers must be 'pruned' or 'all', got {calibrate_layers!r}")
    state = fermi_state(model)
    if calibration_data is not None and not state.config.structured:
        raise ValueError(
            "calibration_data needs structured gates (granularity 'channel' or 'head'): calibration re-fits the "
            "layers that lost input channels; unstructured (granularity='weight') masks are baked without it"
        )
    was_training = model.training
    model.eval()
    example = example_inputs if example_inputs is not None else state.example_inputs
    sparsity = compute_sparsity(model)
    params_before = count_parameters(model)
    macs_before = _count_macs(model, example)
    keep = _group_keep(model)

    reference = None
    if calibration_data is not None:
        reference = copy.deepcopy(model)
        disable_gates(reference)

    twins = gated_modules(model)
    masks = {name: twin.hard_mask() for name, twin in twins.items()}  # decide all before zeroing any
    _swap(model, {id(t): t.to_plain(masks[name]) for name, t in twins.items()})
    delattr(model, _STATE_ATTR)
    report = FermiReport(sparsity=sparsity, params_before=params_before, params_after=params_before)

    changes: dict[str, Any] = {}
    if state.config.structured and shrink and keep:
        changes = _shrink_checked(model, state.graph, keep, example, report)

    if reference is not None:
        from .calibration.engine import calibrate

        # unshrunk: calibrate finds the hard-masked layers itself (whole input columns zeroed)
        if calibrate_layers == "all" and not changes:
            warnings.warn("fermigates: calibrate_layers='all' applies to a shrunk model; nothing was shrunk, so "
                          "only the hard-masked layers are calibrated", stacklevel=2)
        targets = _calibration_targets(model, twins, changes, calibrate_layers) if changes else None
        report.calibration = calibrate(
            model, calibration_data, reference=reference, targets=targets, ridge=ridge, progress=progress
        )
        del reference

    report.params_after = count_parameters(model)
    report.macs_before = macs_before
    report.macs_after = _count_macs(model, example) if macs_before is not None else None
    model.train(was_training)
    return report


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
