"""Which modules are activations the method converts, their channel axis, and the activations a model calls as
functions (which cannot be swapped as modules: reported as skipped)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ...core import registry
from ...core.batches import call_model

#: torch's element-wise activation modules (``y[i] = f(x[i])``); families add theirs to ``registry.ACTIVATIONS``
TORCH_ACTIVATIONS: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.CELU,
    nn.SELU, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.PReLU,
)
#: torch functions that are element-wise activations (a call outside an activation module is reported)
FUNCTIONS = frozenset({
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "gelu", "silu", "silu_", "mish", "mish_", "hardswish",
    "hardswish_", "hardsigmoid", "hardsigmoid_", "sigmoid", "sigmoid_", "tanh", "tanh_", "elu", "elu_", "leaky_relu",
    "leaky_relu_", "softplus", "selu", "selu_", "celu", "celu_", "prelu",
})


def is_activation(module: nn.Module) -> bool:
    """Whether ``module`` is an element-wise activation module: one of torch's (or a subclass that keeps its
    forward), or a class a family registered in ``registry.ACTIVATIONS``."""
    for base in type(module).__mro__:
        if base in TORCH_ACTIVATIONS or registry.listed(registry.ACTIVATIONS, base):
            return True
        if "forward" in base.__dict__:
            return False
    return False


@dataclass
class Probe:
    """What one run on example inputs tells about the activations: per converted module its channel count and
    axis; activations called as functions, ``(where, reason)``."""

    channels: dict[str, tuple[int, int]] = field(default_factory=dict)
    functional: list[tuple[str, str]] = field(default_factory=list)


class _Functions(TorchFunctionMode):
    def __init__(self, stack: list[str], inside: list[int], found: dict[str, set[str]]) -> None:
        super().__init__()
        self.stack, self.inside, self.found = stack, inside, found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in FUNCTIONS and self.inside[0] == 0:
            where = self.stack[-1] if self.stack else ""
            self.found.setdefault(where, set()).add(name.rstrip("_"))
        return func(*args, **(kwargs or {}))


_CHANNEL_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
                  nn.modules.instancenorm._InstanceNorm)


@torch.no_grad()
def probe(model: nn.Module, example_inputs: Any, targets: dict[str, nn.Module]) -> Probe:
    """Run ``model`` once: each target's channel axis (1 after a conv / batch norm or for 4-D+ inputs, else the
    last) and width, and the activation functions called outside activation modules (by the module calling them)."""
    result = Probe()
    stack: list[str] = []
    inside = [0]
    found: dict[str, set[str]] = {}
    channel_first: set[int] = set()
    alive: list[torch.Tensor] = []
    handles = []
    activations = {n for n, m in model.named_modules() if n in targets or is_activation(m)}

    def pre(name):
        def hook(module, args):
            stack.append(name)
            if name in activations:
                inside[0] += 1
                x = args[0] if args and isinstance(args[0], torch.Tensor) else None
                if name in targets and x is not None and x.dim() >= 1:
                    axis = 1 if x.dim() >= 4 or (x.dim() == 3 and id(x) in channel_first) else -1
                    if x.dim() == 1:
                        axis = 0
                    result.channels[name] = (int(x.shape[axis]), axis)
        return hook

    def post(name):
        def hook(module, args, out):
            stack.pop()
            if name in activations:
                inside[0] -= 1
            if isinstance(module, _CHANNEL_FIRST) and isinstance(out, torch.Tensor):
                channel_first.add(id(out))
                alive.append(out)
        return hook

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(pre(name)))
        handles.append(module.register_forward_hook(post(name), always_call=True))
    was = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with _Functions(stack, inside, found):
            call_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
        for m, flag in was.items():
            m.training = flag
    modules = dict(model.named_modules())
    for where, names in found.items():
        cls = type(modules[where]).__qualname__ if where in modules else type(model).__qualname__
        fns = ", ".join(sorted(names))
        result.functional.append((where or "<model>", f"{fns} called as a function in {cls}.forward, not as a module: "
                                  "it cannot be swapped for a unit (replace it by a module to convert it)"))
    return result
