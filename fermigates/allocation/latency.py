"""Measured latency as a budget: per-layer latency tables over candidate widths, on this machine.

For every module whose widths a pruning decision changes, a :class:`LatencyTable` holds its measured forward
time on the input shape it sees in the model (captured on the example inputs) at a small grid of kept widths
per changed axis (at most :data:`GRID` points per axis, on multiples of the gate's rounding), interpolated
linearly in between (as in hardware-aware latency pruning, e.g. HALP). Standalone copies are built for
``nn.Conv1d/2d/3d`` (dense and depthwise), ``nn.Linear`` and batch norms (with their own class, so a fused
norm + activation is timed with its activation); the time of any other module, and of everything a decision
does not change, is the rest: the whole model's measured time minus the tables' dense entries, taken as
fixed (so attention cores, say, are predicted not to get faster).

Timings are medians of round-robin rounds (every grid point and the whole model timed once per round, so a
change of load hits all alike) under ``torch.inference_mode`` with the current ``torch.get_num_threads()``,
made monotone in every width (more width never takes less time), and are
cached per (module kind, shapes, widths, threads, torch version) in memory and in
``$FERMIGATES_CACHE_DIR/latency.json`` (default ``~/.cache/fermigates``; ``FERMIGATES_CACHE_DIR=""`` turns the
file off), so a second prune of the same architecture measures nothing again.
"""

from __future__ import annotations

import bisect
import copy
import itertools
import json
import math
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..core.batches import call_model

__all__ = ["LatencyTable", "LatencyModel", "build_latency_model", "compare_latency"]

#: grid points per changed axis of a module (the dense width included)
GRID = 5
#: round-robin rounds (the median is kept) and the shortest burst timed at once
ROUNDS = 7
BURST_SECONDS = 0.002
_MEMORY_CACHE: dict[str, float] = {}
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


# -- cache ------------------------------------------------------------------------------------------------------
def _cache_file() -> Path | None:
    root = os.environ.get("FERMIGATES_CACHE_DIR")
    if root == "":
        return None
    return Path(root or Path.home() / ".cache" / "fermigates") / "latency.json"


def _load_cache() -> dict[str, float]:
    path = _cache_file()
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        return {k: float(v) for k, v in data.items()} if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_cache(entries: dict[str, float]) -> None:
    path = _cache_file()
    if path is None or not entries:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        merged = {**_load_cache(), **entries}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".latency-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(merged, f)
        os.replace(tmp, path)
    except OSError:
        pass  # a cache that cannot be written is only slower next time


def _machine_key() -> str:
    return f"{platform.machine()}|{platform.processor() or os.cpu_count()}|torch {torch.__version__}|" \
           f"threads {torch.get_num_threads()}"


# -- standalone modules -------------------------------------------------------------------------------------------
def _rebuild(module: nn.Module, shape: tuple[int, ...], kept: dict[str, int]) -> tuple[nn.Module, torch.Tensor] | None:
    """A fresh module of ``module``'s kind with the kept widths, and an input of the matching shape."""
    dtype = next(module.parameters()).dtype if any(True for _ in module.parameters()) else torch.float32
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        if "chan" in kept or (module.groups == module.in_channels == module.out_channels and module.groups > 1):
            c = kept.get("chan", kept.get("out", kept.get("in", module.out_channels)))
            cin = cout = groups = c
        elif module.groups == 1:
            cin, cout, groups = kept.get("in", module.in_channels), kept.get("out", module.out_channels), 1
        else:
            return None
        conv = type(module)(cin, cout, module.kernel_size, stride=module.stride, padding=module.padding,
                            dilation=module.dilation, groups=groups, bias=module.bias is not None,
                            padding_mode=module.padding_mode).to(dtype)
        return conv.eval(), torch.randn(shape[0], cin, *shape[2:], dtype=dtype)
    if isinstance(module, nn.Linear):
        cin, cout = kept.get("in", module.in_features), kept.get("out", module.out_features)
        return nn.Linear(cin, cout, bias=module.bias is not None).to(dtype).eval(), \
            torch.randn(*shape[:-1], cin, dtype=dtype)
    if isinstance(module, _NORMS) and set(kept) <= {"chan"}:
        c = kept.get("chan", module.num_features)
        norm = copy.deepcopy(module)  # its own class and settings (a fused activation, say), c channels
        norm.num_features = c
        for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if t.dim() == 1 and t.shape[0] == module.num_features:
                new = t.detach()[:c].clone()
                setattr(norm, name, nn.Parameter(new) if isinstance(t, nn.Parameter) else new)
        return norm.eval(), torch.randn(shape[0], c, *shape[2:], dtype=dtype)
    return None


def _grid(total: int, step: int, floor: int) -> list[int]:
    """Up to :data:`GRID` kept widths from ``floor`` to ``total``, on multiples of ``step`` (``total`` last)."""
    lo = max(1, min(total, floor))
    if total - lo < 1:
        return [total]
    points = sorted({min(total, max(lo, round((lo + (total - lo) * i / (GRID - 1)) / step) * step))
                     for i in range(GRID)} | {total})
    return points


@dataclass
class LatencyTable:
    """Measured seconds of one module at a grid of kept widths of its changed axes."""

    module: str
    axes: tuple[str, ...]
    totals: tuple[int, ...]
    grids: tuple[tuple[int, ...], ...] = ()
    #: seconds at every grid point (row-major over ``grids``); empty: proportional to the kept fractions
    seconds: tuple[float, ...] = ()
    dense: float = 0.0

    def __call__(self, fractions: tuple[float, ...]) -> float:
        """Seconds at the given kept fraction of each axis (multilinear interpolation on the grid)."""
        if not self.seconds:
            return self.dense * math.prod(fractions)
        per_axis = []
        for f, total, grid in zip(fractions, self.totals, self.grids):
            if len(grid) == 1:
                per_axis.append([(0, 1.0)])
                continue
            width = min(max(f * total, grid[0]), grid[-1])
            j = min(max(bisect.bisect_left(grid, width) - 1, 0), len(grid) - 2)
            t = (width - grid[j]) / (grid[j + 1] - grid[j])
            per_axis.append([(j, 1.0 - t), (j + 1, t)])
        out = 0.0
        for combo in itertools.product(*per_axis):
            index, weight = 0, 1.0
            for (i, w), grid in zip(combo, self.grids):
                index, weight = index * len(grid) + i, weight * w
            if weight:
                out += weight * self.seconds[index]
        return out


@dataclass
class LatencyModel:
    """Latency of the whole model as the tables of the modules pruning changes plus a fixed rest."""

    total: float
    tables: dict[str, LatencyTable] = field(default_factory=dict)
    measured_on: str = ""
    measure_seconds: float = 0.0
    #: the plain dense copy that was timed (``prune`` times it against the pruned model, then drops it)
    dense_model: Any = field(default=None, repr=False, compare=False)

    @property
    def rest(self) -> float:
        return self.total - sum(t.dense for t in self.tables.values())

    def predict(self, fractions: dict[tuple[str, str], float]) -> float:
        """Seconds for the kept fraction of each ``(module, axis)``."""
        return self.rest + sum(t(tuple(fractions.get((t.module, a), 1.0) for a in t.axes))
                               for t in self.tables.values())

    def rows(self) -> list[dict[str, Any]]:
        """One row per table: module, axes, dense milliseconds, measured points."""
        return [{"module": t.module, "axes": "+".join(t.axes), "dense_ms": 1e3 * t.dense,
                 "points": len(t.seconds) or "proportional"} for t in self.tables.values()]


def _input_shapes(model: nn.Module, names: set[str], example: Any) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    mods = dict(model.named_modules())

    def hook(name):
        def fn(mod, args):
            if name not in shapes and args and isinstance(args[0], torch.Tensor):
                shapes[name] = tuple(args[0].shape)
        return fn

    handles = [mods[n].register_forward_pre_hook(hook(n)) for n in names if n in mods]
    try:
        with torch.inference_mode():
            call_model(model, example)
    finally:
        for h in handles:
            h.remove()
    return shapes


def build_latency_model(model: nn.Module, example: Any, widths: dict[tuple[str, str], int],
                        steps: dict[tuple[str, str], int], floors: dict[tuple[str, str], int]) -> LatencyModel:
    """Measure the whole (plain, dense) ``model`` on ``example`` and a table for every module with a changed
    axis. ``widths``: ``(module, axis) -> dense width``; ``steps`` / ``floors``: the rounding step and the
    smallest kept width of each axis."""
    start = time.perf_counter()
    mods = dict(model.named_modules())
    by_module: dict[str, list[str]] = {}
    for (name, axis) in widths:
        by_module.setdefault(name, []).append(axis)
    shapes = _input_shapes(model, set(by_module), example)
    machine = _machine_key()
    cache = {**_load_cache(), **_MEMORY_CACHE}
    jobs: dict[str, Callable[[], Any]] = {"": lambda: call_model(model, example)}  # "": the whole model
    layout: dict[str, tuple[LatencyTable, list[str]]] = {}
    for name, axes in by_module.items():
        axes = sorted(axes)
        module = mods[name]
        table = LatencyTable(name, tuple(axes), tuple(widths[(name, a)] for a in axes))
        shape = shapes.get(name)
        if shape is None or len(axes) > 2 or any(a.startswith("param:") for a in axes) \
                or _rebuild(module, shape, {}) is None:
            continue  # no standalone copy: its time stays in the rest, as if pruning did not change it
        table.grids = tuple(tuple(_grid(t, steps.get((name, a), 1), floors.get((name, a), 1)))
                            for a, t in zip(axes, table.totals))
        keys = []
        for point in itertools.product(*table.grids):
            kept = dict(zip(axes, point))
            key = f"{machine}|{type(module).__name__}|{_signature(module)}|{shape}|{sorted(kept.items())}"
            keys.append(key)
            if key not in cache and key not in jobs:
                built, x = _rebuild(module, shape, kept)
                jobs[key] = (lambda built=built, x=x: built(x))
        layout[name] = (table, keys)
    timed = _time_all(jobs)
    total = timed.pop("")
    _MEMORY_CACHE.update(timed)
    _save_cache(timed)
    cache.update(timed)
    tables = {}
    for name, (table, keys) in layout.items():
        values = torch.tensor([cache[k] for k in keys], dtype=torch.float64).reshape([len(g) for g in table.grids])
        for dim in range(values.dim()):  # more width never takes less time: what is left after is noise
            values = values.cummax(dim).values
        table.seconds = tuple(values.flatten().tolist())
        table.dense = table(tuple(1.0 for _ in table.axes))
        tables[name] = table
    desc = (f"measured with {torch.get_num_threads()} thread(s): medians of {ROUNDS} round-robin rounds under "
            "inference_mode")
    return LatencyModel(total, tables, desc, time.perf_counter() - start)


def _time_all(jobs: dict[str, Callable[[], Any]]) -> dict[str, float]:
    """Median seconds of every job, timed round-robin (one burst of each per round, so that a change of load
    hits all alike), bursts of at least :data:`BURST_SECONDS`."""
    repeat: dict[str, int] = {}
    with torch.inference_mode():
        for key, fn in jobs.items():
            fn()
            t0 = time.perf_counter()
            fn()
            repeat[key] = max(1, min(100, math.ceil(BURST_SECONDS / max(time.perf_counter() - t0, 1e-7))))
        times: dict[str, list[float]] = {k: [] for k in jobs}
        for _ in range(ROUNDS):
            for key, fn in jobs.items():
                t0 = time.perf_counter()
                for _ in range(repeat[key]):
                    fn()
                times[key].append((time.perf_counter() - t0) / repeat[key])
    return {k: statistics.median(v) for k, v in times.items()}


def compare_latency(models: dict[str, Callable[[], Any]]) -> dict[str, float]:
    """Median seconds of each callable, timed round-robin in one go (for before / after comparisons)."""
    return _time_all(models)


def _signature(module: nn.Module) -> str:
    keys = ("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode", "in_channels",
            "out_channels", "in_features", "out_features", "num_features", "affine")
    return ",".join(f"{k}={getattr(module, k)}" for k in keys if hasattr(module, k)) + \
        f",bias={getattr(module, 'bias', None) is not None}"


