"""How labels flow through the torch functions called *between* leaf modules (see :mod:`fermigates._trace`).

Every handler is ``handler(tracer, name, func, args, kwargs, out)``; :data:`HANDLERS` maps a canonical op
name (``"add"`` for ``torch.add``, ``Tensor.add_``, ``Tensor.__radd__``...) to it. An op with labeled input
and no handler pins those labels ("unknown op"): being conservative is the point, since an op that mixes
channels silently treated as element-wise would make the shrunk model differ from the masked one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .labels import NONE, along, compress, expand, varying_dims

_DUNDER = {
    "add": "add", "sub": "sub", "mul": "mul", "truediv": "div", "div": "div", "floordiv": "floor_divide",
    "mod": "remainder", "pow": "pow", "matmul": "matmul", "and": "logical_and", "or": "logical_or",
    "xor": "logical_xor", "neg": "neg", "abs": "abs", "invert": "logical_not", "lt": "lt", "le": "le",
    "gt": "gt", "ge": "ge", "eq": "eq", "ne": "ne", "pos": "positive",
}


def op_name(func: Any) -> str:
    name = getattr(func, "__name__", None) or type(func).__name__
    if name == "__get__":  # a Tensor property (shape, T, data...)
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name


def canonical(name: str) -> str:
    """``"__iadd__"`` -> ``"add"``, ``"relu_"`` -> ``"relu"``, ``"_max_pool2d"`` -> ``"max_pool2d"``."""
    if name.startswith("__") and name.endswith("__"):
        core = name[2:-2]
        if core in _DUNDER:
            return _DUNDER[core]
        if core[:1] in "ir" and core[1:] in _DUNDER:
            return _DUNDER[core[1:]]
        return name
    name = name.lstrip("_")
    return name[:-1] if name.endswith("_") and not name.endswith("__") else name


def tensors_in(args: Any, kwargs: dict) -> list[torch.Tensor]:
    found = []
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(v for v in value if isinstance(v, torch.Tensor))
    return found


def first_arg(args: Any, kwargs: dict, key: str = "input") -> Any:
    return args[0] if args else kwargs.get(key, kwargs.get("self"))


def _align(label: torch.Tensor, nd: int) -> torch.Tensor:
    return label.reshape((1,) * (nd - label.dim()) + tuple(label.shape))


# ------------------------------------------------------------------------------------------- element-wise
def _drop_broadcast(tr, labeled: list, where: str) -> list[torch.Tensor]:
    """A labeled operand broadcast along the channels of another (a one-channel spatial gate times a feature
    map) feeds every one of them: its own channels are pinned instead of joining all the others into one."""
    vary = set().union(*(varying_dims(lab) for lab, _ in labeled)) if labeled else set()
    kept = []
    for lab, shape in labeled:
        if any(shape[d] == 1 for d in vary):
            tr.uf.pin(lab, f"{where} broadcasts these channels over other channels")
        else:
            kept.append(lab)
    return kept


def elementwise(tr, name, func, args, kwargs, out) -> None:
    outs = tr.out_tensors(out)
    if not outs:
        return
    nd = outs[0].dim()
    labeled, others = [], []
    for t in tensors_in(args, kwargs):
        lab = tr.label(t)
        if lab is not None and t.dim() <= nd and bool((lab >= 0).any()):
            labeled.append((_align(lab, nd), (1,) * (nd - t.dim()) + tuple(t.shape)))
        elif t.dim() > 0 and t.numel() > 1:
            others.append(t)
    where = f"{name} at {tr.where()}"
    labeled = _drop_broadcast(tr, labeled, where)
    if not labeled:
        for o in outs:
            tr.set_none(o)
        return
    shape = torch.broadcast_shapes(*[lab.shape for lab in labeled])
    res = labeled[0].expand(shape).clone()
    for lab in labeled[1:]:
        lab = lab.expand(shape)
        tr.uf.union_pairs(res, lab)
        mixed = (res >= 0) != (lab >= 0)
        if bool(mixed.any()):
            why = f"{where} adds channels to ones with no prunable origin"
            tr.uf.pin(res[mixed], why)
            tr.uf.pin(lab[mixed], why)
        res = torch.where(res >= 0, res, lab)
    res = compress(res)
    vary = varying_dims(res)
    for t in others:
        shp = (1,) * (nd - t.dim()) + tuple(t.shape)
        hit = {d for d, n in enumerate(shp) if n > 1} & vary
        if hit and not tr.param_member(t, shp, res, hit):
            tr.uf.pin(res, f"{where} combines channels with a tensor that varies along them and that "
                           "cannot be sliced (no prunable origin)")
    for o in outs:
        if o.dim() == nd:
            tr.set(o, res)
        else:
            tr.set_none(o)


def identity(tr, name, func, args, kwargs, out) -> None:
    lab = tr.label(first_arg(args, kwargs))
    for o in tr.out_tensors(out):
        tr.set(o, lab) if lab is not None and lab.dim() == o.dim() else tr.set_none(o)


# ------------------------------------------------------------------------------------------- structural
def structural(tr, name, func, args, kwargs, out) -> None:
    """Apply the op to the label tensor itself (reshape, permute, getitem, split, repeat...).

    Then check that the op *commutes with shrinking*: applied with the same arguments to the labels with
    one unit removed, it must give the full result minus that unit. Fixed sizes or indices in the code
    (``x[:, :k]``, ``split([a, b])``, ``view(B, 512, 7, 7)``) fail that check and pin the channels.
    """
    x = args[0] if args else kwargs.get("input", kwargs.get("self"))
    full = tr.label_full(x)
    res = _call_on(func, args, kwargs, full)
    if name == "chunk":
        _couple_chunks(tr, x, res, args, kwargs)
    if name not in SIZE_FREE:
        _check_commutes(tr, name, func, args, kwargs, x, full, res)
    tr.assign_like(out, res)


def _call_on(func, args, kwargs, lab):
    if args:
        return func(lab, *args[1:], **kwargs)
    key = "input" if "input" in kwargs else "self"
    return func(**{**kwargs, key: lab})


def _couple_chunks(tr, x, pieces, args, kwargs) -> None:
    """``chunk(n)`` splits at ``size / n``: position ``j`` of every chunk must be removed together."""
    dim = kwargs.get("dim", args[2] if len(args) > 2 else 0) % max(x.dim(), 1)
    lab = _align(tr.label(x), x.dim())
    if dim not in varying_dims(lab) or len(pieces) < 2:
        return
    if len({p.shape for p in pieces}) != 1:
        tr.uf.pin(lab, f"chunk at {tr.where()} splits channels into unequal parts")
        return
    for p in pieces[1:]:
        tr.uf.union_pairs(pieces[0], p)


def _flat(res) -> list[torch.Tensor]:
    return [res] if isinstance(res, torch.Tensor) else [r for r in res if isinstance(r, torch.Tensor)]


def _unit_mask(tr, labels: torch.Tensor, root: int) -> torch.Tensor:
    """Where ``labels`` belong to the unit whose union-find root is ``root``."""
    uniq, inverse = labels.unique(return_inverse=True)
    hit = torch.tensor([v >= 0 and tr.uf.find(v) == root for v in uniq.tolist()], dtype=torch.bool)
    return hit[inverse]


def _without(tr, arg, root: int):
    """``arg`` as it would be after shrinking: a tensor that carries the removed unit loses it too (the
    shape donor of ``reshape_as`` / ``expand_as``); anything else is passed as is."""
    lab = tr.label(arg)
    if lab is None or not bool(_unit_mask(tr, lab, root).any()):
        return arg
    lab = _align(lab, arg.dim())
    vary = list(varying_dims(lab))
    if len(vary) != 1:
        return arg
    vec = lab.reshape(-1)
    return tr.label_full(arg).index_select(vary[0], (~_unit_mask(tr, vec, root)).nonzero().reshape(-1))


def _check_commutes(tr, name, func, args, kwargs, x, full, res) -> None:
    lab = _align(tr.label(x), x.dim())
    vary = [d for d in varying_dims(lab)]
    if len(vary) != 1:
        return
    d = vary[0]
    vec = lab.reshape(-1)
    roots = torch.tensor([tr.uf.find(v) if v >= 0 else NONE for v in vec.tolist()], dtype=torch.long)
    why = f"{name} at {tr.where()} depends on the number of channels (fixed sizes or indices)"
    for pos in (0, roots.numel() - 1):
        root = int(roots[pos])
        keep = roots != root
        if root < 0 or bool(keep.all()) or not bool(keep.any()):
            continue
        try:
            rest = [_without(tr, a, root) for a in args[1:]]
            shrunk = full.index_select(d, keep.nonzero().reshape(-1))
            shrunk = _flat(_call_on(func, (x, *rest) if args else args, kwargs, shrunk))
        except Exception:  # noqa: BLE001 - an error here is the answer: the op needs the old size
            tr.uf.pin(lab, why)
            return
        expect = _flat(res)
        if len(shrunk) != len(expect):
            tr.uf.pin(lab, why)
            return
        for e, s in zip(expect, shrunk):
            e = e.reshape(-1)
            if not torch.equal(e[~_unit_mask(tr, e, root)], s.reshape(-1)):
                tr.uf.pin(lab, why)
                return


def concat(tr, name, func, args, kwargs, out) -> None:
    seq = args[0] if args else kwargs["tensors"]
    labs = [tr.label_full(t) for t in seq]
    res = func(labs, *args[1:], **{k: v for k, v in kwargs.items() if k != "tensors"})
    tr.assign_like(out, res)


def setitem(tr, name, func, args, kwargs, out) -> None:
    """``x[index] = value``: positions take the value's labels; a fixed region along channels pins both."""
    target, index, value = args[0], args[1], args[2]
    region = torch.zeros(target.shape, dtype=torch.bool)
    region[index] = True
    restricted = varying_dims(compress(region.long()))
    touched = [t for t in (target, value) if isinstance(t, torch.Tensor) and tr.label(t) is not None]
    for t in touched:
        if restricted & varying_dims(_align(tr.label(t), target.dim())):
            for u in touched:
                tr.uf.pin(tr.label(u), f"{name} at {tr.where()} writes a fixed range of channels")
            break
    lab = tr.label_full(target)
    if isinstance(value, torch.Tensor):
        lab[index] = tr.label_full(value)
    else:
        lab[index] = NONE
    tr.set(target, compress(lab))


def copy(tr, name, func, args, kwargs, out) -> None:
    target, src = args[0], args[1]
    lab = tr.label(src)
    tr.set(target, compress(expand(lab, target.shape)) if lab is not None else None)


def creation(tr, name, func, args, kwargs, out) -> None:
    """``zeros_like``, ``fill_``...: the result holds no channel of anything."""
    for o in tr.out_tensors(out):
        tr.forget(o)


# ------------------------------------------------------------------------------------------- dims
def _dims(value: Any, nd: int) -> set[int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return {value % nd}
    return {int(v) % nd for v in value}


def reduction(tr, name, func, args, kwargs, out) -> None:
    x = first_arg(args, kwargs)
    if name in ("max", "min") and len(args) > 1 and isinstance(args[1], torch.Tensor):
        return elementwise(tr, name, func, args, kwargs, out)
    nd = x.dim()
    pos = 2 if name == "norm" else 1
    dim = kwargs.get("dim", kwargs.get("axis"))
    if dim is None and len(args) > pos and not isinstance(args[pos], (torch.Tensor, bool, float)):
        dim = args[pos]
    dims = _dims(dim, nd) if nd else set()
    dims = set(range(nd)) if dims is None else dims
    lab = _align(tr.label(x), nd)
    if varying_dims(lab) & dims:
        tr.uf.pin(lab, f"{name} at {tr.where()} reduces over channels")
        for o in tr.out_tensors(out):
            tr.set_none(o)
        return
    squeezed = lab.reshape([n for d, n in enumerate(lab.shape) if d not in dims])
    for o in tr.out_tensors(out):
        tr.set(o, lab if o.dim() == nd else squeezed if o.dim() == squeezed.dim() else None)


_ALONG = {  # op -> (positional index of dim, default dim)
    "softmax": (1, None), "log_softmax": (1, None), "softmin": (1, None), "cumsum": (1, None),
    "cumprod": (1, None), "logcumsumexp": (1, None), "cummax": (1, None), "cummin": (1, None),
    "normalize": (2, 1), "sort": (1, -1), "argsort": (1, -1), "topk": (2, -1), "kthvalue": (2, -1),
}


def along_dim(tr, name, func, args, kwargs, out) -> None:
    """Ops that mix values along one dim (softmax, cumsum, normalize...): fine unless channels lie there."""
    x = first_arg(args, kwargs)
    pos, default = _ALONG[name]
    dim = kwargs.get("dim", args[pos] if len(args) > pos and isinstance(args[pos], int) else default)
    lab = _align(tr.label(x), x.dim())
    dims = set(range(x.dim())) if dim is None else {dim % max(x.dim(), 1)}
    if varying_dims(lab) & dims:
        tr.uf.pin(lab, f"{name} at {tr.where()} mixes channels")
        lab = None
    for o in tr.out_tensors(out):
        tr.set(o, lab if lab is not None and o.dim() == lab.dim() else None)


def spatial(tr, name, func, args, kwargs, out) -> None:
    """Pooling / resampling over the trailing spatial dims; the channel dim passes through."""
    x = first_arg(args, kwargs)
    digit = [c for c in name if c.isdigit()]
    n = int(digit[-1]) if digit else max(x.dim() - 2, 0)
    lab = _align(tr.label(x), x.dim())
    if varying_dims(lab) & set(range(x.dim() - n, x.dim())):
        tr.uf.pin(lab, f"{name} at {tr.where()} mixes positions that carry different channels")
        lab = None
    for o in tr.out_tensors(out):
        tr.set(o, lab if lab is not None and o.dim() == lab.dim() else None)


def pad(tr, name, func, args, kwargs, out) -> None:
    x = first_arg(args, kwargs)
    widths = args[1] if len(args) > 1 else kwargs.get("pad", ())
    nd = x.dim()
    padded = {nd - 1 - i for i in range(len(widths) // 2) if widths[2 * i] or widths[2 * i + 1]}
    lab = _align(tr.label(x), nd)
    if varying_dims(lab) & padded:
        tr.uf.pin(lab, f"{name} at {tr.where()} pads along channels")
    for o in tr.out_tensors(out):
        tr.set(o, lab if o.dim() == nd else None)


# ------------------------------------------------------------------------------------------- norms
def batch_norm(tr, name, func, args, kwargs, out) -> None:
    """Per-channel norm (batch / instance norm): a passthrough of dim 1; its parameters are sliced."""
    x = first_arg(args, kwargs)
    lab = _align(tr.label(x), x.dim())
    ch = 1 if x.dim() > 1 else 0
    vec = along(lab, ch, x.shape[ch], tr.uf)
    keys = ("running_mean", "running_var", "weight", "bias")
    params = [args[i] if len(args) > i else kwargs.get(k) for i, k in enumerate(keys, start=1)]
    params = [p for p in params if isinstance(p, torch.Tensor)]
    owner = tr.norm_owner(params)
    if owner is not None:
        tr.record((owner, "passthrough", None, None), vec)
    else:
        for p in params:
            if not tr.param_member(p, (1,) * ch + (p.shape[0],), vec.reshape((1,) * ch + (-1,)), {ch}):
                tr.uf.pin(vec, f"{name} at {tr.where()} uses per-channel tensors that cannot be sliced")
    for o in tr.out_tensors(out):
        tr.set(o, lab)


def mixing_norm(tr, name, func, args, kwargs, out) -> None:
    """Layer / RMS / group norm: statistics across channels, so channels under it are pinned."""
    x = first_arg(args, kwargs)
    nd = x.dim()
    if name in ("layer_norm", "rms_norm"):
        shape = args[1] if len(args) > 1 else kwargs.get("normalized_shape")
        k = 1 if isinstance(shape, int) else len(shape)
        dims = set(range(nd - k, nd))
    else:
        dims = {1 if nd > 1 else 0}
    lab = _align(tr.label(x), nd)
    if varying_dims(lab) & dims:
        tr.uf.pin(lab, f"{name} at {tr.where()} normalises across channels")
    for o in tr.out_tensors(out):
        tr.set(o, lab if o.dim() == nd else None)


def no_origin(tr, name, func, args, kwargs, out) -> None:
    """``embedding``: rows looked up by index carry no prunable channel."""
    for t in tensors_in(args, kwargs):
        lab = tr.label(t)
        if lab is not None:
            tr.uf.pin(lab, f"{name} at {tr.where()} reads channels as indices")
    for o in tr.out_tensors(out):
        tr.set_none(o)


def value_read(tr, name, func, args, kwargs, out) -> None:
    for t in tensors_in(args, kwargs):
        lab = tr.label(t)
        if lab is not None:
            tr.uf.pin(lab, f"{name} at {tr.where()} reads channel values into Python")


# ------------------------------------------------------------------------------------------- tables
ELEMENTWISE = ["add", "sub", "mul", "div", "true_divide", "floor_divide", "rsub", "remainder", "fmod", "pow", "where", "maximum", "minimum", "clamp", "clip", "clamp_min", "clamp_max", "neg", "negative", "positive", "abs", "exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "sqrt", "rsqrt", "sigmoid", "tanh", "relu", "relu6", "gelu", "silu", "hardswish", "hardsigmoid", "hardtanh", "leaky_relu", "elu", "selu", "celu", "softplus", "softsign", "mish", "erf", "erfc", "sin", "cos", "square", "reciprocal", "sign", "addcmul", "addcdiv", "lerp", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout", "logical_and", "logical_or", "logical_xor", "logical_not", "eq", "ne", "lt", "le", "gt", "ge", "masked_fill", "nan_to_num", "floor", "ceil", "round", "trunc", "frac", "logsigmoid", "threshold", "tanhshrink", "softshrink", "hardshrink", "rrelu", "isnan", "isinf", "isfinite", "bitwise_and", "bitwise_or", "sigmoid_", "silu_", "mul_", "heaviside", "xlogy", "copysign", "hypot", "atan2", "float_power"]
IDENTITY = ["to", "float", "double", "half", "bfloat16", "int", "long", "bool", "short", "type", "type_as", "contiguous", "clone", "detach", "cpu", "cuda", "requires_grad_", "data", "alias", "identity"]
STRUCTURAL = ["view", "reshape", "permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t", "T", "mT", "H", "mH", "flatten", "unflatten", "squeeze", "unsqueeze", "expand", "expand_as", "view_as", "reshape_as", "broadcast_to", "repeat", "repeat_interleave", "tile", "narrow", "select", "__getitem__", "index_select", "gather", "take_along_dim", "split", "split_with_sizes", "tensor_split", "hsplit", "vsplit", "chunk", "unbind", "roll", "flip", "fliplr", "flipud", "rot90", "unfold", "diagonal", "pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "native_channel_shuffle", "ravel", "atleast_1d", "atleast_2d", "atleast_3d", "masked_select"]
CONCAT = ["cat", "concat", "concatenate", "stack", "hstack", "vstack", "dstack"]
REDUCTION = ["sum", "mean", "amax", "amin", "max", "min", "prod", "std", "var", "norm", "logsumexp", "any", "all", "argmax", "argmin", "count_nonzero", "nansum", "nanmean", "median", "nanmedian", "std_mean", "var_mean"]
SPATIAL = ["max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d", "adaptive_max_pool1d_with_indices", "adaptive_max_pool2d_with_indices", "adaptive_max_pool3d_with_indices", "lp_pool1d", "lp_pool2d", "lp_pool3d", "interpolate", "upsample", "upsample_nearest", "upsample_bilinear", "grid_sample", "fractional_max_pool2d", "fractional_max_pool3d"]
CREATION = ["zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "randint_like", "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", "fill", "zero", "uniform", "normal", "bernoulli"]
VALUE_READ = ["item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "__array__"]

HANDLERS: dict[str, Callable] = {}
for _names, _handler in [
    (ELEMENTWISE, elementwise), (IDENTITY, identity), (STRUCTURAL, structural), (CONCAT, concat),
    (REDUCTION, reduction), (list(_ALONG), along_dim), (SPATIAL, spatial), (CREATION, creation),
    (VALUE_READ, value_read), (["pad", "constant_pad_nd"], pad), (["batch_norm", "instance_norm"], batch_norm),
    (["layer_norm", "rms_norm", "group_norm", "local_response_norm"], mixing_norm),
    (["embedding", "embedding_bag", "one_hot"], no_origin), (["__setitem__"], setitem), (["copy"], copy),
]:
    for _name in _names:
        HANDLERS[_name] = _handler

#: structural ops that cannot depend on the number of channels (no commutation check needed)
SIZE_FREE = {"permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t", "T", "mT", "H", "mH", "unsqueeze", "flip", "fliplr", "flipud", "contiguous"}

#: ops on parameters alone through which a parameter's element positions are followed (``gamma.view(1,-1,1,1)``)
PARAM_FOLLOW = set(STRUCTURAL) | set(IDENTITY)
