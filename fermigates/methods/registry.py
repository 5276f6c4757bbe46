"""The registered methods, by the name ``FermiConfig.method`` selects."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from .base import Method

METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Make ``method`` selectable as ``FermiConfig(method=method.name)``."""
    if not isinstance(method, Method) or not method.name:
        raise TypeError(f"register_method needs a named fermigates.methods.base.Method, got {method!r}")
    METHODS[method.name] = method
    return method


def _load_builtin() -> None:
    if "fermi" not in METHODS:
        from .fermi.method import FermiMethod
        from .rewire.model import RewireMethod

        register_method(FermiMethod())
        register_method(RewireMethod("deepr"))
        register_method(RewireMethod("softdeepr"))


def method_names() -> tuple[str, ...]:
    _load_builtin()
    return tuple(METHODS)


def get_method(name: str) -> Method:
    """The method registered as ``name``; a ValueError listing the known names otherwise."""
    _load_builtin()
    method = METHODS.get(name) if isinstance(name, str) else None
    if method is None:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {name!r}")
    return method


def method_of(model: nn.Module) -> Method:
    """The method a converted model was converted with (from its ``FermiState``)."""
    from ..state import fermi_state

    return get_method(getattr(fermi_state(model).config, "method", "fermi"))


def make_optimizer(model: nn.Module, **kwargs: Any) -> Any:
    """The optimizer the model's method trains with: ``FermiAnnealer`` around AdamW for ``"fermi"``
    (``lr``, ``total_steps`` and the annealer's keywords), ``DEEPR`` / ``SoftDEEPR`` over
    ``rewire_param_groups(model)`` for the rewiring methods (their keywords)."""
    return method_of(model).optimizer(model, **kwargs)
