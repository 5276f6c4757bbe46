"""What a shrunk checkpoint holds, read from its manifest and safetensors header without building a model."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fermigates.io import manifest as mf
from fermigates.surgery.macs import macs_by_module


def macs_record(model: nn.Module, example_inputs: Any) -> dict[str, Any]:
    """Multiply-accumulates of one eval-mode forward on ``example_inputs``, per module and in total
    (counted by :func:`fermigates.surgery.macs.macs_by_module`)."""
    per_module = macs_by_module(model, example_inputs)
    return {"inputs": describe_inputs(example_inputs), "total": sum(per_module.values()), "modules": per_module}


def describe_inputs(inputs: Any) -> Any:
    if isinstance(inputs, torch.Tensor):
        return {"shape": list(inputs.shape), "dtype": str(inputs.dtype).removeprefix("torch.")}
    if isinstance(inputs, dict):
        return {k: describe_inputs(v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return [describe_inputs(v) for v in inputs]
    return repr(inputs)


def describe_text(desc: Any) -> str:
    """A recorded input description as a reader writes it: ``float32[1, 3, 224, 224]``, ``{input_ids:
    int64[1, 12], ...}``."""
    if isinstance(desc, dict) and "shape" in desc and "dtype" in desc:
        return f"{desc['dtype']}[{', '.join(map(str, desc['shape']))}]"
    if isinstance(desc, dict):
        return "{" + ", ".join(f"{k}: {describe_text(v)}" for k, v in desc.items()) + "}"
    if isinstance(desc, (list, tuple)):
        return "(" + ", ".join(describe_text(v) for v in desc) + ")"
    return str(desc)


@dataclass
class CheckpointSummary:
    """What ``inspect_checkpoint`` found: sizes, per-module widths, and MACs when an input size was known."""

    directory: str
    format_version: int
    model_class: str
    source: str
    params: int
    tensors: int
    file_bytes: int
    widths: dict[str, dict[str, Any]] = field(default_factory=dict)
    tied: dict[str, str] = field(default_factory=dict)
    macs: int | None = None
    macs_inputs: Any = None
    #: ``{block-list path: {"original": count, "kept": [original indices]}}`` of a depth-pruned model
    removed_blocks: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [
            f"fermigates checkpoint {self.directory} (format v{self.format_version})",
            f"  model   {self.model_class}  [{self.source}]",
            f"  params  {self.params:,} in {self.tensors} tensors, {self.file_bytes / 2**20:.2f} MiB on disk",
            f"  MACs    {self.macs:,} per forward of {describe_text(self.macs_inputs)}"
            if self.macs is not None
            else "  MACs    unknown (save with example_inputs=... to record them)",
        ]
        for path, entry in self.removed_blocks.items():
            gone = sorted(set(range(entry["original"])) - set(entry["kept"]))
            lines.append(f"  depth   {path}: {len(entry['kept'])} of {entry['original']} blocks (removed {gone})")
        if self.tied:
            lines.append("  tied    " + ", ".join(f"{a} -> {b}" for a, b in self.tied.items()))
        width = max((len(p) for p in self.widths), default=6)
        lines.append(f"  {'module':<{width}}  widths")
        for path, attrs in self.widths.items():
            lines.append(f"  {path or '<root>':<{width}}  " + ", ".join(f"{k}={v}" for k, v in attrs.items()))
        return "\n".join(lines)


def inspect_checkpoint(directory: str | os.PathLike) -> CheckpointSummary:
    """Summarise a ``save_shrunk`` directory (validated as ``load_shrunk`` does, checksums aside) without
    building a model. Raises ``CheckpointError`` for anything that is not a readable checkpoint directory."""
    try:
        manifest, header, weights = mf.read_checkpoint(directory)
    except OSError as err:  # a file path, a missing folder, an unreadable file
        raise mf.CheckpointError(f"cannot inspect {str(directory)!r}: {err}") from None
    source = manifest.get("source", {})
    kind = source.get("kind", "custom")
    label = {"timm": f"timm:{source.get('name')}", "hf": f"transformers:{source.get('class')}"}.get(
        kind, kind
    )
    numel = sum(math.prod(info["shape"]) for info in header.values())
    macs = manifest.get("macs") or {}
    return CheckpointSummary(
        directory=str(Path(directory)),
        format_version=manifest["format_version"],
        model_class=manifest.get("model_class", "?"),
        source=label,
        params=int(manifest.get("n_parameters", numel)),
        tensors=len(header),
        file_bytes=weights.stat().st_size,
        widths={p: e.get("attrs", {}) for p, e in manifest["modules"].items()},
        tied=dict(manifest.get("tied", {})),
        macs=macs.get("total"),
        macs_inputs=macs.get("inputs"),
        removed_blocks=dict(manifest.get("removed_blocks") or {}),
    )
