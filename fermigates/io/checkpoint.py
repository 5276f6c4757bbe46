"""Save a shrunk model so that it reloads into its stock class, and load it back.

``save_shrunk`` writes ``model.safetensors`` (tied tensors once) and the ``fermigates.json`` manifest (module
path -> class and shape attributes, the source architecture, ties); see ``fermigates._manifest`` for the
format. ``load_shrunk`` resizes a freshly built stock model to the manifest and loads it strictly, after
validating everything, as a transaction: on any error the model it was given is exactly as it was.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable
from importlib import metadata as _metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fermigates.io import manifest as mf
from fermigates.io.inspect import CheckpointSummary, inspect_checkpoint, macs_record
from fermigates.io.manifest import CheckpointError
from fermigates.core import registry
from fermigates.core.registry import qualname
from fermigates.core.state import find_state
from fermigates.core.twin import is_twin
from fermigates.io.hf import GENERATION_NAME, hf_factory, will_write_generation, write_hf_config
from fermigates.surgery.depth import DEPTH_ATTR, match_removed_blocks, removed_blocks
from fermigates.surgery.fold import FOLDED_ATTR
from fermigates.io.onnx import export_onnx
from fermigates.io.replaced import apply_replaced, replaced_manifest

_logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "CheckpointSummary",
    "export_onnx",
    "from_pretrained",
    "inspect_checkpoint",
    "load_shrunk",
    "save_shrunk",
]

ModelOrFactory = nn.Module | Callable[[], nn.Module]


def _version() -> str:
    try:
        return _metadata.version("fermigates")
    except _metadata.PackageNotFoundError:
        return "unknown"


def _is_hf(model: nn.Module) -> bool:
    return hasattr(getattr(model, "config", None), "to_json_string") and hasattr(model, "save_pretrained")


def _check_not_gated(model: nn.Module) -> None:
    """Refuse a model that still carries Fermi gates: the stock class has no place for their tensors."""
    gated = [n for n, m in model.named_modules() if is_twin(m)]
    if gated or find_state(model) is not None:
        where = f" ({len(gated)} gated layers, e.g. {gated[0]!r})" if gated else ""
        raise ValueError(
            f"save_shrunk() got a model that still has Fermi gates{where}: its state dict holds gate tensors "
            "that the stock model class lacks, so load_shrunk could not load the checkpoint. Bake the gates "
            "first with fermigates.convert_from_fermi(model) (or use fermigates.prune), then save"
        )


def _plan_overwrite(root: Path, overwrite: bool, written: set[str], *, log: bool = True) -> list[Path]:
    """Refuse a folder holding another checkpoint unless ``overwrite``; return the stale files to remove
    once the new checkpoint is written (checkpoint files this save does not write, other models' weights)."""
    if not root.is_dir():
        return []
    ours = [root / n for n in mf.CHECKPOINT_FILES if (root / n).is_file()]
    foreign = [p for p in sorted(root.iterdir()) if p.is_file() and (
        p.name in mf.FOREIGN_WEIGHTS or (p.name.startswith("model-") and p.name.endswith(".safetensors")))]
    if (ours or foreign) and not overwrite:
        names = ", ".join(p.name for p in ours + foreign)
        raise FileExistsError(
            f"{str(root)!r} already holds a checkpoint ({names}); pass overwrite=True to replace it (those "
            "files are replaced or removed, other files are left alone), or save into an empty folder"
        )
    stale = [p for p in ours if p.name not in written] + foreign
    if (ours or foreign) and log:
        _logger.warning(
            "save_shrunk: replacing the checkpoint in %s: %s%s",
            root,
            ", ".join(p.name for p in ours if p.name in written) or "nothing",
            f"; removing {', '.join(p.name for p in stale)}" if stale else "",
        )
    return stale


def _check_finite(tensors: dict[str, torch.Tensor]) -> None:
    """Refuse tensors with NaN or infinite values: a checkpoint of them would load and compute NaN."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() or tensor.is_complex():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise ValueError(
                    f"save_shrunk() refuses tensor {name!r}: {bad} of its {tensor.numel()} values are NaN or "
                    "infinite, so the saved model would compute NaN (a diverged fine-tune, a non-finite ridge or "
                    "calibration input?); nothing was written. Pass allow_non_finite=True to save it anyway"
                )


def save_shrunk(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    example_inputs: Any = None,
    overwrite: bool = False,
    allow_non_finite: bool = False,
) -> Path:
    """Write ``model`` into ``directory`` as ``model.safetensors`` + ``fermigates.json`` (and ``config.json``
    for a transformers model), each atomically (temp file, fsync, ``os.replace``, fsync of the directory),
    with the permissions of the process umask; the manifest records every tensor's SHA-256.

    ``example_inputs`` (a Tensor, a tuple of positional args or a dict of kwargs; or ``"auto"`` for a timm
    model's ``pretrained_cfg["input_size"]`` at batch 1) is optional: when given, the Linear/Conv MACs of one
    eval-mode forward are recorded for ``inspect_checkpoint``. A folder that already holds a checkpoint is
    refused unless ``overwrite=True``; then every file of the old checkpoint is replaced or removed (files
    that are not checkpoint files are left alone). A model that still has gates is refused (bake it first), and
    so is a model with NaN or infinite values in a tensor unless ``allow_non_finite=True``. The same model
    always gives the same bytes. Two saves into one folder at once are refused (the second raises
    ``BlockingIOError``); temp files of a save that was killed are removed. Returns the directory.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be True or False, got {overwrite!r}")
    if not isinstance(allow_non_finite, bool):
        raise TypeError(f"allow_non_finite must be True or False, got {allow_non_finite!r}")
    _check_not_gated(model)
    if getattr(model, FOLDED_ATTR, None):
        raise ValueError(
            "save_shrunk() got a model whose batch norms were folded (fold_batchnorm): its modules no longer "
            "match the stock architecture, so the checkpoint could not be loaded into a fresh model. Save "
            "before folding, and fold after load_shrunk() (it is a deployment step, like model.eval())"
        )
    root = mf.check_directory(directory)
    tensors, tied = mf.find_ties(model.state_dict())
    if not allow_non_finite:
        _check_finite(tensors)
    unique_params = {id(p): p.numel() for p in model.parameters()}
    replaced = replaced_manifest(model)  # modules the bake / merge put in place of the stock ones
    manifest: dict[str, Any] = {
        "format": mf.FORMAT,
        "format_version": mf.FORMAT_VERSION,
        "fermigates_version": _version(),
        "model_class": qualname(type(model)),
        "source": mf.model_source(model),
        "n_parameters": sum(unique_params.values()),
        "modules": mf.module_plan(model),
        "tied": tied,
        "tensors": mf.tensor_table(tensors),
    }
    if replaced:
        manifest["replaced"] = replaced
    num_classes = getattr(model, "num_classes", None)
    if isinstance(num_classes, int) and not isinstance(num_classes, bool):
        manifest["num_classes"] = num_classes
    depth = removed_blocks(model)
    if depth:  # the stock class is built at its original depth unless its config says otherwise (HF)
        manifest["removed_blocks"] = depth
    macs = _macs_for(model, example_inputs, manifest["source"])
    if macs is not None:
        manifest["macs"] = macs
    text = json.dumps(manifest, indent=1)
    metadata = {"format": "pt", mf.METADATA_KEY: text}

    from safetensors.torch import save_file

    is_hf = _is_hf(model)
    written = {mf.WEIGHTS_NAME, mf.MANIFEST_NAME}
    if is_hf:
        written |= {mf.CONFIG_NAME} | ({GENERATION_NAME} if will_write_generation(model) else set())
    _plan_overwrite(root, overwrite, written, log=False)  # refuse before creating the folder
    root = mf.ensure_directory(root)
    with mf.directory_lock(root):
        stale = _plan_overwrite(root, overwrite, written)  # again, now that no other save can write here
        mf.remove_stale_temps(root)

        def write_weights(tmp: Path) -> None:
            save_file(tensors, str(tmp), metadata=metadata)
            mf.sort_safetensors_metadata(tmp)

        # tensors first: the embedded manifest travels with them, so a crash after this replace still leaves a
        # consistent checkpoint (fermigates.json is then stale, and the loader says so and ignores it)
        mf.atomic_write(root / mf.WEIGHTS_NAME, write_weights)
        mf.atomic_write_text(root / mf.MANIFEST_NAME, text + "\n")
        if is_hf:
            write_hf_config(model, root, manifest["modules"])
        for path in stale:  # only once the new checkpoint is complete: a crash before leaves the old one whole
            path.unlink(missing_ok=True)
        if stale:
            mf.fsync_dir(root)
    _logger.info("saved %s (%d tensors, %d tied) to %s", type(model).__name__, len(tensors), len(tied), root)
    return root


def _macs_for(model: nn.Module, example_inputs: Any, source: dict[str, Any]) -> dict[str, Any] | None:
    if isinstance(example_inputs, str):
        if example_inputs != "auto":
            raise ValueError(
                f"example_inputs must be inputs for the model, None or 'auto', got {example_inputs!r}"
            )
        if source.get("kind") != "timm" or not source.get("input_size"):
            _logger.info("no MACs recorded: example_inputs='auto' needs a timm model with an input_size")
            return None
        try:
            return macs_record(model, torch.zeros(1, *source["input_size"]))
        except Exception as err:  # noqa: BLE001 - e.g. a ViT built for another img_size: MACs are optional
            _logger.info("no MACs recorded: the model does not run on its pretrained_cfg input (%s)", err)
            return None
    return None if example_inputs is None else macs_record(model, example_inputs)


# --------------------------------------------------------------------------------------------------- load


def _build(factory: Callable[[], nn.Module]) -> nn.Module:
    """Call ``factory`` with parameters on the meta device (no init cost); fall back to a normal build."""
    try:
        with mf.meta_parameters():
            model = factory()
    except Exception as err:  # noqa: BLE001
        _logger.info("building the model with meta parameters failed (%s); building it normally", err)
        model = None
    if model is None:
        model = factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model_or_factory must return a torch.nn.Module, got {type(model).__name__}")
    return model


def _check_fits(
    model: nn.Module, manifest: dict[str, Any], header: dict[str, Any], strict: bool, where: str
) -> list[str]:
    """Raise CheckpointError when the checkpoint is of another architecture or lacks a tensor; return the
    state-dict keys to load."""
    registry.load_families()
    modules = dict(model.named_modules())
    for path, entry in manifest["modules"].items():
        module = modules.get(path)
        if module is None:
            if strict:
                raise CheckpointError(
                    f"{where} does not fit this {type(model).__name__}: the checkpoint has "
                    f"module {path!r} ({entry.get('class')}), the model has no such module"
                )
            continue
        if qualname(type(module)) != entry.get("class"):
            raise CheckpointError(
                f"{where} does not fit this {type(model).__name__}: module {path!r} is a "
                f"{entry.get('class')} in the checkpoint but a {qualname(type(module))} "
                "in the model"
            )
        _check_attr_names(module, path, entry.get("attrs", {}), where)
        _check_widths(module, path, entry.get("attrs", {}), header, manifest.get("tied", {}), where)
    if strict:
        for path, module in modules.items():  # builtin kinds only: the registry may grow between versions
            if path not in manifest["modules"] and mf.shape_attrs(module, builtin_only=True):
                raise CheckpointError(
                    f"{where} does not fit this {type(model).__name__}: the model has module "
                    f"{path!r} ({qualname(type(module))}) that the checkpoint lacks"
                )
        if manifest.get("model_class") not in (None, qualname(type(model))):
            raise CheckpointError(
                f"{where} holds a {manifest['model_class']}, not a "
                f"{qualname(type(model))}: build the model class that was saved"
            )
    _check_classes(model, manifest, where)
    current = model.state_dict(keep_vars=True)
    expected = list(current.keys())
    available = set(header) | set(manifest.get("tied", {}))
    for key in expected:
        info = header.get(manifest.get("tied", {}).get(key, key)) if key in available else None
        if info is None:
            continue
        tensor, dtype = current[key], mf.header_dtype(info)
        if len(info["shape"]) != tensor.dim() or dtype.is_floating_point != tensor.is_floating_point():
            raise CheckpointError(
                f"{where} does not fit this {type(model).__name__}: tensor {key!r} is {info['dtype']} of shape "
                f"{info['shape']} in the checkpoint but {str(tensor.dtype).removeprefix('torch.')} of shape "
                f"{list(tensor.shape)} in the model"
            )
    missing = [k for k in expected if k not in available]
    if missing and strict:
        raise CheckpointError(
            f"{where} is missing tensor {missing[0]!r} that the model needs"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    unexpected = sorted(available - set(expected))
    if unexpected and strict:
        raise CheckpointError(
            f"{where} does not fit this {type(model).__name__}: checkpoint tensor "
            f"{unexpected[0]!r} has no place in the model"
        )
    meta = [n for n, t in model.named_buffers() if t.is_meta and n not in available]
    if meta:
        raise CheckpointError(
            f"buffer {meta[0]!r} of the model is on the meta device and the checkpoint has no tensor for it "
            "(a non-persistent buffer); pass a model with real buffers, or a factory, which fermigates builds "
            "with meta parameters but real buffers"
        )
    return [k for k in expected if k in available]


def _check_attr_names(module: nn.Module, path: str, attrs: dict[str, Any], where: str) -> None:
    """Refuse a manifest attribute that is not one of the module's shape attributes (``"forward": 5`` would
    replace a method and break the first forward)."""
    known = mf.shape_attrs(module)
    for name in attrs:
        if name not in known:
            raise CheckpointError(
                f"{where} is corrupt: its manifest sets {name!r} on module {path or '<root>'!r} "
                f"({qualname(type(module))}), which is not one of its shape attributes {list(known)}; re-save the "
                "checkpoint"
            )


def _check_depth_record(record: Any, where: str) -> dict[str, Any]:
    """The manifest's ``removed_blocks`` entry, checked: ``{path: {"original": int, "kept": [int, ...]}}``."""
    if record is None:
        return {}
    ok = isinstance(record, dict) and all(
        isinstance(e, dict) and isinstance(e.get("original"), int) and isinstance(e.get("kept"), list)
        and all(isinstance(i, int) and 0 <= i < e["original"] for i in e["kept"]) and e["kept"]
        for e in record.values())
    if not ok:
        raise CheckpointError(f"{where} is corrupt: 'removed_blocks' must map block-list paths to "
                              f"{{'original': count, 'kept': [indices]}}, got {record!r}; re-save the checkpoint")
    return record


def _check_widths(
    module: nn.Module, path: str, attrs: dict[str, Any], header: dict[str, Any], tied: dict[str, str], where: str
) -> None:
    """Refuse widths in the manifest that contradict the shapes of the module's tensors in the file."""
    for name, shape in mf.expected_shapes(module, attrs).items():
        if getattr(module, name, None) is None and name not in module._parameters and name not in module._buffers:
            continue
        key = f"{path}.{name}" if path else name
        info = header.get(tied.get(key, key))
        if info is not None and tuple(info["shape"]) != tuple(shape):
            raise CheckpointError(
                f"{where} is inconsistent: its manifest gives module {path or '<root>'!r} the widths {attrs}, so "
                f"{key!r} should have shape {list(shape)}, but the file holds shape {info['shape']}; re-save "
                "the checkpoint"
            )


def _check_classes(model: nn.Module, manifest: dict[str, Any], where: str) -> None:
    """Refuse a model built for another number of classes than the checkpoint's head has."""
    saved = manifest.get("num_classes")
    built = getattr(model, "num_classes", None)
    if isinstance(saved, int) and isinstance(built, int) and saved != built:
        raise CheckpointError(
            f"{where} has a {saved}-class head but this {type(model).__name__} was built with num_classes="
            f"{built}; build it with num_classes={saved} (e.g. timm.create_model(name, num_classes={saved}))"
        )
    source = manifest.get("source") or {}
    config = getattr(model, "config", None)
    names = {n for n, _ in model.named_children()}
    if source.get("kind") == "hf" and config is not None and names & {"classifier", "score"}:
        saved = (source.get("config") or {}).get("id2label")
        built = getattr(config, "num_labels", None)
        if isinstance(saved, dict) and isinstance(built, int) and len(saved) != built:
            raise CheckpointError(
                f"{where} has a {len(saved)}-label classifier but this {type(model).__name__} was built with "
                f"num_labels={built}; build it from a config with num_labels={len(saved)}, or use "
                "fermigates.from_pretrained(dir), which builds it from the saved config"
            )


def _verify_checksums(manifest: dict[str, Any], tensors: dict[str, torch.Tensor], weights: Path) -> None:
    """Compare every loaded tensor with the SHA-256 recorded at save time (version-2 manifests)."""
    table = manifest.get("tensors")
    if table is None:
        _logger.info("%s has a version-1 manifest without checksums; its tensors are not verified", weights)
        return
    for name, tensor in tensors.items():
        if mf.tensor_digest(tensor) != table[name]["sha256"]:
            raise CheckpointError(
                f"{weights} is corrupt: tensor {name!r} does not match the SHA-256 recorded when it was saved "
                "(the file changed on disk or in transfer); restore it from a good copy or re-save it"
            )


class _Journal:
    """References to every module's parameters, buffers and recorded attributes, to undo a failed load."""

    _MISSING = object()

    def __init__(self, model: nn.Module, attrs: dict[str, list[str]]) -> None:
        modules = dict(model.named_modules())
        self.entries = [(m, dict(m._parameters), dict(m._buffers)) for m in modules.values()]
        self.attrs = [
            (modules[p], n, getattr(modules[p], n, self._MISSING))
            for p, names in attrs.items()
            if p in modules
            for n in names
        ]

    def restore(self) -> None:
        for module, params, buffers in self.entries:
            module._parameters.clear()
            module._parameters.update(params)
            module._buffers.clear()
            module._buffers.update(buffers)
        for module, name, value in reversed(self.attrs):
            if value is self._MISSING:
                module.__dict__.pop(name, None)
            else:
                with contextlib.suppress(Exception):  # an attribute that refused the new value kept the old
                    setattr(module, name, value)


def _owner(model: nn.Module, key: str) -> tuple[nn.Module, str, str] | None:
    """``(module, local name, "p"|"b")`` holding state-dict entry ``key``, or None if hooks renamed it."""
    path, _, name = key.rpartition(".")
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None
    if name in module._parameters:
        return module, name, "p"
    if name in module._buffers:
        return module, name, "b"
    return None


def _apply(
    model: nn.Module,
    manifest: dict[str, Any],
    header: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    keys: list[str],
    strict: bool,
) -> None:
    modules = dict(model.named_modules())
    for path, entry in manifest["modules"].items():
        module = modules.get(path)
        if module is None:
            continue
        for name, value in entry.get("attrs", {}).items():
            if not hasattr(module, name):
                _logger.warning("module %r has no attribute %r that the checkpoint sets", path, name)
            setattr(module, name, mf.coerce_like(value, getattr(module, name, None)))
    tied = manifest.get("tied", {})
    current = model.state_dict(keep_vars=True)
    state: dict[str, torch.Tensor] = {}
    for key in keys:
        tensor = tensors[tied.get(key, key)]
        old = current[key]
        if old.device.type != "meta" and old.device != tensor.device:
            tensor = tensor.to(old.device)
        state[key] = tensor
        if tuple(old.shape) != tuple(tensor.shape):
            place = _owner(model, key)
            if place is not None:  # resize: an empty placeholder that assign=True replaces
                module, name, kind = place
                blank = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
                if kind == "p":
                    module._parameters[name] = nn.Parameter(blank, requires_grad=old.requires_grad)
                else:
                    module._buffers[name] = blank
    model.load_state_dict(state, strict=strict, assign=True)
    for alias, target in tied.items():
        place, source = _owner(model, alias), _owner(model, target)
        if place is None or source is None:
            continue
        value = getattr(source[0], source[1])
        (place[0]._parameters if place[2] == "p" else place[0]._buffers)[place[1]] = value
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(
            f"{left[0]!r} is still on the meta device after loading: the checkpoint has no tensor for it (a "
            "non-persistent buffer, or a key skipped by strict=False); pass a model with real buffers, or a "
            "factory, which fermigates builds with meta parameters but real buffers"
        )


def load_shrunk(
    model_or_factory: ModelOrFactory, directory: str | os.PathLike, *, strict: bool = True
) -> nn.Module:
    """Resize a stock model to the checkpoint in ``directory`` and load its tensors; return the model.

    ``model_or_factory`` is the stock model (e.g. ``timm.create_model("resnet18")``) or a zero-argument
    callable returning one, which is then built with its parameters on the meta device (buffers stay real, so
    non-persistent ones such as rotary frequencies are computed as usual) and filled with ``assign=True``.
    Everything is checked before the model is touched (manifest version, architecture, every tensor's shape
    and dtype against the manifest and the model, widths, class count, missing tensors, truncated files, the
    SHA-256 of every tensor); on any error the given model is left exactly as it was. A checkpoint of a model
    whose blocks were removed (:func:`fermigates.remove_blocks`) removes the same blocks from a stock model
    built at the original depth (one built at the reduced depth, e.g. from the saved config, is left as is).
    """
    manifest, header, weights = mf.read_checkpoint(directory)
    where = f"checkpoint {str(directory)!r}"
    if isinstance(model_or_factory, nn.Module):
        model = model_or_factory
    elif callable(model_or_factory):
        model = _build(model_or_factory)
    else:
        raise TypeError(
            "model_or_factory must be a torch.nn.Module or a zero-argument callable returning one, "
            f"got {type(model_or_factory).__name__}"
        )
    depth = _check_depth_record(manifest.get("removed_blocks"), where)
    try:
        undo_depth = match_removed_blocks(model, depth, where)  # a stock model at its original depth
    except (ValueError, TypeError, IndexError) as err:
        raise CheckpointError(str(err)) from None
    try:
        # merged / removed layers, before the checks (their paths are those of the model after any block removal)
        undo_replaced = apply_replaced(model, manifest, where)
    except BaseException:
        for undo in undo_depth:
            undo()
        raise

    def undo_structure() -> None:
        undo_replaced()
        for undo in undo_depth:
            undo()

    try:
        keys = _check_fits(model, manifest, header, strict, where)
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(weights))
        except (SafetensorError, OSError, RuntimeError) as err:
            raise CheckpointError(f"{weights} cannot be read: {err}; re-save the checkpoint") from None
        _verify_checksums(manifest, tensors, weights)
    except BaseException:
        undo_structure()
        raise
    # safetensors hands out views at 8-byte offsets; oneDNN picks other kernels for unaligned weights and the
    # loaded model would then differ from the saved one in the last bit (seen: MobileNetV2's depthwise convs)
    tensors = {k: v.clone() if v.data_ptr() % 64 else v for k, v in tensors.items()}
    journal = _Journal(model, {p: list(e.get("attrs", {})) for p, e in manifest["modules"].items()})
    try:
        _apply(model, manifest, header, tensors, keys, strict)
    except BaseException:
        journal.restore()
        undo_structure()
        raise
    if depth:  # a re-save of the loaded model records the same removal
        model.__dict__[DEPTH_ATTR] = {p: {"original": e["original"], "kept": list(e["kept"])} for p, e in depth.items()}
    _logger.info("loaded %s from %s", type(model).__name__, directory)
    return model


def from_pretrained(
    directory: str | os.PathLike, *, model_class: type | None = None, strict: bool = True
) -> nn.Module:
    """Rebuild a transformers model saved by ``save_shrunk`` from its folder alone (no hub access).

    The class is ``model_class`` or the config's ``architectures[0]`` looked up in ``transformers``; it is
    built from ``config.json`` on the meta device, resized to the manifest, loaded, and put in eval mode.
    """
    root = Path(directory)
    mf.read_checkpoint(root)  # clear errors for a missing / damaged folder before importing transformers
    model = load_shrunk(hf_factory(root, model_class), root, strict=strict)
    return model.eval()
