"""Runtime capture of channel dependencies: run the model once and follow channel labels.

The model runs on example inputs under a :class:`torch.overrides.TorchFunctionMode` that sees every torch
function and Tensor method called *between* leaf modules, while forward hooks on the leaves (Linear and
Linear-like layers, convolutions, embeddings, RMS norms, attention modules with an ``AttentionSpec``) record
them as members: a Linear consumes the labels of its input's last dim and produces fresh labels for its
outputs, a depthwise / grouped conv passes whole groups through, an attention module turns its heads into
units. Ops inside a leaf are not seen (depth counter). :mod:`fermigates._ops` says how labels flow through
the functions in between; :mod:`fermigates._labels` holds the union-find.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from tqdm.auto import tqdm

from ..core.batches import call_model, walk_tensors
from . import ops as _ops
from .labels import NONE, UnionFind, along, compress, expand
from .leaves import LEAVES, leaf_kind

_logger = logging.getLogger(__name__)

MemberKey = tuple  # (module fqn, role, parameter name or None, parameter axis or None)



class _Mode(TorchFunctionMode):
    def __init__(self, tracer: Tracer) -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tr = self.tracer
        if tr.depth == 0 and tr.quiet == 0:
            tr.quiet += 1
            try:
                tr.on_op(func, args, kwargs, out)
            finally:
                tr.quiet -= 1
        return out


class Tracer:
    """State of one capture: label tensors per live tensor, members per module, the union-find."""

    def __init__(self, model: nn.Module, hidden: bool = False) -> None:
        self.model = model
        #: follow residual streams through embeddings and RMS norms (hidden-size pruning) instead of pinning them
        self.hidden = hidden
        self.uf = UnionFind()
        self.labels: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.param_pos: dict[int, tuple[torch.Tensor, str, str, torch.Tensor, torch.Size]] = {}
        self.owners: dict[int, list[tuple[str, str]]] = {}
        for fqn, mod in model.named_modules(remove_duplicate=False):
            for pname, p in list(mod._parameters.items()) + list(mod._buffers.items()):
                if p is not None and (fqn, pname) not in self.owners.get(id(p), []):
                    self.owners.setdefault(id(p), []).append((fqn, pname))
        self.modules = dict(model.named_modules())
        self.names = {id(m): n for n, m in self.modules.items()}
        self.members: dict[MemberKey, torch.Tensor] = {}
        self.produced: dict[str, torch.Tensor] = {}
        self.stack: list[str] = []
        self.leaf_kinds: dict[int, str] = {}
        self.depth = 0
        self.quiet = 0
        self.unknown_ops: dict[str, str] = {}
        self.bar: Any = None

    # -- label store ------------------------------------------------------------------------
    def label(self, t: Any) -> torch.Tensor | None:
        entry = self.labels.get(id(t)) if isinstance(t, torch.Tensor) else None
        return entry[1] if entry is not None else None

    def label_full(self, t: torch.Tensor) -> torch.Tensor:
        lab = self.label(t)
        if lab is None:
            return torch.full(t.shape, NONE, dtype=torch.long)
        return expand(lab, t.shape)

    def set(self, t: torch.Tensor, lab: torch.Tensor | None) -> None:
        if lab is None:
            return self.set_none(t)
        lab = lab.reshape((1,) * (t.dim() - lab.dim()) + tuple(lab.shape))
        self.labels[id(t)] = (t, compress(lab))

    def set_none(self, t: torch.Tensor) -> None:
        self.labels[id(t)] = (t, torch.full((1,) * t.dim(), NONE, dtype=torch.long))

    def forget(self, t: torch.Tensor) -> None:
        self.labels.pop(id(t), None)

    def out_tensors(self, out: Any) -> list[torch.Tensor]:
        if isinstance(out, torch.Tensor):
            return [out]
        if isinstance(out, (list, tuple)):
            return [o for o in out if isinstance(o, torch.Tensor)]
        return []

    def assign_like(self, out: Any, res: Any) -> None:
        if isinstance(out, torch.Tensor) and isinstance(res, torch.Tensor):
            self.set(out, compress(res))
        elif isinstance(out, (list, tuple)) and isinstance(res, (list, tuple)) and len(out) == len(res):
            for o, r in zip(out, res):
                self.assign_like(o, r)
        else:
            for o in self.out_tensors(out):
                self.set_none(o)

    def where(self) -> str:
        return self.stack[-1] if self.stack and self.stack[-1] else "<model>"

    # -- members ----------------------------------------------------------------------------
    def record(self, key: MemberKey, vec: torch.Tensor) -> None:
        """Member ``key`` holds channel ``k`` of label ``vec[k]``; a second call joins position-wise."""
        vec = vec.reshape(-1).long()
        old = self.members.get(key)
        if old is None:
            self.members[key] = vec.clone()
            return
        if old.shape != vec.shape:
            why = f"{key[0]} is called with inputs of different widths"
            self.uf.pin(old, why)
            self.uf.pin(vec, why)
            return
        self.uf.union_pairs(old, vec)
        mixed = (old >= 0) != (vec >= 0)
        if bool(mixed.any()):
            why = f"{key[0]} reads the same channel from a prunable and a fixed source"
            self.uf.pin(old[mixed], why)
            self.uf.pin(vec[mixed], why)
        self.members[key] = torch.where(old >= 0, old, vec)

    def produce(self, key: str, n: int) -> torch.Tensor:
        if key not in self.produced or self.produced[key].numel() != n:
            self.produced[key] = self.uf.new(n)
        return self.produced[key]

    def norm_owner(self, params: list[torch.Tensor]) -> str | None:
        """The BatchNorm-like module owning all of ``params`` (sliced by the shrink rule of its type)."""
        owners = {o for p in params for o, _ in self.owners.get(id(p), [("?", "?")])}
        if len(owners) != 1:
            return None
        owner = owners.pop()
        mod = self.modules.get(owner)
        return owner if isinstance(mod, nn.modules.batchnorm._NormBase) else None

    def param_member(self, t: torch.Tensor, shp: tuple, res: torch.Tensor, hit: set[int]) -> bool:
        """Record ``t`` (a parameter or a view of one) as sliced along the channels ``res`` varies on."""
        info = self._positions(t)
        if info is None or len(hit) != 1:
            return False
        owner, pname, pos, pshape = info
        d = next(iter(hit))
        pos = pos.reshape((1,) * (len(shp) - pos.dim()) + tuple(pos.shape))
        if pos.dim() != len(shp) or {i for i, n in enumerate(pos.shape) if n > 1} - {d}:
            return False
        if pos.shape[d] == 1:
            return True  # the same parameter element everywhere: nothing to slice
        flat = pos.movedim(d, 0).reshape(-1)
        coords = torch.stack(torch.unravel_index(flat, pshape), dim=1) if len(pshape) else flat[:, None]
        axes = [a for a in range(coords.shape[1]) if bool((coords[:, a] != coords[0, a]).any())]
        if len(axes) != 1:
            return False
        a = axes[0]
        idx = coords[:, a]
        if not torch.equal(idx.sort().values, torch.arange(pshape[a])):
            return False
        vec = torch.full((pshape[a],), NONE, dtype=torch.long)
        vec[idx] = along(res, d, res.shape[d] if res.shape[d] > 1 else len(idx), self.uf)
        self.record((owner, "passthrough", pname, a), vec)
        return True

    def _positions(self, t: torch.Tensor):
        if id(t) in self.param_pos:
            _, owner, pname, pos, pshape = self.param_pos[id(t)]
            return owner, pname, pos, pshape
        owners = self.owners.get(id(t))
        if not owners or len(owners) > 1:
            return None
        owner, pname = owners[0]
        return owner, pname, torch.arange(t.numel()).reshape(t.shape), t.shape

    # -- ops between leaves -----------------------------------------------------------------
    def on_op(self, func, args, kwargs, out) -> None:
        raw = _ops.op_name(func)
        name = _ops.canonical(raw)
        ins = _ops.tensors_in(args, kwargs)
        tracked = [t for t in ins if id(t) in self.labels]
        if not tracked:
            self._follow_param(name, func, args, kwargs, out, ins)
            return
        handler = _ops.HANDLERS.get(name)
        if handler is None and not self.out_tensors(out) and name not in ("__setitem__",):
            return  # shape / dtype queries and the like
        if handler is None:
            return self._unknown(raw, tracked, out, "unknown op")
        try:
            handler(self, name, func, args, kwargs, out)
        except Exception as err:  # noqa: BLE001 - an op we cannot follow pins its channels
            self._unknown(raw, tracked, out, f"op that could not be followed ({type(err).__name__}: {err})")
        if args and isinstance(args[0], torch.Tensor) and args[0]._base is not None and len(tracked) > 1 \
                and raw in ("copy_", "__setitem__"):
            self._pin_view_write(raw, args[0], tracked)

    def _pin_view_write(self, raw: str, view: torch.Tensor, tracked: list[torch.Tensor]) -> None:
        """Overwriting a view with other channels changes its base behind the labels' back: pin. (In-place
        arithmetic needs no care: it joins labels, and the union-find is shared by view and base.)"""
        base = self.label(view._base)
        if base is None:
            return
        why = f"in-place {raw} into a view at {self.where()}"
        self.uf.pin(base, why)
        for t in tracked:
            self.uf.pin(self.label(t), why)

    def _unknown(self, raw: str, tracked: list[torch.Tensor], out: Any, what: str) -> None:
        why = f"{what} {raw} at {self.where()}"
        self.unknown_ops.setdefault(raw, self.where())
        for t in tracked:
            self.uf.pin(self.label(t), why)
        for o in self.out_tensors(out):
            self.set_none(o)

    def _follow_param(self, name, func, args, kwargs, out, ins) -> None:
        if name not in _ops.PARAM_FOLLOW or not args or not isinstance(out, torch.Tensor):
            return
        info = self._positions(args[0])
        if info is None:
            return
        owner, pname, pos, pshape = info
        try:
            res = func(expand(pos, args[0].shape), *args[1:], **kwargs)
        except Exception:  # noqa: BLE001
            return
        if isinstance(res, torch.Tensor) and res.shape == out.shape:
            self.param_pos[id(out)] = (out, owner, pname, compress(res), pshape)

    # -- leaves -----------------------------------------------------------------------------
    def pre_hook(self, module, args, kwargs):
        self.stack.append(self.names.get(id(module), "?"))
        if id(module) in self.leaf_kinds:
            self.depth += 1

    def post_hook(self, module, args, kwargs, output):
        if self.bar is not None:
            self.bar.update(1)
        kind = self.leaf_kinds.get(id(module))
        if kind:
            self.depth -= 1
            if self.depth == 0:
                self.quiet += 1
                try:
                    LEAVES[kind](self, self.stack[-1], module, args, kwargs, output)
                finally:
                    self.quiet -= 1
        self.stack.pop()

    def pin_output(self, out: Any) -> None:
        for t in walk_tensors(out):
            lab = self.label(t)
            if lab is not None:
                self.uf.pin(lab, "reaches the model output")

    def pin_tied(self) -> None:
        tied = {}
        for owners in self.owners.values():
            mods = {o for o, _ in owners}
            if len(mods) > 1:
                for o in mods:
                    tied[o] = min(mods - {o})
        for key, vec in self.members.items():
            if key[0] in tied and not self._tie_slices_alike(key, tied[key[0]]):
                self.uf.pin(vec, f"{key[0]} shares a weight with {tied[key[0]]}")

    def _tie_slices_alike(self, key: MemberKey, other: str) -> bool:
        """A tied embedding / output head pair (GPT-style tied LM heads) whose shared weight the residual
        stream's channels slice along the same axis in both: removing those channels slices it once for both."""
        if not self.hidden or key[1] not in ("producer", "consumer"):
            return False
        pair = {"producer": (other, "consumer", None, None), "consumer": (other, "producer", None, None)}[key[1]]
        mine, theirs = self.members[key], self.members.get(pair)
        kinds = {self.leaf_kinds.get(id(self.modules.get(key[0]))), self.leaf_kinds.get(id(self.modules.get(other)))}
        if theirs is None or kinds != {"embedding", "linear"} or mine.shape != theirs.shape:
            return False
        find = self.uf.find
        return all(find(int(a)) == find(int(b)) for a, b in zip(mine.tolist(), theirs.tolist()) if a >= 0 and b >= 0)


def trace(model: nn.Module, example_inputs: Any, progress: bool = False, hidden: bool = False) -> Tracer:
    """Run ``model`` once on ``example_inputs`` (eval mode, no grad) and return the filled tracer; ``progress``
    shows a bar over the modules the forward runs through; ``hidden`` follows residual streams through
    embeddings and RMS norms (see :func:`fermigates.surgery.graph.build_dependency_graph`)."""
    tr = Tracer(model, hidden)
    tr.bar = tqdm(total=sum(1 for _ in model.modules()), desc="tracing the dependency graph", unit="module",
                  disable=not progress, leave=False)
    handles = []
    modes = {m: m.training for m in model.modules()}
    try:
        for mod in model.modules():
            kind = leaf_kind(mod)
            if kind:
                tr.leaf_kinds[id(mod)] = kind
            handles.append(mod.register_forward_pre_hook(tr.pre_hook, with_kwargs=True))
            handles.append(mod.register_forward_hook(tr.post_hook, with_kwargs=True))
        model.eval()
        for t in walk_tensors(example_inputs):
            tr.set_none(t)
        with torch.no_grad(), _Mode(tr):
            out = call_model(model, example_inputs)
        tr.pin_output(out)
        tr.pin_tied()
    finally:
        tr.bar.close()
        for h in handles:
            h.remove()
        for mod, training in modes.items():
            mod.training = training
    return tr
