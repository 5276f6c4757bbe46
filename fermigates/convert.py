"""``convert_to_fermi``: swap targeted layers for gated twins, in place, as a transaction."""

from __future__ import annotations

import logging
import re
import warnings
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from .config import FermiConfig
from .core import registry
from .core.modules import swap_modules
from .core.state import ConversionState, ConversionSummary, attach_state, find_state
from .core.twin import is_twin
from .methods.base import Method
from .methods.registry import get_method

_logger = logging.getLogger(__name__)

FilterFn = Callable[[nn.Module, str], bool]


# -- target selection ---------------------------------------------------------------------------------
def _matches(name: str, spec: str | Iterable[str]) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


def _check_pattern(spec: str | Iterable[str] | None, names: list[str], arg: str) -> None:
    if spec is None:
        return
    if isinstance(spec, str):
        try:
            re.compile(spec)
        except re.error as err:
            raise ValueError(f"{arg}={spec!r} is not a valid regular expression: {err}") from None
        if not any(_matches(n, spec) for n in names):
            raise ValueError(
                f"{arg}={spec!r} matches no module name (regex, full match); "
                f"some names: {names[:8]}"
            )
        return
    missing = [s for s in spec if not any(_matches(n, [s]) for n in names)]
    if missing:
        raise ValueError(f"{arg} entries {missing} match no module name; some names: {names[:8]}")


def classifier_names(model: nn.Module, candidates: list[str]) -> set[str]:
    """Names of the final classifier / LM head: from timm's pretrained_cfg, HF's output embeddings, or
    else the last gate-able layer of the model."""
    names: set[str] = set()
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and cfg.get("classifier"):
        cls = cfg["classifier"]
        names.update([cls] if isinstance(cls, str) else list(cls))
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            head = get_out()
        except Exception:  # noqa: BLE001 - some models raise NotImplementedError here
            head = None
        if head is not None:
            names.update(n for n, m in model.named_modules() if m is head)
    if not names and candidates:
        names.add(candidates[-1])
    return names


def select_targets(
    model: nn.Module, config: FermiConfig, filter_fn: FilterFn | None = None, method: Method | None = None
) -> tuple[dict[str, nn.Module], list[tuple[str, str]]]:
    """The modules ``config`` and ``filter_fn`` ask to convert (name -> module) that the method can convert, and
    the skipped ones with why."""
    method = method or get_method(config.method)
    all_names = [n for n, _ in model.named_modules() if n]
    _check_pattern(config.target_modules, all_names, "target_modules")
    _check_pattern(config.exclude_modules, all_names, "exclude_modules")
    gateable: dict[str, nn.Module] = {}
    skipped: list[tuple[str, str]] = []
    for name, module in model.named_modules():
        if not name:
            continue
        if config.target_modules is not None and not _matches(name, config.target_modules):
            continue
        if config.exclude_modules is not None and _matches(name, config.exclude_modules):
            continue
        if filter_fn is not None and not filter_fn(module, name):
            continue
        verdict = method.target(module, config)
        if verdict is not True:
            if isinstance(verdict, str):
                skipped.append((name, verdict))
            continue
        gateable[name] = module
    if method.structured(config):
        for fixed in registry.entries(registry.FIXED_INPUT_WIDTH):
            for name, why in fixed(model).items():
                if gateable.pop(name, None) is not None:
                    skipped.append((name, why))
    if not method.structured(config) and config.keep_classifier:
        every = [n for n, m in model.named_modules() if n and method.target(m, config) is True]
        for name in classifier_names(model, every):
            if gateable.pop(name, None) is not None:
                skipped.append((name, "final classifier (keep_classifier=True)"))
    return gateable, skipped


# -- conversion -----------------------------------------------------------------------------------
def _check_materialised(model: nn.Module) -> None:
    """Refuse a model whose parameters or buffers are on the meta device (they hold no values to score)."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_meta:
            raise ValueError(
                f"{type(model).__name__} has {name!r} on the meta device: gates are scored from the weights' "
                "values, and a meta tensor has none. Load the weights first (e.g. model.to_empty(device='cpu') "
                "then load_state_dict, or fermigates.load_shrunk), then convert"
            )


def _check_ties(model: nn.Module, twins: dict[str, nn.Module], graph: Any = None) -> None:
    """Refuse to gate a layer whose weight or bias is also used by another module (tied weights): baking its
    gates would rewrite the other module's tensor too (e.g. GPT-2's ``lm_head`` and ``transformer.wte``) --
    unless the dependency graph put both in one prunable group (a tied embedding and LM head around a residual
    stream: removing its channels slices the shared weight alike for both)."""
    together = {frozenset(m.module for m in g.members) for g in getattr(graph, "groups", []) if g.prunable}
    modules = dict(model.named_modules())
    users: dict[int, list[tuple[str, str, nn.Module]]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for pname, param in module._parameters.items():
            if param is not None:
                users.setdefault(id(param), []).append((path, pname, module))
    for name in twins:
        original = modules[name]
        for pname, param in original._parameters.items():
            if param is None:
                continue
            others = [f"{p}.{n}" if p else n for p, n, user in users.get(id(param), []) if user is not original
                      and not any(name in g and p in g for g in together)]
            if others:
                raise ValueError(
                    f"cannot gate {name!r}: its {pname} is tied to {others[0]!r} (the same Parameter), so baking "
                    f"the gates would also change {others[0]!r}. Leave it ungated with "
                    f"exclude_modules=[{name!r}] (or keep_classifier=True for an output head), or untie the "
                    "weights first"
                )


def _warn_all_zero(twins: dict[str, nn.Module], structured: bool) -> None:
    """Warn about gates whose scores are all zero: what they keep is then arbitrary."""
    for name, twin in twins.items():
        weight = getattr(twin, "weight", None)
        if not structured:
            if isinstance(weight, torch.Tensor) and not weight.detach().any():
                warnings.warn(
                    f"fermigates: {name}.weight is all zero, so every gate score is 0 and which weights it "
                    "prunes is arbitrary; load the trained weights before converting, or exclude_modules="
                    f"[{name!r}]",
                    stacklevel=3,
                )
            continue
        for gate in getattr(twin, "gates", []):
            score = getattr(gate, "score", None)
            if callable(score) and not score().detach().any():
                warnings.warn(
                    f"fermigates: the layers producing {getattr(gate, 'label', name)} have all-zero weights, so "
                    "every channel scores 0 and which ones are pruned is arbitrary; load the trained weights "
                    "before converting",
                    stacklevel=3,
                )


def default_example_inputs(model: nn.Module) -> Any:
    """Example inputs for a model, from the family converters (timm input size, HF config), else None."""
    for factory in registry.entries(registry.EXAMPLE_INPUTS):
        try:
            inputs = factory(model)
        except Exception as err:  # noqa: BLE001 - a converter that cannot tell is not an error
            _logger.debug("example-input factory %s failed: %s", factory, err)
            continue
        if inputs is not None:
            return inputs
    return None


def convert_to_fermi(
    model: nn.Module,
    config: FermiConfig | None = None,
    *,
    filter_fn: FilterFn | None = None,
    example_inputs: Any = None,
    progress: bool = False,
) -> nn.Module:
    """Swap the targeted layers of ``model`` for Fermi-gated twins, in place, and return ``model``.

    ``config`` says what to gate (``FermiConfig``); ``filter_fn(module, fqn) -> bool`` narrows the targets
    further. Structured granularities (``channel``, ``head``) gate coupled groups found from a run of the
    model on ``example_inputs`` (a tensor, a tuple of positional arguments or a dict of keyword arguments;
    for timm and Hugging Face models a default is derived from the model's config). ``progress`` shows a bar
    while the dependency graph is traced.
    With ``mu_init="open"`` (default) the converted model computes the original function.
    On any error the model is left exactly as it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if config is None:
        config = FermiConfig()
    if not isinstance(config, FermiConfig):
        raise TypeError(f"config must be a fermigates.FermiConfig, got {type(config).__name__}")
    config.validate()
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be callable as filter_fn(module, fqn), got {type(filter_fn).__name__}")
    if find_state(model) is not None or any(is_twin(m) for m in model.modules()):
        previous = getattr(getattr(find_state(model), "config", None), "method", None)
        how = f" (method {previous!r})" if previous else ""
        raise ValueError(
            f"{type(model).__name__} is already converted{how}; call "
            "fermigates.convert_from_fermi(model) before converting or pruning it again"
        )

    _check_materialised(model)
    method = get_method(config.method)
    targets, skipped = select_targets(model, config, filter_fn, method)
    if not targets:
        raise ValueError(
            f"nothing to convert in {type(model).__name__}: no module that method={config.method!r} converts "
            "(nn.Linear / nn.Conv1d/2d/3d or a registered linear-like layer for the gate and rewiring methods) "
            "is selected; check target_modules / exclude_modules / filter_fn"
        )
    summary_ = ConversionSummary(granularity=config.granularities, skipped=skipped, method=config.method)
    state = ConversionState(config=config, summary=summary_, progress=progress)
    if method.structured(config) and example_inputs is None:
        example_inputs = default_example_inputs(model)
    state.example_inputs = example_inputs  # kept for every granularity: the bake checks its outputs on them
    twins = method.convert(model, config, targets, state, example_inputs)

    _check_ties(model, twins, state.graph)
    _warn_all_zero(twins, method.structured(config))

    modules = dict(model.named_modules())
    swap_modules(model, {id(modules[name]): twin for name, twin in twins.items()})
    try:
        summary_.modules = list(twins)
        method.on_converted(model, state)
        state.record_fingerprints(model, method.own_tensors(model))
    except BaseException:
        for hook_id in state.hook_ids:
            model._forward_pre_hooks.pop(hook_id, None)
        swap_modules(model, {id(twin): modules[name] for name, twin in twins.items()})
        raise
    attach_state(model, state)
    _logger.info("%s", summary_)
    return model
