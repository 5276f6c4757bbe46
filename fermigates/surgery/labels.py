"""Channel labels for the dependency trace: a union-find over integer labels, plus label-tensor helpers.

A *label* is an integer naming one channel (one unit candidate) born in a producer layer; ``-1`` means
"no prunable origin" (model inputs, embeddings, constants that vary along channels). Every traced tensor
carries a *label tensor*: an int64 tensor broadcastable to the real tensor with size 1 on every dim along
which the labels are constant (``compress``). Structural ops are applied to label tensors as they are to the
real ones, so reshapes, permutes, slicing and concatenation need no per-op index math.
"""

from __future__ import annotations

import torch

NONE = -1


class UnionFind:
    """Labels joined into components; a component may be pinned (not prunable) with a reason."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.reason: dict[int, str] = {}  # root -> why the component is pinned

    def new(self, n: int) -> torch.Tensor:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return torch.arange(start, start + n, dtype=torch.long)

    def find(self, a: int) -> int:
        parent = self.parent
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:
            parent[a], a = root, parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if rb < ra:
            ra, rb = rb, ra
        self.parent[rb] = ra
        why = self.reason.pop(rb, None)
        if why is not None and ra not in self.reason:
            self.reason[ra] = why

    def union_pairs(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Union ``a[i]`` with ``b[i]`` wherever both are labels and differ."""
        a, b = torch.broadcast_tensors(a, b)
        m = (a >= 0) & (b >= 0) & (a != b)
        if not bool(m.any()):
            return
        pairs = torch.stack([a[m], b[m]], dim=1).unique(dim=0)
        for x, y in pairs.tolist():
            self.union(x, y)

    def union_all(self, labels: torch.Tensor) -> int:
        """Join every label in ``labels``; returns one of them, or NONE (pinning them if NONE is among them)."""
        vals = labels.reshape(-1).unique().tolist()
        good = [v for v in vals if v >= 0]
        if not good:
            return NONE
        for v in good[1:]:
            self.union(good[0], v)
        return good[0]

    def pin(self, labels: torch.Tensor | int, reason: str) -> None:
        vals = [labels] if isinstance(labels, int) else labels.reshape(-1).unique().tolist()
        for v in vals:
            if v >= 0:
                root = self.find(v)
                self.reason.setdefault(root, reason)

    def pinned(self, a: int) -> str | None:
        return self.reason.get(self.find(a))


def compress(label: torch.Tensor) -> torch.Tensor:
    """Shrink every dim along which ``label`` is constant to size 1 (an all-NONE tensor becomes all ones)."""
    if label.numel() == 0:
        return label
    if bool((label < 0).all()):
        return torch.full((1,) * label.dim(), NONE, dtype=torch.long)
    for d in range(label.dim()):
        if label.shape[d] > 1:
            first = label.narrow(d, 0, 1)
            if bool((label == first).all()):
                label = first
    return label


def expand(label: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``label`` materialised at ``shape`` (contiguous, so views behave as on any tensor of that shape)."""
    label = label.reshape((1,) * (len(shape) - label.dim()) + tuple(label.shape))
    return label.expand(shape).contiguous()


def varying_dims(label: torch.Tensor) -> set[int]:
    """Dims along which a (compressed) label tensor is not constant."""
    return {d for d, n in enumerate(label.shape) if n > 1}


def along(label: torch.Tensor, dim: int, size: int, uf: UnionFind) -> torch.Tensor:
    """One label per index of ``dim`` (length ``size``): labels sharing an index are joined.

    A channel index holding both a label and NONE pins the label (the column also reads something that
    cannot be removed).
    """
    dim = dim % label.dim()
    if label.shape[dim] == 1:
        return torch.full((size,), _join(label.reshape(-1), uf), dtype=torch.long)
    moved = label.movedim(dim, 0).reshape(label.shape[dim], -1)
    return join_rows(moved, uf)


def join_rows(rows: torch.Tensor, uf: UnionFind) -> torch.Tensor:
    """One label per row of a (K, M) label matrix: the labels of a row are joined (pinned if NONE is among
    them); a row of NONE gives NONE."""
    if rows.shape[1] == 1:
        return rows[:, 0].clone()
    uf.union_pairs(rows[:, :1].expand_as(rows), rows)
    has = rows >= 0
    mixed = has.any(1) & ~has.all(1)
    if bool(mixed.any()):
        uf.pin(rows[mixed], "a channel position mixes this channel with one that has no prunable origin")
    return rows.max(1).values


def _join(row: torch.Tensor, uf: UnionFind) -> int:
    return int(join_rows(row.reshape(1, -1), uf)[0])
