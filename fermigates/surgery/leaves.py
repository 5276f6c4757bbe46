"""Leaf-module handlers of the trace: what a Linear, a conv, an attention module... does to channel labels.

Each handler is ``handler(tracer, fqn, module, args, kwargs, output)`` and runs after the module's forward.
Member keys are ``(fqn, role, None, None)``; roles follow the contract (producer rows, consumer columns,
passthrough per-channel axis, attention heads).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..core import registry
from ..core.layouts import CONV_TRANSPOSES, CONVS, attention_spec, head_units, linear_layout
from ..core.twin import is_twin
from .labels import NONE, along, join_rows

if TYPE_CHECKING:
    from .trace import Tracer


def leaf_kind(module: nn.Module) -> str | None:
    """Which leaf handler treats ``module`` (``None``: the trace goes inside it)."""
    if attention_spec(module) is not None:
        return "attention"
    if linear_layout(module) is not None:
        return "linear"
    if isinstance(module, CONVS):
        return "conv"
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return "conv_transpose"
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return "embedding"
    if isinstance(module, nn.RMSNorm) or registry.lookup(registry.RMS_NORMS, module) is not None:
        return "rmsnorm"
    return None


def opaque(module: nn.Module) -> bool:
    """True when a Linear / Conv subclass overrides forward in a way we cannot vouch for (e.g. StdConv2d)."""
    if is_twin(module) or registry.lookup(registry.LINEAR_LIKE, module) is not None:
        return False
    for base in type(module).__mro__:
        if registry.listed(registry.CHANNEL_SAFE, base) or registry.listed(registry.SAME_FORWARD, base):
            return False
        if base in (nn.Linear, *CONVS, *CONV_TRANSPOSES):
            cls = type(module)
            conv_forward = getattr(base, "_conv_forward", None)  # where Conv{1,2,3}d apply their weight
            return cls.forward is not base.forward or (conv_forward is not None and cls._conv_forward is not conv_forward)
        if "forward" in base.__dict__:
            return True
    return False


def _input(args: Any, kwargs: dict, keys=("input", "x", "hidden_states")) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for key in keys:
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key]
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)


def _first_out(output: Any, index: int = 0) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (list, tuple)) and len(output) > index and isinstance(output[index], torch.Tensor):
        return output[index]
    return None


def _at_axis(vec: torch.Tensor, nd: int, axis: int) -> torch.Tensor:
    shape = [1] * nd
    shape[axis] = vec.numel()
    return vec.reshape(shape)


def _consume(tr: Tracer, key: tuple, x: torch.Tensor | None, axis: int) -> torch.Tensor | None:
    lab = tr.label(x) if x is not None else None
    if lab is None:
        return None
    lab = lab.reshape((1,) * (x.dim() - lab.dim()) + tuple(lab.shape))
    vec = along(lab, axis, x.shape[axis], tr.uf)
    if bool((vec >= 0).any()):
        tr.record(key, vec)
    return vec


def _rest_none(tr: Tracer, output: Any, keep: torch.Tensor | None) -> None:
    for o in tr.out_tensors(output):
        if o is not keep:
            tr.set_none(o)


def linear(tr: Tracer, fqn: str, module: nn.Module, args, kwargs, output) -> None:
    layout = linear_layout(module)
    x = _input(args, kwargs)
    vec = _consume(tr, (fqn, "consumer", None, None), x, -1)
    labs = tr.produce(fqn, int(module.weight.shape[layout.out_dim]))
    tr.record((fqn, "producer", None, None), labs)
    if opaque(module):
        why = f"{fqn} ({type(module).__name__}) overrides forward"
        tr.uf.pin(labs, why)
        if vec is not None:
            tr.uf.pin(vec, why)
    y = _first_out(output)
    if y is not None:
        tr.set(y, _at_axis(labs, y.dim(), -1))
    _rest_none(tr, output, y)


def conv(tr: Tracer, fqn: str, module: nn.Module, args, kwargs, output) -> None:
    x, y = _input(args, kwargs), _first_out(output)
    n_sp = len(module.kernel_size)
    axis = x.dim() - n_sp - 1 if x is not None else 1
    hidden = opaque(module)
    if module.groups == 1:
        vec = _consume(tr, (fqn, "consumer", None, None), x, axis)
        labs = tr.produce(fqn, module.out_channels)
        tr.record((fqn, "producer", None, None), labs)
        pinned = [labs] + ([vec] if vec is not None else [])
    else:
        lab = tr.label(x) if x is not None else None
        vec = torch.full((module.in_channels,), NONE, dtype=torch.long)
        if lab is not None:
            lab = lab.reshape((1,) * (x.dim() - lab.dim()) + tuple(lab.shape))
            vec = along(lab, axis, module.in_channels, tr.uf)
        group_labs = join_rows(vec.reshape(module.groups, -1), tr.uf)
        labs = group_labs.repeat_interleave(module.out_channels // module.groups)
        if bool((labs >= 0).any()):
            tr.record((fqn, "passthrough", None, None), labs)
        pinned = [labs]
    if hidden:
        for v in pinned:
            tr.uf.pin(v, f"{fqn} ({type(module).__name__}) overrides forward")
    if y is not None:
        tr.set(y, _at_axis(labs, y.dim(), y.dim() - n_sp - 1))
    _rest_none(tr, output, y)


def conv_transpose(tr: Tracer, fqn: str, module: nn.Module, args, kwargs, output) -> None:
    """Transposed conv: weight ``(in, out / groups, *k)``; grouped ones are pinned."""
    x, y = _input(args, kwargs), _first_out(output)
    n_sp = len(module.kernel_size)
    axis = x.dim() - n_sp - 1 if x is not None else 1
    vec = _consume(tr, (fqn, "consumer", None, None), x, axis)
    labs = tr.produce(fqn, module.out_channels)
    tr.record((fqn, "producer", None, None), labs)
    why = f"{fqn} ({type(module).__name__}) overrides forward" if opaque(module) else (
        f"{fqn} is a grouped transposed conv" if module.groups > 1 else None)
    if why:
        for v in (labs, vec):
            if v is not None:
                tr.uf.pin(v, why)
    if y is not None:
        tr.set(y, _at_axis(labs, y.dim(), y.dim() - n_sp - 1))
    _rest_none(tr, output, y)


def embedding(tr: Tracer, fqn: str, module: nn.Module, args, kwargs, output) -> None:
    """An embedding's rows are looked up by index; with ``hidden`` its columns are the channels of the residual
    stream it starts (a producer along the weight's last axis), else fixed."""
    y = _first_out(output)
    if tr.hidden and isinstance(module, nn.Embedding) and y is not None and module.max_norm is None:
        labs = tr.produce(fqn, module.embedding_dim)
        tr.record((fqn, "producer", None, None), labs)
        tr.set(y, _at_axis(labs, y.dim(), -1))
        _rest_none(tr, output, y)
        return
    for t in tr.out_tensors(output):
        tr.set_none(t)


def rms_norm(tr: Tracer, fqn: str, module: nn.Module, args, kwargs, output) -> None:
    """An RMS norm's statistic spans all channels: pinned; with ``hidden`` a ``norm`` member instead, whose
    channels can go if the stream is zero there (the shrink rescales its weight and epsilon to match)."""
    x, y = _input(args, kwargs), _first_out(output)
    lab = tr.label(x) if x is not None else None
    if lab is not None and lab.dim() and lab.shape[-1] > 1:
        if tr.hidden and x.dim() >= 1:
            vec = along(lab.reshape((1,) * (x.dim() - lab.dim()) + tuple(lab.shape)), x.dim() - 1, x.shape[-1],
                        tr.uf)
            tr.record((fqn, "norm", None, None), vec)
        else:
            tr.uf.pin(lab, f"RMS norm {fqn} normalises across channels")
    if y is not None and lab is not None and lab.dim() == y.dim():
        tr.set(y, lab)
    _rest_none(tr, output, y if lab is not None else None)


def attention(tr: Tracer, fqn: str, module: nn.Module, args, kwargs, output) -> None:
    """Heads (or KV groups) become units; q/k/v consume the input, o (inside or outside) consumes the units."""
    spec = attention_spec(module)
    x = _input(args, kwargs)
    prefix = f"{fqn}." if fqn else ""
    others = [t for t in _tensors(args, kwargs) if t is not x and tr.label(t) is not None
              and bool((tr.label(t) >= 0).any())]
    cross = [v for k, v in kwargs.items() if isinstance(v, torch.Tensor) and ("encoder" in k or "key_value" in k)]
    if cross and x is not None:  # k / v read another sequence: their input columns are not x's channels
        others.extend(c for c in cross if c is not x)
    for child in [spec.q, spec.k, spec.v, spec.qkv, *spec.q_like]:
        if child is not None and _has(module, child):
            _consume(tr, (prefix + child, "consumer", None, None), x, -1)
    if others:
        why = f"attention {fqn} reads several labeled inputs (cross-attention is not followed)"
        for t in others + ([x] if x is not None else []):
            if tr.label(t) is not None:
                tr.uf.pin(tr.label(t), why)
    units = head_units(module, spec, "group")
    labs = tr.produce(prefix + "#heads", units.n_units)
    reason = spec.reason(module)
    if reason:
        tr.uf.pin(labs, f"attention {fqn}: {reason}")
    tr.record((fqn, "attention", None, None), _spread(labs, units.q_heads, spec.num_heads(module)))
    rows = {spec.qkv: units.qkv_rows, spec.q: units.q_rows, spec.k: units.k_rows, spec.v: units.v_rows}
    rows.update({name: units.q_like_rows for name in spec.q_like if _has(module, name)})
    for child, index in rows.items():
        if child is not None and index is not None:
            width = int(module.get_submodule(child).weight.shape[linear_layout(module.get_submodule(child)).out_dim])
            tr.record((prefix + child, "producer", None, None), _spread(labs, index, width))
    n_ctx = spec.num_heads(module) * spec.head_dim(module)
    ctx = _spread(labs, units.o_cols, n_ctx)
    y = _first_out(output, spec.output)
    if spec.o is not None:
        o = module.get_submodule(spec.o)
        tr.record((prefix + spec.o, "consumer", None, None), ctx)
        out_labs = tr.produce(prefix + spec.o, int(o.weight.shape[linear_layout(o).out_dim]))
        tr.record((prefix + spec.o, "producer", None, None), out_labs)
        ctx = out_labs
    if y is not None:
        tr.set(y, _at_axis(ctx, y.dim(), -1))
    _rest_none(tr, output, y)


def _spread(labs: torch.Tensor, index: torch.Tensor, width: int) -> torch.Tensor:
    vec = torch.full((width,), NONE, dtype=torch.long)
    vec[index.reshape(-1)] = labs[:, None].expand(index.shape).reshape(-1)
    return vec


def _has(module: nn.Module, name: str) -> bool:
    try:
        return isinstance(module.get_submodule(name), nn.Module)
    except AttributeError:
        return False


def _tensors(args, kwargs) -> list[torch.Tensor]:
    return [v for v in list(args) + list(kwargs.values()) if isinstance(v, torch.Tensor)]


LEAVES: dict[str, Callable] = {
    "linear": linear, "conv": conv, "conv_transpose": conv_transpose, "embedding": embedding, "rmsnorm": rms_norm, "attention": attention,
}
