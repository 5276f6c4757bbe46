"""Readable sparsity / size reports: per-layer tables, totals, ``compute_sparsity``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .converters.registry import LINEAR_LIKE, lookup
from .methods.fermi.layers import is_gated


def _fmt_count(n: float | int | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}" if isinstance(n, float) else str(n)


def format_table(header: list[str], rows: list[list[Any]]) -> str:
    """A plain-text table with right-aligned numeric columns."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    numeric = [all(_is_number(r[i]) for r in cells[1:]) and len(cells) > 1 for i in range(len(header))]
    lines = []
    for j, row in enumerate(cells):
        parts = [c.rjust(w) if numeric[i] and j else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(parts).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _is_number(text: str) -> bool:
    try:
        float(text.rstrip("%kMG"))
        return True
    except ValueError:
        return False


@dataclass
class LayerSparsity:
    name: str
    unit: str  # "weights", "input channels", ...
    kept: int
    total: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.kept / self.total if self.total else 0.0


@dataclass
class SparsityReport:
    """Per-layer kept/total and the overall fraction removed."""

    layers: list[LayerSparsity] = field(default_factory=list)

    @property
    def kept(self) -> int:
        return sum(layer.kept for layer in self.layers)

    @property
    def total(self) -> int:
        return sum(layer.total for layer in self.layers)

    @property
    def overall(self) -> float:
        return 1.0 - self.kept / self.total if self.total else 0.0

    def __getitem__(self, name: str) -> LayerSparsity:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def __str__(self) -> str:
        rows = [[l.name, l.unit, l.kept, l.total, f"{100 * l.sparsity:.1f}%"] for l in self.layers]
        rows.append(["total", "", self.kept, self.total, f"{100 * self.overall:.1f}%"])
        return format_table(["layer", "unit", "kept", "total", "sparsity"], rows)


@torch.no_grad()
def compute_sparsity(model: nn.Module) -> SparsityReport:
    """Sparsity of a model: of its gates' hard decisions if it is Fermi-gated, else of its zero weights.

    Gated model: one row per weight gate (kept weights) and per group gate (kept units). Plain model: one row
    per ``nn.Linear`` / ``nn.Conv*`` with the count of non-zero weights.
    """
    report = SparsityReport()
    gated = [(n, m) for n, m in model.named_modules() if is_gated(m)]
    if gated:
        seen: set[int] = set()
        for name, module in gated:
            if module.weight_gate is not None:
                keep = module.weight_gate.keep(module.weight.abs())
                report.layers.append(LayerSparsity(name, "weights", int(keep.sum()), keep.numel()))
            for slot in module._slots:
                if id(slot.gate) in seen:
                    continue
                seen.add(id(slot.gate))
                keep = slot.gate.keep_units()
                label = getattr(slot.gate, "label", name)
                report.layers.append(LayerSparsity(label, "units", int(keep.sum()), keep.numel()))
        return report
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) or lookup(LINEAR_LIKE, module) is not None:
            w = module.weight
            report.layers.append(LayerSparsity(name, "weights", int((w != 0).sum()), w.numel()))
    return report


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied weights counted once), excluding the gates' own."""
    seen: set[int] = set()
    total = 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen or name.rsplit(".", 1)[-1] == "mu":
            continue
        seen.add(id(p))
        total += p.numel()
    return total


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

    def __str__(self) -> str:
        lines = ["fermigates report", "=" * 17]
        size = [["parameters", _fmt_count(self.params_before), _fmt_count(self.params_after),
                 _ratio(self.params_before, self.params_after)]]
        if self.macs_before is not None:
            size.append(["MACs", _fmt_count(self.macs_before), _fmt_count(self.macs_after),
                         _ratio(self.macs_before, self.macs_after)])
        lines.append(format_table(["", "before", "after", "ratio"], size))
        lines.append(f"\nsparsity of the gates' decisions: {100 * self.sparsity.overall:.1f}% "
                     f"({self.sparsity.kept:,} of {self.sparsity.total:,} units kept)")
        lines.append(str(self.sparsity))
        if self.shapes:
            lines.append("\nshrunk modules:")
            lines.append(format_table(["module", "before", "after"], [list(s) for s in self.shapes]))
        if self.max_abs_diff is not None:
            lines.append(f"\nshrunk vs hard-masked model on the example inputs: max |diff| = {self.max_abs_diff:.3g}")
        for what, why in self.not_shrunk:
            lines.append(f"not shrunk: {what}: {why}")
        if self.calibration is not None:
            lines.append("\n" + str(self.calibration))
        return "\n".join(lines)


def _ratio(before: int | None, after: int | None) -> str:
    if not before or after is None:
        return "-"
    return f"{after / before:.3f}"
