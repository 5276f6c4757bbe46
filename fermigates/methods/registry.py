"""The registered methods, by the name ``FermiConfig.method`` selects.

Every method folder registers its own instance when it is imported; the built-in folders are imported by name
(:data:`BUILTIN_METHODS`) the first time a method is looked up, so the registry never depends on any of them.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch.nn as nn

from ..core.state import get_state
from .base import Method

METHODS: dict[str, Method] = {}
#: the method folders that ship with fermigates (each registers itself when imported)
BUILTIN_METHODS = ("fermigates.methods.fermi", "fermigates.methods.rewire", "fermigates.methods.spectral",
                   "fermigates.methods.activation")
_loaded = False


def register_method(method: Method) -> Method:
    """Make ``method`` selectable as ``FermiConfig(method=method.name)``."""
    if not isinstance(method, Method) or not method.name:
        raise TypeError(f"register_method needs a named fermigates.methods.base.Method, got {method!r}")
    METHODS[method.name] = method
    return method


def _load_builtin() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for name in BUILTIN_METHODS:
            importlib.import_module(name)


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
    """The method a converted model was converted with (from its conversion record)."""
    return get_method(get_state(model).method)


def make_optimizer(model: nn.Module, **kwargs: Any) -> Any:
    """The optimizer the model's method trains with: ``FermiAnnealer`` around AdamW for ``"fermi"``
    (``lr``, ``total_steps`` and the annealer's keywords), ``DEEPR`` / ``SoftDEEPR`` over
    ``rewire_param_groups(model)`` for the rewiring methods (their keywords)."""
    return method_of(model).optimizer(model, **kwargs)
