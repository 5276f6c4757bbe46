"""What ``convert_to_fermi`` records on a converted model: its config, summary, graph and example inputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
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
    #: set by ``prune``: the selection pass records the dense outputs of the gates' consumers, so that the
    #: calibration that follows need not run the dense reference again
    record_reference: str | None = None  # None, "consumers" or "all"
    reference_record: "ReferenceRecord | None" = None
    #: set by ``prune(calibration="one-pass")``: the selection pass keeps the input Gram of every Linear that
    #: consumes a gate (``selection_grams``), from which the layers that lose inputs are then re-fitted
    collect_grams: bool = False
    selection_grams: "dict[str, torch.Tensor] | None" = None

    def weights_changed(self, model: nn.Module) -> bool:
        """True when a gated layer's weight was modified in place (an optimizer step, a load) since conversion."""
        seen = {id(p): p for p in model.parameters()}
        return any(pid in seen and seen[pid]._version != v for pid, v in self.weight_versions.items())


@dataclass
class ReferenceRecord:
    """Outputs of named layers of the dense (gates-open) model on given batches, valid while nothing changes."""

    batches: list
    outputs: dict
    versions: dict

    @staticmethod
    def tensor_versions(model: nn.Module, gates: list) -> dict:
        """Versions of every parameter and buffer but the gates' own (which gates-open outputs ignore)."""
        skip = {id(t) for g in gates for t in [*g.parameters(), *g.buffers()]}
        return {id(t): t._version for t in [*model.parameters(), *model.buffers()] if id(t) not in skip}

    def valid_for(self, model: nn.Module, batches: list, gates: list) -> bool:
        """Recorded on these very batch objects, and no parameter or buffer changed since."""
        return (len(batches) == len(self.batches) and all(a is b for a, b in zip(batches, self.batches))
                and self.tensor_versions(model, gates) == self.versions)


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
