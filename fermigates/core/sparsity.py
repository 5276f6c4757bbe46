"""Per-layer kept / total counts of a model's decisions, parameter counts, and the plain-text tables they print as."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn


def format_count(n: float | int | None) -> str:
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
    kind: str = "weight"  # the granularity: "weight", "channel" or "head"

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


def count_parameters(model: nn.Module, skip: list[torch.Tensor] | tuple = ()) -> int:
    """Distinct parameters (tied weights counted once), leaving out ``skip`` (a method's own tensors)."""
    ignored = {id(t) for t in skip}
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or id(p) in ignored:
            continue
        seen.add(id(p))
        total += p.numel()
    return total
