"""Replaced modules in a checkpoint: what the bake and the merge step put in place of the stock model's modules.

A removed activation baked into ``nn.Identity``, layers merged into one (its members but the first become
identities, the first a Linear / conv of another shape), a folded batch norm: the stock class has other modules at
those paths. The manifest's ``"replaced"`` object records, per path, how to build the module that stands there
(:func:`fermigates.surgery.merge.module_spec`); loading builds them into the freshly made stock model first, then
resizes and loads the tensors as for any shrunk checkpoint. Only ``torch.nn`` and fermigates classes are built.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from fermigates.io import manifest as mf
from fermigates.io.manifest import CheckpointError
from fermigates.surgery.merge import REPLACED_ATTR, build_module, module_spec, record_replaced, replaced_paths

#: the manifest format version that introduced ``"replaced"`` (older fermigates refuse such a checkpoint)
REPLACED_FORMAT_VERSION = 3


def replaced_manifest(model: nn.Module) -> dict[str, Any]:
    """``{path: spec}`` of every module the bake / merge step recorded as replaced (empty for a stock layout)."""
    modules = dict(model.named_modules())
    return {path: module_spec(modules[path], path) for path in replaced_paths(model)}


def _check(replaced: Any, where: str) -> dict[str, dict[str, Any]]:
    if not isinstance(replaced, dict) or not all(
            isinstance(p, str) and isinstance(s, dict) and isinstance(s.get("class"), str) and
            isinstance(s.get("args", {}), dict) for p, s in replaced.items()):
        raise CheckpointError(f"{where} is corrupt: 'replaced' must map module paths to objects with a 'class' "
                              "string and an 'args' object; re-save the checkpoint")
    return replaced


def apply_replaced(model: nn.Module, manifest: dict[str, Any], where: str) -> Callable[[], None]:
    """Build the manifest's replaced modules into ``model`` (parameters on the meta device: the checkpoint's
    tensors fill them); returns a function that puts the original modules back."""
    replaced = _check(manifest.get("replaced") or {}, where)
    done: list[tuple[nn.Module, str, nn.Module]] = []
    recorded = model.__dict__.get(REPLACED_ATTR)

    def undo() -> None:
        for parent, key, old in reversed(done):
            parent._modules[key] = old
        model.__dict__.pop(REPLACED_ATTR, None)
        if recorded is not None:
            model.__dict__[REPLACED_ATTR] = recorded

    try:
        for path in sorted(replaced, key=lambda p: p.count(".")):  # a container before what it holds
            parent_path, _, key = path.rpartition(".")
            try:
                parent = model.get_submodule(parent_path) if parent_path else model
            except AttributeError:
                raise CheckpointError(f"{where} does not fit this {type(model).__name__}: it replaces module "
                                      f"{path!r}, which the model does not have") from None
            if not path or key not in parent._modules:
                raise CheckpointError(f"{where} does not fit this {type(model).__name__}: it replaces module "
                                      f"{path!r}, which the model does not have")
            old = parent._modules[key]
            try:
                with mf.meta_parameters():
                    new = build_module(replaced[path], old)
            except (ValueError, TypeError) as err:
                raise CheckpointError(f"{where}: cannot rebuild replaced module {path!r}: {err}") from None
            parent._modules[key] = new
            done.append((parent, key, old))
        if replaced:
            record_replaced(model, list(replaced))
    except BaseException:
        undo()
        raise
    return undo
