"""Channel-dependency graph: which channels (and attention heads) must be removed together, and where.

How it is built (see :mod:`fermigates._trace`): the model runs once on example inputs while a
``TorchFunctionMode`` and forward hooks follow an integer *label* per channel. Producers (Linear / conv
output rows, attention heads) create labels; consumers (Linear / conv input columns) record the labels they
read; depthwise / grouped convs and batch norms pass them through. Element-wise ops join the labels that meet
position-wise (a residual add couples its two producers), structural ops (reshape, permute, flatten, getitem,
cat, split...) are applied to the label tensors themselves, so no per-op index math is needed. Anything that
mixes channels (layer norm, softmax or a reduction over channels, a matmul, an unknown op) or that carries
channels to the model output *pins* them. Runtime capture works on timm and Hugging Face models alike (no FX,
asserts and data-dependent Python are fine), at the price of seeing only the path the example inputs take.

Structural ops are also checked to *commute with shrinking*: re-applied with the same arguments to the labels
minus one unit they must give the full result minus that unit. Fixed sizes or indices in the model code
(``x[:, :k]``, ``split([a, b])``, ``view(B, num_heads, -1)``) fail the check and pin; so, conservatively, does
a size the code computed from ``x.shape`` (a runtime trace cannot tell the two apart). ``chunk(n)`` couples
position ``j`` of every chunk into one unit, which keeps the chunks equal after shrinking.

Why pinning is enough: gates live on the consumers' input columns, and the hard-masked model zeroes those
columns. Removing a unit everywhere computes the same function as that masked model exactly when every path
of the unit's channels ends in a consumer, which is what a prunable group guarantees.

Other rules: a depthwise / grouped conv passes whole groups through (a unit is one group: ``in/groups`` input
and ``out/groups`` output channels), so RegNet-style grouped bottlenecks stay prunable; per-channel parameters
met in element-wise ops (a layer scale ``x * gamma``) become ``passthrough`` members with ``param`` set; a
module that shares a weight with another (tied embeddings) is pinned; attention modules with a registered
``AttentionSpec`` are leaves whose heads (or KV groups) are units, cross-attention inputs are pinned; a
Linear / conv subclass that overrides ``forward`` (``StdConv2d``) is pinned unless it is a gated twin or known
to be safe.

A *unit* is one component of joined labels; units that touch the same members (with the same widths) form
one :class:`ChannelGroup`. ``GroupMember.index[u]`` lists the channels unit ``u`` covers on the member's axis.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .trace import trace

_logger = logging.getLogger(__name__)

__all__ = ["ChannelGroup", "DependencyGraph", "GroupMember", "build_dependency_graph"]


@dataclass
class GroupMember:
    """One module's share of a group.

    ``role``: ``"producer"`` (rows of the weight / output channels), ``"consumer"`` (input columns),
    ``"norm"`` (an RMS norm across the channels of a residual stream: its weight is sliced and rescaled),
    ``"passthrough"`` (per-channel axis: batch norm features, depthwise / grouped conv output channels, or --
    when ``param`` is set -- axis ``axis`` of the single parameter ``module.param``, e.g. a layer scale), or
    ``"attention"`` (the query heads each unit owns; the module's projections are members of their own).
    """

    module: str
    role: str
    index: torch.Tensor
    param: str | None = None
    axis: int | None = None

    @property
    def width(self) -> int:
        return int(self.index.shape[1])


@dataclass
class ChannelGroup:
    """Units removed together. ``prunable`` is False when some path of the channels does not end in a
    consumer (``reason`` says which module / op and why)."""

    id: int
    kind: str
    n_units: int
    members: list[GroupMember]
    prunable: bool
    reason: str | None = None

    def member(self, module: str, role: str | None = None) -> GroupMember | None:
        return next((m for m in self.members if m.module == module and role in (None, m.role)), None)

    def __repr__(self) -> str:
        roles = defaultdict(int)
        for m in self.members:
            roles[m.role] += 1
        state = "prunable" if self.prunable else f"pinned: {self.reason}"
        return f"ChannelGroup(id={self.id}, {self.kind}, n_units={self.n_units}, {dict(roles)}, {state})"


@dataclass
class DependencyGraph:
    """All channel / head groups of a model, in a stable order (by first producer)."""

    groups: list[ChannelGroup]
    unknown_ops: dict[str, str] = field(default_factory=dict)

    def group(self, gid: int) -> ChannelGroup:
        return self.groups[gid]

    @property
    def prunable(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    def summary(self) -> str:
        """A short human-readable description: counts and the most common pin reasons."""
        pinned = defaultdict(int)
        for g in self.groups:
            if not g.prunable:
                pinned[_reason_kind(g.reason)] += 1
        lines = [(f"{len(self.groups)} groups, {len(self.prunable)} prunable "
                 f"({sum(g.n_units for g in self.prunable)} units)")]
        lines += [f"  pinned x{n}: {why}" for why, n in sorted(pinned.items(), key=lambda kv: -kv[1])]
        return "\n".join(lines)


def _reason_kind(reason: str | None) -> str:
    return (reason or "?").split(" at ")[0]


def build_dependency_graph(model: nn.Module, example_inputs: Any, progress: bool = False,
                           hidden: bool = False) -> DependencyGraph:
    """Trace ``model`` on ``example_inputs`` (a Tensor, a tuple of positional args or a dict of kwargs) and
    return its channel groups. The model runs once in eval mode under ``torch.no_grad``; its modes are
    restored. A batch of one is enough and the cheapest.

    ``hidden=True`` also follows residual streams through the embeddings that start them (producers along the
    embedding's columns) and the RMS norms that read them (``norm`` members), so a decoder's hidden size becomes
    a group of kind ``"hidden"``: removing its channels is exact for a model whose stream is zero at the removed
    channels (the shrink rescales each norm's weight and epsilon for the smaller width). Layer norms stay pinned:
    their mean over all channels changes whatever the stream holds there."""
    tr = trace(model, example_inputs, progress, hidden)
    groups = _groups_from(tr)
    order = {name: i for i, name in enumerate(n for n, _ in model.named_modules())}
    groups.sort(key=lambda g: (min(order.get(m.module, 1 << 30) for m in g.members), g.members[0].module,
                               int(g.members[0].index.min())))
    for i, g in enumerate(groups):
        g.id = i
    graph = DependencyGraph(groups, dict(tr.unknown_ops))
    _logger.debug("dependency graph: %s", graph.summary())
    return graph


def _roots(parent: list[int]) -> torch.Tensor:
    """The union-find root of every label (pointer jumping, vectorised)."""
    roots = torch.tensor(parent, dtype=torch.long)
    while True:
        nxt = roots[roots]
        if torch.equal(nxt, roots):
            return roots
        roots = nxt


def _groups_from(tr) -> list[ChannelGroup]:
    """Units = label components; units touching the same members with the same widths form a group."""
    uf = tr.uf
    roots = _roots(uf.parent) if uf.parent else torch.zeros(0, dtype=torch.long)
    keys = list(tr.members)
    rs, ks, ps = [], [], []
    for ki, key in enumerate(keys):
        vec = tr.members[key]
        pos = (vec >= 0).nonzero().reshape(-1)
        rs.append(roots[vec[pos]])
        ks.append(torch.full_like(pos, ki))
        ps.append(pos)
    if not rs:
        return []
    r, k, p = torch.cat(rs), torch.cat(ks), torch.cat(ps)
    order = p.argsort(stable=True)
    order = order[k[order].argsort(stable=True)]
    order = order[r[order].argsort(stable=True)]
    r, k, p = r[order], k[order], p[order].tolist()
    pairs, counts = torch.unique_consecutive(r * len(keys) + k, return_counts=True)
    spans: dict[int, dict[int, tuple[int, int]]] = defaultdict(dict)  # root -> key index -> (start, end)
    start = 0
    for pair, n in zip(pairs.tolist(), counts.tolist()):
        root, ki = divmod(pair, len(keys))
        spans[root][ki] = (start, start + n)
        start += n
    pinned = {uf.find(x) for x in uf.reason}
    embeddings = {name: tr.leaf_kinds.get(id(module)) == "embedding" for name, module in tr.modules.items()}
    by_sig: dict[tuple, list[int]] = defaultdict(list)
    for root, parts in spans.items():
        sig = tuple((ki, e - s) for ki, (s, e) in parts.items())  # key indices ascending (sorted above)
        by_sig[(sig, root in pinned)].append(root)

    groups = []
    for (sig, is_pinned), members_roots in by_sig.items():
        k0 = sig[0][0]
        members_roots.sort(key=lambda root: p[spans[root][k0][0]])
        members = []
        for ki, _ in sig:
            rows = [p[slice(*spans[root][ki])] for root in members_roots]
            key = keys[ki]
            members.append(GroupMember(key[0], key[1], torch.tensor(rows, dtype=torch.long), key[2], key[3]))
        members.sort(key=lambda m: _ROLE_ORDER[m.role])
        stream = any(m.role == "norm" or (m.role == "producer" and embeddings.get(m.module)) for m in members)
        kind = "head" if any(m.role == "attention" for m in members) else "hidden" if stream else "channel"
        reason = uf.pinned(members_roots[0]) if is_pinned else None
        groups.append(ChannelGroup(-1, kind, len(members_roots), members, not is_pinned, reason))
    return groups


_ROLE_ORDER = {"producer": 0, "attention": 1, "passthrough": 2, "norm": 3, "consumer": 4}
