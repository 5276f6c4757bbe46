"""Export a (shrunk) model to ONNX that runs in onnxruntime without fermigates.

Uses the dynamo exporter (``torch.onnx.export(..., dynamo=True)``, i.e. ``torch.export`` + onnxscript): on
torch 2.14 it exports both timm CNNs and transformers v5 BERT with dynamic batch and sequence axes, whereas
the legacy TorchScript exporter fails on transformers v5 models (``BertModel.forward() got multiple values
for argument 'use_cache'``). ``exporter="torchscript"`` remains available for models it can trace.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fermigates.io.manifest import fsync_dir

_logger = logging.getLogger(__name__)

_EXPORTERS = ("dynamo", "torchscript")
#: above this many bytes of weights the tensors go to an external ``<name>.data`` file (protobuf limit 2 GiB)
_EXTERNAL_DATA_BYTES = 1_800_000_000


def _output_names(outputs: Any) -> list[str]:
    if isinstance(outputs, torch.Tensor):
        return ["output"]
    if isinstance(outputs, dict):  # includes transformers ModelOutput (None fields are already dropped)
        return [k for k, v in outputs.items() if isinstance(v, torch.Tensor)]
    if isinstance(outputs, (tuple, list)):
        return [f"output_{i}" for i, v in enumerate(outputs) if isinstance(v, torch.Tensor)]
    raise TypeError(
        f"the model must return a Tensor, a tuple of Tensors or a dict of Tensors, got "
        f"{type(outputs).__name__}"
    )


def _is_text(inputs: dict[str, Any]) -> bool:
    return any(
        isinstance(v, torch.Tensor) and v.dim() == 2 and not v.is_floating_point() for v in inputs.values()
    )


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    dynamic_batch: bool = True,
    dynamic_sequence: bool | None = None,
    opset: int | None = None,
    exporter: str = "dynamo",
    optimize: bool = True,
) -> Path:
    """Export ``model`` (put in eval mode for the export, flags restored after) to ``path``, atomically.

    ``example_inputs``: a Tensor, a tuple of positional Tensors, or a dict of keyword Tensors (an HF batch).
    Axis 0 of every input is dynamic when ``dynamic_batch``; axis 1 of every 2-D-or-more input is dynamic when
    ``dynamic_sequence`` (default: True when an input is a 2-D integer tensor, i.e. token ids). Prefer example
    sizes above 1 (a model may branch on a size of 1, which export then specialises). Inputs are named after
    the dict keys (else ``input`` / ``input_0``...), outputs after the model's output keys.
    ``optimize`` runs onnxscript's graph optimizer after a dynamo export (constant folding,
    fusion-friendly rewrites; slower export, same numbers).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__} {model!r:.60}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file path (str or os.PathLike), got {type(path).__name__}")
    if exporter not in _EXPORTERS:
        raise ValueError(f"exporter must be one of {_EXPORTERS}, got {exporter!r}")
    if isinstance(example_inputs, torch.Tensor):
        args, kwargs, names = (example_inputs,), {}, ["input"]
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs, names = tuple(example_inputs), {}, [f"input_{i}" for i in range(len(example_inputs))]
    elif isinstance(example_inputs, dict):
        args, kwargs, names = (), dict(example_inputs), list(example_inputs)
    else:
        raise TypeError(
            f"example_inputs must be a Tensor, a tuple or a dict of Tensors, got "
            f"{type(example_inputs).__name__}"
        )
    inputs = dict(zip(names, [*args, *kwargs.values()]))
    if dynamic_sequence is None:
        dynamic_sequence = _is_text(inputs)
    axes: dict[str, dict[int, str]] = {}
    for name, value in inputs.items():
        dims = {}
        if dynamic_batch and isinstance(value, torch.Tensor) and value.dim() >= 1:
            dims[0] = "batch"
        if dynamic_sequence and isinstance(value, torch.Tensor) and value.dim() >= 2:
            dims[1] = "sequence"
        if dims:
            axes[name] = dims
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(
            f"path must be a file name for the .onnx model, got the directory {str(target)!r}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    flags = {m: m.training for m in model.modules()}
    model.eval()
    workdir = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        with torch.no_grad():
            out_names = _output_names(model(*args, **kwargs))
        tmp = workdir / target.name  # same file name, so external-data references stay valid after the move
        options: dict[str, Any] = {"input_names": names, "output_names": out_names}
        if opset is not None:
            options["opset_version"] = opset
        if exporter == "dynamo":  # string dim names become named dynamic dims in the ONNX graph
            specs = [axes.get(n) for n in names]
            shapes = dict(zip(names, specs)) if kwargs else tuple(specs)
            big = sum(p.numel() * p.element_size() for p in model.parameters()) > _EXTERNAL_DATA_BYTES
            options.update(
                dynamo=True,
                dynamic_shapes=shapes if axes else None,
                external_data=big,
                optimize=optimize,
                verbose=False,
                report=False,
            )
        else:
            options.update(dynamo=False, dynamic_axes=axes or None)
        torch.onnx.export(model, args, str(tmp), kwargs=kwargs or None, **options)
        produced = sorted(workdir.iterdir(), key=lambda p: p == tmp)  # external data first, the model last
        for item in produced:
            with open(item, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(item, target.parent / item.name)
        fsync_dir(target.parent)
    finally:
        for m, flag in flags.items():
            m.training = flag
        with contextlib.suppress(OSError):
            shutil.rmtree(workdir)
    _logger.info("exported %s to %s with the %s exporter", type(model).__name__, target, exporter)
    return target
