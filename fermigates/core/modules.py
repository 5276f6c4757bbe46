"""Edits of a module tree that can be undone: swapping modules where they sit, snapshots of module state,
attributes set for the span of a ``with`` block."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator
from typing import Any

import torch.nn as nn

from .twin import copy_module_dict


def locations(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """Every (parent, attribute) where each module object sits: shared modules appear more than once."""
    where: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for key, child in parent._modules.items():
            if child is not None:
                where.setdefault(id(child), []).append((parent, key))
    return where


def swap_modules(model: nn.Module, replacements: dict[int, nn.Module]) -> None:
    """Put each replacement (keyed by ``id`` of the module it replaces) where its original sits; undo every
    swap if one fails."""
    where = locations(model)
    done: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for old_id, new in replacements.items():
            for parent, key in where.get(old_id, []):
                old = parent._modules[key]
                parent._modules[key] = new
                done.append((parent, key, old))
    except BaseException:
        for parent, key, old in reversed(done):
            parent._modules[key] = old
        raise


def snapshot(model: nn.Module) -> list[tuple[Any, dict]]:
    """References to every module's state (and an HF config's), enough to undo edits that replace tensors
    and attributes (not in-place writes into tensors)."""
    snap: list[tuple[Any, dict]] = [(m, copy_module_dict(m)) for m in model.modules()]
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "__dict__"):
        snap.append((config, copy.deepcopy(config.__dict__)))
    return snap


def restore(snap: list[tuple[Any, dict]]) -> None:
    for obj, state in snap:
        obj.__dict__.clear()
        obj.__dict__.update(state)


@contextlib.contextmanager
def attribute_set(objects: Iterable[Any], name: str, value: Any) -> Iterator[None]:
    """Within this context every object's ``name`` is ``value``; each gets its own value back afterwards."""
    objects = list(objects)
    before = [getattr(o, name) for o in objects]
    for o in objects:
        setattr(o, name, value)
    try:
        yield
    finally:
        for o, v in zip(objects, before):
            setattr(o, name, v)
