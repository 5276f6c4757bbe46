"""The method interface: what a way of deciding what to cut gives the shared pipeline.

A method says

* how it parameterises a layer: ``convert`` builds the twins of the targeted layers (not yet swapped in);
* what it trains with: ``optimizer(model, **kwargs)`` (an optimizer, or a wrapper around one);
* how it bakes: ``plain_replacements`` gives the plain layer for every twin (all decided before any is
  swapped) and ``kept_units`` the kept units of structured groups that the shared shrink consumes.

``convert_to_fermi`` / ``convert_from_fermi`` / ``compute_sparsity`` / ``save_shrunk`` look the method up by
``FermiConfig.method`` (``fermigates.methods.registry``) and never branch on which one it is.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from ..config import FermiConfig
    from ..report import FermiReport, SparsityReport
    from ..state import FermiState


class Method(ABC):
    """One way of deciding what to cut. Subclasses are registered with ``register_method``."""

    #: the name ``FermiConfig.method`` selects
    name: str = ""
    #: granularities the method supports
    granularities: tuple[str, ...] = ("weight",)

    def check_config(self, config: "FermiConfig") -> None:
        """Raise a ValueError naming the field if ``config`` asks for something this method cannot do."""
        bad = [g for g in config.granularities if g not in self.granularities]
        if bad:
            raise ValueError(f"method={self.name!r} supports granularity {self.granularities}, got {bad[0]!r}")
        if config.method_options:
            raise ValueError(f"method={self.name!r} takes no method_options, got {sorted(config.method_options)}")

    @abstractmethod
    def convert(
        self, model: nn.Module, config: "FermiConfig", targets: dict[str, nn.Module], state: "FermiState",
        example_inputs: Any = None,
    ) -> dict[str, nn.Module]:
        """The twin of every target it can parameterise (name -> twin), without modifying ``model``;
        updates ``state.summary`` (gates, units, what it skipped and why)."""

    @abstractmethod
    def is_twin(self, module: nn.Module) -> bool:
        """Whether ``module`` is one of this method's twins."""

    @abstractmethod
    def sparsity(self, model: nn.Module) -> "SparsityReport":
        """Per-layer kept / total of the model's current (hard) decisions."""

    @abstractmethod
    def plain_replacements(self, model: nn.Module) -> dict[int, nn.Module]:
        """``id(twin) -> plain layer`` with the hard decisions baked in, for every twin; decided all at once."""

    def kept_units(self, model: nn.Module) -> dict[int, torch.Tensor]:
        """``group id -> bool keep mask`` for the shared shrink; empty for weight-level methods."""
        return {}

    def training_only_parameters(self, model: nn.Module) -> int:
        """How many parameters exist only while the model is converted (a method's own, e.g. gate levels);
        the report's ``params_before`` leaves them out so that it counts the network itself."""
        return 0

    def optimizer(self, model: nn.Module, **kwargs: Any) -> torch.optim.Optimizer:
        """The optimizer (or wrapper) that trains a model converted with this method."""
        raise NotImplementedError(f"method {self.name!r} does not build its own optimizer")

    def bake(self, model: nn.Module, *, calibration_data: Any = None, example_inputs: Any = None) -> "FermiReport":
        """Bake a weight-level method: plain layers with exact zeros, no shrink (shapes stay), a report.

        On any error before the swap the model is left as it was.
        """
        return bake_weight_level(self, model, calibration_data=calibration_data, example_inputs=example_inputs)

    def twins(self, model: nn.Module) -> dict[str, nn.Module]:
        return {n: m for n, m in model.named_modules() if self.is_twin(m)}


@torch.no_grad()
def bake_weight_level(
    method: Method, model: nn.Module, *, calibration_data: Any = None, example_inputs: Any = None
) -> "FermiReport":
    """``convert_from_fermi`` for a method whose decisions are single weights: swap every twin for its plain
    layer (exact zeros where cut), drop the conversion state, and report sizes and sparsity."""
    from ..bake import _count_macs
    from ..convert import _swap
    from ..report import FermiReport, count_parameters
    from ..state import _STATE_ATTR, fermi_state

    state = fermi_state(model)
    if calibration_data is not None:
        raise ValueError(
            f"calibration_data needs structured decisions: method={method.name!r} removes single connections, "
            "which leaves every layer's shape (and inputs) as they were; bake it without calibration_data"
        )
    was_training = model.training
    model.eval()
    example = example_inputs if example_inputs is not None else state.example_inputs
    try:
        sparsity = method.sparsity(model)
        params_before = count_parameters(model) - method.training_only_parameters(model)
        macs_before = _count_macs(model, example)
        replacements = method.plain_replacements(model)
    finally:
        model.train(was_training)
    _swap(model, replacements)
    delattr(model, _STATE_ATTR)
    report = FermiReport(sparsity=sparsity, params_before=params_before, params_after=count_parameters(model))
    report.macs_before = macs_before
    report.macs_after = _count_macs(model, example) if macs_before is not None else None
    return report
