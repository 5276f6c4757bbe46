"""The checkpoint manifest, the safetensors header, and atomic file writes.

A shrunk checkpoint is a directory holding ``model.safetensors`` and ``fermigates.json``. The manifest is a
JSON object::

    {"format": "fermigates.shrunk", "format_version": 2, "fermigates_version": "0.1.0",
     "model_class": "timm.models.resnet.ResNet",
     "source": {"kind": "timm", "name": "resnet18"} | {"kind": "hf", "config": {...}} | {"kind": "custom"},
     "modules": {"layer1.0.conv1": {"class": "torch.nn.modules.conv.Conv2d",
                                     "attrs": {"in_channels": 64, "out_channels": 40, "groups": 1}}, ...},
     "tied": {"lm_head.weight": "transformer.wte.weight"},
     "tensors": {"conv1.weight": {"dtype": "F32", "shape": [64, 3, 7, 7], "sha256": "..."}, ...},
     "num_classes": 10 (when the model has an integer ``num_classes``, as timm models do),
     "macs": {"inputs": {...}, "total": 123, "modules": {...}} (only when an example input was known)}

Every module with known shape-defining attributes is recorded (not only those that differ from a fresh
default): the loader then needs no dense reference to diff against, the list doubles as an architecture
fingerprint (paths + classes) checked before anything is touched, and ``inspect_checkpoint`` can print every
layer's width. The same manifest is stored in the safetensors ``__metadata__`` (key ``"fermigates"``),
where it is written atomically with the tensors; that copy is authoritative, ``fermigates.json`` is the
readable one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import stat
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fermigates.core import registry

_logger = logging.getLogger(__name__)

FORMAT = "fermigates.shrunk"
FORMAT_VERSION = 3  # 2: "tensors" (SHA-256 of every tensor), "num_classes" (and optional "removed_blocks"); 3: "replaced"
OLDEST_FORMAT_VERSION = 1  # version-1 checkpoints load, without checksums
WEIGHTS_NAME = "model.safetensors"
MANIFEST_NAME = "fermigates.json"
CONFIG_NAME = "config.json"
METADATA_KEY = "fermigates"

#: builtin torch modules -> attributes that define their tensor shapes (looked up along the MRO)
BUILTIN_SHAPE_ATTRS: dict[str, tuple[str, ...]] = {
    "torch.nn.modules.linear.Linear": ("in_features", "out_features"),
    "torch.nn.modules.conv._ConvNd": ("in_channels", "out_channels", "groups"),
    "torch.nn.modules.batchnorm._NormBase": ("num_features",),
    "torch.nn.modules.normalization.LayerNorm": ("normalized_shape",),
    "torch.nn.modules.normalization.RMSNorm": ("normalized_shape", "eps"),
    "torch.nn.modules.normalization.GroupNorm": ("num_groups", "num_channels"),
    "torch.nn.modules.sparse.Embedding": ("num_embeddings", "embedding_dim"),
}

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100_000_000
#: files a save writes (or removes when the model does not need them); everything else in a folder is left alone
CHECKPOINT_FILES = (WEIGHTS_NAME, MANIFEST_NAME, CONFIG_NAME, "generation_config.json")
#: weight files of other (Hugging Face style) checkpoints that ``overwrite=True`` removes as stale
FOREIGN_WEIGHTS = ("pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json",
                   "tf_model.h5", "flax_model.msgpack")


class CheckpointError(ValueError):
    """A shrunk checkpoint cannot be read, or does not fit the model it is loaded into."""


def shape_attrs(module: nn.Module, *, builtin_only: bool = False) -> tuple[str, ...]:
    """The names of ``module``'s shape-defining attributes (builtin lists plus ``registry.SHAPE_ATTRS``)."""
    names: list[str] = []
    for table in (BUILTIN_SHAPE_ATTRS,) if builtin_only else (BUILTIN_SHAPE_ATTRS, registry.SHAPE_ATTRS):
        for name in registry.lookup(table, module) or ():
            if name not in names:
                names.append(name)
    return tuple(n for n in names if hasattr(module, n))


def _jsonable(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list, torch.Size)):
        return [_jsonable(v, where) for v in value]
    raise TypeError(
        f"shape attribute {where} must be int/float/str/bool/None or a sequence of them, "
        f"got {type(value).__name__} {value!r}"
    )


def coerce_like(value: Any, current: Any) -> Any:
    """JSON lists become tuples where the module currently holds a tuple (e.g. ``normalized_shape``)."""
    if isinstance(value, list) and isinstance(current, tuple):
        return tuple(value)
    return value


def module_plan(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{path: {"class": qualname, "attrs": {...}}}`` for every module with known shape attributes."""
    registry.load_families()
    plan: dict[str, dict[str, Any]] = {}
    for path, module in model.named_modules():
        names = shape_attrs(module)
        if names:
            attrs = {n: _jsonable(getattr(module, n), f"{path or '<root>'}.{n}") for n in names}
            plan[path] = {"class": registry.qualname(type(module)), "attrs": attrs}
    return plan


def model_source(model: nn.Module) -> dict[str, Any]:
    """Where the stock architecture comes from: a timm name, an HF config, or ``custom``."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        cfg = json.loads(config.to_json_string(use_diff=False))
        cfg["architectures"] = [type(model).__name__]
        return {"kind": "hf", "class": type(model).__name__, "config": cfg}
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, dict) and cfg.get("architecture"):
            return {
                "kind": "timm",
                "name": cfg["architecture"],
                "input_size": _jsonable(cfg.get("input_size"), attr),
            }
    return {"kind": "custom"}


def find_ties(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Split a state dict into the tensors to write and ``{alias: kept name}`` for tied entries.

    Entries that are the same view of the same storage are tied (saved once, re-tied on load); entries that
    only overlap (different views of one storage) are cloned so that each is written on its own.
    """
    kept: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: dict[tuple, str] = {}
    for name, tensor in state.items():
        if tensor.device.type == "meta":
            raise CheckpointError(
                f"tensor {name!r} is on the meta device and has no data to save; "
                "load or materialise the model before save_shrunk"
            )
        tensor = tensor.detach()
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        key = (*storage, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if tensor.numel() and key in seen:
            tied[name] = seen[key]
            continue
        if tensor.numel() and storage in storages:
            tensor = tensor.clone()
        elif tensor.numel():
            storages[storage] = name
            seen[key] = name
        kept[name] = tensor.contiguous()
    return kept, tied


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes (C order, native little-endian layout as safetensors stores them)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


def tensor_table(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """``{name: {"dtype", "shape", "sha256"}}`` of the tensors a checkpoint writes."""
    table = {}
    for name, tensor in tensors.items():
        if tensor.dtype not in _DTYPE_NAMES:
            raise CheckpointError(
                f"tensor {name!r} has dtype {tensor.dtype}, which fermigates checkpoints do not support; "
                f"convert it to one of {sorted(str(d) for d in _DTYPE_NAMES)}"
            )
        table[name] = {
            "dtype": _DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "sha256": tensor_digest(tensor),
        }
    return table


def expected_shapes(module: nn.Module, attrs: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The shapes ``module``'s own tensors must have for the width attributes ``attrs`` of a manifest entry
    (builtin Linear / Conv / norms / Embedding and registered Linear-like layers; ``{}`` for other kinds)."""

    def get(name: str) -> Any:
        return attrs.get(name, getattr(module, name, None))

    try:
        if isinstance(module, nn.Linear):
            out = (int(get("out_features")),)
            return {"weight": out + (int(get("in_features")),), "bias": out}
        if isinstance(module, nn.modules.conv._ConvNd):
            o, i, g = int(get("out_channels")), int(get("in_channels")), int(get("groups"))
            first = (i, o // g) if module.transposed else (o, i // g)
            return {"weight": first + tuple(module.kernel_size), "bias": (o,)}
        if isinstance(module, nn.modules.batchnorm._NormBase):
            n = (int(get("num_features")),)
            return {k: n for k in ("weight", "bias", "running_mean", "running_var")}
        if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            shape = get("normalized_shape")
            shape = (int(shape),) if isinstance(shape, int) else tuple(int(d) for d in shape)
            return {"weight": shape, "bias": shape}
        if isinstance(module, nn.GroupNorm):
            n = (int(get("num_channels")),)
            return {"weight": n, "bias": n}
        if isinstance(module, nn.Embedding):
            return {"weight": (int(get("num_embeddings")), int(get("embedding_dim")))}
        layout = registry.lookup(registry.LINEAR_LIKE, module)
        if layout is not None and layout.in_attr in attrs and layout.out_attr in attrs:
            o, i = int(attrs[layout.out_attr]), int(attrs[layout.in_attr])
            return {"weight": (o, i) if layout.out_dim == 0 else (i, o), "bias": (o,)}
    except (TypeError, ValueError, AttributeError):
        raise CheckpointError(
            f"the manifest's widths for module of class {registry.qualname(type(module))} are not integers: "
            f"{attrs!r}"
        ) from None
    return {}


# --------------------------------------------------------------------------------------------- safetensors


def read_header(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The tensor table and ``__metadata__`` of a safetensors file, after checking it is complete.

    Raises CheckpointError when the file is truncated, has trailing bytes, or its header is not valid JSON,
    so that a damaged file is refused before any model is touched.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path} is truncated or not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(_MAX_HEADER, size - 8):
            raise CheckpointError(
                f"{path} is truncated or corrupt: header of {n} bytes in a {size}-byte file"
            )
        try:
            header = json.loads(handle.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path} is corrupt: its header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is corrupt: its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    end = 0
    for name, info in header.items():
        try:
            dtype = _DTYPES[info["dtype"]]
            start, stop = info["data_offsets"]
            numel = 1
            for dim in info["shape"]:
                numel *= int(dim)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"{path} is corrupt or uses an unsupported dtype at tensor {name!r}: {info!r}"
            ) from None
        if stop - start != numel * dtype.itemsize:
            raise CheckpointError(
                f"{path} is corrupt: tensor {name!r} has {stop - start} bytes for shape "
                f"{info['shape']} {info['dtype']}"
            )
        end = max(end, stop)
    if 8 + n + end != size:
        raise CheckpointError(
            f"{path} is truncated or corrupt: the header describes {8 + n + end} bytes, "
            f"the file has {size}; re-save the checkpoint"
        )
    return header, metadata


def header_dtype(info: dict[str, Any]) -> torch.dtype:
    return _DTYPES[info["dtype"]]


# ----------------------------------------------------------------------------------------- manifest I/O


def check_manifest(manifest: Any, where: str) -> dict[str, Any]:
    """Refuse a manifest that is not ours or is newer than this version of fermigates understands."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(
            f"{where} is not a fermigates shrunk-model manifest (format "
            f"{manifest.get('format') if isinstance(manifest, dict) else None!r})"
        )
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise CheckpointError(f"{where} has no integer format_version, got {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{where} has manifest format version {version}, newer than version "
            f"{FORMAT_VERSION} that this fermigates supports; upgrade fermigates"
        )
    if version < OLDEST_FORMAT_VERSION:
        raise CheckpointError(f"{where} has manifest format version {version}, which never existed; re-save it")
    if not isinstance(manifest.get("modules"), dict) or not isinstance(manifest.get("tied", {}), dict):
        raise CheckpointError(f"{where} is corrupt: 'modules' and 'tied' must be JSON objects")
    for path, entry in manifest["modules"].items():
        if not (isinstance(entry, dict) and isinstance(entry.get("class"), str)
                and isinstance(entry.get("attrs", {}), dict)):
            raise CheckpointError(
                f"{where} is corrupt: module entry {path!r} must be an object with a 'class' string and an "
                f"'attrs' object, got {entry!r}; re-save the checkpoint"
            )
    for alias, target in manifest["tied"].items():
        if not isinstance(target, str):
            raise CheckpointError(f"{where} is corrupt: tied entry {alias!r} must name a tensor, got {target!r}")
    table = manifest.get("tensors")
    if version >= 2 and not (
        isinstance(table, dict)
        and all(isinstance(v, dict) and isinstance(v.get("sha256"), str) for v in table.values())
    ):
        raise CheckpointError(
            f"{where} is corrupt: a version-{version} manifest needs a 'tensors' table with a dtype, shape and "
            "sha256 per tensor; re-save the checkpoint"
        )
    return manifest


def check_header_matches(manifest: dict[str, Any], header: dict[str, dict[str, Any]], weights: Path) -> None:
    """Refuse a safetensors header whose tensors (names, dtypes, shapes) differ from the manifest's table."""
    table = manifest.get("tensors")
    if table is None:  # version 1: no table
        return
    missing = sorted(set(table) - set(header))
    extra = sorted(set(header) - set(table))
    if missing:
        raise CheckpointError(
            f"{weights} is missing tensor {missing[0]!r} that its manifest lists; re-save the checkpoint"
        )
    if extra:
        raise CheckpointError(
            f"{weights} does not match its manifest: tensor {extra[0]!r} is in the file but not in the "
            "manifest; re-save the checkpoint"
        )
    for name, info in header.items():
        want = table[name]
        if info["dtype"] != want.get("dtype") or list(info["shape"]) != list(want.get("shape", [])):
            raise CheckpointError(
                f"{weights} does not match its manifest: tensor {name!r} is {info['dtype']} {info['shape']} in "
                f"the file, {want.get('dtype')} {want.get('shape')} in the manifest; re-save the checkpoint"
            )


def read_checkpoint(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, dict[str, Any]], Path]:
    """Validated ``(manifest, tensor header, weights path)`` of a checkpoint directory; touches no model."""
    root = Path(directory)
    if not root.exists():
        raise FileNotFoundError(f"checkpoint directory {str(root)!r} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(
            f"checkpoint path {str(root)!r} is a file, expected a directory written by save_shrunk"
        )
    weights = root / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{str(root)!r} has no {WEIGHTS_NAME}; is it a save_shrunk directory?")
    header, metadata = read_header(weights)
    embedded = metadata.get(METADATA_KEY)
    on_disk = root / MANIFEST_NAME
    file_manifest = None
    if on_disk.is_file():
        try:
            file_manifest = json.loads(on_disk.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            _logger.warning("%s is not valid JSON (%s); using the copy inside %s", on_disk, err, WEIGHTS_NAME)
    if embedded is not None:
        try:
            manifest = json.loads(embedded)
        except json.JSONDecodeError as err:
            raise CheckpointError(
                f"{weights} is corrupt: its embedded manifest is not JSON ({err})"
            ) from None
        if file_manifest is not None and file_manifest != manifest:
            _logger.warning(
                "%s differs from the manifest inside %s (an interrupted save?); using the "
                "embedded one, which was written together with the tensors",
                on_disk,
                weights,
            )
        where = f"{weights} (embedded manifest)"
    elif file_manifest is not None:
        manifest, where = file_manifest, str(on_disk)
    else:
        raise CheckpointError(
            f"{str(root)!r} has no fermigates manifest (neither {MANIFEST_NAME} nor "
            f"metadata in {WEIGHTS_NAME}); it was not written by save_shrunk"
        )
    manifest = check_manifest(manifest, where)
    check_header_matches(manifest, header, weights)
    for alias, target in manifest.get("tied", {}).items():
        if target not in header:
            raise CheckpointError(f"{weights} is missing tensor {target!r} that {alias!r} is tied to")
    return manifest, header, weights


# --------------------------------------------------------------------------------------------- atomic I/O


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms that cannot open directories (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_directory(directory: str | os.PathLike) -> Path:
    """``directory`` as a Path; refuse a path that is an existing file (before anything is written)."""
    root = Path(directory)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(
            f"cannot save into {str(root)!r}: it is a file, not a directory; pass a directory path"
        )
    return root


def ensure_directory(directory: str | os.PathLike) -> Path:
    """Create ``directory`` (and parents); refuse a path that is an existing file."""
    root = check_directory(directory)
    root.mkdir(parents=True, exist_ok=True)
    return root


def _temp_prefix(name: str) -> str:
    return f".{name}."


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through ``write(tmp_path)`` into a temp file beside it, fsync, then ``os.replace``.

    A crash at any point leaves either the old file or the new one, never a partial file under ``path``. The
    file gets the permissions a plain ``open()`` would give it (``0o666`` less the process umask).
    """
    while True:
        tmp = path.parent / f"{_temp_prefix(path.name)}{secrets.token_hex(6)}.tmp"
        try:  # created by open(2) with mode 0o666, so the kernel applies the umask as for any new file
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    try:
        mode = stat.S_IMODE(tmp.stat().st_mode)  # what the umask made of 0o666
        write(tmp)
        if stat.S_IMODE(tmp.stat().st_mode) != mode:  # writers that recreate the file (safetensors: 0o600)
            os.chmod(tmp, mode)
        with open(tmp, "rb+") as handle:
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def remove_stale_temps(root: Path) -> list[Path]:
    """Delete the temp files that a killed save left in ``root`` (``.model.safetensors.<random>.tmp`` ...);
    returns them. Call it with :func:`directory_lock` held, so that no other save's temp file is removed."""
    removed = []
    prefixes = tuple(_temp_prefix(n) for n in CHECKPOINT_FILES)
    with contextlib.suppress(OSError):
        for entry in root.iterdir():
            if entry.name.startswith(prefixes) and entry.name.endswith(".tmp") and entry.is_file():
                with contextlib.suppress(OSError):
                    entry.unlink()
                    removed.append(entry)
    if removed:
        _logger.info("removed %d temp file(s) left by an interrupted save in %s", len(removed), root)
    return removed


def sort_safetensors_metadata(path: Path) -> None:
    """Rewrite the ``__metadata__`` of the safetensors file at ``path`` with its keys sorted, in place.

    safetensors serialises the metadata from a hash map whose order changes from one process to the next, so
    the same model would give different bytes; the header is rewritten (same length, padded with spaces as
    the format allows) so that a model always gives the same file.
    """
    with open(path, "rb+") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            return
        (n,) = struct.unpack("<Q", raw)
        header = json.loads(handle.read(n))
        metadata = header.get("__metadata__")
        if not isinstance(metadata, dict) or list(metadata) == sorted(metadata):
            return
        header["__metadata__"] = dict(sorted(metadata.items()))
        header = {"__metadata__": header.pop("__metadata__"), **header}
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > n:  # cannot happen for a reordering; leave the file as safetensors wrote it
            return
        handle.seek(8)
        handle.write(text + b" " * (n - len(text)))


@contextlib.contextmanager
def directory_lock(root: Path, what: str = "save_shrunk") -> Iterator[None]:
    """Hold an exclusive advisory lock on the directory ``root`` (``flock`` on the directory itself, so no lock
    file is left behind); raise ``BlockingIOError`` at once when another process holds it. A no-op where
    ``fcntl`` does not exist (Windows)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    fd = os.open(root, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BlockingIOError(
                f"{what}: another process is writing a checkpoint into {str(root)!r} right now; wait for it to "
                "finish, or save into another folder (two saves into one folder at once are refused)"
            ) from None
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


@contextlib.contextmanager
def meta_parameters() -> Iterator[None]:
    """Inside, modules register their parameters on the meta device; buffers stay real.

    Buffers are kept real so that non-persistent ones (rotary ``inv_freq``, ``position_ids``), which no
    checkpoint holds, are computed as usual. Not thread-safe: it patches ``nn.Module.register_parameter``.
    """
    original = nn.Module.register_parameter

    def register_parameter(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(self, name, param)
        if type(param) is nn.Parameter and param.device.type != "meta":
            self._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]
