"""The method interface: what a way of deciding what to cut gives the shared pipeline.

A method decides *which* units, connections or non-linearities go and how it trains; everything after the
decision (allocation to a budget, shrink, merge, calibration, checkpoints, reports, recipes, the CLI) is shared
and never asks which method ran. Like peft's tuners, a method is one folder under ``fermigates/methods/`` that
registers an instance of a :class:`Method` subclass (``register_method``) when it is imported; see
``docs/adding-a-method.md``.

Hooks to override (``*``: abstract):

=======================  ===========================================================================================
``name``, ``granularities``  what ``FermiConfig(method=..., granularity=...)`` selects
``options``              the method's own options dataclass (``FermiConfig.method_options`` parsed into it)
``check_config``         refuse a config the method cannot serve, naming the field
``target``               which modules it converts (Linear / Conv by default; activations, ...)
``convert`` *            build the twins of the targets (the model untouched; the shared convert swaps them in)
``on_converted``         after the swap (e.g. register a forward pre-hook in ``state.hook_ids``)
``is_twin`` *            whether a module is one of its twins
``own_tensors``          parameters / buffers that exist only while converted (left out of sizes)
``check_finite``         refuse to bake when its own tensors hold NaN / inf
``decided`` / ``dense``  context managers: the model with its hard decisions in force / as the original network
``make_dense``           turn a (copied) converted model into the original dense function for good
``undecided_units``      how many units are not yet decided (what the bake would round)
``undecided_advice``     what the bake's warning advises when the baked model is not the one trained
``unit_groups``          the dependency-graph groups it can cut, as allocation's ``UnitGroup`` (structured methods)
``set_keep``             write allocation's keep masks back as frozen decisions
``decisions`` *          the bake's input: plain replacements, entries to zero, kept units per group, merges
``sparsity`` *           per-layer kept / total of its current decisions
``optimizer``            what trains a converted model (``fine_tune``, recipes and ``make_optimizer`` use it)
``trainer_callback``     a Hugging Face ``Trainer`` callback, when the method has one
``unconvert``            put the original modules back (an undone ``prune``; the latency budget's dense copy)
``refine``               optional: decisions learned on calibration data with frozen weights
=======================  ===========================================================================================

The optimizer a method returns may offer, and the shared training loop uses when present: ``sparsity_loss()``
(a term added to the loss), ``stats()`` (a dict logged every few steps), ``decided`` (True once the decisions
are frozen: the model trained from then on is the model baked), ``decides_next_step`` and ``budget_result``.
"""

from __future__ import annotations

import contextlib
import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from ..allocation.units import Allocatable, UnitGroup
from ..core.layouts import linear_like, plain_base
from ..core.modules import swap_modules
from ..core.options import Options
from ..core.state import ConversionState, detach_state, get_state
from ..core.twin import is_twin

if TYPE_CHECKING:
    from ..core.sparsity import SparsityReport


@dataclass
class Decisions:
    """What the bake does with a converted model; decided all at once, before anything is changed.

    ``replacements``: ``id(twin) -> plain module`` for every twin (sharing the twin's tensors where the method
    allows). ``zero``: ``(tensor, bool mask)`` pairs, entries the bake sets to zero in place (undone if the bake
    fails). ``kept``: dependency-graph group id -> bool keep mask per unit, for the shared shrink. ``merges``:
    layer merges for the shared merge step (``fermigates.surgery.merge``). ``refit``: layers whose inputs the
    decisions changed without reshaping them (the layer after a removed non-linearity), re-fitted toward the
    reference when the bake calibrates (before any merge).
    """

    replacements: dict[int, nn.Module]
    zero: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    kept: dict[int, torch.Tensor] = field(default_factory=dict)
    merges: list[Any] = field(default_factory=list)
    refit: list[str] = field(default_factory=list)


class Method(ABC):
    """One way of deciding what to cut (see the module docstring for the hooks)."""

    #: the name ``FermiConfig.method`` selects
    name: str = ""
    #: granularities the method supports
    granularities: tuple[str, ...] = ("weight",)
    #: the options dataclass ``FermiConfig.method_options`` is parsed into (None: the method takes none)
    options: type[Options] | None = None
    #: whether :meth:`optimizer` wraps an ordinary optimizer (``base``) rather than being the whole update rule
    wraps_optimizer: bool = False
    #: whether :meth:`optimizer` takes the annealing keywords of a recipe's ``anneal`` section (temperature,
    #: schedule, sparsity_schedule, ramp, sparsity_weight, init, bake_when_decided)
    anneals: bool = False
    #: what the bake's warning advises when the baked model differs from the model as trained (decisions that
    #: were still open while it trained)
    undecided_advice: str = ("freeze the decisions for the last part of the run, so that the model you train is the "
                             "one you bake")

    # -- configuration --------------------------------------------------------------------------------------
    def check_config(self, config: Any) -> None:
        """Raise a ValueError naming the field if ``config`` asks for something this method cannot do."""
        for g in config.granularities:
            if g not in self.granularities:
                raise ValueError(f"granularity must be one of {self.granularities} (or a tuple of them) for "
                                 f"method={self.name!r}, got {g!r}")
        if "weight" in config.granularities and len(config.granularities) > 1:
            raise ValueError("granularity 'weight' cannot be combined with structured granularities")
        self.parse_options(config)

    def parse_options(self, config: Any) -> Options | None:
        """``config.method_options`` as the method's options dataclass (its defaults when None)."""
        if self.options is None:
            if config.method_options:
                raise ValueError(f"method={self.name!r} takes no method_options, got {sorted(config.method_options)}")
            return None
        return self.options.from_dict(config.method_options)

    def structured(self, config: Any) -> bool:
        """Whether the method's decisions remove whole units (channels, heads) that the shared shrink cuts."""
        return "weight" not in config.granularities

    # -- conversion -----------------------------------------------------------------------------------------
    def target(self, module: nn.Module, config: Any) -> bool | str:
        """True if the method can convert ``module`` under ``config``; a reason (str) when it is of a kind the
        method converts but this one cannot be (reported as skipped); False when it is not of that kind at all.
        Default: Linear, registered Linear-like layers and Conv1d/2d/3d whose forward computes the plain layer's
        function."""
        if is_twin(module):
            return False
        if plain_base(module) is not None or linear_like(module) is not None:
            return True
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            return f"{type(module).__name__} overrides forward or has no {self.name} twin"
        return False

    @abstractmethod
    def convert(self, model: nn.Module, config: Any, targets: dict[str, nn.Module], state: ConversionState,
                example_inputs: Any = None) -> dict[str, nn.Module]:
        """The twin of every target it can convert (name -> twin), without modifying ``model``; updates
        ``state.summary`` (gates, units, what it skipped and why) and, for structured methods, ``state.graph``."""

    def on_converted(self, model: nn.Module, state: ConversionState) -> None:
        """Called once the twins are in place (register hooks here, recording their ids in ``state.hook_ids``)."""

    @abstractmethod
    def is_twin(self, module: nn.Module) -> bool:
        """Whether ``module`` is one of this method's twins."""

    def twins(self, model: nn.Module) -> dict[str, nn.Module]:
        return {n: m for n, m in model.named_modules() if self.is_twin(m)}

    def own_tensors(self, model: nn.Module) -> list[torch.Tensor]:
        """Parameters and buffers that exist only while the model is converted (a method's own, e.g. gate
        levels): sizes and version checks leave them out."""
        return []

    def check_finite(self, model: nn.Module) -> None:
        """Raise ``ValueError`` when one of the method's own tensors is NaN / inf (nothing can be baked)."""
        for t in self.own_tensors(model):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"a {self.name} parameter holds NaN/inf (a NaN loss step?): nothing was baked; "
                                 "restore the model from a checkpoint taken before the NaN")

    # -- views ----------------------------------------------------------------------------------------------
    def decided(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """Within this context the model applies its hard decisions (what the bake gives, before shrinking)."""
        return contextlib.nullcontext(model)

    def dense(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """Within this context the model computes the original dense function."""
        raise NotImplementedError(f"method {self.name!r} cannot show the dense network")

    def make_dense(self, model: nn.Module) -> None:
        """Turn ``model`` (a copy: the distillation teacher, the calibration reference) into the dense network."""
        raise NotImplementedError(f"method {self.name!r} cannot show the dense network")

    def undecided_units(self, model: nn.Module) -> int:
        """Units whose decision is still open (soft); 0 for methods whose decisions are always hard."""
        return 0

    # -- structured decisions -------------------------------------------------------------------------------
    def unit_groups(self, model: nn.Module) -> list[UnitGroup]:
        """The dependency-graph groups the method can cut, with its own score per unit; empty for weight-level
        methods."""
        return []

    def set_keep(self, model: nn.Module, keep: dict[int, torch.Tensor]) -> None:
        """Freeze these decisions (group id -> bool keep mask): the model then computes, and bakes, exactly them."""
        raise ValueError(f"method {self.name!r} has no structured units to keep or remove")

    def allocatable(self, model: nn.Module) -> Allocatable:
        """The model as allocation sees it: this method's unit groups and views of the dense network."""
        state = get_state(model)
        return Allocatable(model, self.unit_groups(model), state.graph, state,
                           dense=lambda: self.dense(model), plain_copy=lambda: self.unconverted_copy(model),
                           own_tensors=self.own_tensors(model))

    # -- the bake -------------------------------------------------------------------------------------------
    @abstractmethod
    def decisions(self, model: nn.Module) -> Decisions:
        """Everything the bake needs, decided at once before anything is changed."""

    @abstractmethod
    def sparsity(self, model: nn.Module) -> SparsityReport:
        """Per-layer kept / total of the model's current (hard) decisions."""

    def unconvert(self, model: nn.Module) -> dict[int, nn.Module]:
        """``id(twin) -> the module it replaced`` with nothing decided (the conversion undone)."""
        raise NotImplementedError(f"method {self.name!r} cannot undo its conversion")

    def unconverted_copy(self, model: nn.Module) -> nn.Module:
        """A deep copy of ``model`` with the conversion undone: the dense network as plain modules."""
        clone = copy.deepcopy(model)
        swap_modules(clone, self.unconvert(clone))
        detach_state(clone)
        return clone

    # -- training -------------------------------------------------------------------------------------------
    def optimizer(self, model: nn.Module, *, lr: float = 1e-3, total_steps: int | None = None,
                  base: torch.optim.Optimizer | None = None, calibration_data: Any = None, progress: bool = False,
                  **options: Any) -> torch.optim.Optimizer:
        """What trains a model converted with this method. ``base``: an optimizer already built on the model's
        parameters that the method may wrap (else it builds its own with ``lr``); ``calibration_data``: a few
        training batches the method may use to start from; ``progress``: bars for its own preparation (a
        ranking pass, say); ``options``: the method optimizer's keywords."""
        raise NotImplementedError(f"method {self.name!r} does not build its own optimizer")

    def fine_tune_options(self, model: nn.Module, *, objective: str) -> dict[str, Any]:
        """The keywords :func:`fermigates.fine_tune` gives this method's optimizer by default for a training
        ``objective``: ``"task"`` (labels, a ``loss_fn``, or a teacher the user gave) or ``"original"``
        (distillation toward the model as it was converted, the default teacher). The user's ``anneal={...}``
        keywords replace them. Empty by default."""
        return {}

    def is_method_optimizer(self, optimizer: Any) -> bool:
        """Whether ``optimizer`` is already one this method builds (used as it is by the training loop)."""
        return False

    def trainer_callback(self, model: nn.Module, **kwargs: Any) -> Any:
        """A ``transformers.TrainerCallback`` that trains the method's decisions inside a ``Trainer``."""
        raise NotImplementedError(
            f"method {self.name!r} has no Trainer callback: pass Trainer(optimizers=(fermigates.make_optimizer("
            "model, ...), None)) to train it with its own optimizer")

    def refine(self, model: nn.Module, batches: list, **kwargs: Any) -> Any:
        """Learn the structured decisions on ``batches`` with the weights frozen (optional capability)."""
        raise ValueError(f"method {self.name!r} has no refinement of its decisions (refine_steps)")
