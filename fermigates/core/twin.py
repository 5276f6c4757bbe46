"""The twin marker: what every method's converted layer carries, so that shared code can recognise it.

A *twin* replaces a layer of the user's model while it is converted (a gated ``nn.Linear``, a sign-fixed conv,
a gated activation...). It is usually a subclass of the class it replaces, so ``isinstance`` checks and state
dict keys stay intact, and it shares the original's parameters and buffers. The dependency graph, the fold and
the checkpoint writer only need to know *that* a module is a twin (and which class it stands in for), never
which method made it: they ask :func:`is_twin`.
"""

from __future__ import annotations

import torch.nn as nn


class Twin:
    """Mixin of every method's converted layer. ``_plain_cls`` is the class of the module it replaced."""

    _plain_cls: type

    @property
    def plain_class(self) -> type:
        """The class of the module this twin replaced (what the bake turns it back into)."""
        return self._plain_cls


def is_twin(module: nn.Module) -> bool:
    """Whether ``module`` is a converted layer of some method (see :class:`Twin`)."""
    return isinstance(module, Twin)


def copy_module_dict(module: nn.Module) -> dict:
    """A shallow copy of a module's ``__dict__`` whose containers (params, buffers, hooks) are new dicts."""
    return {k: (type(v)(v) if isinstance(v, dict) else v) for k, v in module.__dict__.items()}


def make_twin(module: nn.Module, twin_cls: type) -> nn.Module:
    """A ``twin_cls`` instance that shares ``module``'s parameters, buffers and attributes (``module`` itself is
    left as it is) and remembers ``type(module)`` as its plain class."""
    twin = twin_cls.__new__(twin_cls)
    twin.__dict__ = copy_module_dict(module)
    twin._plain_cls = type(module)
    return twin


def plain_copy(twin: nn.Module, drop_attrs: tuple[str, ...] = (), drop_modules: tuple[str, ...] = (),
               drop_params: tuple[str, ...] = (), drop_buffers: tuple[str, ...] = ()) -> nn.Module:
    """An instance of ``twin``'s plain class sharing its parameters and buffers, without the named attributes,
    child modules, parameters and buffers the method added."""
    plain_cls = twin._plain_cls
    plain = plain_cls.__new__(plain_cls)
    state = copy_module_dict(twin)
    for key in (*drop_attrs, "_plain_cls"):
        state.pop(key, None)
    for container, keys in (("_modules", drop_modules), ("_parameters", drop_params), ("_buffers", drop_buffers)):
        for key in keys:
            state[container].pop(key, None)
    plain.__dict__ = state
    return plain
