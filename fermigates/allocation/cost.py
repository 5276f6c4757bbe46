"""The cost model: predicted MACs / parameters / units / latency of a model as a function of how many units each
group removes, exactly and without shrinking anything.

For every module the MACs (measured once on the example inputs with :func:`fermigates.count_macs`, dense) and
parameters scale with the kept fraction of each of its channel axes (output rows, input columns, per-channel
axis, heads) that the dependency graph's groups touch.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from ..core.layouts import weight_axes
from ..core.sparsity import count_parameters
from ..surgery.macs import macs_by_module
from .budget import describe_inputs
from .latency import build_latency_model
from .units import Allocatable

__all__ = ["CostModel"]


class CostModel:
    """Predicted MACs / parameters of the model as a function of how many units each gate removes."""

    def __init__(self, target: Allocatable, example: Any) -> None:
        model, gates = target.model, target.groups
        self.target = target
        with target.dense():
            self.macs_by_module = macs_by_module(model, example)
        self.total_macs = sum(self.macs_by_module.values())
        self.total_params = count_parameters(model, target.own_tensors)
        self.total_units = sum(g.n_units for g in gates)
        self.latency: Any = None
        self.counted_on = f"per forward of {describe_inputs(example)}"
        modules = dict(model.named_modules())
        groups = {grp.id: grp for grp in target.graph.groups}
        own = {id(t) for t in target.own_tensors}
        # (module, axis) -> total width, and per gate -> [(module, axis, width per unit)]
        self.width: dict[tuple[str, str], int] = {}
        self.touch: list[list[tuple[str, str, int]]] = []
        for gate in gates:
            touches = []
            for member in groups[gate.id].members:
                module = modules[member.module]
                axis = {"producer": "out", "consumer": "in", "passthrough": "chan", "attention": "heads",
                        "norm": "chan"}[member.role]
                if member.role == "passthrough" and member.param is not None:
                    axis = f"param:{member.param}:{member.axis}"
                    total = getattr(module, member.param).shape[member.axis]
                elif axis in ("out", "in"):
                    in_axis, out_axis = weight_axes(module)
                    total = module.weight.shape[out_axis if axis == "out" else in_axis]
                elif axis == "chan":
                    total = (getattr(module, "num_features", None) or getattr(module, "out_channels", None)
                             or module.weight.shape[-1 if member.role == "norm" else 0])
                else:
                    total = gate.n_units
                self.width[(member.module, axis)] = int(total)
                touches.append((member.module, axis, member.width))
            self.touch.append(touches)
        # parameters of each touched module and the axes each one spans
        self.params: dict[str, list[tuple[int, tuple[str, ...]]]] = {}
        seen = set(own)  # a tied weight (embedding and LM head) counts once
        for name in sorted({m for m, _ in self.width}, key=list(modules).index):
            module = modules[name]
            axes = {a for m, a in self.width if m == name}
            entries = []
            for pname, p in module.named_parameters(recurse=False):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                spans: tuple[str, ...] = ()
                if any(a.startswith(f"param:{pname}:") for a in axes):
                    spans = tuple(a for a in axes if a.startswith(f"param:{pname}:"))
                elif "chan" in axes:
                    spans = ("chan",) if p.dim() >= 1 else ()
                elif pname == "weight":
                    spans = tuple(a for a in ("out", "in") if a in axes)
                elif pname == "bias" and "out" in axes:
                    spans = ("out",)
                entries.append((p.numel(), spans))
            self.params[name] = entries

    def _fractions(self, removed: list[int]) -> dict[tuple[str, str], float]:
        lost: dict[tuple[str, str], int] = {}
        for touches, r in zip(self.touch, removed):
            for module, axis, width in touches:
                lost[(module, axis)] = lost.get((module, axis), 0) + r * width
        return {key: 1.0 - lost.get(key, 0) / self.width[key] for key in self.width}

    def measure_latency(self, model: nn.Module, example: Any, steps: list[int], floors: list[int]) -> Any:
        """Per-layer latency tables for the modules the gates change (see :mod:`fermigates.allocation.latency`)."""
        step: dict[tuple[str, str], int] = {}
        floor: dict[tuple[str, str], int] = {}
        for touches, s, f in zip(self.touch, steps, floors):
            for module, axis, width in touches:
                key = (module, axis)
                step[key] = s * width if key not in step else 1
                floor[key] = f * width if key not in floor else 1
        if self.target.plain_copy is None:
            raise ValueError("a latency budget times an unconverted copy of the model, which this method cannot "
                             "give (Method.unconvert)")
        dense = self.target.plain_copy().eval()
        self.latency = build_latency_model(dense, example, dict(self.width), step, floor)
        self.latency.dense_model = dense
        self.latency_example = example
        return self.latency

    def kept(self, kind: str, removed: list[int]) -> float:
        """The fraction of ``kind`` kept when gate ``i`` removes ``removed[i]`` units."""
        if kind == "units":
            return 1.0 - sum(removed) / max(self.total_units, 1)
        frac = self._fractions(removed)
        if kind == "latency":
            return self.latency.predict(frac) / max(self.latency.total, 1e-12)
        by_module: dict[str, list[float]] = {}
        for (module, axis), f in frac.items():
            by_module.setdefault(module, []).append(f)
        if kind == "macs":
            lost = 0.0
            for module, fs in by_module.items():
                lost += self.macs_by_module.get(module, 0) * (1.0 - math.prod(fs))
            return 1.0 - lost / max(self.total_macs, 1)
        lost = 0.0
        for module, entries in self.params.items():
            for numel, spans in entries:
                lost += numel * (1.0 - math.prod(frac[(module, a)] for a in spans))
        return 1.0 - lost / max(self.total_params, 1)

    def unit_cost(self, kind: str, i: int) -> float:
        """What removing one unit of gate ``i`` saves, at dense widths (for ranking across gates)."""
        base = [0] * len(self.touch)
        base[i] = 1
        return max(1.0 - self.kept(kind, base), 1e-12)
