"""Layer layouts: how a Linear-like layer stores its weight, and what the library needs to know about an
attention module to remove whole heads from it.

An :class:`AttentionSpec` is registered per attention class (``registry.ATTENTION``, keyed by qualname) by the
family files (``hf_attention.py``, ``timm_attention.py``). The graph treats a module with a spec as a leaf:

* its projections ``q``/``k``/``v`` (or one fused ``qkv`` whose output rows are ``[q; k; v]``, each head-major:
  head ``h`` owns rows ``h*head_dim:(h+1)*head_dim`` of its block) consume the module's input;
* the *units* are heads (multi-head attention) or whole KV groups (grouped-query attention: one KV head plus
  the ``num_heads // num_kv_heads`` query heads that read it), see :func:`head_units`;
* if ``o`` names a child, ``o`` consumes the units' channels (its input columns) and produces fresh stream
  channels; if ``o`` is ``None`` (BERT), the module's output tensor (``(B, T, H*D)`` context, element
  ``output`` of a tuple output) carries the units' channels to a consumer outside the module.

Removing heads is two steps that live in one place each: slicing the child Linear layers (rows of q/k/v/qkv,
columns of o) and updating the module's attributes (``spec.set_heads``). :func:`prune_heads` does both for a
single module (used by tests and by anyone pruning heads without a dependency graph); the shared shrink
slices children through its generic Linear code and calls ``spec.set_heads`` only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from . import registry

_logger = logging.getLogger(__name__)

UnitMode = Literal["group", "slot"]


# --------------------------------------------------------------------------------------------- linear layouts
@dataclass(frozen=True)
class LinearLayout:
    """How a module computing ``y = x W + b`` (a Linear or Linear-like layer) stores its weight.

    ``out_dim`` is the axis of ``weight`` that indexes output features (``nn.Linear``: 0; transformers'
    ``Conv1D``, whose weight is ``(in, out)``: 1); the bias, if any, is indexed by output features.
    ``in_attr`` / ``out_attr`` name the attributes holding the sizes (updated when the layer is sliced).
    """

    out_dim: int
    in_attr: str | None
    out_attr: str | None

    @property
    def in_dim(self) -> int:
        return 1 - self.out_dim


LINEAR = LinearLayout(out_dim=0, in_attr="in_features", out_attr="out_features")
CONV1D = LinearLayout(out_dim=1, in_attr="nx", out_attr="nf")


@dataclass(frozen=True)
class RMSNormSpec:
    """An RMS norm ``y = x / sqrt(mean(x^2) + eps) * (offset + weight)`` (registered in ``RMS_NORMS``).

    ``weight`` / ``eps`` name the module's attributes. Calling the spec with a module returns the spec
    itself, so the registry's ``callable(module) -> description`` convention holds.
    """

    weight: str = "weight"
    eps: str = "eps"
    offset: float = 0.0

    def __call__(self, module: nn.Module | None = None) -> RMSNormSpec:
        return self


def linear_layout(module: nn.Module) -> LinearLayout | None:
    """The layout of ``module`` if it is an ``nn.Linear`` (or subclass) or a registered Linear-like layer."""
    if isinstance(module, nn.Linear):
        return LINEAR
    return registry.lookup(registry.LINEAR_LIKE, module)


CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def weight_axes(module: nn.Module) -> tuple[int, int]:
    """``(in_axis, out_axis)`` of the module's weight: where its input and output channels lie."""
    layout = registry.lookup(registry.LINEAR_LIKE, module)
    if layout is not None:
        return layout.in_dim, layout.out_dim
    if isinstance(module, (nn.modules.conv._ConvTransposeNd, nn.Embedding)):
        return 0, 1  # an embedding: rows are looked up, columns are the channels it writes
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
        return 1, 0
    raise TypeError(f"{type(module).__name__} has no known weight layout; register it in LINEAR_LIKE")


def plain_base(module: nn.Module) -> type | None:
    """The torch layer class (``nn.Linear``, ``nn.Conv1d/2d/3d``) whose function ``module`` computes exactly,
    or ``None``: another kind of module, or a subclass whose ``forward`` adds something (timm's
    ``Conv2dSame`` pads, ``StdConv2d`` standardises its weight) unless registered in ``SAME_FORWARD``."""
    for base in (nn.Linear, *CONVS):
        if isinstance(module, base):
            for attr in ("forward", "_conv_forward"):
                owner = next((c for c in type(module).__mro__ if attr in c.__dict__), None)
                if owner is not None and owner is not base and not issubclass(base, owner) \
                        and not registry.listed(registry.SAME_FORWARD, owner):
                    return None
            return base
    return None


def linear_like(module: nn.Module) -> LinearLayout | None:
    """The layout of a registered Linear-like layer that is not an ``nn.Linear`` (transformers' ``Conv1D``)."""
    if isinstance(module, nn.Linear):
        return None
    return registry.lookup(registry.LINEAR_LIKE, module)


@torch.no_grad()
def slice_linear(
    module: nn.Module, kept_out: torch.Tensor | None = None, kept_in: torch.Tensor | None = None
) -> None:
    """Keep only output features ``kept_out`` and input features ``kept_in`` of a Linear-like ``module``."""
    layout = linear_layout(module)
    if layout is None:
        raise TypeError(f"module must be nn.Linear or registered in LINEAR_LIKE, got {type(module).__name__}")
    weight = module.weight
    new = weight.detach()
    if kept_out is not None:
        new = new.index_select(layout.out_dim, kept_out.to(weight.device))
    if kept_in is not None:
        new = new.index_select(layout.in_dim, kept_in.to(weight.device))
    module.weight = nn.Parameter(new.contiguous(), requires_grad=weight.requires_grad)
    bias = getattr(module, "bias", None)
    if kept_out is not None and isinstance(bias, torch.Tensor):
        module.bias = nn.Parameter(bias.detach()[kept_out.to(bias.device)].contiguous(),
                                   requires_grad=bias.requires_grad)
    if layout.out_attr and kept_out is not None:
        setattr(module, layout.out_attr, int(new.shape[layout.out_dim]))
    if layout.in_attr and kept_in is not None:
        setattr(module, layout.in_attr, int(new.shape[layout.in_dim]))


# --------------------------------------------------------------------------------------------- the spec
@dataclass(frozen=True)
class AttentionSpec:
    """Head structure of one attention class; see the module docstring.

    Child names are attribute paths relative to the attention module (``"q_proj"``, ``"c_attn"``).
    ``set_heads(module, kept_q_heads, kept_kv_heads)`` updates the module's attributes (head counts,
    widths) *after* its children were sliced; indices are head ids before shrinking. ``q_like`` lists extra
    children whose output rows follow the query layout (timm's ``gated`` attention gate); ``unsupported(m)``
    returns why an instance cannot lose heads (or ``None``), e.g. a norm across all heads. ``modes``: the
    unit kinds :func:`head_units` supports for this class. ``select(m)``, when set, returns the concrete spec of
    an instance (a class whose instances are fused or not, e.g. timm's ``AttentionRope``); always go through
    :func:`attention_spec`, which applies it.
    """

    num_heads: Callable[[nn.Module], int]
    head_dim: Callable[[nn.Module], int]
    set_heads: Callable[[nn.Module, torch.Tensor, torch.Tensor], None]
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    o: str | None = None
    num_kv_heads: Callable[[nn.Module], int] | None = None
    q_like: tuple[str, ...] = ()
    output: int = 0
    unsupported: Callable[[nn.Module], str | None] | None = None
    modes: tuple[UnitMode, ...] = field(default=("group",))
    select: Callable[[nn.Module], AttentionSpec] | None = None

    def __post_init__(self) -> None:
        if self.select is not None:
            return
        separate = (self.q, self.k, self.v)
        if self.qkv is None and None in separate:
            raise ValueError(f"AttentionSpec needs q, k and v or a fused qkv, got q/k/v={separate!r}")
        if self.qkv is not None and any(name is not None for name in separate):
            raise ValueError(f"AttentionSpec takes q/k/v or qkv, not both; got qkv={self.qkv!r} and {separate!r}")

    def kv_heads(self, module: nn.Module) -> int:
        return self.num_heads(module) if self.num_kv_heads is None else self.num_kv_heads(module)

    def children(self) -> dict[str, str]:
        """Role -> child name of the projections present (``q``, ``k``, ``v``, ``qkv``, ``o``)."""
        names = {"q": self.q, "k": self.k, "v": self.v, "qkv": self.qkv, "o": self.o}
        return {role: name for role, name in names.items() if name is not None}

    def reason(self, module: nn.Module) -> str | None:
        """Why ``module`` cannot lose heads, or ``None``."""
        return None if self.unsupported is None else self.unsupported(module)


def attention_spec(module: nn.Module) -> AttentionSpec | None:
    """The spec of ``module`` (its class's or nearest registered base's, resolved per instance), else ``None``."""
    spec = registry.lookup(registry.ATTENTION, module)
    if spec is not None and spec.select is not None:
        spec = spec.select(module)
    return spec


# --------------------------------------------------------------------------------------------- units
@dataclass
class HeadUnits:
    """Unit structure of one attention module; every index tensor is ``(n_units, width)``.

    ``q_heads`` / ``kv_heads``: the head ids unit ``u`` owns (``kv_heads`` has width 0 for ``"slot"`` units,
    which keep every KV head). ``q_rows``/``k_rows``/``v_rows``: output rows of separate projections (``None``
    when fused); ``qkv_rows``: rows of the fused projection (``None`` when separate); ``q_like_rows``: rows of
    the ``q_like`` children; ``o_cols``: input columns of ``o`` -- equally the channels of the module's output
    tensor when ``o`` is outside.
    """

    mode: UnitMode
    q_heads: torch.Tensor
    kv_heads: torch.Tensor
    q_rows: torch.Tensor | None
    k_rows: torch.Tensor | None
    v_rows: torch.Tensor | None
    qkv_rows: torch.Tensor | None
    o_cols: torch.Tensor

    @property
    def n_units(self) -> int:
        return int(self.q_heads.shape[0])

    @property
    def q_like_rows(self) -> torch.Tensor:
        return self.o_cols


def _rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of a head-major projection owned by ``heads`` (n_units, k) -> (n_units, k * head_dim)."""
    offs = torch.arange(head_dim)
    return (heads[..., None] * head_dim + offs).reshape(heads.shape[0], -1)


def head_units(module: nn.Module, spec: AttentionSpec | None = None, mode: UnitMode = "group") -> HeadUnits:
    """Unit structure of ``module``: which rows of q/k/v (or qkv) and columns of o each unit owns.

    ``mode="group"``: unit ``g`` is KV head ``g`` and its query heads ``g*G .. g*G+G-1`` (``G`` query heads
    per KV head; plain multi-head attention: one head per unit). ``mode="slot"`` (GQA only): unit ``r`` is
    query slot ``r`` of every group (query heads ``r, G+r, 2G+r, ...``); KV heads are all kept.
    """
    spec = spec or attention_spec(module)
    if spec is None:
        raise TypeError(f"module has no registered AttentionSpec: {type(module).__name__}")
    if mode not in spec.modes:
        raise ValueError(f"mode must be one of {spec.modes} for {type(module).__name__}, got {mode!r}")
    n_q, n_kv, d = spec.num_heads(module), spec.kv_heads(module), spec.head_dim(module)
    if n_kv <= 0 or n_q % n_kv:
        raise ValueError(f"num_heads ({n_q}) must be a multiple of num_kv_heads ({n_kv}) in {type(module).__name__}")
    g = n_q // n_kv
    if mode == "group":
        q_heads = torch.arange(n_q).reshape(n_kv, g)
        kv_heads = torch.arange(n_kv).reshape(n_kv, 1)
    else:
        q_heads = torch.arange(n_q).reshape(n_kv, g).T.contiguous()
        kv_heads = torch.zeros(g, 0, dtype=torch.long)
    q_rows, kv_rows = _rows(q_heads, d), _rows(kv_heads, d)
    if spec.qkv is not None:
        qkv_rows = torch.cat([q_rows, n_q * d + kv_rows, (n_q + n_kv) * d + kv_rows], dim=1)
        return HeadUnits(mode, q_heads, kv_heads, None, None, None, qkv_rows, q_rows)
    return HeadUnits(mode, q_heads, kv_heads, q_rows, kv_rows, kv_rows.clone(), None, q_rows.clone())


def kept_heads(units: HeadUnits, keep: torch.Tensor, n_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted (kept query head ids, kept KV head ids) when units ``keep`` (bool, n_units) are kept."""
    keep = torch.as_tensor(keep, dtype=torch.bool).reshape(-1)
    if keep.numel() != units.n_units:
        raise ValueError(f"keep must have {units.n_units} entries (one per unit), got {keep.numel()}")
    q = units.q_heads[keep].reshape(-1).sort().values
    kv = torch.arange(n_kv_heads) if units.mode == "slot" else units.kv_heads[keep].reshape(-1).sort().values
    return q, kv


def _child(module: nn.Module, name: str) -> nn.Module:
    return module.get_submodule(name)


@dataclass
class HeadPruneResult:
    """What :func:`prune_heads` removed: kept head ids and kept channels of the context (o input / output)."""

    kept_q_heads: torch.Tensor
    kept_kv_heads: torch.Tensor
    kept_channels: torch.Tensor


def prune_heads(
    module: nn.Module, keep: torch.Tensor, spec: AttentionSpec | None = None, mode: UnitMode = "group"
) -> HeadPruneResult:
    """Remove the units of ``module`` where ``keep`` is False: slice its projections and update attributes.

    When ``spec.o`` is ``None`` the output projection lives outside ``module``: slice its input columns with
    ``result.kept_channels`` (e.g. ``slice_linear(bert_layer.attention.output.dense, kept_in=...)``).
    At least one unit must stay.
    """
    spec = spec or attention_spec(module)
    if spec is None:
        raise TypeError(f"module has no registered AttentionSpec: {type(module).__name__}")
    reason = spec.reason(module)
    if reason is not None:
        raise ValueError(f"cannot remove heads from {type(module).__name__}: {reason}")
    units = head_units(module, spec, mode)
    keep = torch.as_tensor(keep, dtype=torch.bool).reshape(-1)
    if keep.numel() != units.n_units or not bool(keep.any()):
        raise ValueError(f"keep must have {units.n_units} entries with at least one True, got {keep.tolist()!r}")
    kq, kkv = kept_heads(units, keep, spec.kv_heads(module))
    d = spec.head_dim(module)
    q_rows = _rows(kq[None], d)[0]
    kv_rows = _rows(kkv[None], d)[0]
    n_q, n_kv = spec.num_heads(module), spec.kv_heads(module)
    if spec.qkv is not None:
        rows = torch.cat([q_rows, n_q * d + kv_rows, (n_q + n_kv) * d + kv_rows])
        slice_linear(_child(module, spec.qkv), kept_out=rows)
    else:
        slice_linear(_child(module, spec.q), kept_out=q_rows)
        slice_linear(_child(module, spec.k), kept_out=kv_rows)
        slice_linear(_child(module, spec.v), kept_out=kv_rows)
    for name in spec.q_like:
        child = getattr(module, name, None)
        if child is not None:
            slice_linear(child, kept_out=q_rows)
    if spec.o is not None:
        slice_linear(_child(module, spec.o), kept_in=q_rows)
    spec.set_heads(module, kq, kkv)
    _logger.debug("%s: kept query heads %s, kv heads %s", type(module).__name__, kq.tolist(), kkv.tolist())
    return HeadPruneResult(kq, kkv, q_rows)


def hard_mask_heads(
    module: nn.Module, keep: torch.Tensor, spec: AttentionSpec | None = None, mode: UnitMode = "group",
    outside_o: nn.Module | None = None,
) -> None:
    """Reference for tests: zero the o input columns (``outside_o``'s when ``o`` is outside) of removed units."""
    spec = spec or attention_spec(module)
    units = head_units(module, spec, mode)
    keep = torch.as_tensor(keep, dtype=torch.bool).reshape(-1)
    cols = units.o_cols[~keep].reshape(-1)
    target = _child(module, spec.o) if spec.o is not None else outside_o
    if target is None:
        raise ValueError("outside_o must be given when the spec's output projection is outside the module")
    layout = linear_layout(target)
    with torch.no_grad():
        target.weight.index_fill_(layout.in_dim, cols.to(target.weight.device), 0.0)
