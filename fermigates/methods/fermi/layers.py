"""Gated twins of ``nn.Linear`` and ``nn.Conv{1,2,3}d``.

A twin is a subclass of the layer it replaces (``isinstance(twin, nn.Linear)`` stays true) and shares its
``weight`` and ``bias`` Parameter objects, so state dicts, optimizers built afterwards and code that checks
types keep working. Its forward multiplies the weight by retention probabilities:

* a **weight gate** (unstructured): ``P(|w|)`` for every weight;
* **group slots** (structured): for every coupled channel group or attention-head group this layer
  *consumes*, the columns of its weight that read the group's units are multiplied by the unit's ``P``.
  Gating the consumer's input columns makes "remove the unit everywhere" exactly equal to "mask it here".

``to_plain()`` bakes the hard decision (``P >= 0.5``) into the weight and returns the original class.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...core.layouts import LinearLayout, linear_like, plain_base
from ...core.twin import Twin, make_twin, plain_copy
from .gates import FermiGate

_GATE_ATTRS = ("weight_gate", "_slots", "_row_slots", "_plain_cls", "_in_axis", "_out_axis", "_frozen_factor")


@dataclass(eq=False)
class GroupSlot:
    """A consumer's view of one group gate: column indices ``index[u]`` read unit ``u``."""

    gate: "GroupGate"
    index: torch.Tensor  # (n_units, width), long


#: gate -> [key, probability, used by a backward] of the current forward: outside the modules, so deep copies never see a tensor
#: that carries an autograd graph
_PROBABILITIES: "weakref.WeakKeyDictionary[FermiGate, list]" = weakref.WeakKeyDictionary()


def _shared(gate: FermiGate, inputs_version: tuple, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``compute()``, or the value this forward already computed for ``gate`` if nothing it reads changed and
    no backward has gone through it yet (its graph may be freed after one)."""
    key = (torch.is_grad_enabled(), gate.enabled, gate.hard, gate.mu._version, gate.temperature._version,
           None if gate.mu_offset is None else gate.mu_offset._version, inputs_version)
    hit = _PROBABILITIES.get(gate)
    if hit is not None and hit[0] == key and not hit[2]:
        return hit[1]
    p = compute()
    entry = [key, p, False]
    if p.requires_grad:
        p.register_hook(lambda grad: entry.__setitem__(2, True))
    _PROBABILITIES[gate] = entry
    return p


def weight_probability(gate: FermiGate, weight: torch.Tensor) -> torch.Tensor:
    """A weight gate's soft probabilities of ``weight``'s entries, shared within a forward (the layer and the
    annealer's sparsity term read the same tensor)."""
    return _shared(gate, (weight._version,), lambda: gate(weight.abs()))


def new_forward(model: nn.Module, args: Any) -> None:
    """Forward pre-hook of a converted model: a new forward builds a new graph, so probabilities are computed
    afresh (also when no weight changed in between, as with gradient accumulation)."""
    for module in model.modules():
        if isinstance(module, FermiGate):
            _PROBABILITIES.pop(module, None)


class GroupGate(FermiGate):
    """One Fermi gate per unit of a coupled group; units are scored by their producers' weights.

    ``producers`` holds ``(module, out_axis, index)``: rows ``index[u]`` along ``out_axis`` of the module's
    weight produce unit ``u``. The score of a unit is the L2 norm of all those rows together.
    """

    def __init__(self, n_units: int, scale: float, mu: float, temperature: float, producers: list) -> None:
        super().__init__(n_units, scale, mu, temperature)
        # plain list, not registered: the producers are registered where they live in the model
        self.producers = producers
        self.group_id: int | None = None

    def score(self) -> torch.Tensor:
        total = None
        for module, out_axis, index in self.producers:
            w = module.weight
            rows = w.movedim(out_axis, 0).reshape(w.shape[out_axis], -1)
            sq = rows.float().pow(2).sum(1)[index.to(w.device)].sum(1)
            if not bool(torch.isfinite(sq).all()):  # weights beyond ~1e19: their squares overflow float32
                sq = rows.double().pow(2).sum(1)[index.to(w.device)].sum(1)
            total = sq if total is None else total + sq
        return total.clamp_min(0).sqrt().float()

    def probability(self) -> torch.Tensor:
        """Soft retention probability of every unit; computed once per forward of the converted model however
        many layers consume the group (see :func:`new_forward`)."""
        if self.enabled and self.decided is not None:  # no need to score: the decision is frozen
            return self._touch(self.decided.float())
        return _shared(self, tuple(m.weight._version for m, _, _ in self.producers), lambda: self(self.score()))

    def keep_units(self) -> torch.Tensor:
        if self.decided is not None:
            return self.decided
        return self.keep(self.score())


class GatedMixin(Twin):
    """Shared behaviour of every gated twin. ``_in_axis`` / ``_out_axis`` locate the weight's channel axes.

    ``_slots`` gate input columns (the layer consumes the units); ``_row_slots`` gate output rows and the bias
    (the layer writes the units into a residual stream whose norms must see them gone: hidden-size gates)."""

    weight_gate: FermiGate | None
    _slots: list[GroupSlot]
    _row_slots: list[GroupSlot] = []
    _in_axis: int = 1
    _out_axis: int = 0

    def _init_gating(self) -> None:
        self.weight_gate = None
        self._slots = []
        self._row_slots = []
        self.gates = nn.ModuleList()  # group gates owned (registered) by this layer

    # -- gating -------------------------------------------------------------------------------
    def add_weight_gate(self, temperature: float = 1.0, init: str | float = "open") -> FermiGate:
        self.weight_gate = FermiGate.for_scores(self.weight.detach().abs(), temperature, init)
        self.weight_gate.to(self.weight.device)
        return self.weight_gate

    def add_slot(self, gate: "GroupGate", index: torch.Tensor, owner: bool, rows: bool = False) -> None:
        """Gate the input columns (or, with ``rows``, the output rows and bias) ``index[u]`` by unit ``u``."""
        if owner:
            self.gates.append(gate)
        (self._row_slots if rows else self._slots).append(GroupSlot(gate, index.to(self.weight.device)))

    def group_slots(self) -> list[GroupSlot]:
        return [*self._slots, *self._row_slots]

    def _axis_factor(self, values: list[tuple[GroupSlot, torch.Tensor]], axis: int, flat: bool = False) -> torch.Tensor:
        n = self.weight.shape[axis]
        factor = torch.ones(n, dtype=values[0][1].dtype, device=self.weight.device)
        for slot, p in values:
            width = slot.index.shape[1]
            factor = factor.index_put((slot.index.reshape(-1),), p[:, None].expand(-1, width).reshape(-1))
        if flat:
            return factor
        shape = [1] * self.weight.dim()
        shape[axis] = n
        return factor.reshape(shape)

    def _column_factor(self, values: list[tuple[GroupSlot, torch.Tensor]]) -> torch.Tensor:
        return self._axis_factor(values, self._in_axis)

    def _weight_factor(self) -> torch.Tensor | None:
        gate = self.weight_gate
        if gate is None or not gate.enabled:
            return None
        if gate.decided is not None:
            return gate._touch(self._frozen((gate.decided,), lambda: gate.decided))
        return weight_probability(gate, self.weight)

    def _column_factor_live(self) -> torch.Tensor | None:
        """The multiplier of the input columns (shaped to broadcast over the weight), or None."""
        return self._slot_factor(self._slots, self._in_axis, "columns")

    def _row_factor_live(self, flat: bool = False) -> torch.Tensor | None:
        """The multiplier of the output rows (shaped to broadcast over the weight, or 1-D for the bias)."""
        return self._slot_factor(self._row_slots, self._out_axis, "flat rows" if flat else "rows", flat)

    def _slot_factor(self, slots: list[GroupSlot], axis: int, tag: str, flat: bool = False) -> torch.Tensor | None:
        live = [s for s in slots if s.gate.enabled]
        if not live:
            return None
        if all(s.gate.decided is not None for s in live):
            # frozen decisions: the mask is built once, not at every forward
            factor = self._frozen((tag, *(s.gate.decided for s in live)),
                                  lambda: self._axis_factor([(s, s.gate.decided.float()) for s in live], axis, flat))
            for s in live:
                factor = s.gate._touch(factor)
            return factor
        return self._axis_factor([(s, s.gate.probability()) for s in live], axis, flat).to(self.weight.dtype)

    def gate_factor(self) -> torch.Tensor | None:
        """The soft multiplier of the weight (broadcastable to it), or None when nothing is gated."""
        factor = self._weight_factor()
        for other in (self._column_factor_live(), self._row_factor_live()):
            if other is not None:
                factor = other if factor is None else factor * other
        return factor

    def _gated_bias(self) -> torch.Tensor | None:
        """The bias, its entries multiplied by the output rows' gates (hidden-size gates)."""
        bias = getattr(self, "bias", None)
        rows = self._row_factor_live(flat=True) if bias is not None and self._row_slots else None
        return bias if rows is None else bias * rows.to(bias.dtype)

    def _gated_operands(self, input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input, weight)`` with the gates applied. The column factor scales the weight's input columns,
        or, when the input is the smaller tensor, the input's channels instead (the same product, cheaper:
        deep layers of a CNN hold far more weights than activations)."""
        factor = self._weight_factor()
        weight = self.weight if factor is None else self.weight * factor
        rows = self._row_factor_live()
        if rows is not None:
            weight = weight * rows
        col = self._column_factor_live()
        if col is None:
            return input, weight
        if self._scales_input(input):
            shape = [1] * input.dim()  # channels: last for a Linear, after the batch dimension for a conv
            axis = input.dim() - 1 if isinstance(self, nn.Linear) else input.dim() - (self.weight.dim() - 1)
            shape[axis] = col.numel()
            return input * col.reshape(shape).to(input.dtype), weight
        return input, weight * col

    def _scales_input(self, input: torch.Tensor) -> bool:
        if isinstance(self, nn.Linear):
            return input.numel() < self.weight.numel()
        return getattr(self, "groups", 1) == 1 and self._in_axis == 1 and input.numel() < self.weight.numel()

    def _frozen(self, decided: tuple, build) -> torch.Tensor:
        """The factor built from these frozen decisions, cached (held by reference: a new decision is another
        tensor object, so it never matches a stale entry)."""
        cache = self.__dict__.setdefault("_frozen_factor", [])
        for key, value in cache:
            if len(key) == len(decided) and all(a is b for a, b in zip(key, decided)) \
                    and value.device == self.weight.device and value.dtype == self.weight.dtype:
                return value
        value = build().to(self.weight.device, self.weight.dtype)
        cache[:] = [e for e in cache if e[0][-1] is not decided[-1]][-3:] + [(decided, value)]
        return value

    @torch.no_grad()
    def hard_mask(self) -> torch.Tensor | None:
        """The bool mask of the hard decision (broadcastable to the weight), or None when ungated."""
        mask = None
        if self.weight_gate is not None:
            mask = self.weight_gate.keep(self.weight.abs())
        for slots, axis in ((self._slots, self._in_axis), (self._row_slots, self._out_axis)):
            values = [(s, s.gate.keep_units().float()) for s in slots]
            if values:
                part = self._axis_factor(values, axis) > 0.5
                mask = part if mask is None else mask & part
        return mask

    @torch.no_grad()
    def hard_bias_mask(self) -> torch.Tensor | None:
        """The bool keep mask of the bias entries (output rows gated by hidden-size gates), or None."""
        if getattr(self, "bias", None) is None or not self._row_slots:
            return None
        return self._axis_factor([(s, s.gate.keep_units().float()) for s in self._row_slots], self._out_axis,
                                 flat=True) > 0.5

    def gated_weight(self) -> torch.Tensor:
        factor = self.gate_factor()
        return self.weight if factor is None else self.weight * factor

    # -- baking -------------------------------------------------------------------------------
    def plain(self) -> nn.Module:
        """The original class, sharing this twin's ``weight`` and ``bias`` (nothing is zeroed: the bake zeroes
        the entries of :meth:`hard_mask` itself, so that it can undo them)."""
        return plain_copy(self, drop_attrs=_GATE_ATTRS, drop_modules=("gates", "weight_gate"))

    @torch.no_grad()
    def to_plain(self, mask: torch.Tensor | None = None) -> nn.Module:
        """The original class with the hard mask multiplied into ``weight`` (same Parameter objects).

        Pass ``mask`` (from ``hard_mask()``) when baking several layers: a group's scores read its producers'
        weights, so every mask must be decided before any weight is zeroed.
        """
        mask = self.hard_mask() if mask is None else mask
        if mask is not None:
            self.weight.mul_(mask.to(self.weight.dtype))
        return self.plain()

    def _gate_repr(self) -> str:
        parts = []
        if self.weight_gate is not None:
            g = self.weight_gate
            parts.append(f"weight_gate(mu={g.mu.item():.3g}, T={g.temperature.item():.3g})")
        if self._slots:
            units = sum(s.gate.n_units for s in self._slots)
            parts.append(f"group_gates={len(self._slots)} ({units} units on inputs)")
        if self._row_slots:
            units = sum(s.gate.n_units for s in self._row_slots)
            parts.append(f"stream_gates={len(self._row_slots)} ({units} units on outputs)")
        return ", ".join(parts)


def gated_twin(module: nn.Module, twin_cls: type) -> nn.Module:
    """A ``twin_cls`` instance that shares ``module``'s parameters, buffers and attributes, with no gate yet."""
    twin = make_twin(module, twin_cls)
    twin._init_gating()
    return twin


class FermiLinear(GatedMixin, nn.Linear):
    """``nn.Linear`` whose weight is multiplied by Fermi retention probabilities."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "FermiLinear":
        return gated_twin(linear, cls)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        input, weight = self._gated_operands(input)
        return F.linear(input, weight, self._gated_bias())

    def extra_repr(self) -> str:
        return f"{nn.Linear.extra_repr(self)}, {self._gate_repr()}"


class _FermiConvMixin(GatedMixin):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        input, weight = self._gated_operands(input)
        return self._conv_forward(input, weight, self._gated_bias())

    @classmethod
    def from_conv(cls, conv: nn.Module) -> nn.Module:
        return gated_twin(conv, cls)

    def extra_repr(self) -> str:
        return f"{nn.modules.conv._ConvNd.extra_repr(self)}, {self._gate_repr()}"


class FermiConv1d(_FermiConvMixin, nn.Conv1d):
    """``nn.Conv1d`` with Fermi-gated weights."""


class FermiConv2d(_FermiConvMixin, nn.Conv2d):
    """``nn.Conv2d`` with Fermi-gated weights."""


class FermiConv3d(_FermiConvMixin, nn.Conv3d):
    """``nn.Conv3d`` with Fermi-gated weights."""


class FermiEmbedding(GatedMixin, nn.Embedding):
    """``nn.Embedding`` whose columns (the channels of the residual stream it starts) are gated: hidden-size
    gates."""

    _in_axis, _out_axis = 0, 1

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.embedding(input, self.gated_weight(), self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)

    def extra_repr(self) -> str:
        return f"{nn.Embedding.extra_repr(self)}, {self._gate_repr()}"


_TWIN_CLASSES = {nn.Linear: FermiLinear, nn.Conv1d: FermiConv1d, nn.Conv2d: FermiConv2d, nn.Conv3d: FermiConv3d}


@functools.lru_cache(maxsize=None)
def _linear_like_twin_class(base: type, layout: LinearLayout) -> type:
    """A gated twin of a registered Linear-like class that stores its weight as ``(in, out)`` (transformers'
    ``Conv1D``): ``y = x @ W + b`` with ``W`` gated."""
    if layout.out_dim != 1:
        raise TypeError(f"{base.__name__}: only Linear-like layers with weight (in, out) get a generic twin")

    class FermiLinearLike(GatedMixin, base):
        _in_axis, _out_axis = 0, 1

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            weight, bias = self.gated_weight(), self._gated_bias()
            flat = x.reshape(-1, x.shape[-1])
            out = flat @ weight if bias is None else torch.addmm(bias, flat, weight)
            return out.view(*x.shape[:-1], weight.shape[1])

        def __repr__(self) -> str:
            return f"Fermi{base.__name__}({self._gate_repr()})"

    FermiLinearLike.__name__ = FermiLinearLike.__qualname__ = f"Fermi{base.__name__}"
    return FermiLinearLike


def twin_factory(module: nn.Module) -> Callable[[nn.Module], nn.Module] | None:
    """How to build the gated twin of ``module``, or None if it cannot be gated.

    A subclass that overrides ``forward`` (timm's ``Conv2dSame``, ``StdConv2d``...) is not gated: the twin's
    forward would silently drop what the subclass adds (unless the family registered it as ``SAME_FORWARD``).
    """
    if isinstance(module, GatedMixin):
        return None
    if type(module) is nn.Embedding:
        return lambda m: gated_twin(m, FermiEmbedding)
    base = plain_base(module)
    if base is not None:
        return lambda m: gated_twin(m, _TWIN_CLASSES[base])
    layout = linear_like(module)
    if layout is not None and layout.out_dim == 1 and "forward" in type(module).__dict__:
        return lambda m: gated_twin(m, _linear_like_twin_class(type(m), layout))
    return None


def is_gated(module: nn.Module) -> bool:
    return isinstance(module, GatedMixin)
