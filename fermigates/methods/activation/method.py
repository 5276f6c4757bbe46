"""Activation gating behind the method interface: units for activation modules, driven to the identity, baked
into identities that the shared merge step composes across."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from ...allocation.units import Allocatable, UnitGroup
from ...core.sparsity import LayerSparsity, SparsityReport
from ...core.state import get_state
from ...surgery.merge import MergeRequest
from ..base import Decisions, Method
from .anneal import ActivationAnnealer
from .model import (
    decided,
    dense,
    make_dense,
    own_tensors,
    plain_replacements,
    readers,
    undecided_units,
    units,
)
from .options import ActivationOptions
from .targets import is_activation, probe
from .units import PaTwin, make_unit


class ActivationMethod(Method):
    """``method="activation"``: each activation module becomes ``a * act(x) + (1 - a) * x`` (``a = 1`` at
    conversion); the annealer drives the removed ones to the identity and the bake merges the layers they
    separated. Granularity ``"unit"``: one ``a`` per activation module; ``"channel"``: one per channel."""

    name = "activation"
    granularities = ("unit", "channel")
    options = ActivationOptions
    wraps_optimizer = True
    anneals = True

    def structured(self, config: Any) -> bool:
        """True: a decision removes a whole non-linearity (and the bake may merge layers), found on example
        inputs like channel groups are."""
        return True

    def check_config(self, config: Any) -> None:
        super().check_config(config)
        if len(config.granularities) != 1:
            raise ValueError(f"granularity must be one of {self.granularities} for method='activation', got "
                             f"{config.granularity!r}")
        if isinstance(config.target_sparsity, dict):
            raise ValueError("target_sparsity must be one fraction (of the activations removed) for "
                             f"method='activation', got {config.target_sparsity!r}")

    def target(self, module: nn.Module, config: Any) -> bool | str:
        if isinstance(module, PaTwin):
            return False
        return is_activation(module)

    def convert(self, model: nn.Module, config: Any, targets: dict[str, nn.Module], state: Any,
                example_inputs: Any = None) -> dict[str, nn.Module]:
        options = self.parse_options(config)
        per_channel = config.granularities == ("channel",)
        found = None
        if example_inputs is not None:
            found = probe(model, example_inputs, targets)
            state.summary.skipped.extend(found.functional)
        elif per_channel:
            raise ValueError("granularity='channel' needs example_inputs to find each activation's channels: pass "
                             "convert_to_fermi(model, config, example_inputs=x)")
        twins: dict[str, nn.Module] = {}
        for name, module in targets.items():
            channels, axis = (found.channels.get(name, (None, 1)) if found is not None else (None, 1))
            if found is not None and name not in found.channels:
                state.summary.skipped.append((name, "not run on the example inputs"))
                continue
            twins[name] = make_unit(module, options.alpha, float(options.alpha_init),
                                    channels if per_channel else None, axis, options.keep)
            state.summary.n_gates += 1
            state.summary.n_units += 1
        if not twins:
            reasons = "; ".join(f"{n}: {w}" for n, w in state.summary.skipped[:5])
            raise ValueError(f"nothing to convert in {type(model).__name__}: no activation module was selected "
                             f"and run ({reasons or 'no activation modules found'})")
        state.extra["options"] = options
        return twins

    def is_twin(self, module: nn.Module) -> bool:
        return isinstance(module, PaTwin)

    def own_tensors(self, model: nn.Module) -> list[torch.Tensor]:
        return own_tensors(model)

    # -- views ----------------------------------------------------------------------------------------------
    def decided(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return decided(model)

    def dense(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return dense(model)

    def make_dense(self, model: nn.Module) -> None:
        make_dense(model)

    def undecided_units(self, model: nn.Module) -> int:
        return undecided_units(model)

    def unit_groups(self, model: nn.Module) -> list[UnitGroup]:
        raise ValueError("method='activation' removes non-linearities while it trains (fermigates.make_optimizer / "
                         "fine_tune, with budget='macs:...' / 'latency:...' there); the one-shot prune() and its "
                         "allocation cut channels / heads: use method='fermi' for it")

    def allocatable(self, model: nn.Module) -> Allocatable:
        self.unit_groups(model)
        raise AssertionError  # unreachable

    # -- the bake -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def decisions(self, model: nn.Module) -> Decisions:
        found = units(model)
        gone = [n for n, u in found.items() if u.pa_removed]
        replacements = plain_replacements(model, identity=gone)
        options = get_state(model).extra["options"]
        merges = [] if options.merge == "never" else \
            [MergeRequest(n, force=options.merge == "always") for n in gone]
        example = get_state(model).example_inputs
        refit = readers(model, gone, example) if gone and example is not None else []
        return Decisions(replacements, merges=merges, refit=refit)

    @torch.no_grad()
    def sparsity(self, model: nn.Module) -> SparsityReport:
        return SparsityReport([LayerSparsity(name, "activation", 0 if u.pa_removed else 1, 1, kind="activation")
                               for name, u in units(model).items()])

    def unconvert(self, model: nn.Module) -> dict[int, nn.Module]:
        return {id(u): u.original() for u in units(model).values()}

    # -- training -------------------------------------------------------------------------------------------
    def optimizer(self, model: nn.Module, *, lr: float = 1e-3, total_steps: int | None = None,
                  base: torch.optim.Optimizer | None = None, calibration_data: Any = None, progress: bool = False,
                  **options: Any) -> ActivationAnnealer:
        if total_steps is None:
            raise TypeError("the activation method's optimizer (ActivationAnnealer) needs total_steps=: the length "
                            "of the run its schedule spans")
        options.pop("bake_when_decided", None)
        if calibration_data is not None and "calibration_data" not in options:
            options["calibration_data"] = calibration_data
        base = base if base is not None else torch.optim.AdamW(model.parameters(), lr=lr)
        return ActivationAnnealer(base, model, total_steps=total_steps, **options)

    def is_method_optimizer(self, optimizer: Any) -> bool:
        return isinstance(optimizer, ActivationAnnealer)
