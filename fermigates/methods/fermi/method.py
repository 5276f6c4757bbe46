"""The Fermi gate behind the method interface: magnitude-scored gates, annealed, baked into hard masks."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..base import Method


class FermiMethod(Method):
    """``method="fermi"``: weight gates, or channel / head group gates on the dependency graph."""

    name = "fermi"
    granularities = ("weight", "channel", "head")

    def convert(self, model: nn.Module, config: Any, targets: dict[str, nn.Module], state: Any,
                example_inputs: Any = None) -> dict[str, nn.Module]:
        from .layers import twin_factory

        twins: dict[str, nn.Module] = {}
        summary = state.summary
        if config.structured:
            from .group_gates import attach_group_gates

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

    def is_twin(self, module: nn.Module) -> bool:
        from .layers import is_gated

        return is_gated(module)

    def sparsity(self, model: nn.Module) -> Any:
        from ...report import compute_sparsity

        return compute_sparsity(model)

    @torch.no_grad()
    def plain_replacements(self, model: nn.Module) -> dict[int, nn.Module]:
        from .model import gated_modules

        twins = gated_modules(model)
        masks = {name: twin.hard_mask() for name, twin in twins.items()}  # decide all before zeroing any
        return {id(t): t.to_plain(masks[name]) for name, t in twins.items()}

    def kept_units(self, model: nn.Module) -> dict[int, torch.Tensor]:
        from .model import _group_keep

        return _group_keep(model)

    def optimizer(self, model: nn.Module, *, lr: float = 1e-3, total_steps: int, **anneal: Any) -> Any:
        from .anneal import FermiAnnealer

        return FermiAnnealer(torch.optim.AdamW(model.parameters(), lr=lr), model, total_steps=total_steps, **anneal)
