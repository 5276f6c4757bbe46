"""Layer merging: compose the linear maps that a removed non-linearity used to separate, for any method.

A method that removes non-linearities (an activation driven to the identity, say) asks for merges with
:class:`MergeRequest` entries in ``Decisions.merges``; the bake calls :func:`merge_layers` once the plain modules
are in place. Wherever a requested point now computes the identity and nothing else lies between two linear maps,
the two compose into one: ``Linear`` with ``Linear``, a conv with the next conv (a 1x1 on either side of any conv,
a k x k, depthwise included, with the next conv into one dense conv with the composed kernel, as DepthShrinker
does for MobileNetV2's inverted residual blocks). Chains of several maps are cut into merged segments by a small
dynamic programme that minimises the MACs (``when="cheaper"``, the default: a merge happens only where the merged
layer is cheaper) or merges everything it can (``when="always"``, or ``MergeRequest(force=True)`` per point).

What qualifies is read from one run of the model on example inputs, not from module order (as in
:mod:`fermigates.surgery.fold`): a linear map's output may be read by nothing but the next map (through identity
modules and eval-mode dropout, which return their input), each map runs once, owns its weight and is a plain
``nn.Linear`` / ``nn.Conv{1,2,3}d``. So a residual connection that also reads a tensor inside the chain keeps the
chain apart there, and the residual addition itself stays where it is (the merged layer is the branch; the skip
is added as before). Batch norms between the maps are folded first (the pairs :func:`fermigates.fold_batchnorm`
finds, on a copy; only those inside merged segments are replaced in the model).

Exactness. Composition is exact for ``Linear`` maps and for convs, except at the border when the second conv pads
its input with zeros: the first conv's output is not zero there. So a padded conv composes only after 1x1 maps
with stride 1 (their value at a padded position is just their bias), and when such a prefix carries a bias (a
folded batch norm always does) the merged layer is a :class:`BorderBiasConv2d`: the composed conv plus the
prefix bias pushed through the padded kernel over a map of ones, which is exactly what the border received
(a cheap single-channel conv; the map is the same for every sample). Every merge is checked on the example
inputs against the unmerged model and undone when they differ by more than float rounding.

The bake records which modules it replaced (:func:`record_replaced`), so that a checkpoint rebuilds them
(:func:`module_spec` / :func:`build_module`) before it loads the tensors into the stock class.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

from ..core import registry
from ..core.batches import call_model, max_relative_diff, output_tensors, walk_tensors
from ..core.modules import restore, snapshot
from ..core.state import find_state
from ..core.twin import is_twin
from .fold import BatchNormFold, _find_pairs, _fold_into
from .verify import SHRINK_RTOL

__all__ = [
    "BorderBiasConv1d", "BorderBiasConv2d", "BorderBiasConv3d", "ChainTrace", "MergeReport", "MergeRequest",
    "MergedLayer", "build_module", "fold_norms", "merge_layers", "merge_savings", "module_spec", "record_replaced",
    "replaced_paths", "trace_chains",
]

_logger = logging.getLogger(__name__)

WHEN = ("cheaper", "always")
_LINEAR_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T_FN = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


# -- requests and reports -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MergeRequest:
    """Compose the linear maps on either side of module ``at``, a point that computes the identity after the
    bake (e.g. a removed activation). ``force``: merge even where the merged layer is not cheaper."""

    at: str
    force: bool = False


@dataclass
class MergedLayer:
    """One merged segment: ``members`` (in order) became one layer at ``name``; MACs per forward of the example
    inputs before and after; ``across``: the requested points it merged across."""

    name: str
    members: list[str]
    across: list[str]
    macs_before: int
    macs_after: int
    shape: str

    def __str__(self) -> str:
        return (f"{' + '.join(self.members)} -> {self.name} ({self.shape}; MACs {self.macs_before:,} -> "
                f"{self.macs_after:,})")


@dataclass
class MergeReport:
    """What :func:`merge_layers` did: ``merged`` segments, the requested points it did not merge across and why
    (``skipped``), the modules it replaced, and how far the merged outputs are from the unmerged ones."""

    merged: list[MergedLayer] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    replaced: list[str] = field(default_factory=list)
    max_abs_diff: float | None = None
    undone: str | None = None

    @property
    def layers_removed(self) -> int:
        """How many linear layers the merges removed (a segment of n maps removes n - 1)."""
        return sum(len(m.members) - 1 for m in self.merged)

    def to_dict(self) -> dict[str, Any]:
        return {"merged": [{"name": m.name, "members": m.members, "across": m.across, "macs_before": m.macs_before,
                            "macs_after": m.macs_after, "shape": m.shape} for m in self.merged],
                "skipped": dict(self.skipped), "replaced": list(self.replaced), "max_abs_diff": self.max_abs_diff,
                "undone": self.undone}

    def __str__(self) -> str:
        lines = [f"merged {len(self.merged)} segment(s), {self.layers_removed} layer(s) fewer"]
        lines += [f"  {m}" for m in self.merged]
        lines += [f"  not merged at {at}: {why}" for at, why in self.skipped.items()]
        if self.undone:
            lines.append(f"  undone: {self.undone}")
        return "\n".join(lines)


# -- the merged conv with an exact border -------------------------------------------------------------------------
class _BorderBias:
    """A conv plus a bias that differs at the border: ``conv(x) + conv(ones, border_weight)`` over the input's
    spatial size with the same stride and padding (zero padding makes the border receive less of the bias that a
    1x1 prefix added before a padded conv)."""

    def _border_init(self, dims: int) -> None:
        k = tuple(self.kernel_size)
        self.register_buffer("border_weight", torch.zeros((self.out_channels, 1) + k, dtype=self.weight.dtype,
                                                          device=self.weight.device))
        self._dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._conv_forward(x, self.weight, self.bias)
        d = self._dims
        ones = x.new_ones((1, 1) + tuple(x.shape[-d:]))
        border = _CONV_FN[d](ones, self.border_weight.to(x.dtype), None, self.stride, self.padding)
        return out + (border if x.dim() == d + 2 else border[0])


class BorderBiasConv1d(_BorderBias, nn.Conv1d):
    """A merged ``nn.Conv1d`` with an exact border (see :class:`BorderBiasConv2d`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._border_init(1)


class BorderBiasConv2d(_BorderBias, nn.Conv2d):
    """A merged ``nn.Conv2d`` whose bias differs at the border exactly as the unmerged layers' did: the bias of
    the 1x1 layers before a zero-padded conv reaches a border output through fewer kernel taps. The extra term is
    a conv of a single-channel map of ones (computed per forward; batch-independent), ``border_weight`` its
    kernel. Exported to ONNX like any conv."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._border_init(2)


class BorderBiasConv3d(_BorderBias, nn.Conv3d):
    """A merged ``nn.Conv3d`` with an exact border (see :class:`BorderBiasConv2d`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._border_init(3)


_BORDER_CLS = {1: BorderBiasConv1d, 2: BorderBiasConv2d, 3: BorderBiasConv3d}
_PLAIN_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


# -- replaced modules: what a checkpoint must rebuild ----------------------------------------------------------------
#: set on a model by the bake / merge: the paths of modules whose class differs from the stock model's
REPLACED_ATTR = "_fermigates_replaced"
#: packages a checkpoint may name classes from (a saved file never makes the loader import anything else)
SPEC_PACKAGES = ("torch.nn.", "fermigates.")


def record_replaced(model: nn.Module, paths: Iterable[str]) -> None:
    """Remember that the modules at ``paths`` replaced the stock model's (the checkpoint rebuilds them)."""
    known = list(getattr(model, REPLACED_ATTR, []))
    for path in paths:
        if path not in known:
            known.append(path)
    setattr(model, REPLACED_ATTR, known)


def replaced_paths(model: nn.Module) -> list[str]:
    """The module paths recorded by :func:`record_replaced` that still exist in ``model``."""
    names = {n for n, _ in model.named_modules()}
    return [p for p in getattr(model, REPLACED_ATTR, []) if p in names]


def _jsonable(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list, torch.Size)):
        return [_jsonable(v, where) for v in value]
    raise ValueError(f"cannot record {where} = {value!r} ({type(value).__name__}) in a checkpoint manifest")


def _init_parameters(cls: type) -> list[tuple[str, inspect.Parameter]]:
    """The named constructor parameters of ``cls``, or of the nearest base whose ``__init__`` names them (a
    subclass that only forwards ``*args, **kwargs``)."""
    for klass in cls.__mro__:
        if "__init__" not in klass.__dict__:
            continue
        params = list(inspect.signature(klass.__init__).parameters.items())[1:]
        if any(p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for _, p in params) or klass is nn.Module:
            return params
    return []


def module_spec(module: nn.Module, where: str = "module") -> dict[str, Any]:
    """``{"class", "args", "children"}``: enough to build an empty ``module`` again (its tensors come from the
    state dict). ``args`` are the constructor arguments read from the same-named attributes (``bias``: whether
    it has one); a class may provide ``fermigates_spec()`` instead. Children are recorded recursively."""
    cls = type(module)
    custom = getattr(module, "fermigates_spec", None)
    if callable(custom):
        args = custom()
    else:
        args = {}
        for name, param in _init_parameters(cls):
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or name in ("device", "dtype"):
                continue
            if name == "bias" and ("bias" in module._parameters or "bias" in module._buffers):
                args[name] = module.bias is not None
            elif hasattr(module, name) and not isinstance(getattr(module, name), (torch.Tensor, nn.Module)):
                args[name] = _jsonable(getattr(module, name), f"{where}.{name}")
            elif param.default is param.empty:
                raise ValueError(f"cannot record {where} ({registry.qualname(cls)}) in a checkpoint: its constructor "
                                 f"argument {name!r} is not an attribute; give the class a fermigates_spec() method")
    spec: dict[str, Any] = {"class": registry.qualname(cls), "args": args}
    if not callable(custom):
        children = {name: module_spec(child, f"{where}.{name}") for name, child in module.named_children()}
        if children:
            spec["children"] = children
    return spec


def build_module(spec: dict[str, Any], original: nn.Module | None = None) -> nn.Module:
    """An empty module from :func:`module_spec`'s record (``original``: the stock module it replaces, passed to a
    class's ``from_fermigates_spec(args, original)`` when it has one). Only classes of ``torch.nn`` and
    fermigates are built."""
    qual = spec.get("class") if isinstance(spec, dict) else None
    if not isinstance(qual, str) or not qual.startswith(SPEC_PACKAGES):
        raise ValueError(f"a replaced module must be a torch.nn or fermigates class, got {qual!r}")
    module_name, _, cls_name = qual.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot build replaced module class {qual!r}: {err}") from None
    args = dict(spec.get("args") or {})
    rebuild = getattr(cls, "from_fermigates_spec", None)
    module = rebuild(args, original) if callable(rebuild) else cls(**args)
    for name, child in (spec.get("children") or {}).items():
        module.add_module(name, build_module(child, getattr(original, name, None)))
    return module


# -- which maps chain: one run of the model ------------------------------------------------------------------------
def _is_linear_map(module: nn.Module) -> bool:
    if is_twin(module) or parametrize.is_parametrized(module) or not isinstance(module, _LINEAR_TYPES):
        return False
    if type(module) in _LINEAR_TYPES:
        return True
    return any(registry.listed(registry.SAME_FORWARD, base) for base in type(module).__mro__)


def _in_place(func: Any, kwargs: dict) -> bool:
    name = getattr(func, "__name__", "")
    return name.endswith("_") and not name.endswith("__") or bool(kwargs.get("inplace")) or "out" in kwargs


class _FlowMode(TorchFunctionMode):
    """Counts, per tensor, the calls that read it outside the linear maps; an op that returns its input object
    unchanged and does not write it (eval dropout, ``contiguous``) passes the tensor on instead."""

    def __init__(self) -> None:
        super().__init__()
        self.uses: dict[int, int] = {}
        self.depth = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth == 0 and next(walk_tensors(out), None) is not None:
            inputs = list(walk_tensors((args, kwargs)))
            if not (isinstance(out, torch.Tensor) and any(out is t for t in inputs) and not _in_place(func, kwargs)):
                for t in inputs:
                    self.uses[id(t)] = self.uses.get(id(t), 0) + 1
        return out


@dataclass
class ChainTrace:
    """The chains of linear maps that may compose, found on one run: ``chains`` (module names in order),
    ``across[(a, b)]`` the requested points crossed between consecutive maps, the input / output shapes and MACs
    of every map, and why each requested point joins no chain (``unlinked``)."""

    chains: list[list[str]]
    across: dict[tuple[str, str], tuple[str, ...]]
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]
    macs: dict[str, int]
    unlinked: dict[str, str] = field(default_factory=dict)


def _map_macs(module: nn.Module, out_shape: tuple[int, ...]) -> int:
    numel = math.prod(out_shape)
    if isinstance(module, nn.Linear):
        return numel * module.in_features
    return numel * (module.in_channels // module.groups) * math.prod(module.kernel_size)


@torch.no_grad()
def trace_chains(model: nn.Module, example_inputs: Any, through: Iterable[str]) -> ChainTrace:
    """Run ``model`` once on ``example_inputs`` and find the chains of plain Linear / Conv layers joined only
    through the modules named in ``through`` (which must return their input, e.g. ``nn.Identity``) and other
    identities. The model runs in eval mode (its modes are restored)."""
    through = set(through)
    modules = dict(model.named_modules())
    maps = {n: m for n, m in modules.items() if _is_linear_map(m)}
    owners: dict[int, int] = {}
    for module in modules.values():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    calls: dict[str, int] = {}
    made: dict[int, str] = {}
    read: dict[str, int] = {}
    readers: dict[int, int] = {}
    crossed: dict[int, list[str]] = {}
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    alive: list[torch.Tensor] = []
    mode = _FlowMode()
    handles = []

    def pre(name):
        def hook(module, args):
            calls[name] = calls.get(name, 0) + 1
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if x is not None:
                read[name] = id(x)
                readers[id(x)] = readers.get(id(x), 0) + 1
                alive.append(x)
            mode.depth += 1
        return hook

    def post(name):
        def hook(module, args, out):
            mode.depth -= 1
            if isinstance(out, torch.Tensor):
                made[id(out)] = name
                mode.uses[id(out)] = 0  # the id may have served a freed tensor before
                crossed.pop(id(out), None)
                alive.append(out)
                x = args[0] if args and isinstance(args[0], torch.Tensor) else None
                shapes[name] = (tuple(x.shape) if x is not None else (), tuple(out.shape))
        return hook

    ran: set[str] = set()

    def mark(name):
        def hook(module, args, out):
            ran.add(name)
            if isinstance(out, torch.Tensor) and args and out is args[0]:
                crossed.setdefault(id(out), []).append(name)
        return hook

    for name, module in maps.items():
        handles.append(module.register_forward_pre_hook(pre(name)))
        handles.append(module.register_forward_hook(post(name), always_call=True))
    for name in through:
        if name in modules:
            handles.append(modules[name].register_forward_hook(mark(name)))
    was = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with mode:
            out = call_model(model, example_inputs)
        for t in walk_tensors(out):
            mode.uses[id(t)] = mode.uses.get(id(t), 0) + 1
    finally:
        for h in handles:
            h.remove()
        for m, flag in was.items():
            m.training = flag

    nxt: dict[str, str] = {}
    prev: dict[str, str] = {}
    across: dict[tuple[str, str], tuple[str, ...]] = {}
    unlinked: dict[str, str] = {}
    for name, source in read.items():
        producer = made.get(source)
        points = tuple(crossed.get(source, ()))
        if producer is None or not points:
            continue
        why = None
        if calls.get(name, 0) != 1 or calls.get(producer, 0) != 1:
            why = f"{producer if calls.get(producer, 0) != 1 else name!r} runs more than once"
        elif mode.uses.get(source, 0) or readers.get(source, 0) != 1:
            why = f"the output of {producer!r} is also read elsewhere (a residual, another layer)"
        elif any(owners.get(id(p), 0) > 1 for m in (maps[producer], maps[name]) for p in m.parameters(recurse=False)):
            why = "a weight is shared with another module"
        elif isinstance(maps[producer], nn.Linear) != isinstance(maps[name], nn.Linear) or \
                maps[producer].weight.dim() != maps[name].weight.dim():
            why = f"{type(maps[producer]).__name__} and {type(maps[name]).__name__} do not compose"
        elif not isinstance(maps[name], nn.Linear) and len(shapes[name][0]) != maps[name].weight.dim():
            why = f"{name!r} runs unbatched"
        if why is not None:
            for p in points:
                unlinked[p] = why
            continue
        nxt[producer], prev[name] = name, producer
        across[(producer, name)] = points
    chains = []
    for start in maps:
        if start in nxt and start not in prev:
            chain = [start]
            while chain[-1] in nxt:
                chain.append(nxt[chain[-1]])
            chains.append(chain)
    linked = {p for pts in across.values() for p in pts}
    for name in through:
        if name not in linked and name not in unlinked:
            unlinked[name] = ("no such module" if name not in modules else "not run on the example inputs"
                              if name not in ran else "does not return its input unchanged (not an identity)"
                              if not any(name in pts for pts in crossed.values()) else
                              "not between two linear maps (a Linear / Conv must produce its input and be the only "
                              "reader of its output)")
    macs = {n: _map_macs(maps[n], shapes[n][1]) for n in shapes}
    return ChainTrace(chains, across, shapes, macs, unlinked)


# -- composition ---------------------------------------------------------------------------------------------------
@dataclass
class _Geometry:
    """Shape of a composed map: kernel, stride, padding (convs), groups, whether it is still 1x1 with stride 1
    and no padding, and whether a border term arises."""

    dims: int  # 0 for Linear
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    groups: int = 1
    border: bool = False

    @property
    def pointwise(self) -> bool:
        return all(k == 1 for k in self.kernel) and all(s == 1 for s in self.stride) and not any(self.padding)


def _geometry(module: nn.Module) -> _Geometry | str:
    if isinstance(module, nn.Linear):
        return _Geometry(0)
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        return f"{type(module).__name__} pads with {module.padding_mode!r} / {module.padding!r}"
    if any(d != 1 for d in module.dilation):
        return "dilated convs are not merged"
    return _Geometry(module.weight.dim() - 2, tuple(module.kernel_size), tuple(module.stride),
                     tuple(module.padding), module.groups)


def _then(cur: _Geometry, nxt: _Geometry, cur_bias: bool) -> _Geometry | str:
    """The geometry of ``cur`` followed by ``nxt``, or why they do not compose exactly."""
    if cur.dims != nxt.dims:
        return "a Linear and a conv do not compose"
    if cur.dims == 0:
        return _Geometry(0)
    if any(nxt.padding) and not cur.pointwise:
        return ("a zero-padded conv after a conv that is not 1x1 with stride 1: the merged conv would see other "
                "values at the border")
    if cur.border and any(nxt.padding):
        return "two zero-padded convs"
    kernel = tuple(k + s * (kn - 1) for k, s, kn in zip(cur.kernel, cur.stride, nxt.kernel))
    stride = tuple(s * sn for s, sn in zip(cur.stride, nxt.stride))
    padding = tuple(p + s * pn for p, s, pn in zip(cur.padding, cur.stride, nxt.padding))
    groups = cur.groups if cur.groups == nxt.groups else 1
    return _Geometry(cur.dims, kernel, stride, padding, groups, cur.border or (any(nxt.padding) and cur_bias))


def _segment_geometry(modules: list[nn.Module], bias_known: bool = True) -> _Geometry | str:
    geo = _geometry(modules[0])
    has_bias = modules[0].bias is not None if bias_known else True
    for module in modules[1:]:
        if isinstance(geo, str):
            return geo
        nxt = _geometry(module)
        if isinstance(nxt, str):
            return nxt
        geo = _then(geo, nxt, has_bias)
        has_bias = has_bias or module.bias is not None
    return geo


def _segment_macs(geo: _Geometry, first: nn.Module, last: nn.Module, out_shape: tuple[int, ...]) -> int:
    numel = math.prod(out_shape)
    if geo.dims == 0:
        return numel * first.in_features
    k = math.prod(geo.kernel)
    macs = numel * (first.in_channels // geo.groups) * k
    if geo.border:  # the border term runs on one sample
        macs += (numel // max(out_shape[0], 1) if len(out_shape) == geo.dims + 2 else numel) * k
    return macs


def _dense(module: nn.Module) -> torch.Tensor:
    """The weight of a Linear / conv as float64, grouped convs expanded to block-diagonal dense form."""
    w = module.weight.detach().double()
    if isinstance(module, nn.Linear) or module.groups == 1:
        return w
    g, out, in_g = module.groups, w.shape[0], w.shape[1]
    dense = w.new_zeros((out, in_g * g) + tuple(w.shape[2:]))
    og = out // g
    for j in range(g):
        dense[j * og:(j + 1) * og, j * in_g:(j + 1) * in_g] = w[j * og:(j + 1) * og]
    return dense


def _compose_kernels(wa: torch.Tensor, wb: torch.Tensor, dilation: tuple[int, ...]) -> torch.Tensor:
    """Kernel of conv ``wa`` (stride = ``dilation``) followed by conv ``wb``: ``(out_b, in_a, *K)``."""
    fn = _CONV_T_FN[wa.dim() - 2]
    return fn(wa.transpose(0, 1), wb.transpose(0, 1), dilation=dilation).transpose(0, 1)


def _bias(module: nn.Module, n: int, like: torch.Tensor) -> torch.Tensor:
    return module.bias.detach().double() if module.bias is not None else like.new_zeros(n)


@torch.no_grad()
def _compose(modules: list[nn.Module]) -> nn.Module:
    """One module computing ``modules[-1](...modules[0](x))`` exactly (the geometry was checked)."""
    first, last = modules[0], modules[-1]
    dtype, device = first.weight.dtype, first.weight.device
    if isinstance(first, nn.Linear):
        w, b = _dense(first), _bias(first, first.out_features, first.weight.detach().double())
        for m in modules[1:]:
            wm = _dense(m)
            b = wm @ b + _bias(m, m.out_features, b)
            w = wm @ w
        merged = nn.Linear(first.in_features, last.out_features, bias=True, device=device, dtype=dtype)
        merged.weight.copy_(w.to(dtype))
        merged.bias.copy_(b.to(dtype))
        return merged
    geo = _segment_geometry(modules)
    w = _dense(first)
    b = _bias(first, first.out_channels, w)
    border = None
    cur = _geometry(first)
    for m in modules[1:]:
        wm, nxt = _dense(m), _geometry(m)
        spatial = tuple(range(2, wm.dim()))
        if any(nxt.padding) and bool(b.any()):  # the prefix bias reaches the border through fewer taps
            border = torch.einsum("om...,m->o...", wm, b).unsqueeze(1)
            b = _bias(m, m.out_channels, b)
        else:
            b = wm.sum(dim=spatial) @ b + _bias(m, m.out_channels, b)
            if border is not None:
                border = _compose_kernels(border, wm, cur.stride)
        w = _compose_kernels(w, wm, cur.stride)
        cur = _then(cur, nxt, True)
    dims = w.dim() - 2
    if geo.groups > 1:  # all members grouped alike: the composition stays block-diagonal
        g, out = geo.groups, w.shape[0]
        og, ig = out // g, w.shape[1] // g
        w = torch.cat([w[j * og:(j + 1) * og, j * ig:(j + 1) * ig] for j in range(g)])
    cls = _BORDER_CLS[dims] if border is not None else _PLAIN_CONV[dims]
    merged = cls(first.in_channels, last.out_channels, geo.kernel, stride=geo.stride, padding=geo.padding,
                 groups=geo.groups, bias=True, device=device, dtype=dtype)
    merged.weight.copy_(w.to(dtype))
    merged.bias.copy_(b.to(dtype))
    if border is not None:
        merged.border_weight.copy_(border.to(dtype))
    return merged


def _shape_text(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return f"Linear {module.in_features}->{module.out_features}"
    kernel = "x".join(map(str, module.kernel_size))
    extra = f", groups={module.groups}" if module.groups > 1 else ""
    extra += ", border" if isinstance(module, _BorderBias) else ""
    return f"{type(module).__name__.replace('BorderBias', '')} {module.in_channels}->{module.out_channels} " \
           f"{kernel}/{module.stride[0]}{extra}"


# -- planning: which segments ---------------------------------------------------------------------------------------
def _plan_chain(chain: list[str], maps: dict[str, nn.Module], trace: ChainTrace, cut: set[int], forced: set[int],
                when: str, bias_known: bool = True) -> tuple[list[tuple[int, int]], dict[int, str]]:
    """Segments ``(i, j)`` (inclusive) of ``chain`` minimising (forced links left unmerged, MACs); links in
    ``cut`` cannot be merged across. Also why each unmerged link was not merged."""
    n = len(chain)
    single = [trace.macs[c] for c in chain]
    best: list[tuple[tuple[int, int], int]] = [((0, 0), -1)] + [((1 << 60, 1 << 62), -1)] * n
    reasons: dict[int, str] = {}
    for j in range(1, n + 1):
        for i in range(j, 0, -1):  # i == j first: a tie keeps the layers apart
            if i < j and (i - 1) in cut:  # link (i-1 -> i) inside would be cut
                break
            if i == j:
                cost = single[j - 1]
            else:
                geo = _segment_geometry([maps[c] for c in chain[i - 1:j]], bias_known)
                if isinstance(geo, str):
                    reasons.setdefault(j - 2, geo)
                    continue
                cost = _segment_macs(geo, maps[chain[i - 1]], maps[chain[j - 1]], trace.shapes[chain[j - 1]][1])
            boundary = 1 if i >= 2 and (i - 2) in forced and (i - 2) not in cut else 0
            prev = best[i - 1][0]
            cand = (prev[0] + boundary, prev[1] + cost)
            if cand < best[j][0]:
                best[j] = (cand, i)
    segments, j = [], n
    while j > 0:
        i = best[j][1]
        segments.append((i - 1, j - 1))
        j = i - 1
    segments.reverse()
    for (a, b), (c, _) in zip(segments, segments[1:]):
        if b not in cut:
            reasons.setdefault(b, "merging is not cheaper (MACs)" if when == "cheaper" and b not in forced
                               else "cannot be composed exactly")
    return segments, reasons


def _links(chain: list[str], trace: ChainTrace, points: set[str]) -> tuple[set[int], list[tuple[str, ...]]]:
    """Link indices of ``chain`` that cross none of ``points`` (cut), and the points each link crosses."""
    crossings = [trace.across[(a, b)] for a, b in zip(chain, chain[1:])]
    return {k for k, pts in enumerate(crossings) if not set(pts) & points}, crossings


def _params(geo: _Geometry, first: nn.Module, last: nn.Module) -> int:
    if geo.dims == 0:
        return first.in_features * last.out_features + last.out_features
    return last.out_channels * (first.in_channels // geo.groups) * math.prod(geo.kernel) + last.out_channels


def merge_savings(model: nn.Module, trace: ChainTrace, removed: Iterable[str], *, when: str = "cheaper"
                  ) -> tuple[int, int]:
    """``(MACs, parameters)`` the merges would save if exactly the points in ``removed`` computed the identity,
    predicted from ``trace`` (a run of ``model`` with every candidate point as an identity) without building
    anything. Biases are assumed present (a folded batch norm has one), so a padded conv after a 1x1 prefix counts
    its border term."""
    removed = set(removed)
    maps = dict(model.named_modules())
    macs = params = 0
    for chain in trace.chains:
        cut, _ = _links(chain, trace, removed)
        forced = set(range(len(chain) - 1)) - cut if when == "always" else set()
        segments, _ = _plan_chain(chain, maps, trace, cut, forced, when, bias_known=False)
        for i, j in segments:
            if j > i:
                members = [maps[c] for c in chain[i:j + 1]]
                geo = _segment_geometry(members, bias_known=False)
                macs += sum(trace.macs[c] for c in chain[i:j + 1]) - \
                    _segment_macs(geo, members[0], members[-1], trace.shapes[chain[j]][1])
                params += sum(p.numel() for m in members for p in m.parameters(recurse=False)) - \
                    _params(geo, members[0], members[-1])
    return macs, params


# -- the merge step -------------------------------------------------------------------------------------------------
def _requests(requests: Iterable[MergeRequest | str]) -> tuple[list[str], set[str]]:
    names, forced = [], set()
    for r in requests:
        if isinstance(r, str):
            r = MergeRequest(r)
        if not isinstance(r, MergeRequest):
            raise TypeError(f"merge requests must be MergeRequest or module names, got {type(r).__name__}")
        if r.at not in names:
            names.append(r.at)
        if r.force:
            forced.add(r.at)
    return names, forced


@torch.no_grad()
def fold_norms(model: nn.Module, example_inputs: Any) -> dict[str, str]:
    """Fold every batch norm that directly follows a Conv / Linear into it (the pairs
    :func:`fermigates.fold_batchnorm` finds), without its whole-model check: the merge step checks the merged
    model itself. For copies; returns ``{norm: producer}``."""
    pairs, _ = _find_pairs(model, example_inputs, BatchNormFold())
    for norm_name, producer_name, replacement in pairs:
        _fold_into(model.get_submodule(producer_name), model.get_submodule(norm_name))
        _set(model, norm_name, replacement)
    return {norm: producer for norm, producer, _ in pairs}


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def merge_layers(model: nn.Module, example_inputs: Any, requests: Iterable[MergeRequest | str], *,
                 when: str = "cheaper", rtol: float = SHRINK_RTOL) -> MergeReport:
    """Compose the linear maps on either side of every requested point, in place (see the module docstring).

    ``requests``: :class:`MergeRequest` entries (or module names) of points that compute the identity.
    ``when``: ``"cheaper"`` merges a segment only where the merged layer needs fewer MACs than its members (a
    request's ``force=True`` merges across that point anyway); ``"always"`` merges whatever composes exactly.
    The merged model is checked against the unmerged one on ``example_inputs`` (relative ``rtol``); merges that
    differ are undone (each segment is then tried on its own). Returns a :class:`MergeReport`.
    """
    if when not in WHEN:
        raise ValueError(f"when must be one of {WHEN}, got {when!r}")
    names, forced_points = _requests(requests)
    report = MergeReport()
    if not names:
        return report
    if find_state(model) is not None:
        raise ValueError("merge_layers needs a baked model (plain layers): call convert_from_fermi(model) first")
    if example_inputs is None:
        report.skipped = {n: "no example inputs to find the layers on either side" for n in names}
        return report
    if when == "always":
        forced_points = set(names)
    was_training = model.training
    model.eval()
    try:
        before = output_tensors(call_model(model, example_inputs))
        folded = copy.deepcopy(model)
        fold = fold_norms(folded, example_inputs)
        trace = trace_chains(folded, example_inputs, names)
        report.skipped.update(trace.unlinked)
        maps = dict(folded.named_modules())
        plans = []
        for chain in trace.chains:
            cut, crossings = _links(chain, trace, set(names))
            forced = {k for k, pts in enumerate(crossings) if set(pts) & forced_points} - cut
            segments, reasons = _plan_chain(chain, maps, trace, cut, forced, when)
            for k, why in reasons.items():
                for p in crossings[k]:
                    report.skipped.setdefault(p, why)
            for i, j in segments:
                if j > i:
                    members = chain[i:j + 1]
                    norms = [norm for norm, producer in fold.items() if producer in members]
                    points = [p for k in range(i, j) for p in crossings[k]]
                    plans.append((members, norms, points))
        if not plans:
            return report
        built = [(members, norms, points, _compose([maps[c] for c in members])) for members, norms, points in plans]
        saved = snapshot(model)
        _apply(model, folded, built, trace, report)
        diff = max_relative_diff(before, output_tensors(call_model(model, example_inputs)))
        if not diff <= rtol:
            restore(saved)
            report.merged, report.replaced = [], []
            kept = []
            for item in built:  # one segment at a time: keep those that hold
                step = snapshot(model)
                _apply(model, folded, [item], trace, report)
                d = max_relative_diff(before, output_tensors(call_model(model, example_inputs)))
                if d <= rtol:
                    kept.append(item)
                else:
                    restore(step)
                    report.merged.pop()
                    for p in item[2]:
                        report.skipped[p] = f"the merged layer changed the outputs by {d:.3g} (> {rtol}); undone"
                    report.replaced = [r for r in report.replaced if r not in item[0] and r not in item[1]]
            report.undone = (f"merging all segments changed the outputs by {diff:.3g} (> {rtol}); "
                             f"{len(kept)} of {len(built)} segments kept after checking each")
            diff = max_relative_diff(before, output_tensors(call_model(model, example_inputs)))
        report.max_abs_diff = diff
        merged_points = {p for m in report.merged for p in m.across}
        report.skipped = {p: why for p, why in report.skipped.items() if p not in merged_points}
        record_replaced(model, report.replaced)
    finally:
        model.train(was_training)
    return report


def _apply(model: nn.Module, folded: nn.Module, built: list, trace: ChainTrace, report: MergeReport) -> None:
    for members, norms, points, merged in built:
        _set(model, members[0], copy.deepcopy(merged))
        for name in members[1:]:
            _set(model, name, nn.Identity())
        for norm in norms:
            _set(model, norm, copy.deepcopy(folded.get_submodule(norm)))
        report.replaced.extend([*members, *norms])
        before = sum(trace.macs[m] for m in members)
        geo = _segment_geometry([folded.get_submodule(m) for m in members])
        after = _segment_macs(geo, folded.get_submodule(members[0]), folded.get_submodule(members[-1]),
                              trace.shapes[members[-1]][1])
        report.merged.append(MergedLayer(members[0], list(members), list(points), before, after, _shape_text(merged)))
