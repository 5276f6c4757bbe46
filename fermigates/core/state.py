"""What a conversion records on the model it converted: config, summary, graph, example inputs, fingerprints.

The record is a plain attribute of the model (never in its state dict), so it travels with the model through
``copy.deepcopy`` and pickling. Read it with :func:`get_state` / :func:`find_state`; only the conversion
attaches it and only the bake (or an undone conversion) detaches it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

STATE_ATTR = "_fermigates"


@dataclass
class ConversionSummary:
    """What ``convert_to_fermi`` did: converted modules, gates, units, and what it left alone and why."""

    granularity: tuple[str, ...]
    modules: list[str] = field(default_factory=list)
    n_gates: int = 0
    n_units: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    #: the method that converted the model (``FermiConfig.method``)
    method: str = ""

    def __str__(self) -> str:
        lines = [
            f"fermigates: gated {len(self.modules)} modules with {self.n_gates} gates over {self.n_units:,} "
            f"units (granularity={'+'.join(self.granularity)}, method={self.method})"
        ]
        for name, why in self.skipped[:20]:
            lines.append(f"  not gated: {name}: {why}")
        if len(self.skipped) > 20:
            lines.append(f"  ... and {len(self.skipped) - 20} more not gated")
        return "\n".join(lines)


def fingerprint(tensor: torch.Tensor) -> str:
    """A digest of a tensor's values (and dtype / shape): equal exactly when the values are."""
    data = tensor.detach()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{data.dtype}{tuple(data.shape)}".encode())
    h.update(data.contiguous().cpu().view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()


@dataclass
class ReferenceRecord:
    """Outputs of named layers of the dense model on given batches, valid while nothing changes."""

    batches: list
    outputs: dict
    versions: dict

    @staticmethod
    def tensor_versions(model: nn.Module, skip: list[torch.Tensor]) -> dict:
        """Versions of every parameter and buffer but ``skip`` (a method's own tensors, which the dense model
        ignores)."""
        ignored = {id(t) for t in skip}
        return {id(t): t._version for t in [*model.parameters(), *model.buffers()] if id(t) not in ignored}

    def valid_for(self, model: nn.Module, batches: list, skip: list[torch.Tensor]) -> bool:
        """Recorded on these very batch objects, and no parameter or buffer changed since."""
        return (len(batches) == len(self.batches) and all(a is b for a, b in zip(batches, self.batches))
                and self.tensor_versions(model, skip) == self.versions)


@dataclass
class ConversionState:
    """Bookkeeping kept on a converted model (a plain attribute, never in its state dict)."""

    config: Any
    summary: ConversionSummary
    graph: Any = None
    example_inputs: Any = None
    #: parameter name -> :func:`fingerprint` of its values at conversion: tells, from the weights themselves,
    #: whether the network was trained since (whatever trained it, and through copies and pickles)
    fingerprints: dict[str, str] = field(default_factory=dict)
    #: ids of forward pre-hooks a method registered on the root module (removed at the bake)
    hook_ids: list[int] = field(default_factory=list)
    #: how the training steered the decisions to a budget (a ``BudgetResult``), reported by the bake
    budget_result: Any = None
    #: whatever else the method keeps about this conversion (its own keys)
    extra: dict[str, Any] = field(default_factory=dict)
    #: whether long steps of the conversion (tracing the graph) show progress bars
    progress: bool = False
    #: set by ``prune``: the selection pass records the dense outputs of the units' consumers, so that the
    #: calibration that follows need not run the dense reference again
    record_reference: str | None = None  # None, "consumers" or "all"
    reference_record: ReferenceRecord | None = None
    #: set by ``prune(calibration="one-pass")``: the selection pass keeps the input Gram of every Linear that
    #: consumes a unit (``selection_grams``), from which the layers that lose inputs are then re-fitted
    collect_grams: bool = False
    selection_grams: dict[str, torch.Tensor] | None = None

    @property
    def method(self) -> str:
        """The name of the method that converted the model."""
        return self.config.method

    def record_fingerprints(self, model: nn.Module, skip: list[torch.Tensor]) -> None:
        """Remember the values of every parameter of ``model`` but ``skip`` (a method's own tensors)."""
        ignored = {id(t) for t in skip}
        self.fingerprints = {name: fingerprint(p) for name, p in model.named_parameters() if id(p) not in ignored}

    def weights_changed(self, model: nn.Module) -> bool:
        """True when a parameter recorded at conversion holds other values now (an optimizer step, a load)."""
        params = dict(model.named_parameters())
        return any(name in params and fingerprint(params[name]) != digest
                   for name, digest in self.fingerprints.items())


def find_state(model: nn.Module) -> ConversionState | None:
    """The conversion record of ``model``, or ``None`` when it is not converted."""
    return getattr(model, STATE_ATTR, None)


def get_state(model: nn.Module) -> ConversionState:
    """The conversion record of ``model``; a ``ValueError`` saying what to do when it is not converted."""
    state = find_state(model)
    if state is None:
        raise ValueError(
            f"{type(model).__name__} has no Fermi gates (it is not converted): call "
            "fermigates.convert_to_fermi(model, ...) first"
        )
    return state


def attach_state(model: nn.Module, state: ConversionState) -> None:
    setattr(model, STATE_ATTR, state)


def detach_state(model: nn.Module) -> ConversionState:
    """Remove the record (and the hooks a method registered on the root module); return it."""
    state = get_state(model)
    for hook_id in state.hook_ids:
        model._forward_pre_hooks.pop(hook_id, None)
    delattr(model, STATE_ATTR)
    return state


def summary(model: nn.Module) -> ConversionSummary:
    """The summary recorded by ``convert_to_fermi``."""
    return get_state(model).summary
