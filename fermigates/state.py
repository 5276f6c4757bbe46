"""What ``convert_to_fermi`` records on a converted model: its config, summary, graph and example inputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from .config import FermiConfig

_STATE_ATTR = "_fermigates"


@dataclass
class ConversionSummary:
    """What ``convert_to_fermi`` did: gated modules, gates, units, and what it left alone and why."""

    granularity: tuple[str, ...]
    modules: list[str] = field(default_factory=list)
    n_gates: int = 0
    n_units: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"fermigates: gated {len(self.modules)} modules with {self.n_gates} gates over {self.n_units:,} "
            f"units (granularity={'+'.join(self.granularity)})"
        ]
        for name, why in self.skipped[:20]:
            lines.append(f"  not gated: {name}: {why}")
        if len(self.skipped) > 20:
            lines.append(f"  ... and {len(self.skipped) - 20} more not gated")
        return "\n".join(lines)


@dataclass
class FermiState:
    """Bookkeeping kept on a converted model (a plain attribute, never in its state dict)."""

    config: FermiConfig
    summary: ConversionSummary
    graph: Any = None
    example_inputs: Any = None
    #: ``id(weight) -> weight._version`` at conversion: tells whether the weights were trained since
    weight_versions: dict = field(default_factory=dict)
    #: id of the forward pre-hook that starts each forward with fresh gate probabilities (removed at the bake)
    hook_id: int | None = None

    def weights_changed(self, model: nn.Module) -> bool:
        """True when a gated layer's weight was modified in place (an optimizer step, a load) since conversion."""
        seen = {id(p): p for p in model.parameters()}
        return any(pid in seen and seen[pid]._version != v for pid, v in self.weight_versions.items())


def fermi_state(model: nn.Module) -> FermiState:
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise ValueError(
            f"{type(model).__name__} has no Fermi gates: call fermigates.convert_to_fermi(model, ...) first"
        )
    return state


def summary(model: nn.Module) -> ConversionSummary:
    """The summary recorded by ``convert_to_fermi``."""
    return fermi_state(model).summary
