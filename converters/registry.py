"""Registries through which the model-agnostic core finds per-family knowledge.

Entries are keyed by a class's qualified name (``"transformers.models.bert.modeling_bert.BertSelfAttention"``)
so that registering a family never imports it: the core asks ``lookup(registry, module)``, which walks the
module's MRO and compares names.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import torch.nn as nn

T = TypeVar("T")


#: class qualname -> AttentionSpec (see fermigates.converters.attention)
ATTENTION: dict[str, Any] = {}
#: class qualname -> LinearLayout (converters.attention): modules that compute ``x @ W`` like a Linear but store W differently
LINEAR_LIKE: dict[str, Any] = {}
#: class qualname -> callable(module, **gate_kwargs) -> gated twin of that module
TWINS: dict[str, Callable[..., nn.Module]] = {}
#: class qualname -> tuple of attribute names that define the module's tensor shapes
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


def qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register(registry: dict[str, T], names: str | list[str], value: T) -> T:
    for name in [names] if isinstance(names, str) else names:
        registry[name] = value
    return value


def lookup(registry: dict[str, T], module: nn.Module | type) -> T | None:
    """The entry for ``module``'s class or its nearest registered base class, else ``None``."""
    cls = module if isinstance(module, type) else type(module)
    for base in cls.__mro__:
        hit = registry.get(qualname(base))
        if hit is not None:
            return hit
    return None
