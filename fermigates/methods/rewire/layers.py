"""Sign-fixed twins of ``nn.Linear`` and ``nn.Conv{1,2,3}d`` for Deep Rewiring (Bellec et al. 2018).

Each weight is ``sign * max(theta, 0)``: ``weight`` (the Parameter) holds ``theta``, the buffer
``weight_sign`` holds the fixed sign (+1 / -1). A connection is **active while theta > 0**; an inactive one
contributes exactly zero and receives no gradient. A twin is a subclass of the layer it replaces
(``isinstance(twin, nn.Linear)`` stays true), keeps the ``weight`` / ``bias`` names, and is an ordinary module
(parameters and buffers only), so ``copy.deepcopy``, ``.to()`` and ``state_dict`` work.

Biases (``handle_biases``): ``"ignore"`` leaves ``bias`` an ordinary parameter; ``"as_connections"`` makes it
``bias_sign * max(bias, 0)``, a connection like the weights; ``"second_bias"`` makes it ``bias -
bias_negative``, two non-negative parts that both receive gradients (``DEEPR`` / ``SoftDEEPR`` keep them
non-negative), so a bias can change sign.

``to_plain()`` returns the original class with ``sign * theta`` where active and exact zeros elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...core.twin import Twin, copy_module_dict

_REWIRE_ATTRS = ("_plain_cls", "handle_biases", "all_active")
_REWIRE_BUFFERS = ("weight_sign", "bias_sign")
_REWIRE_PARAMS = ("bias_negative",)


class RewireMixin(Twin):
    """Shared behaviour of every sign-fixed twin. With ``all_active`` set, every connection counts with its
    magnitude (``sign * |theta|``): the dense network, which the converted model computed when it was made."""

    handle_biases: str
    weight: nn.Parameter
    bias: nn.Parameter | None
    all_active: bool = False

    def rewired_weight(self) -> torch.Tensor:
        """The effective weight ``sign * max(theta, 0)`` (differentiable in ``theta``)."""
        return self.weight_sign * (self.weight.abs() if self.all_active else self.weight.clamp_min(0))

    def rewired_bias(self) -> torch.Tensor | None:
        """The effective bias under ``handle_biases``."""
        if self.bias is None or self.handle_biases == "ignore":
            return self.bias
        if self.handle_biases == "as_connections":
            return self.bias_sign * (self.bias.abs() if self.all_active else self.bias.clamp_min(0))
        return self.bias - self.bias_negative

    def active_mask(self) -> torch.Tensor:
        """Bool mask of the active weight connections (``theta > 0``)."""
        return self.weight.detach() > 0

    def connection_parameters(self) -> list[nn.Parameter]:
        """The parameters whose sign decides whether a connection is active (what ``DEEPR`` rewires)."""
        params = [self.weight]
        if self.bias is not None and self.handle_biases == "as_connections":
            params.append(self.bias)
        return params

    def bias_pair(self) -> list[nn.Parameter]:
        """The two non-negative parts of a ``second_bias`` (empty for the other bias options)."""
        if self.bias is None or self.handle_biases != "second_bias":
            return []
        return [self.bias, self.bias_negative]

    @torch.no_grad()
    def to_plain(self) -> nn.Module:
        """The original class, weight ``sign * theta`` on active connections and exact zeros elsewhere."""
        theta = self.weight
        weight = torch.where(theta > 0, self.weight_sign * theta, torch.zeros_like(theta))
        bias = self.rewired_bias()
        if bias is not None and self.handle_biases == "as_connections":
            bias = torch.where(self.bias > 0, bias, torch.zeros_like(bias))
        plain_cls = self._plain_cls
        plain = plain_cls.__new__(plain_cls)
        state = copy_module_dict(self)
        for key in _REWIRE_ATTRS:
            state.pop(key, None)
        for key in _REWIRE_BUFFERS:
            state["_buffers"].pop(key, None)
        for key in _REWIRE_PARAMS:
            state["_parameters"].pop(key, None)
        state["_parameters"]["weight"] = nn.Parameter(weight.detach().clone(), requires_grad=theta.requires_grad)
        if bias is not None:
            state["_parameters"]["bias"] = nn.Parameter(bias.detach().clone(), requires_grad=self.bias.requires_grad)
        plain.__dict__ = state
        return plain

    def _rewire_repr(self) -> str:
        active = int(self.active_mask().sum())
        return f"rewired: {active}/{self.weight.numel()} connections active, handle_biases={self.handle_biases!r}"


class RewiredLinear(RewireMixin, nn.Linear):
    """``nn.Linear`` with sign-fixed connections (active while ``theta > 0``)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, self.rewired_weight(), self.rewired_bias())

    def extra_repr(self) -> str:
        return f"{nn.Linear.extra_repr(self)}, {self._rewire_repr()}"


class _RewiredConvMixin(RewireMixin):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(input, self.rewired_weight(), self.rewired_bias())

    def extra_repr(self) -> str:
        return f"{nn.modules.conv._ConvNd.extra_repr(self)}, {self._rewire_repr()}"


class RewiredConv1d(_RewiredConvMixin, nn.Conv1d):
    """``nn.Conv1d`` with sign-fixed connections."""


class RewiredConv2d(_RewiredConvMixin, nn.Conv2d):
    """``nn.Conv2d`` with sign-fixed connections."""


class RewiredConv3d(_RewiredConvMixin, nn.Conv3d):
    """``nn.Conv3d`` with sign-fixed connections."""


_TWINS: dict[type, type] = {
    nn.Linear: RewiredLinear, nn.Conv1d: RewiredConv1d, nn.Conv2d: RewiredConv2d, nn.Conv3d: RewiredConv3d,
}


def rewired_class(module: nn.Module) -> type | None:
    """The sign-fixed twin class for ``module``, or None (other layer types, or a subclass that overrides
    ``forward``: the twin's forward would silently drop what the subclass adds)."""
    if isinstance(module, RewireMixin):
        return None
    for base, twin in _TWINS.items():
        if isinstance(module, base):
            return twin if type(module).forward is base.forward else None
    return None


def is_rewired(module: nn.Module) -> bool:
    return isinstance(module, RewireMixin)


def _random_signs(shape: torch.Size, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=generator).mul_(2).sub_(1)


@torch.no_grad()
def make_rewired(
    module: nn.Module,
    *,
    keep_fraction: float,
    handle_biases: str = "second_bias",
    keep_signs: bool = True,
    init: str = "magnitude",
    generator: torch.Generator | None = None,
) -> nn.Module:
    """A sign-fixed twin of ``module`` with ``round(keep_fraction * n)`` weight connections active.

    The twin owns new Parameters (``module`` is not modified). With ``keep_signs`` and all connections kept
    it computes ``module``'s function exactly.
    """
    twin_cls = rewired_class(module)
    if twin_cls is None:
        raise TypeError(f"{type(module).__name__} has no sign-fixed twin (nn.Linear / nn.Conv1d/2d/3d only)")
    w = module.weight.detach()
    magnitude = w.abs()
    n = w.numel()
    k = min(n, max(0, round(keep_fraction * n)))
    active = torch.zeros(n, dtype=torch.bool)
    if init == "magnitude":
        order = magnitude.flatten().float().cpu().argsort(descending=True, stable=True)
    else:
        order = torch.randperm(n, generator=generator)
    active[order[:k]] = True
    active = active.reshape(w.shape).to(w.device)
    sign = torch.where(w >= 0, 1.0, -1.0) if keep_signs else _random_signs(w.shape, generator).to(w.device)
    theta = torch.where(active, magnitude, -magnitude)

    twin = twin_cls.__new__(twin_cls)
    twin.__dict__ = copy_module_dict(module)
    twin._plain_cls = type(module)
    twin.handle_biases = handle_biases
    twin._parameters["weight"] = nn.Parameter(theta, requires_grad=module.weight.requires_grad)
    twin._buffers["weight_sign"] = sign.to(w.dtype)
    b = module.bias
    if b is not None and handle_biases == "as_connections":
        b_sign = torch.where(b >= 0, 1.0, -1.0) if keep_signs else _random_signs(b.shape, generator).to(b.device)
        twin._parameters["bias"] = nn.Parameter(b.detach().abs(), requires_grad=b.requires_grad)
        twin._buffers["bias_sign"] = b_sign.to(b.dtype)
    elif b is not None and handle_biases == "second_bias":
        twin._parameters["bias"] = nn.Parameter(b.detach().clamp_min(0), requires_grad=b.requires_grad)
        twin._parameters["bias_negative"] = nn.Parameter((-b.detach()).clamp_min(0), requires_grad=b.requires_grad)
    return twin
