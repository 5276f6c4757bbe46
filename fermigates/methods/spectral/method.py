"""The spectral method behind the shared interface: which layers become spectral, the node groups the
eigenvalues judge, the decisions (frozen, or taken from the eigenvalues when asked), views and the bake."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ...allocation.allocate import allocate, allocate_share
from ...allocation.units import UnitGroup
from ...core.layouts import linear_like
from ...core.modules import attribute_set
from ...core.sparsity import LayerSparsity, SparsityReport
from ...core.state import get_state
from ...surgery.graph import build_dependency_graph
from ..base import Decisions, Method
from .layers import is_spectral, make_spectral, spectral_class
from .nodes import (
    NodeGroup,
    eigenvalue_penalty,
    input_masks,
    node_groups,
    node_scores,
    set_scales,
)
from .optim import SpectralOptimizer, spectral_modules
from .options import SpectralOptions

#: the optimizer keywords that override the options' trained parts
_PART_KEYWORDS = {"train_base": "base", "train_start": "start", "train_end": "end", "train_bias": "bias",
                  "train_rest": "rest"}


@dataclass
class SpectralRecord:
    """What a spectral conversion keeps on the model (``ConversionState.extra["spectral"]``)."""

    groups: list[NodeGroup]
    #: frozen decisions: group id -> bool keep mask per node (``set_keep``)
    keep: dict[int, torch.Tensor] = field(default_factory=dict)
    #: the automatic decisions last taken, with the tensor versions they were taken at
    cache: tuple[Any, dict[int, torch.Tensor]] | None = None


class SpectralMethod(Method):
    """``method="spectral"``: Linear layers written through eigenvectors and eigenvalues (Giambagli et al. 2021),
    nodes ranked by their eigenvalues (Buffoni et al. 2022) and removed through the shared allocation and shrink.

    Before any decision is frozen the converted model computes the dense function; the decisions the bake takes
    (and :meth:`decided` shows) are then the nodes with the smallest eigenvalue scores: ``target_sparsity`` of
    every group, or the config's budget allocated over the groups. ``set_keep`` (``prune``, ``spectral_prune``,
    ``spectral_pretrain``) freezes decisions, which the model applies from then on.
    """

    name = "spectral"
    granularities = ("channel",)
    options = SpectralOptions
    undecided_advice = ("the nodes are decided from the eigenvalues at the bake: freeze the decision first with "
                        "spectral_prune (spectral_pretrain and spectral_distill also train the pruned network), or "
                        "calibrate the bake (calibration_data=...)")

    # -- conversion -----------------------------------------------------------------------------------------
    def target(self, module: nn.Module, config: Any) -> bool | str:
        if is_spectral(module):
            return False
        if spectral_class(module) is not None:
            return True
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) or linear_like(module) is not None:
            return f"{type(module).__name__} has no spectral twin (nn.Linear and Linear-like layers only)"
        return False

    def convert(self, model: nn.Module, config: Any, targets: dict[str, nn.Module], state: Any,
                example_inputs: Any = None) -> dict[str, nn.Module]:
        options = self.parse_options(config)
        if example_inputs is None:
            raise ValueError(f"method='spectral' needs example_inputs to find which nodes are coupled in "
                             f"{type(model).__name__}: pass convert_to_fermi(model, config, example_inputs=x)")
        state.example_inputs = example_inputs
        summary = state.summary
        owners: dict[int, int] = {}
        for module in model.modules():
            for p in module.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
        chosen = {}
        for name, module in targets.items():
            if any(owners.get(id(p), 0) > 1 for p in module.parameters(recurse=False)):
                summary.skipped.append((name, "its weight is shared with another module (tied); left whole"))
            else:
                chosen[name] = module
        graph = build_dependency_graph(model, example_inputs)
        state.graph = graph
        groups = node_groups(graph, set(chosen), config, options.train_start, summary.skipped)
        if not groups:
            reasons = "; ".join(f"{n}: {w}" for n, w in summary.skipped[:5])
            raise ValueError(f"nothing to convert in {type(model).__name__}: no prunable channel group whose nodes "
                             f"spectral layers can judge and remove ({reasons or 'no groups found'})")
        twins = {name: make_spectral(module, normalize=options.normalize) for name, module in chosen.items()}
        set_scales(twins, groups)
        state.extra["spectral"] = SpectralRecord(groups)
        summary.n_gates = len(groups)
        summary.n_units = sum(g.n_units for g in groups)
        return twins

    def is_twin(self, module: nn.Module) -> bool:
        return is_spectral(module)

    def own_tensors(self, model: nn.Module) -> list[torch.Tensor]:
        """The eigenvalues and the input masks (the plain layer folds them into its weight)."""
        out: list[torch.Tensor] = []
        for twin in spectral_modules(model).values():
            out += [twin.eig_start, twin.eig_end]
            if twin.in_mask is not None:
                out.append(twin.in_mask)
        return out

    # -- decisions ------------------------------------------------------------------------------------------
    def record(self, model: nn.Module) -> SpectralRecord:
        state = get_state(model)
        record = state.extra.get("spectral")
        if record is None:
            raise ValueError(f"{type(model).__name__} was not converted with method='spectral' "
                             f"(it was with {state.method!r})")
        return record

    def unit_groups(self, model: nn.Module) -> list[UnitGroup]:
        """Every node group, scored by its eigenvalues (:func:`~fermigates.methods.spectral.nodes.node_scores`)."""
        record, modules = self.record(model), dict(model.named_modules())
        link = self.parse_options(get_state(model).config).link_mode
        return [UnitGroup(g.id, g.n_units, g.step, "channel", g.label, node_scores(modules, g, link))
                for g in record.groups]

    def set_keep(self, model: nn.Module, keep: dict[int, torch.Tensor]) -> None:
        """Freeze these decisions (group id -> bool keep mask per node); the model applies them from now on."""
        record = self.record(model)
        sizes = {g.id: g.n_units for g in record.groups}
        for gid, mask in keep.items():
            if gid not in sizes:
                raise ValueError(f"keep names group {gid}, which is not a spectral node group (groups: "
                                 f"{sorted(sizes)})")
            if mask.numel() != sizes[gid] or not bool(mask.bool().any()):
                raise ValueError(f"keep[{gid}] must have {sizes[gid]} entries with at least one True")
        for gid, mask in keep.items():
            record.keep[gid] = mask.detach().reshape(-1).bool().cpu().clone()
        self._apply(model, record.keep)

    def clear_keep(self, model: nn.Module) -> None:
        """Unfreeze every decision: the model computes the dense function again."""
        self.record(model).keep.clear()
        self._apply(model, {})

    def _apply(self, model: nn.Module, keep: dict[int, torch.Tensor]) -> None:
        modules = dict(model.named_modules())
        for name, mask in input_masks(modules, self.record(model).groups, keep).items():
            modules[name].in_mask = mask

    def current_keep(self, model: nn.Module) -> dict[int, torch.Tensor]:
        """The decisions the bake would take now: the frozen ones, and for every other group the nodes with the
        smallest eigenvalue scores (``target_sparsity`` of the group, or the config's budget)."""
        record = self.record(model)
        if all(g.id in record.keep for g in record.groups):
            return dict(record.keep)
        versions = tuple((id(p), p._version) for t in spectral_modules(model).values()
                         for p in (t.eig_start, t.eig_end))
        if record.cache is None or record.cache[0] != versions:
            state = get_state(model)
            config, target = state.config, self.allocatable(model)
            if config.budget is not None:
                auto, _ = allocate(target, config.budget, example_inputs=state.example_inputs,
                                   selection="magnitude", allocation="auto")
            else:
                auto = allocate_share(target, config.target_sparsity, selection="magnitude")
            record.cache = (versions, auto)
        return {**record.cache[1], **record.keep}

    def undecided_units(self, model: nn.Module) -> int:
        """Nodes of the groups with no frozen decision (the bake decides them from the eigenvalues it finds)."""
        record = self.record(model)
        return sum(g.n_units for g in record.groups if g.id not in record.keep)

    # -- views ----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def decided(self, model: nn.Module) -> Iterator[nn.Module]:
        twins = list(spectral_modules(model).values())
        before = [(t, t.in_mask, t.mask_on) for t in twins]
        try:
            self._apply(model, self.current_keep(model))
            for t in twins:
                t.mask_on = True
            yield model
        finally:
            for t, mask, on in before:
                t.in_mask, t.mask_on = mask, on

    @contextlib.contextmanager
    def dense(self, model: nn.Module) -> Iterator[nn.Module]:
        with attribute_set(spectral_modules(model).values(), "mask_on", False):
            yield model

    def make_dense(self, model: nn.Module) -> None:
        for t in spectral_modules(model).values():
            t.mask_on = False

    # -- the bake -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def decisions(self, model: nn.Module) -> Decisions:
        record, modules = self.record(model), dict(model.named_modules())
        keep = self.current_keep(model)
        masks = input_masks(modules, record.groups, keep)
        replacements, zero = {}, []
        for name, twin in spectral_modules(model).items():
            plain = twin.to_plain()
            replacements[id(twin)] = plain
            mask = masks.get(name)
            if mask is not None:
                removed = mask == 0
                zero.append((plain.weight, removed.unsqueeze(0) if twin._out_dim == 0 else removed.unsqueeze(1)))
        return Decisions(replacements, zero, keep)

    @torch.no_grad()
    def sparsity(self, model: nn.Module) -> SparsityReport:
        record, keep = self.record(model), self.current_keep(model)
        return SparsityReport([LayerSparsity(g.label, "units", int(keep[g.id].sum()), g.n_units, kind="channel")
                               for g in record.groups])

    def unconvert(self, model: nn.Module) -> dict[int, nn.Module]:
        """The plain layers with the spectral weights (the originals' to rounding when nothing was trained)."""
        return {id(t): t.to_plain() for t in spectral_modules(model).values()}

    # -- training -------------------------------------------------------------------------------------------
    def optimizer(self, model: nn.Module, *, lr: float = 1e-3, total_steps: int | None = None,
                  base: torch.optim.Optimizer | None = None, calibration_data: Any = None, progress: bool = False,
                  **kwargs: Any) -> SpectralOptimizer:
        """:class:`SpectralOptimizer` (AdamW) over the parts the options train (default: the end eigenvalues);
        ``train_base=`` / ``train_start=`` / ``train_end=`` / ``train_bias=`` / ``train_rest=`` and ``l1=``
        override the options, other keywords go to AdamW. A ``base`` optimizer cannot be wrapped."""
        if base is not None:
            raise ValueError(f"method='spectral' trains with its own optimizer (SpectralOptimizer over the parts "
                             f"its options name), not around {type(base).__name__}: pass no optimizer")
        options = self.parse_options(get_state(model).config)
        parts = options.parts()
        for key in list(kwargs):
            if key in _PART_KEYWORDS:
                parts[_PART_KEYWORDS[key]] = bool(kwargs.pop(key))
        l1 = kwargs.pop("l1", options.l1)
        groups = self.record(model).groups
        penalty = lambda: eigenvalue_penalty(dict(model.named_modules()), groups)  # noqa: E731
        try:
            return SpectralOptimizer(model, parts, lr=lr, l1=l1, penalty=penalty, **kwargs)
        except TypeError as err:
            raise ValueError(f"method='spectral' takes {sorted(_PART_KEYWORDS)} and AdamW's keywords for its "
                             f"optimizer: {err}") from None

    def is_method_optimizer(self, optimizer: Any) -> bool:
        return isinstance(optimizer, SpectralOptimizer)
