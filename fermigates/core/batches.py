"""Batches and model calls: the shapes of data every part of the library accepts, read the same way everywhere.

A *batch* is a tensor of inputs, a tuple ``(inputs, labels, ...)`` or a Hugging Face style mapping of keyword
arguments (``labels`` optional). *Example inputs* are a tensor, a tuple of positional arguments or a mapping of
keyword arguments, passed to the model as they are.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

#: keys of a mapping batch that hold labels, not model inputs
DROP_KEYS = ("labels", "label")


def as_batches(data: Any, batch_size: int, max_batches: int | None, name: str = "data") -> list[Any]:
    """``data`` (a tensor, a DataLoader or an iterable of batches) as a list of batches, read once."""
    if isinstance(data, torch.Tensor):
        if data.dim() == 0 or data.shape[0] == 0:
            raise ValueError(f"{name} is an empty tensor: give at least one sample (a batch dimension first)")
        batches = list(data.split(batch_size))
    elif isinstance(data, (Mapping, str, bytes)) or not isinstance(data, Iterable):
        raise TypeError(f"{name} must be a DataLoader, an iterable of batches or a tensor, got {type(data).__name__}")
    else:
        batches = list(data)
    if max_batches is not None:
        batches = batches[:max_batches]
    if not batches:
        raise ValueError(f"{name} is empty: it yielded no batch (check the DataLoader / max_batches)")
    return batches


def check_batches_finite(batches: list, name: str) -> None:
    """Raise ``ValueError`` naming the first batch (and key) with NaN / inf floating-point values."""
    for i, batch in enumerate(batches):
        items = batch.items() if isinstance(batch, Mapping) else enumerate(
            batch if isinstance(batch, (tuple, list)) else [batch])
        for key, value in items:
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                where = f"[{key!r}]" if isinstance(batch, Mapping) else (f"[{key}]" if isinstance(batch, (tuple, list)) else "")
                raise ValueError(f"{name} batch {i}{where} holds NaN/inf values; nothing was changed")


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model with neither)."""
    p = next(itertools.chain(model.parameters(), model.buffers()), None)
    return p.device if p is not None else torch.device("cpu")


def to_device(x: Any, device: torch.device) -> Any:
    return x.to(device) if isinstance(x, torch.Tensor) else x


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(model inputs, labels or None)`` of a batch: a tensor, ``(x, y, ...)`` or an HF-style mapping."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        labels = next((batch[k] for k in DROP_KEYS if k in batch), None)
        return {k: v for k, v in batch.items() if k not in DROP_KEYS}, labels
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0], (batch[1] if len(batch) > 1 else None)
    raise TypeError(f"a training batch must be a tensor, a tuple (inputs, labels) or a dict, got {type(batch).__name__}")


def call_inputs(model: nn.Module, inputs: Any, device: torch.device) -> Any:
    """Run ``model`` on the inputs part of a batch (a tensor or a mapping of keyword arguments) on ``device``."""
    if isinstance(inputs, Mapping):
        return model(**{k: to_device(v, device) for k, v in inputs.items()})
    return model(to_device(inputs, device))


def feed(model: nn.Module, batch: Any) -> Any:
    """Run ``model`` on one batch (tensor, ``(inputs, ...)`` or keyword mapping; labels dropped) on its device."""
    device = device_of(model)
    if isinstance(batch, torch.Tensor):
        return model(batch.to(device))
    if isinstance(batch, Mapping):
        return model(**{k: to_device(v, device) for k, v in batch.items() if k not in DROP_KEYS})
    if isinstance(batch, (tuple, list)) and batch:
        return model(to_device(batch[0], device))
    raise ValueError(f"cannot feed a batch of type {type(batch)!r} to the model")


def feed_no_grad(model: nn.Module, batch: Any) -> None:
    with torch.no_grad():
        feed(model, batch)


def attention_mask(batch: Any) -> torch.Tensor | None:
    """The batch's ``attention_mask`` as a bool tensor, when it is a mapping that has one."""
    if isinstance(batch, Mapping) and isinstance(batch.get("attention_mask"), torch.Tensor):
        return batch["attention_mask"].bool()
    return None


def first_sample(batch: Any) -> Any:
    """The first sample of a batch as example inputs (labels dropped)."""
    if isinstance(batch, Mapping):
        return {k: v[:1] if isinstance(v, torch.Tensor) else v for k, v in batch.items() if k not in DROP_KEYS}
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"a calibration batch must be a tensor, a tuple (inputs, ...) or a dict, got {type(batch).__name__}")
    return batch[:1]


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Run ``model`` on example inputs given as a tensor, a tuple of positional args or a dict of kwargs."""
    if isinstance(inputs, torch.Tensor):
        return model(inputs)
    if isinstance(inputs, Mapping):
        return model(**dict(inputs))
    if isinstance(inputs, (list, tuple)):
        return model(*inputs)
    raise TypeError(f"example_inputs must be a Tensor, a tuple of positional args or a dict of kwargs, "
                    f"got {type(inputs).__name__}")


def walk_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside a (nested) tensor / tuple / list / dict / dataclass output."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from walk_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from walk_tensors(v)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from walk_tensors(getattr(obj, f.name, None))


def output_tensors(out: Any) -> list[torch.Tensor]:
    """The floating-point tensors of a model output (tensor, tuple, dict or HF ModelOutput), in order."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict) or hasattr(out, "to_tuple"):
        items: Iterable[Any] = out.values()
    elif isinstance(out, (tuple, list)):
        items = out
    else:
        return []
    return [t for item in items for t in output_tensors(item)]


def max_relative_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Largest ``|a - b| / max(1, max|a|)`` over paired tensors; inf when the structures differ or any value
    is NaN / inf (two NaN outputs are not "equal")."""
    if len(a) != len(b):
        return float("inf")
    worst = 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape or not (bool(torch.isfinite(x).all()) and bool(torch.isfinite(y).all())):
            return float("inf")
        scale = max(1.0, float(x.abs().max())) if x.numel() else 1.0
        worst = max(worst, float((x.float() - y.float()).abs().max()) / scale if x.numel() else 0.0)
    return worst


class BatchStream:
    """The batches of ``data`` for a training loop: the first ones can be looked at (and kept for calibration)
    without being lost to training, a re-iterable ``data`` (list, DataLoader) is cycled epoch after epoch, and a
    one-shot iterator (a generator) that runs out stops with a clear error instead of spinning."""

    def __init__(self, data: Iterable[Any], name: str = "data") -> None:
        if isinstance(data, (torch.Tensor, Mapping, str, bytes)) or not isinstance(data, Iterable):
            raise TypeError(f"{name} must be a DataLoader or an iterable of batches, got {type(data).__name__}")
        self.data, self.name = data, name
        self._source: Iterator[Any] = iter(data)
        self.one_shot = self._source is data
        self._ahead: list[Any] = []
        self._served = 0
        self._epoch_batches = 0

    def peek(self, n: int = 1) -> list[Any]:
        """Up to ``n`` first batches, read ahead and still served to training afterwards."""
        while len(self._ahead) < n:
            batch = next(self._source, _END)
            if batch is _END:
                break
            self._ahead.append(batch)
        return self._ahead[:n]

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Any:
        if self._ahead:
            self._served += 1
            self._epoch_batches += 1
            return self._ahead.pop(0)
        batch = next(self._source, _END)
        if batch is _END:
            if self.one_shot:
                raise ValueError(
                    f"{self.name} ran out after {self._served} batches: it is a one-shot iterator (a generator), "
                    "which can be read only once; pass a list or a DataLoader (re-read every epoch), or ask for "
                    f"at most {self._served} steps")
            if self._epoch_batches == 0:
                raise ValueError(f"{self.name} is empty: it yielded no batch")
            self._source, self._epoch_batches = iter(self.data), 0
            return next(self)
        self._served += 1
        self._epoch_batches += 1
        return batch


_END = object()
