"""Readable sparsity / size reports: per-layer tables, totals, ``compute_sparsity``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .core.registry import LINEAR_LIKE, lookup
from .core.sparsity import LayerSparsity, SparsityReport, format_count, format_table
from .core.sparsity import count_parameters as core_count
from .core.state import find_state
from .methods.registry import method_of


@torch.no_grad()
def compute_sparsity(model: nn.Module) -> SparsityReport:
    """Sparsity of a model: of its method's current decisions if it is converted, else of its zero weights.

    Converted model: one row per decision unit of its method (a weight gate's kept weights, a group gate's kept
    units, a rewired layer's active connections). Plain model: one row per ``nn.Linear`` / ``nn.Conv*`` with
    the count of non-zero weights.
    """
    if find_state(model) is not None:
        return method_of(model).sparsity(model)
    report = SparsityReport()
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) or lookup(LINEAR_LIKE, module) is not None:
            w = module.weight
            report.layers.append(LayerSparsity(name, "weights", int((w != 0).sum()), w.numel()))
    return report


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied weights counted once); for a converted model, without the method's own
    (gate levels and the like): the network itself."""
    state = find_state(model)
    return core_count(model, method_of(model).own_tensors(model) if state is not None else ())


@dataclass
class FermiReport:
    """What ``convert_from_fermi`` did: sparsity, size before/after, shrink and calibration details."""

    sparsity: SparsityReport
    params_before: int
    params_after: int
    macs_before: int | None = None
    macs_after: int | None = None
    shrunk: bool = False
    shapes: list[tuple[str, str, str]] = field(default_factory=list)  # (module, before, after)
    not_shrunk: list[tuple[str, str]] = field(default_factory=list)  # (what, why)
    max_abs_diff: float | None = None  # shrunk vs hard-masked outputs on the example inputs
    calibration: Any = None
    refine: Any = None  # RefineResult when prune(..., refine_steps > 0) refined the gates first
    #: largest relative output difference between the model as trained and the baked (hard) one, on the
    #: example inputs; None when there were no example inputs
    trained_vs_baked: float | None = None
    #: which reference calibration fitted toward: "trained", "dense" or "module"
    reference: str | None = None
    #: why calibration was undone (it made the model match its reference worse), or None
    calibration_reverted: str | None = None
    #: how the calibration was judged: ``{"measure", "toward", "before", "after", "kept"}`` (None: not judged)
    calibration_check: dict[str, Any] | None = None
    #: why no calibration ran although calibration data was given (the baked model already is the trained one)
    calibration_skipped: str | None = None
    #: fqn -> (kept_in, kept_out) index tensors of every shrunk layer, relative to its original shape (None: all
    #: kept); what ``fermigates.calibrate(model, data, reference=..., targets=report.kept)`` takes
    kept: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    #: what the MACs were counted on (e.g. "Tensor[1, 3, 224, 224]"): MACs are per forward of these inputs
    macs_inputs: Any = None
    #: {"before": ms, "after": ms} per forward of the example inputs, when measured
    latency_ms: dict[str, float] | None = None
    #: how ``prune(..., budget=...)`` met its budget (a ``fermigates.BudgetResult``), or None
    budget: Any = None
    #: the blocks removed whole (a ``fermigates.RemovedBlocks``: path, indices removed, kept in the original
    #: numbering), or None
    removed_blocks: Any = None
    #: the layers the shared merge step composed across removed non-linearities (a ``MergeReport``), or None
    merges: Any = None

    def kept_by_kind(self) -> dict[str, tuple[int, int]]:
        """``{granularity: (kept, total)}`` over the gates' decisions."""
        out: dict[str, tuple[int, int]] = {}
        for layer in self.sparsity.layers:
            kept, total = out.get(layer.kind, (0, 0))
            out[layer.kind] = (kept + layer.kept, total + layer.total)
        return out

    def calibration_error(self) -> tuple[float, float] | None:
        """Mean relative error of the calibrated layers before and after the ridge re-fit, or None."""
        rows = getattr(self.calibration, "layers", None)
        if not rows:
            return None
        return (sum(r.err_before for r in rows) / len(rows), sum(r.err_after for r in rows) / len(rows))

    def __str__(self) -> str:
        """The compact summary (a dozen lines); :meth:`full` has the per-layer tables."""
        return format_summary(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """Everything in the report as JSON-ready values (what ``fermigates report`` reads back)."""
        err = self.calibration_error()
        return {
            "params": {"before": self.params_before, "after": self.params_after},
            "macs": {"before": self.macs_before, "after": self.macs_after,
                     "inputs": None if self.macs_inputs is None else str(self.macs_inputs)},
            "latency_ms": self.latency_ms,
            "budget": None if self.budget is None else {
                "kind": self.budget.kind, "requested": self.budget.requested, "predicted": self.budget.predicted,
                "measured": self.budget.measured, "allocation": self.budget.allocation,
                "selection": self.budget.selection, "counted_on": self.budget.counted_on,
                "depth": self.budget.depth},
            "removed_blocks": None if self.removed_blocks is None else {
                "path": self.removed_blocks.path, "removed": self.removed_blocks.removed,
                "kept": self.removed_blocks.kept, "original": self.removed_blocks.original_count},
            "kept": {k: {"kept": a, "total": b} for k, (a, b) in self.kept_by_kind().items()},
            "layers": [{"name": l.name, "unit": l.unit, "kind": l.kind, "kept": l.kept, "total": l.total}
                       for l in self.sparsity.layers],
            "shrunk": self.shrunk,
            "shapes": [list(s) for s in self.shapes],
            "not_shrunk": [list(n) for n in self.not_shrunk],
            "max_abs_diff": self.max_abs_diff,
            "trained_vs_baked": self.trained_vs_baked,
            "calibration": None if self.calibration is None else {
                **(self.calibration.to_dict() if hasattr(self.calibration, "to_dict") else {}),
                "mean_err_before": err[0] if err else None, "mean_err_after": err[1] if err else None},
            "calibration_reverted": self.calibration_reverted,
            "calibration_check": self.calibration_check,
            "calibration_skipped": self.calibration_skipped,
            "reference": self.reference,
            "merges": None if self.merges is None else self.merges.to_dict(),
        }

    def to_json(self, path: str | None = None) -> str:
        """:meth:`to_dict` as JSON text, also written to ``path`` when given."""
        import json

        text = json.dumps(self.to_dict(), indent=1, default=str)
        if path is not None:
            with open(path, "w") as fh:
                fh.write(text + "\n")
        return text

    def full(self) -> str:
        """The full report: the summary, every gate's kept / total, resized modules, calibration per layer."""
        return format_full(self.to_dict())


def format_summary(d: dict[str, Any]) -> str:
    """The compact summary of a report dict (:meth:`FermiReport.to_dict`, or ``report.json``)."""
    params, macs = d["params"], d.get("macs") or {}
    lines = ["fermigates report",
             f"  params       {format_count(params['before'])} -> {format_count(params['after'])} "
             f"({_ratio(params['before'], params['after'])}x)"]
    if macs.get("before") is not None:
        per = f"per forward of {macs['inputs']}" if macs.get("inputs") else "per forward of the example inputs"
        lines.append(f"  MACs         {format_count(macs['before'])} -> {format_count(macs['after'])} "
                     f"({_ratio(macs['before'], macs['after'])}x), {per}")
    lat = d.get("latency_ms") or {}
    if lat.get("before") is not None and lat.get("after") is not None:
        per = f" per forward of a batch of {lat['batch']}" if lat.get("batch") else ""
        if lat.get("threads"):
            per += f", {lat['threads']} thread{'s' if lat['threads'] > 1 else ''}"
        speed = f" ({lat['before'] / lat['after']:.2f}x as fast)" if lat["after"] > 0 else ""
        lines.append(f"  latency      {lat['before']:.2f} ms -> {lat['after']:.2f} ms{per}{speed}")
    budget = d.get("budget")
    if budget:
        got = f", got {budget['measured']:.3f}" if budget.get("measured") is not None else ""
        lines.append(f"  budget       {budget['kind']} kept {budget['requested']:.3f}{got} "
                     f"({budget['allocation']} allocation, {budget['selection']} selection)")
    blocks = d.get("removed_blocks")
    if blocks:
        lines.append(f"  blocks       {len(blocks['kept'])} of {blocks['original']} kept in {blocks['path']!r}; "
                     f"removed {blocks['removed']}")
    for kind, kt in (d.get("kept") or {}).items():
        lines.append(f"  kept {kind + 's':<8} {kt['kept']:,} of {kt['total']:,} "
                     f"({100 * kt['kept'] / max(kt['total'], 1):.1f}%)")
    shapes, whole = d.get("shapes") or [], d.get("not_shrunk") or []
    lines.append(f"  shrunk       {'yes' if d.get('shrunk') else 'no'}"
                 + (f", {len(shapes)} modules resized" if shapes else "")
                 + (f"; {len(whole)} items left whole (see the full report)" if whole else ""))
    if d.get("max_abs_diff") is not None:
        lines.append(f"  check        shrunk vs hard-masked, max |diff| {d['max_abs_diff']:.3g}")
    lines += _calibration_lines(d)
    merges = d.get("merges")
    if merges is not None:
        fewer = sum(len(m["members"]) - 1 for m in merges["merged"])
        lines.append(f"  merged       {len(merges['merged'])} segments, {fewer} layers fewer"
                     + (f"; {len(merges['skipped'])} removed activations not merged across (see the full report)"
                        if merges["skipped"] else ""))
    lines += _evaluation_lines(d.get("evaluation"))
    return "\n".join(lines)


_REFERENCES = {"dense": "the dense model", "trained": "the model as trained", "module": "the given reference model"}
#: what a run evaluates: its headline figures per task, and the phases in order with the words for them
METRICS = {"accuracy": ("accuracy", "loss"), "perplexity": ("perplexity", "loss"), "fidelity": ("cosine", "rel_error")}
PHASES = {"dense": "dense", "cut": "after the cut", "final": "after fine-tuning"}


def _calibration_lines(d: dict[str, Any]) -> list[str]:
    """What calibration compared and what came of it, in words."""
    cal = d.get("calibration") or {}
    toward = _REFERENCES.get(d.get("reference") or "", "the reference")
    if d.get("calibration_skipped"):
        return [f"  calibration  not needed: {d['calibration_skipped']}"]
    lines = []
    if cal.get("mean_err_before") is not None:
        lines.append(f"  calibration  {len(cal.get('layers', []))} layers re-fitted toward {toward}: mean relative "
                     f"error {cal['mean_err_before']:.3g} -> {cal['mean_err_after']:.3g}")
    check = d.get("calibration_check")
    if check and not check.get("kept"):
        lines.append(f"  calibration  undone: it did not lower {check['measure']} ({_num(check['before'])} -> "
                     f"{_num(check['after'])}); the weights as baked stay")
    elif d.get("calibration_reverted") and not check:
        lines.append(f"  calibration  not kept: {d['calibration_reverted']}")
    return lines


def _evaluation_lines(ev: dict[str, Any] | None) -> list[str]:
    """The quality the run reached: dense, after the cut, after fine-tuning, on the held-out samples."""
    if not ev or not ev.get("phases"):
        return []
    task, phases = ev["task"], ev["phases"]

    def series(metric: str, skip_dense: bool = False) -> str:
        return " -> ".join(f"{PHASES.get(p, p)} {_value(phases[p].get(metric))}" for p in PHASES
                           if p in phases and not (skip_dense and p == "dense"))

    if task == "fidelity":  # the dense model is the reference: its own figures say nothing
        cos, err = series("cosine", True), series("rel_error", True)
        if not cos:
            return []
        return [f"  fidelity     cosine to the dense model's outputs: {cos}", f"               relative error: {err}",
                f"  evaluated on {ev.get('on')} (mean-pooled outputs)"]
    head = {"accuracy": "accuracy", "perplexity": "perplexity"}.get(task, task)
    loss = {"accuracy": "loss (CE)", "perplexity": "loss (NLL)"}.get(task, "loss")
    return [f"  {head:<12} {series(METRICS[task][0])}", f"  {loss:<12} {series('loss')}",
            f"  evaluated on {ev.get('on')}"]


def _num(value: Any) -> str:
    try:
        return f"{float(value):.3g}"
    except (TypeError, ValueError):
        return str(value)


def _value(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"


def format_full(d: dict[str, Any], *, summary: bool = True) -> str:
    """The per-layer tables of a report dict, after its summary unless ``summary=False``."""
    lines = ([format_summary(d), ""] if summary else []) + ["gates (kept of total per gate):"]
    rows = [[l["name"], l["kind"], l["kept"], l["total"], f"{100 * (1 - l['kept'] / max(l['total'], 1)):.1f}%"]
            for l in d.get("layers", [])]
    lines.append(format_table(["gate", "kind", "kept", "total", "sparsity"], rows))
    if d.get("shapes"):
        lines += ["", "resized modules:", format_table(["module", "before", "after"], d["shapes"])]
    for what, why in d.get("not_shrunk") or []:
        lines.append(f"not shrunk: {what}: {why}")
    merges = d.get("merges") or {}
    if merges.get("merged"):
        rows = [[" + ".join(m["members"]), m["shape"], f"{m['macs_before']:,}", f"{m['macs_after']:,}"]
                for m in merges["merged"]]
        lines += ["", "merged layers:", format_table(["members", "merged layer", "MACs before", "MACs after"], rows)]
    for at, why in (merges.get("skipped") or {}).items():
        lines.append(f"not merged at {at}: {why}")
    cal = d.get("calibration") or {}
    if cal.get("layers"):
        rows = [[r["name"], r.get("kind", ""), f"{r['err_before']:.3e}", f"{r['err_after']:.3e}"]
                for r in cal["layers"]]
        lines += ["", f"calibration (ridge {cal.get('ridge')}, {cal.get('n_batches')} batches):",
                  format_table(["layer", "kind", "err before", "err after"], rows)]
    return "\n".join(lines)


def _ratio(before: int | None, after: int | None) -> str:
    if not before or after is None:
        return "-"
    return f"{after / before:.3f}"
