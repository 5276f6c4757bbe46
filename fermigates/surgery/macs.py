"""Multiply-accumulate counts measured by running the model (not estimated from the module list).

A ``TorchFunctionMode`` sees every linear / conv / matmul-like call actually made on the example inputs --
``F.linear`` inside ``nn.Linear``, ``torch.addmm`` inside transformers' ``Conv1D``, the ``q @ k^T`` and
``attn @ v`` products or ``scaled_dot_product_attention`` inside attention modules -- and counts its MACs
from the operand shapes. Element-wise ops, norms and softmax are not counted (the usual convention).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..core.batches import call_model

_logger = logging.getLogger(__name__)


def _prod(xs) -> int:
    return int(math.prod(int(x) for x in xs))


def _linear(args, kwargs, out) -> int:
    return out.numel() * int(args[0].shape[-1])


def _matmul(args, kwargs, out) -> int:
    a = args[0]
    return out.numel() * int(a.shape[-1]) if a.dim() > 1 else out.numel() * int(a.shape[0])


def _addmm(args, kwargs, out) -> int:
    return out.numel() * int(args[1].shape[-1])


def _conv(args, kwargs, out) -> int:
    weight = args[1] if len(args) > 1 else kwargs["weight"]
    return out.numel() * _prod(weight.shape[1:])


def _conv_transpose(args, kwargs, out) -> int:
    x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
    return x.numel() * _prod(weight.shape[1:])


def _sdpa(args, kwargs, out) -> int:
    q, k, v = args[:3] if len(args) >= 3 else (kwargs["query"], kwargs["key"], kwargs["value"])
    batch = _prod(q.shape[:-2])
    return batch * int(q.shape[-2]) * int(k.shape[-2]) * (int(q.shape[-1]) + int(v.shape[-1]))


def _einsum(args, kwargs, out) -> int:
    eq = args[0].replace(" ", "")
    operands = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
    if "..." in eq:
        return 0
    sizes: dict[str, int] = {}
    for spec, t in zip(eq.split("->")[0].split(","), operands):
        for letter, n in zip(spec, t.shape):
            sizes[letter] = max(sizes.get(letter, 1), int(n))
    return _prod(sizes.values())


def _mha(args, kwargs, out) -> int:
    query, key = args[0], args[1]
    tgt, embed = int(query.shape[0]), int(query.shape[-1])
    src = int(key.shape[0])
    batch = _prod(query.shape[1:-1])
    return batch * (tgt * embed * embed + 2 * src * embed * embed + 2 * tgt * src * embed + tgt * embed * embed)


_COUNTERS = {
    "linear": _linear, "matmul": _matmul, "mm": _matmul, "bmm": _matmul, "__matmul__": _matmul,
    "__rmatmul__": _matmul, "addmm": _addmm, "baddbmm": _addmm, "addbmm": _addmm,
    "conv1d": _conv, "conv2d": _conv, "conv3d": _conv, "conv_transpose1d": _conv_transpose,
    "conv_transpose2d": _conv_transpose, "conv_transpose3d": _conv_transpose,
    "scaled_dot_product_attention": _sdpa, "einsum": _einsum, "multi_head_attention_forward": _mha,
}


class _MacMode(TorchFunctionMode):
    def __init__(self, stack: list[str]) -> None:
        super().__init__()
        self.stack = stack
        self.per_module: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        counter = _COUNTERS.get(name)
        if counter is not None and isinstance(out, torch.Tensor):
            try:
                macs = counter(args, kwargs, out)
            except Exception as err:  # noqa: BLE001 - an odd call signature is not worth failing a report
                _logger.debug("could not count MACs of %s: %s", name, err)
                macs = 0
            where = self.stack[-1] if self.stack else ""
            self.per_module[where] = self.per_module.get(where, 0) + macs
        return out


def macs_by_module(model: nn.Module, example_inputs: Any) -> dict[str, int]:
    """MACs per innermost module (its fqn; ``""`` for calls made by the root) for one forward pass."""
    stack: list[str] = []
    handles = []
    for name, mod in model.named_modules():
        handles.append(mod.register_forward_pre_hook(lambda m, a, n=name: stack.append(n)))
        handles.append(mod.register_forward_hook(lambda m, a, o: (stack.pop(), None)[1]))
    mode = _MacMode(stack)
    was_training = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad(), mode:
            call_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
        for m, t in was_training.items():
            m.training = t
    return mode.per_module


def count_macs(model: nn.Module, example_inputs: Any) -> int:
    """Total multiply-accumulates of one forward pass of ``model`` on ``example_inputs`` (measured)."""
    return int(sum(macs_by_module(model, example_inputs).values()))
