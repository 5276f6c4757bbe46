"""The Fermi gate behind the method interface: magnitude-scored gates, annealed, baked into hard masks."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn as nn

from ...allocation.units import Allocatable, UnitGroup
from ...core.sparsity import LayerSparsity, SparsityReport
from ..base import Decisions, Method
from .anneal import CUT_FIRST, FermiAnnealer
from .gates import check_temperature
from .group_gates import attach_group_gates
from .layers import is_gated, new_forward, twin_factory
from .model import (
    all_gates,
    allocatable,
    disable_gates,
    gated_modules,
    gates_open,
    group_keep,
    hard_gates,
    original_modules,
    own_tensors,
    set_keep,
    structured_gates,
    undecided_units,
    unit_groups,
)
from .refine import refine_gates
from .trainer import fermi_trainer_callback


class FermiMethod(Method):
    """``method="fermi"``: weight gates, or channel / head group gates on the dependency graph."""

    name = "fermi"
    granularities = ("weight", "channel", "head", "hidden")
    wraps_optimizer = True
    anneals = True
    undecided_advice = ("train the last part of the run with decided gates (FermiAnnealer's hard phase, "
                        "hard_after=...; a unit is undecided while 0.01 < P < 0.99) so that the model you train is "
                        "the one you bake")

    def check_config(self, config: Any) -> None:
        super().check_config(config)
        t = config.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise TypeError(f"temperature must be a number > 0 (e.g. 1.0), got {type(t).__name__} {t!r}")
        check_temperature(t)
        m = config.mu_init
        if m != "open" and not (isinstance(m, (int, float)) and not isinstance(m, bool) and 0 <= m < 1):
            raise ValueError(f"mu_init must be 'open' or a percentile in [0, 1), got {m!r}")

    def target(self, module: nn.Module, config: Any) -> bool | str:
        if type(module) is nn.Embedding:  # an embedding is gated only where it starts a gated residual stream
            return "hidden" in config.granularities
        if twin_factory(module) is not None:
            return True
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and not is_gated(module):
            return f"{type(module).__name__} overrides forward or has no gated twin"
        return False

    def convert(self, model: nn.Module, config: Any, targets: dict[str, nn.Module], state: Any,
                example_inputs: Any = None) -> dict[str, nn.Module]:
        twins: dict[str, nn.Module] = {}
        summary = state.summary
        if config.structured:
            if example_inputs is None:
                raise ValueError(
                    f"granularity={config.granularity!r} needs example_inputs to find which channels are "
                    f"coupled in {type(model).__name__}: pass convert_to_fermi(model, config, example_inputs=x)"
                )
            state.example_inputs = example_inputs
            attach_group_gates(model, config, targets, twins, state)
            if not twins:
                reasons = "; ".join(f"{n}: {w}" for n, w in summary.skipped[:5])
                raise ValueError(
                    f"nothing to convert in {type(model).__name__}: no prunable {config.granularity!r} group "
                    f"has all its consumers targeted ({reasons or 'no groups found'})"
                )
            return twins
        for name, module in targets.items():
            twin = twin_factory(module)(module)
            twin.add_weight_gate(config.temperature, config.mu_init)
            twins[name] = twin
            summary.n_gates += 1
            summary.n_units += module.weight.numel()
        return twins

    def on_converted(self, model: nn.Module, state: Any) -> None:
        state.hook_ids.append(model.register_forward_pre_hook(new_forward).id)

    def is_twin(self, module: nn.Module) -> bool:
        return is_gated(module)

    def own_tensors(self, model: nn.Module) -> list[torch.Tensor]:
        return own_tensors(model)

    def check_finite(self, model: nn.Module) -> None:
        for gate in all_gates(model):
            for p in (gate.mu, gate.mu_offset):
                if p is not None and not bool(torch.isfinite(p).all()):
                    name = getattr(gate, "label", None) or f"{gate.kind} gate ({gate.n_units} units)"
                    raise ValueError(f"the Fermi level of {name} is NaN/inf (a NaN loss step?): nothing was baked; "
                                     "restore the model from a checkpoint taken before the NaN")

    # -- views ----------------------------------------------------------------------------------------------
    def decided(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return hard_gates(model)

    def dense(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return gates_open(model)

    def make_dense(self, model: nn.Module) -> None:
        disable_gates(model)

    def undecided_units(self, model: nn.Module) -> int:
        return undecided_units(model)

    # -- structured decisions -------------------------------------------------------------------------------
    def unit_groups(self, model: nn.Module) -> list[UnitGroup]:
        return unit_groups(model)

    def set_keep(self, model: nn.Module, keep: dict[int, torch.Tensor]) -> None:
        set_keep(model, keep)

    def allocatable(self, model: nn.Module) -> Allocatable:
        return allocatable(model)

    # -- the bake -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def decisions(self, model: nn.Module) -> Decisions:
        twins = gated_modules(model)
        masks = {name: twin.hard_mask() for name, twin in twins.items()}  # decide all before zeroing any
        zero = [(twin.weight, ~masks[name].expand_as(twin.weight)) for name, twin in twins.items()
                if masks[name] is not None]
        zero += [(twin.bias, ~keep) for twin in twins.values() if (keep := twin.hard_bias_mask()) is not None]
        return Decisions({id(t): t.plain() for t in twins.values()}, zero, group_keep(model))

    @torch.no_grad()
    def sparsity(self, model: nn.Module) -> SparsityReport:
        report = SparsityReport()
        seen: set[int] = set()
        for name, module in gated_modules(model).items():
            if module.weight_gate is not None:
                keep = module.weight_gate.keep(module.weight.abs())
                report.layers.append(LayerSparsity(name, "weights", int(keep.sum()), keep.numel()))
            for slot in module.group_slots():
                if id(slot.gate) in seen:
                    continue
                seen.add(id(slot.gate))
                keep = slot.gate.keep_units()
                label = getattr(slot.gate, "label", name)
                report.layers.append(LayerSparsity(label, "units", int(keep.sum()), keep.numel(),
                                                   kind=getattr(slot.gate, "kind", "channel")))
        return report

    def unconvert(self, model: nn.Module) -> dict[int, nn.Module]:
        return original_modules(model)

    # -- training -------------------------------------------------------------------------------------------
    def optimizer(self, model: nn.Module, *, lr: float = 1e-3, total_steps: int | None = None,
                  base: torch.optim.Optimizer | None = None, calibration_data: Any = None, progress: bool = False,
                  **anneal: Any) -> FermiAnnealer:
        if total_steps is None:
            raise TypeError("the Fermi method's optimizer (FermiAnnealer) needs total_steps=: the length of the "
                            "run its schedules span")
        if calibration_data is not None and "calibration_data" not in anneal:
            anneal["calibration_data"] = calibration_data
        base = base if base is not None else torch.optim.AdamW(model.parameters(), lr=lr)
        anneal.setdefault("progress", progress)
        return FermiAnnealer(base, model, total_steps=total_steps, **anneal)

    def fine_tune_options(self, model: nn.Module, *, objective: str) -> dict[str, Any]:
        """Toward the original network with channel / head gates: :data:`~.anneal.CUT_FIRST` (the one-shot cut
        at the first step, calibrated toward the original); else the annealer's own defaults."""
        if objective == "original" and structured_gates(model):
            return dict(CUT_FIRST)
        return {}

    def is_method_optimizer(self, optimizer: Any) -> bool:
        return isinstance(optimizer, FermiAnnealer)

    def trainer_callback(self, model: nn.Module, **kwargs: Any) -> Any:
        return fermi_trainer_callback(model, **kwargs)

    def refine(self, model: nn.Module, batches: list, **kwargs: Any) -> Any:
        return refine_gates(model, batches, **kwargs)
