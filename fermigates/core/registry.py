"""Registries through which the model-agnostic library finds per-family knowledge.

Entries are keyed by a class's qualified name (``"transformers.models.bert.modeling_bert.BertSelfAttention"``)
so that registering a family never imports it: the library asks ``lookup(registry, module)``, which walks the
module's MRO and compares names.

The family files (``fermigates.converters`` and any module listed in :data:`FAMILY_MODULES`) fill these
registries when they are imported; :func:`load_families` imports them by name the first time knowledge is
looked up, so that nothing below the front door depends on the family code itself.
"""

from __future__ import annotations

import importlib
import logging
import math
from typing import Any, Callable, TypeVar

import torch.nn as nn

T = TypeVar("T")

_logger = logging.getLogger(__name__)

#: modules whose import registers per-family knowledge (a third-party package may append its own)
FAMILY_MODULES: list[str] = ["fermigates.converters"]
_LOADED: set[str] = set()

#: class qualname -> AttentionSpec (see fermigates.core.layouts)
ATTENTION: dict[str, Any] = {}
#: class qualname -> LinearLayout (core.layouts): modules that compute ``x @ W`` like a Linear but store W differently
LINEAR_LIKE: dict[str, Any] = {}
#: class qualname of a subclass of nn.Linear / nn.Conv*d whose ``forward`` override computes exactly the base
#: class's function (timm's ``Linear`` only adds a cast): a method may convert it like the base class
SAME_FORWARD: set[str] = set()
#: class qualname of a subclass of nn.Linear / nn.Conv*d whose ``forward`` override keeps the base class's
#: channel semantics (padding added, say): the dependency graph may slice it like the base class
CHANNEL_SAFE: set[str] = set()
#: class qualname of an element-wise activation module (``y[i] = f(x[i])``, e.g. timm's ``Swish``, transformers'
#: ``GELUActivation``): what a method that gates non-linearities converts (torch's own are known to it)
ACTIVATIONS: set[str] = set()
#: class qualname -> tuple of attribute names that define the module's tensor shapes (and attributes a shrink
#: rescales with them, such as an RMS norm's epsilon), recorded in a checkpoint's manifest
SHAPE_ATTRS: dict[str, tuple[str, ...]] = {}
#: class qualname -> callable(module) -> RMS-norm description (weight attr, eps attr), for exact shrinking
RMS_NORMS: dict[str, Any] = {}
#: batch-norm class qualname (exact class) -> callable(norm) -> the module that replaces it once its affine
#: map is folded into the preceding layer (``fermigates.fold_batchnorm``), e.g. timm's norm + activation
BN_FOLD: dict[str, Callable[[nn.Module], nn.Module]] = {}
#: callables(model) -> {module name: reason} of layers whose *input* width the model's config fixes (e.g. a
#: Hugging Face classifier reading the pooler: ``hidden_size``); structured gating leaves what they read whole
FIXED_INPUT_WIDTH: list[Callable[[nn.Module], dict[str, str]]] = []
#: callables(model) -> {projection fqn: (module fqn, getter(args, kwargs) -> residual)}: the residual stream
#: added to a projection's output, read in that module's forward pre-hook (see converters.hf_residuals)
RESIDUALS: list[Callable[[nn.Module], dict[str, Any]]] = []
#: model class qualname -> BlockListSpec (converters.blocks): where the stack of blocks lives and what removing
#: blocks updates (config counts, per-layer config fields, cache indices), for depth pruning
BLOCK_LISTS: dict[str, Any] = {}
#: ordered list of callables(model) -> example inputs or None (first non-None wins)
EXAMPLE_INPUTS: list[Callable[[nn.Module], Any]] = []
#: callables(model) -> int or None: the hidden size (a residual stream's width) of ``model`` must stay a
#: multiple of this for its family's config to describe it (transformers' LLaMA-like configs: the head count)
HIDDEN_MULTIPLE: list[Callable[[nn.Module], int | None]] = []
#: callables(model) -> {config field: value} describing a shrunk model's widths in its own config format
#: (e.g. a Hugging Face config's ``intermediate_size``), ``{}`` when nothing changed
CONFIG_UPDATES: list[Callable[[nn.Module], dict[str, Any]]] = []
#: callables(model) -> {field: value} written into the model's own config (and per-module width attributes)
#: after a shrink, so that the family's code (caches, ``generate()``) sees the new shapes
CONFIG_APPLY: list[Callable[[nn.Module], dict[str, Any]]] = []


def load_families() -> None:
    """Import every module of :data:`FAMILY_MODULES` once (they fill the registries when imported)."""
    for name in FAMILY_MODULES:
        if name not in _LOADED:
            _LOADED.add(name)
            try:
                importlib.import_module(name)
            except ImportError as err:  # a missing family module only narrows what is known
                _logger.warning("could not import family module %s (%s); its layers are not known", name, err)


def qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register(registry: dict[str, T], names: str | list[str], value: T) -> T:
    for name in [names] if isinstance(names, str) else names:
        registry[name] = value
    return value


def lookup(registry: dict[str, T], module: nn.Module | type) -> T | None:
    """The entry for ``module``'s class or its nearest registered base class, else ``None``."""
    load_families()
    cls = module if isinstance(module, type) else type(module)
    for base in cls.__mro__:
        hit = registry.get(qualname(base))
        if hit is not None:
            return hit
    return None


def listed(names: set[str], cls: type) -> bool:
    """Whether ``cls`` itself is named in the set ``names`` (an exact class, not a base)."""
    load_families()
    return qualname(cls) in names


def entries(registry: list[Callable[..., T]]) -> list[Callable[..., T]]:
    """The callables of a list registry, with the family modules loaded."""
    load_families()
    return list(registry)


def residual_sources(model: nn.Module) -> dict[str, Any]:
    """``{projection fqn: (module fqn, getter)}`` from every family's RESIDUALS entry (see hf_residuals)."""
    out: dict[str, Any] = {}
    for find in entries(RESIDUALS):
        out.update(find(model))
    return out


def hidden_multiple(model: nn.Module) -> int:
    """The multiple every family's HIDDEN_MULTIPLE entry asks of ``model``'s hidden size (their lcm; 1: none)."""
    step = 1
    for ask in entries(HIDDEN_MULTIPLE):
        value = ask(model)
        if isinstance(value, int) and value > 1:
            step = math.lcm(step, value)
    return step


def config_updates(model: nn.Module) -> dict[str, Any]:
    """The config fields every family's CONFIG_UPDATES entry reports for ``model``."""
    out: dict[str, Any] = {}
    for describe in entries(CONFIG_UPDATES):
        out.update(describe(model))
    return out


def apply_config_updates(model: nn.Module) -> dict[str, Any]:
    """Write the shrunk widths into ``model``'s own config through every family's CONFIG_APPLY entry."""
    out: dict[str, Any] = {}
    for apply in entries(CONFIG_APPLY):
        out.update(apply(model))
    return out
