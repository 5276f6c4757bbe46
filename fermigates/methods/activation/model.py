"""The units of a converted model: enumerating them, the views (decided / dense / a unit switched off), copies
with units replaced by identities, and writing ``a``."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from ...core.batches import call_model
from ...core.modules import attribute_set, swap_modules
from ...core.state import detach_state, get_state
from .units import PaActivation, PaTwin


def units(model: nn.Module) -> dict[str, PaTwin]:
    """Every converted activation of ``model`` by name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, PaTwin)}


@contextlib.contextmanager
def view(model: nn.Module, value: str | None, names: Iterable[str] | None = None) -> Iterator[nn.Module]:
    """Within this context the units (all, or those in ``names``) compute ``value``: ``"dense"`` (the original
    activation), ``"decided"`` (what the bake gives) or ``"identity"``."""
    wanted = None if names is None else set(names)
    with attribute_set((u for n, u in units(model).items() if wanted is None or n in wanted), "pa_view", value):
        yield model


def decided(model: nn.Module) -> contextlib.AbstractContextManager:
    get_state(model)
    return view(model, "decided")


def dense(model: nn.Module) -> contextlib.AbstractContextManager:
    return view(model, "dense")


def make_dense(model: nn.Module) -> None:
    for u in units(model).values():
        u.pa_view = "dense"


def removed(model: nn.Module) -> list[str]:
    """The units whose decision is removal (the identity once baked)."""
    return [n for n, u in units(model).items() if u.pa_removed]


def own_tensors(model: nn.Module) -> list[torch.Tensor]:
    return [u.pa_alpha for u in units(model).values()]


@torch.no_grad()
def undecided_units(model: nn.Module, eps: float = 0.01) -> int:
    """Units whose ``a`` is not yet what the bake fixes (a removed unit still fading, a kept one away from 1)."""
    count = 0
    for u in units(model).values():
        a = u.pa_alpha.detach().float()
        target = u.decided_alpha()
        target = torch.as_tensor(target, dtype=a.dtype) if not isinstance(target, torch.Tensor) else target.float()
        if u.pa_fixed is None and bool(((a - target).abs() > eps).any()):
            count += 1
    return count


def plain_replacements(model: nn.Module, identity: Iterable[str] = (), *, decided_alphas: bool = True
                       ) -> dict[int, nn.Module]:
    """``id(unit) -> plain module``: ``nn.Identity`` for the units in ``identity``, else the original activation
    (with ``decided_alphas``, a kept unit with ``0 < a < 1`` becomes a :class:`PaActivation`)."""
    identity = set(identity)
    out: dict[int, nn.Module] = {}
    for name, u in units(model).items():
        if name in identity:
            out[id(u)] = nn.Identity()
            continue
        a = u.decided_alpha() if decided_alphas else 1.0
        if isinstance(a, float) and a == 1.0:
            out[id(u)] = u.original()
        else:
            out[id(u)] = PaActivation(u.original(), torch.as_tensor(a, dtype=u.pa_alpha.dtype), u.pa_axis)
    return out


def plain_copy(model: nn.Module, identity: Iterable[str] = ()) -> nn.Module:
    """A deep copy of a converted model as plain modules: the units in ``identity`` as ``nn.Identity``, the others
    as their original activation (no conversion record)."""
    clone = copy.deepcopy(model)
    swap_modules(clone, plain_replacements(clone, identity, decided_alphas=False))
    detach_state(clone)
    return clone.eval()


@torch.no_grad()
def readers(model: nn.Module, names: Iterable[str], example: Any) -> list[str]:
    """The Linear / ungrouped conv layers that read the output of the units in ``names`` directly, found on one
    run of ``model`` on ``example`` (the layers a calibration re-fits once those units are identities)."""
    names = set(names)
    found = units(model)
    made: dict[int, str] = {}
    alive: list[torch.Tensor] = []
    out: list[str] = []
    handles = []

    def after(name):
        def hook(module, args, output):
            if isinstance(output, torch.Tensor):
                made[id(output)] = name
                alive.append(output)
        return hook

    def before(name):
        def hook(module, args):
            if args and isinstance(args[0], torch.Tensor) and id(args[0]) in made and name not in out:
                out.append(name)
        return hook

    for name in names:
        if name in found:
            handles.append(found[name].register_forward_hook(after(name)))
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or (isinstance(module, nn.modules.conv._ConvNd) and module.groups == 1
                                             and not module.transposed):
            handles.append(module.register_forward_pre_hook(before(name)))
    was = model.training
    model.eval()
    try:
        call_model(model, example)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return out


@torch.no_grad()
def set_alpha(model: nn.Module, values: float | dict[str, float]) -> None:
    """Write ``a`` of every unit (a number) or of the named units (``{name: value}``); a unit set to 0 is decided
    removed, any other value kept (what ``alpha="fixed"`` bakes)."""
    found = units(model)
    items = {n: values for n in found} if not isinstance(values, dict) else values
    for name, value in items.items():
        if name not in found:
            raise ValueError(f"{name!r} is not a converted activation; units: {list(found)[:8]}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"a of {name!r} must be a number in [0, 1], got {value!r}")
    for name, value in items.items():
        u = found[name]
        u.pa_alpha.fill_(float(value))
        u.pa_fixed = float(value) if value in (0.0, 1.0) and not u.pa_alpha.requires_grad else None
        u.pa_removed = value == 0.0
