"""Activation units ``a * act(x) + (1 - a) * x``: the original activation at ``a = 1``, the identity at ``a = 0``.

paGating writes its units ``x * (a * g(x) + (1 - a))`` with a gate function ``g``; for an activation of the form
``act(x) = x * g(x)`` (SiLU: ``g = sigmoid``, GELU: ``g = Phi``, Mish: ``g = tanh(softplus)``, ReLU: ``g = 1[x > 0]``)
that is exactly ``a * act(x) + (1 - a) * x``, the form implemented here because it holds for *any* activation
(``tanh``, ``ReLU6``, ``Hardswish``...) and gives the activation itself at ``a = 1`` (computed as the activation's own
forward, bit for bit) and the identity at ``a = 0`` (the input itself). For ReLU it is a leaky ReLU of slope
``1 - a`` on the negative side (Layer Folding's learned slope).

The named paGating units (:class:`PaGLU`, :class:`PaGTU`, :class:`PaReGLU`, :class:`PaGELU`, :class:`PaMishU`,
:class:`PaSwishU`) keep paGating's gate functions with the value and gate paths tied to the same input,
``x * (a * g(x) + (1 - a))``; each is ``a * act(x) + (1 - a) * x`` with its own ``act(x) = x * g(x)`` (so paGLU at
``a = 1`` is SiLU). The Swish form sometimes quoted, ``x * (a * sigmoid(x) + (1 - a) * x)``, gives ``x * x`` at
``a = 0``, not the identity: the identity limit needs ``(1 - a)`` inside the bracket, which is paGLU.

``a`` is fixed (a buffer), learnable (a parameter) or scheduled (a buffer an annealer writes); one per unit, or one
per channel (``channels=``, along ``axis``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core.twin import Twin, copy_module_dict, plain_copy

ALPHA_MODES = ("fixed", "learnable", "scheduled")


def pa_unit(x: torch.Tensor, alpha: torch.Tensor | float, act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``alpha * act(x) + (1 - alpha) * x``: ``act`` at ``alpha = 1``, the identity at ``alpha = 0``."""
    return alpha * act(x) + (1 - alpha) * x


def _shaped(alpha: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    if alpha.dim() == 0:
        return alpha.to(x.dtype)
    if axis == -1 or axis == x.dim() - 1:
        return alpha.to(x.dtype)
    return alpha.to(x.dtype).view((-1,) + (1,) * (x.dim() - axis - 1))


def _alpha_tensor(value: float, channels: int | None, mode: str) -> torch.Tensor:
    if mode not in ALPHA_MODES:
        raise ValueError(f"alpha mode must be one of {ALPHA_MODES}, got {mode!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {value!r}")
    shape = () if channels is None else (int(channels),)
    return torch.full(shape, float(value))


class PaUnit(nn.Module):
    """``a * act(x) + (1 - a) * x`` over any callable ``act`` (a function or a module).

    ``alpha``: the starting value of ``a`` (1: the activation itself); ``mode``: ``"fixed"`` / ``"scheduled"`` (a
    buffer: set it with :meth:`set_alpha`) or ``"learnable"`` (a parameter); ``channels``: one ``a`` per channel
    along ``axis`` (1 for ``(N, C, ...)`` conv features, -1 for ``(..., C)`` token features) instead of one.
    """

    def __init__(self, act: Callable[[torch.Tensor], torch.Tensor], alpha: float = 1.0, mode: str = "fixed",
                 channels: int | None = None, axis: int = 1) -> None:
        super().__init__()
        if not callable(act):
            raise TypeError(f"act must be callable (a function or an nn.Module), got {type(act).__name__}")
        self.act = act
        self.mode, self.axis = mode, axis
        a = _alpha_tensor(alpha, channels, mode)
        if mode == "learnable":
            self.alpha = nn.Parameter(a)
        else:
            self.register_buffer("alpha", a)

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        """The activation this unit interpolates toward (its value at ``a = 1``)."""
        return self.act(x)

    @torch.no_grad()
    def set_alpha(self, value: float | torch.Tensor) -> None:
        """Write ``a`` (a number, or one value per channel)."""
        self.alpha.copy_(torch.as_tensor(value, dtype=self.alpha.dtype).expand_as(self.alpha))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = _shaped(self.alpha, x, self.axis)
        return a * self.activation(x) + (1 - a) * x

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, alpha shape={tuple(self.alpha.shape)}"


class _GatedUnit(PaUnit):
    """paGating's ``x * (a * g(x) + (1 - a))`` with ``g`` the class's gate; ``act(x) = x * g(x)``."""

    gate: Callable[[torch.Tensor], torch.Tensor]

    def __init__(self, alpha: float = 1.0, mode: str = "fixed", channels: int | None = None, axis: int = 1) -> None:
        super().__init__(self._act, alpha, mode, channels, axis)

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        return x * type(self).gate(x)


class PaGLU(_GatedUnit):
    """paGLU: ``x * (a * sigmoid(x) + (1 - a))``; SiLU (``x * sigmoid(x)``) at ``a = 1``."""

    gate = staticmethod(torch.sigmoid)


class PaGTU(_GatedUnit):
    """paGTU: ``x * (a * tanh(x) + (1 - a))``; ``x * tanh(x)`` at ``a = 1``."""

    gate = staticmethod(torch.tanh)


class PaReGLU(_GatedUnit):
    """paReGLU: ``x * (a * relu(x) + (1 - a))``; ``x * relu(x)`` at ``a = 1``."""

    gate = staticmethod(F.relu)


class PaGELU(_GatedUnit):
    """paGELU: ``x * (a * gelu(x) + (1 - a))``; ``x * gelu(x)`` at ``a = 1`` (paGating's gate; converting an
    ``nn.GELU`` gives ``a * gelu(x) + (1 - a) * x`` instead, GELU itself at ``a = 1``)."""

    gate = staticmethod(F.gelu)


class PaMishU(_GatedUnit):
    """paMishU: ``x * (a * mish(x) + (1 - a))``; ``x * mish(x)`` at ``a = 1``."""

    gate = staticmethod(F.mish)


class PaSwishU(_GatedUnit):
    """paSwishU: ``x * (a * swish(x) + (1 - a))`` (swish = SiLU as the gate); ``x * silu(x)`` at ``a = 1``."""

    gate = staticmethod(F.silu)


#: the named paGating units, by paGating's names
NAMED_UNITS: dict[str, type[_GatedUnit]] = {"paGLU": PaGLU, "paGTU": PaGTU, "paReGLU": PaReGLU, "paGELU": PaGELU,
                                            "paMishU": PaMishU, "paSwishU": PaSwishU}


# -- the twin of a converted activation module ----------------------------------------------------------------------
#: what a twin's forward computes: the unit, the original activation, the hard decision, or the identity
VIEWS = (None, "dense", "decided", "identity")


class PaTwin(Twin):
    """Mixin of a converted activation module: ``a * act(x) + (1 - a) * x`` where ``act`` is the original class's
    own forward (a twin class is made per activation class, see :func:`twin_class`).

    ``pa_alpha``: ``a`` (a parameter when learnable, else a buffer), one value or one per channel along
    ``pa_axis``; ``pa_fixed``: 0.0 / 1.0 when ``a`` is known to be exactly that (the identity / the activation,
    computed without the blend); ``pa_removed``: the unit's decision (removed: the identity after the bake);
    ``pa_keep``: what a kept unit bakes to, ``"original"`` (``a = 1``) or ``"learned"`` (``a`` as it is);
    ``pa_view``: one of :data:`VIEWS` (set by the method's context managers).
    """

    pa_alpha: torch.Tensor

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        return self._plain_cls.forward(self, x)

    def decided_alpha(self) -> torch.Tensor | float:
        """``a`` as the bake will fix it: 0 for a removed unit, 1 or the learned ``a`` for a kept one."""
        if self.pa_removed:
            return 0.0
        if self.pa_keep == "original":
            return 1.0
        a = self.pa_alpha.detach()
        return float(a) if a.dim() == 0 else a

    def _blend(self, x: torch.Tensor, a: torch.Tensor | float) -> torch.Tensor:
        if isinstance(a, float):
            if a == 0.0:
                return x
            if a == 1.0:
                return self._act(x)
            return a * self._act(x) + (1 - a) * x
        a = _shaped(a, x, self.pa_axis)
        return a * self._act(x) + (1 - a) * x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        view = self.pa_view
        if view == "dense":
            return self._act(x)
        if view == "identity":
            return x
        if view == "decided":
            return self._blend(x, self.decided_alpha())
        if self.pa_fixed is not None:
            return self._blend(x, self.pa_fixed)
        return self._blend(x, self.pa_alpha)

    def original(self) -> nn.Module:
        """The plain activation module (sharing the twin's tensors, ``inplace`` as it was)."""
        plain = plain_copy(self, drop_attrs=_TWIN_ATTRS, drop_params=("pa_alpha",), drop_buffers=("pa_alpha",))
        if self.pa_inplace is not None:
            plain.inplace = self.pa_inplace
        return plain

    def __reduce_ex__(self, protocol: int) -> Any:  # the class is made at run time: rebuild it by its base
        return _rebuild_twin, (self._plain_cls,), self.__getstate__()

    def extra_repr(self) -> str:
        base = self._plain_cls.extra_repr(self)
        a = self.pa_alpha
        value = f"{float(a):.3g}" if a.dim() == 0 else f"[{a.numel()} channels]"
        state = "removed" if self.pa_removed else "kept"
        return f"{base + ', ' if base else ''}a={value}, {state}"


_TWIN_ATTRS = ("pa_axis", "pa_fixed", "pa_removed", "pa_keep", "pa_view", "pa_inplace", "pa_channels", "pa_mode")
_CLASSES: dict[type, type] = {}


def twin_class(cls: type) -> type:
    """The twin class of activation class ``cls`` (made once per class)."""
    made = _CLASSES.get(cls)
    if made is None:
        made = type(f"Pa{cls.__name__}", (PaTwin, cls), {"__module__": __name__})
        _CLASSES[cls] = made
    return made


def _rebuild_twin(cls: type) -> nn.Module:
    twin_cls = twin_class(cls)
    return twin_cls.__new__(twin_cls)


def make_unit(module: nn.Module, mode: str, alpha: float, channels: int | None, axis: int, keep: str) -> PaTwin:
    """The twin of activation ``module``: shares its parameters and attributes (``module`` is left as it is), with
    ``a`` = ``alpha`` (one value, or ``channels`` values along ``axis``)."""
    twin_cls = twin_class(type(module))
    twin = twin_cls.__new__(twin_cls)
    twin.__dict__ = copy_module_dict(module)
    twin._plain_cls = type(module)
    a = _alpha_tensor(alpha, channels, mode)
    ref = next(iter([*module.parameters(), *module.buffers()]), None)
    if ref is not None:
        a = a.to(device=ref.device)
    if mode == "learnable":
        twin._parameters["pa_alpha"] = nn.Parameter(a)
    else:
        twin._buffers["pa_alpha"] = a
    twin.pa_axis, twin.pa_channels, twin.pa_mode, twin.pa_keep = axis, channels, mode, keep
    twin.pa_fixed = float(alpha) if alpha in (0.0, 1.0) and mode != "learnable" else None
    twin.pa_removed, twin.pa_view = False, None
    inplace = module.__dict__.get("inplace")
    twin.pa_inplace = inplace if isinstance(inplace, bool) else None
    if twin.pa_inplace:
        twin.inplace = False  # the blend reads x after the activation ran
    return twin


class PaActivation(nn.Module):
    """A kept unit baked with ``0 < a < 1``: ``a * act(x) + (1 - a) * x`` around the original module ``act`` (its
    child). Checkpoints rebuild it around the stock module at the same path."""

    def __init__(self, act: nn.Module, alpha: torch.Tensor, axis: int = 1) -> None:
        super().__init__()
        self.act = act
        self.axis = axis
        self.register_buffer("alpha", alpha.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = _shaped(self.alpha, x, self.axis)
        return a * self.act(x) + (1 - a) * x

    def fermigates_spec(self) -> dict[str, Any]:
        return {"axis": self.axis, "shape": list(self.alpha.shape)}

    @classmethod
    def from_fermigates_spec(cls, args: dict[str, Any], original: nn.Module | None) -> PaActivation:
        if original is None:
            raise ValueError("PaActivation is rebuilt around the stock activation module at its path; none was found")
        return cls(original, torch.ones(tuple(args.get("shape", ()))), int(args.get("axis", 1)))


def fade(progress: float, shape: str = "linear") -> float:
    """A leaving unit's ``a`` after ``progress`` (0..1) of its fade: 1 at the start, 0 at the end."""
    p = min(max(progress, 0.0), 1.0)
    if shape == "linear":
        return 1.0 - p
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    if shape == "exponential":
        return (math.exp(-5.0 * p) - math.exp(-5.0)) / (1.0 - math.exp(-5.0))
    raise ValueError(f"schedule must be one of ('linear', 'cosine', 'exponential'), got {shape!r}")


FADES = ("linear", "cosine", "exponential")
