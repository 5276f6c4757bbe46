"""Physical removal of channels and heads: slice every member of a dependency-graph group.

``shrink_model(model, graph, keep)`` removes the units where ``keep[group_id]`` is False: producer rows,
consumer columns, per-channel parameters / running statistics of passthrough members, and attention heads
(the projections are sliced as producer / consumer members; the attention module's attributes are updated
by its ``AttentionSpec.set_heads``). The result computes the same function as the *hard-masked* model
(:func:`mask_model`: consumers' columns of removed units zeroed) because every path of a prunable group's
channels ends in a consumer.

Per-layer-type rules live in :data:`SHRINK_RULES` (keyed by class, looked up along the MRO). A group whose
units would all be removed keeps its first unit with the consumers' columns zeroed (zero-width convolutions
and batch norms do not run), which is still exactly the masked function.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core import registry
from ..core.layouts import RMSNormSpec, attention_spec, linear_layout, slice_linear
from .graph import ChannelGroup, DependencyGraph
from .macs import count_macs, macs_by_module

_logger = logging.getLogger(__name__)

__all__ = [
    "SHRINK_RULES",
    "ModuleChange",
    "ShrinkResult",
    "count_macs",
    "macs_by_module",
    "mask_model",
    "shrink_model",
]


@dataclass
class ModuleChange:
    """What happened to one module; ``kept_in`` / ``kept_out`` index the module as it was before shrinking
    (``None``: that side is unchanged). ``attrs`` are the new shape attributes, ``attrs_before`` the old."""

    cls: str
    kept_in: torch.Tensor | None
    kept_out: torch.Tensor | None
    attrs: dict[str, Any] = field(default_factory=dict)
    attrs_before: dict[str, Any] = field(default_factory=dict)


@dataclass
class ShrinkResult:
    changes: dict[str, ModuleChange]
    skipped: list[tuple[int, str]]
    params_before: int
    params_after: int
    kept: dict[int, torch.Tensor] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------- keep masks
def _keep_masks(graph: DependencyGraph, keep: dict[int, Any]) -> tuple[dict[int, torch.Tensor], list]:
    masks, skipped = {}, []
    for gid, mask in keep.items():
        if not isinstance(gid, int) or not 0 <= gid < len(graph.groups):
            raise ValueError(f"keep keys must be group ids in [0, {len(graph.groups)}), got {gid!r}")
        group = graph.groups[gid]
        mask = torch.as_tensor(mask, dtype=torch.bool).reshape(-1).cpu()
        if mask.numel() != group.n_units:
            raise ValueError(f"keep[{gid}] must have {group.n_units} entries (one per unit), got {mask.numel()}")
        if bool(mask.all()):
            continue
        if not group.prunable:
            skipped.append((gid, group.reason or "not prunable"))
            continue
        masks[gid] = mask
    return masks, skipped


def _removed_index(member, mask: torch.Tensor) -> torch.Tensor:
    return member.index[~mask].reshape(-1)


def _slot(member) -> tuple:
    if member.role == "passthrough" and member.param is not None:
        return ("param", member.param, member.axis)
    return {"producer": "out", "consumer": "in", "passthrough": "chan", "attention": "heads",
            "norm": "norm"}[member.role]


def _zero_columns(module: nn.Module, cols: torch.Tensor) -> None:
    axis = _in_axis(module)
    with torch.no_grad():
        module.weight.index_fill_(axis, cols.to(module.weight.device), 0.0)


def _in_axis(module: nn.Module) -> int:
    layout = linear_layout(module)
    if layout is not None:
        return layout.in_dim
    return 0 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 1


@torch.no_grad()
def mask_model(model: nn.Module, graph: DependencyGraph, keep: dict[int, Any]) -> None:
    """The hard-masked reference, in place: zero the consumers' input columns of every removed unit; for a
    residual stream under RMS norms (kind ``"hidden"``) zero the stream itself there instead: its producers'
    output rows (and biases) and embedding columns, so that the norms see zeros (:func:`zero_stream`)."""
    masks, _ = _keep_masks(graph, keep)
    modules = dict(model.named_modules())
    for gid, mask in masks.items():
        group = graph.groups[gid]
        for member in group.members:
            if group.kind == "hidden":
                if member.role == "producer":
                    zero_stream(modules[member.module], _removed_index(member, mask))
            elif member.role == "consumer":
                _zero_columns(modules[member.module], _removed_index(member, mask))


@torch.no_grad()
def zero_stream(module: nn.Module, channels: torch.Tensor) -> None:
    """Zero what ``module`` writes into a residual stream at ``channels``: rows (and bias) of a Linear-like
    producer, columns of an embedding."""
    if isinstance(module, nn.Embedding):
        module.weight.index_fill_(1, channels.to(module.weight.device), 0.0)
        return
    out_axis = linear_layout(module).out_dim
    module.weight.index_fill_(out_axis, channels.to(module.weight.device), 0.0)
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.index_fill_(0, channels.to(bias.device), 0.0)


# ------------------------------------------------------------------------------------------- shrink
def shrink_model(model: nn.Module, graph: DependencyGraph, keep: dict[int, Any]) -> ShrinkResult:
    """Remove the units of ``graph`` where ``keep[group_id]`` (bool, one per unit) is False, in place.

    Groups missing from ``keep`` stay whole; a pinned group asked to lose units is left alone and listed in
    ``ShrinkResult.skipped``. Parameters are replaced by new ``nn.Parameter`` objects (same dtype, device,
    ``requires_grad``); parameters the rules do not know (e.g. gate parameters of a gated twin) are untouched.
    """
    masks, skipped = _keep_masks(graph, keep)
    modules = dict(model.named_modules())
    params_before = _count_params(model)
    removed: dict[str, dict[Any, set[int]]] = defaultdict(lambda: defaultdict(set))
    for gid, mask in masks.items():
        group = graph.groups[gid]
        if not bool(mask.any()):
            mask = mask.clone()
            mask[0] = True
            _zero_kept_unit(group, modules)
            masks[gid] = mask
        for member in group.members:
            if member.module not in modules:
                raise ValueError(f"graph member {member.module!r} is not a module of this model; rebuild the graph")
            removed[member.module][_slot(member)].update(_removed_index(member, mask).tolist())

    ties = _ties(model)
    with torch.no_grad():
        before = {name: _attention_info(modules[name]) for name, slots in removed.items() if "heads" in slots}
        changes = {}
        for name, slots in removed.items():
            module = modules[name]
            rule = _rule(module)
            change = ModuleChange(registry.qualname(type(module)), None, None, attrs_before=_shape_attrs(module))
            module_slots = {k: v for k, v in slots.items() if not isinstance(k, tuple) and k != "heads"}
            if module_slots:
                if rule is None:
                    raise TypeError(f"no shrink rule for {name} ({type(module).__name__}) with slots "
                                    f"{sorted(module_slots)}; register one in SHRINK_RULES")
                rule(module, module_slots, change)
            for key, idx in slots.items():
                if isinstance(key, tuple):
                    _, pname, axis = key
                    _slice_attr(module, pname, axis, _complement(idx, getattr(module, pname).shape[axis]))
            changes[name] = change
        for name, info in before.items():
            _set_heads(modules[name], info, removed[name]["heads"], changes[name])
        for name, change in changes.items():
            change.attrs = _shape_attrs(modules[name])
    _retie(modules, ties)
    result = ShrinkResult(changes, skipped, params_before, _count_params(model), masks)
    _logger.info("shrink: %d -> %d parameters, %d modules changed", params_before, result.params_after, len(changes))
    return result


def _zero_kept_unit(group: ChannelGroup, modules: dict[str, nn.Module]) -> None:
    for member in group.members:
        if member.role == "consumer":
            _zero_columns(modules[member.module], member.index[0])


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _complement(removed: set[int], n: int) -> torch.Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    if removed:
        keep[torch.tensor(sorted(removed), dtype=torch.long)] = False
    return keep.nonzero().reshape(-1)


def _slice_attr(module: nn.Module, name: str, axis: int, kept: torch.Tensor) -> None:
    """Replace parameter / buffer ``name`` of ``module`` by its slice ``kept`` along ``axis``."""
    old = getattr(module, name)
    if old is None:
        return
    new = old.detach().index_select(axis, kept.to(old.device)).contiguous()
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        module._buffers[name] = new


# ------------------------------------------------------------------------------------------- rules
def _shrink_linear(module: nn.Module, slots: dict, change: ModuleChange) -> None:
    layout = linear_layout(module)
    w = module.weight
    kept_out = _complement(slots["out"], w.shape[layout.out_dim]) if "out" in slots else None
    kept_in = _complement(slots["in"], w.shape[layout.in_dim]) if "in" in slots else None
    slice_linear(module, kept_out=kept_out, kept_in=kept_in)
    change.kept_in, change.kept_out = kept_in, kept_out


def _shrink_conv(module: nn.Module, slots: dict, change: ModuleChange) -> None:
    w = module.weight
    if "chan" in slots:  # depthwise / grouped conv: whole groups pass through
        og, ig = module.out_channels // module.groups, module.in_channels // module.groups
        kept_out = _complement(slots["chan"], module.out_channels)
        groups = (kept_out // og).unique()
        full = (groups[:, None] * og + torch.arange(og)).reshape(-1)
        if not torch.equal(full, kept_out):
            raise ValueError(f"grouped conv {type(module).__name__} must keep whole groups of {og} channels")
        kept_in = (groups[:, None] * ig + torch.arange(ig)).reshape(-1)
        module.groups = int(groups.numel())
    else:
        kept_out = _complement(slots["out"], module.out_channels) if "out" in slots else None
        kept_in = _complement(slots["in"], module.in_channels) if "in" in slots else None
    if kept_in is not None and "chan" not in slots:
        module.weight = nn.Parameter(w.detach().index_select(1, kept_in.to(w.device)).contiguous(),
                                     requires_grad=w.requires_grad)
    if kept_out is not None:
        _slice_attr(module, "weight", 0, kept_out)
        _slice_attr(module, "bias", 0, kept_out)
        module.out_channels = int(kept_out.numel())
    if kept_in is not None:
        module.in_channels = int(kept_in.numel())
    change.kept_in, change.kept_out = kept_in, kept_out


def _shrink_conv_transpose(module: nn.Module, slots: dict, change: ModuleChange) -> None:
    kept_in = _complement(slots["in"], module.in_channels) if "in" in slots else None
    kept_out = _complement(slots["out"], module.out_channels) if "out" in slots else None
    if kept_in is not None:
        _slice_attr(module, "weight", 0, kept_in)
        module.in_channels = int(kept_in.numel())
    if kept_out is not None:
        _slice_attr(module, "weight", 1, kept_out)
        _slice_attr(module, "bias", 0, kept_out)
        module.out_channels = int(kept_out.numel())
    change.kept_in, change.kept_out = kept_in, kept_out


def _shrink_norm(module: nn.Module, slots: dict, change: ModuleChange) -> None:
    kept = _complement(slots["chan"], module.num_features)
    for name in ("weight", "bias", "running_mean", "running_var"):
        _slice_attr(module, name, 0, kept)
    module.num_features = int(kept.numel())
    change.kept_in = change.kept_out = kept


def _shrink_embedding(module: nn.Module, slots: dict, change: ModuleChange) -> None:
    """An embedding that starts a residual stream: its columns are the stream's channels."""
    kept = _complement(slots["out"], module.embedding_dim)
    _slice_attr(module, "weight", 1, kept)
    module.embedding_dim = int(kept.numel())
    change.kept_out = kept


def _shrink_rms_norm(module: nn.Module, slots: dict, change: ModuleChange) -> None:
    """An RMS norm over a residual stream that is zero at the removed channels: with ``k`` of ``n`` channels
    kept, ``rms`` over the kept ones is ``sqrt(n / k)`` times the full one (epsilon scaled alike), so the weight
    is multiplied by ``sqrt(n / k)`` and epsilon by ``n / k``: the same outputs exactly."""
    spec = registry.lookup(registry.RMS_NORMS, module)
    spec = spec(module) if spec is not None else RMSNormSpec(weight="weight", eps="eps")
    weight = getattr(module, spec.weight)
    n = int(weight.shape[-1])
    kept = _complement(slots["norm"], n)
    k = int(kept.numel())
    scale = math.sqrt(n / k)
    new = (weight.detach().index_select(-1, kept.to(weight.device)).double() + spec.offset) * scale - spec.offset
    setattr(module, spec.weight, nn.Parameter(new.to(weight.dtype).contiguous(), requires_grad=weight.requires_grad))
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        _slice_attr(module, "bias", 0, kept)
    eps = getattr(module, spec.eps, None)
    if eps is None:  # nn.RMSNorm(eps=None) uses the dtype's machine epsilon
        eps = torch.finfo(weight.dtype).eps
    setattr(module, spec.eps, float(eps) * n / k)
    if isinstance(getattr(module, "normalized_shape", None), tuple):
        module.normalized_shape = (*module.normalized_shape[:-1], k)
    change.kept_in = change.kept_out = kept


#: class -> rule(module, slots, change); slots maps "out"/"in"/"chan"/"norm" to removed indices
SHRINK_RULES: dict[type, Callable[[nn.Module, dict, ModuleChange], None]] = {
    nn.Linear: _shrink_linear,
    nn.modules.conv._ConvTransposeNd: _shrink_conv_transpose,
    nn.modules.conv._ConvNd: _shrink_conv,
    nn.modules.batchnorm._NormBase: _shrink_norm,
    nn.Embedding: _shrink_embedding,
    nn.RMSNorm: _shrink_rms_norm,
}


def _rule(module: nn.Module) -> Callable | None:
    if registry.lookup(registry.LINEAR_LIKE, module) is not None:
        return _shrink_linear
    if registry.lookup(registry.RMS_NORMS, module) is not None:
        return _shrink_rms_norm
    for base in type(module).__mro__:
        if base in SHRINK_RULES:
            return SHRINK_RULES[base]
    return None


def _ties(model: nn.Module) -> list[list[tuple[str, str]]]:
    """Parameters shared by several modules (a tied embedding and LM head): ``[(module, name), ...]`` each."""
    owners: dict[int, list[tuple[str, str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for pname, p in module._parameters.items():
            if p is not None and (name, pname) not in owners.get(id(p), []):
                owners.setdefault(id(p), []).append((name, pname))
    return [o for o in owners.values() if len({m for m, _ in o}) > 1]


def _retie(modules: dict[str, nn.Module], ties: list[list[tuple[str, str]]]) -> None:
    """Share each tied parameter again after the rules replaced it (every user sliced it the same way)."""
    for owners in ties:
        (first, name), *rest = owners
        shared = modules[first]._parameters[name]
        for module, pname in rest:
            current = modules[module]._parameters[pname]
            if current is not shared:
                if current.shape != shared.shape or not torch.equal(current, shared):
                    raise ValueError(f"{module}.{pname} is tied to {first}.{name} but was sliced differently")
                modules[module]._parameters[pname] = shared


_BUILTIN_ATTRS = {
    nn.Linear: ("in_features", "out_features"),
    nn.modules.conv._ConvNd: ("in_channels", "out_channels", "groups"),
    nn.modules.batchnorm._NormBase: ("num_features",),
}


def _shape_attrs(module: nn.Module) -> dict[str, Any]:
    names = registry.lookup(registry.SHAPE_ATTRS, module)
    if names is None:
        layout = registry.lookup(registry.LINEAR_LIKE, module)
        names = tuple(a for a in (layout.in_attr, layout.out_attr) if a) if layout is not None else ()
        names = names or next((v for k, v in _BUILTIN_ATTRS.items() if isinstance(module, k)), ())
    return {a: getattr(module, a) for a in names if hasattr(module, a)}


# ------------------------------------------------------------------------------------------- attention
def _attention_info(module: nn.Module) -> tuple:
    spec = attention_spec(module)
    return spec, spec.num_heads(module), spec.kv_heads(module)


def _set_heads(module: nn.Module, info: tuple, removed_heads: set[int], change: ModuleChange) -> None:
    spec, n_q, n_kv = info
    kept_q = _complement(removed_heads, n_q)
    per_kv = n_q // n_kv
    kept_kv = (kept_q // per_kv).unique()
    spec.set_heads(module, kept_q, kept_kv)
