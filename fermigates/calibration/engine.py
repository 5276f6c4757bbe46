"""Closed-form ridge calibration of pruned layers, folded into their weights.

After pruning, a layer that lost input channels (or whose inputs drifted because earlier layers were pruned)
no longer reproduces the dense model's output. :func:`calibrate` streams, per target layer and in network
order, the layer's input ``X`` in the *pruned* model and the dense reference layer's output ``Y`` (restricted
to the kept outputs), accumulates ``XᵀX`` / ``XᵀY`` in float64 and writes the ridge solution back into the
layer. Each layer sees the inputs produced by the already-calibrated layers before it.

Execution: every batch's forward runs as a suspendable coroutine (see ``_coroutine``) that waits inside the
target layer's hook until that layer is solved, so the pruned model and the reference each run about once
over the data whatever the number of layers (``low_memory=True`` instead re-runs one batch at a time from
the start for every layer: ``O(layers)`` forwards, memory of one batch).
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..core.batches import as_batches, attention_mask, check_batches_finite, feed_no_grad
from ..core.registry import residual_sources
from . import stream as co
from .report import CalibrationReport, LayerCalibration
from .ridge import SUPPORTED, LayerPlan, RidgeStats, is_supported, ridge_solve, weight_2d

_logger = logging.getLogger(__name__)

__all__ = ["calibrate", "CalibrationReport", "LayerCalibration", "CalibrationError", "check_batches_finite", "residual_key"]

Targets = Mapping[str, "tuple[torch.Tensor | None, torch.Tensor | None]"]


class CalibrationError(RuntimeError):
    """A calibration batch failed in the model or the reference; the model was restored."""


def calibrate(
    model: nn.Module,
    data: Any,
    *,
    reference: nn.Module,
    targets: Targets | None = None,
    ridge: float = 1e-2,
    max_batches: int | None = None,
    batch_size: int = 32,
    low_memory: bool = False,
    precision: str = "auto",
    progress: bool = True,
    residual: bool = True,
    recorded: "Mapping[str, list[torch.Tensor]] | None" = None,
) -> CalibrationReport:
    """Re-fit the weights of pruned layers so they reproduce the dense ``reference``'s outputs.

    Args:
        model: the pruned model (plain ``nn.Linear`` / ``nn.Conv1d/2d/3d``, some physically shrunk);
            modified in place.
        data: a DataLoader or any iterable of batches (tensor, tuple/list whose first element is the input,
            or a mapping of keyword arguments such as a Hugging Face batch; ``labels`` keys are dropped), or
            one tensor split into batches of ``batch_size``. An ``attention_mask`` in a mapping batch
            excludes padding positions from the statistics of Linear layers.
        reference: the dense model before pruning, modules matched by name (left unchanged).
        targets: fqn -> ``(kept_in, kept_out)``, index tensors relative to the reference layer (None = all).
            None: every layer whose weight equals the reference's with some whole input columns / output
            rows zeroed (hard-masked); physically shrunk layers then need explicit targets.
        ridge: ``λ / mean(diag(XᵀX))``; the solve is pulled toward the layer's current weights.
        max_batches: use at most this many batches.
        low_memory: re-run each batch from the start for every layer instead of keeping all batches'
            forwards suspended (slower, memory of one batch).
        precision: ``"float64"``: each batch's ``XᵀX`` / ``XᵀY`` products in float64; ``"auto"``: in float32
            (then summed in float64) when the inputs are float32 and ``ridge >= 1e-4``, which halves the
            cost at no visible loss, else float64.
        progress: show a tqdm bar.
        residual: for a projection whose output is added to a residual stream (BERT's ``output.dense``,
            LLaMA's ``o_proj`` / ``down_proj``, GPT-2's ``c_proj``: found by the converters), fit the dense
            output plus the drift of the residual (dense residual - pruned residual), so that the sum the next
            norm sees matches the dense model's; each such layer then also repairs the layers before it.
        recorded: the reference's outputs already computed on these batches, ``{layer name: [output of
            batch 0, batch 1, ...]}`` (e.g. recorded by the selection pass of :func:`fermigates.prune`); when
            every target layer is in it, the reference is not run at all.

    Returns:
        A :class:`CalibrationReport` with one row per calibrated layer. On any error the target layers'
        weights are restored and the error is raised (:class:`CalibrationError` names the batch).
    """
    if reference is model:
        raise ValueError("reference must be the dense model before pruning, a different object than model")
    check_ridge(ridge)
    if precision not in ("auto", "float64"):
        raise ValueError(f"precision must be 'auto' or 'float64', got {precision!r}")
    plans = _make_plans(model, reference, targets)
    batches = as_batches(data, batch_size, max_batches)
    report = CalibrationReport(ridge=ridge, n_batches=len(batches))
    residuals = _residual_sources(model, plans) if residual else {}
    needed = [p.name for p in plans] + [residual_key(n) for n in residuals]
    if recorded is not None and not all(len(recorded.get(n, ())) == len(batches) for n in needed):
        recorded = None  # not every target was recorded: run the reference
    if not plans:
        _logger.warning("calibrate: no target layer (nothing pruned?); model left unchanged")
        return report
    snapshot = {p.name: [t.detach().clone() for t in _params(p.module)] for p in plans}
    modes = {m: m.training for m in itertools.chain(model.modules(), reference.modules())}
    model.eval()
    reference.eval()
    start = time.perf_counter()
    try:
        _Engine(model, reference, plans, batches, ridge, report, low_memory, progress, precision, recorded,
                residuals).run()
    except BaseException:
        with torch.no_grad():
            for p in plans:
                for t, saved in zip(_params(p.module), snapshot[p.name]):
                    t.copy_(saved)
        raise
    finally:
        for m, mode in modes.items():
            m.training = mode
    report.seconds = time.perf_counter() - start
    report.reference_run = recorded is None
    return report


def check_ridge(ridge: Any) -> float:
    """``ridge`` as a finite number >= 0, else a ValueError naming it."""
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not math.isfinite(ridge) or ridge < 0:
        raise ValueError(f"ridge must be a finite number >= 0 (e.g. 1e-2), got {ridge!r}")
    return float(ridge)


def check_stats_finite(name: str, stats: RidgeStats, w0: torch.Tensor) -> None:
    """Refuse non-finite calibration statistics (inputs so large that their products overflow), naming the layer
    and the largest input magnitude."""
    if bool(torch.isfinite(stats.xtx).all()) and bool(torch.isfinite(stats.xty).all()) and \
            bool(torch.isfinite(stats.yy).all()) and bool(torch.isfinite(w0).all()):
        return
    raise CalibrationError(
        f"the calibration statistics of {name!r} overflowed (sums of squared inputs / outputs are NaN/inf: the "
        "calibration data or the activations it produces are too large to square in float64/float32); nothing "
        "was changed: scale the calibration data to the range the model was trained on")


# -- targets ------------------------------------------------------------------------------------------------
def residual_key(name: str) -> str:
    """The key under which the dense residual added to layer ``name``'s output is recorded."""
    return f"{name}#residual"


def _residual_sources(model: nn.Module, plans: list[LayerPlan]) -> dict[str, tuple[str, Any]]:
    """Target layers whose output joins a residual stream: ``{layer: (module fqn, getter)}`` (Linear-like only;
    the module must exist in the model)."""
    found = residual_sources(model)
    mods = dict(model.named_modules())
    return {p.name: found[p.name] for p in plans
            if p.name in found and not p.is_conv and found[p.name][0] in mods}



def _params(m: nn.Module) -> list[torch.Tensor]:
    return [m.weight] + ([m.bias] if m.bias is not None else [])


def _expected_shape(ref: nn.Module, kept_in: torch.Tensor | None, kept_out: torch.Tensor | None,
                    groups: int) -> tuple[int, int]:
    w = weight_2d(ref)
    n_out = w.shape[0] if kept_out is None else len(kept_out)
    n_in = (w.shape[1] * ref.groups if isinstance(ref, SUPPORTED[1:]) else w.shape[1])
    n_in = n_in if kept_in is None else len(kept_in)
    return n_out, n_in // groups


def _check_index(name: str, what: str, idx: Any, size: int) -> torch.Tensor | None:
    if idx is None:
        return None
    idx = torch.as_tensor(idx)
    if idx.dtype == torch.bool:
        idx = idx.nonzero().flatten()
    if idx.dim() != 1 or idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"targets[{name!r}] {what} must be a 1-d index tensor, got {idx!r}")
    idx = idx.long().cpu()
    if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= size or len(idx.unique()) != len(idx)):
        raise ValueError(f"targets[{name!r}] {what} must hold distinct indices in [0, {size}), got {idx.tolist()}")
    return idx


def _make_plans(model: nn.Module, reference: nn.Module, targets: Targets | None) -> list[LayerPlan]:
    mods, refs = dict(model.named_modules()), dict(reference.named_modules())
    layers = {n for n, m in mods.items() if is_supported(m)}
    ref_layers = {n for n, m in refs.items() if is_supported(m)}
    if layers != ref_layers:
        missing, extra = sorted(layers - ref_layers)[:5], sorted(ref_layers - layers)[:5]
        raise ValueError(
            "reference does not match model: Linear/Conv module names differ "
            f"(only in model: {missing}, only in reference: {extra}); pass the dense model before pruning"
        )
    if targets is None:
        return _infer_plans(mods, refs)
    plans = []
    for name, pair in targets.items():
        if name not in layers:
            raise ValueError(f"targets key {name!r} is not a Linear/Conv module of model (and reference)")
        m, r = mods[name], refs[name]
        if type(m) is not type(r) and not (isinstance(m, type(r)) or isinstance(r, type(m))):
            raise ValueError(f"reference layer {name!r} is a {type(r).__name__}, model's is {type(m).__name__}")
        if (m.bias is None) != (r.bias is None):
            raise ValueError(f"layer {name!r}: model and reference disagree on having a bias")
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(f"targets[{name!r}] must be a (kept_in, kept_out) pair, got {pair!r}")
        is_conv = isinstance(m, SUPPORTED[1:])
        mw, rw = weight_2d(m), weight_2d(r)
        n_in_ref = r.in_channels if is_conv else rw.shape[1]
        kept_in = _check_index(name, "kept_in", pair[0], n_in_ref)
        kept_out = _check_index(name, "kept_out", pair[1], rw.shape[0])
        want = _expected_shape(r, kept_in, kept_out, m.groups if is_conv else 1)
        if tuple(mw.shape[:2]) != want or mw.shape[2:] != rw.shape[2:]:
            raise ValueError(
                f"layer {name!r} has weight shape (out, in) {tuple(mw.shape)}, but the reference's "
                f"{tuple(rw.shape)} with kept_in/kept_out of sizes "
                f"{None if kept_in is None else len(kept_in)}/{None if kept_out is None else len(kept_out)} "
                f"gives {want} in the first two dims"
            )
        if is_conv:
            for attr in ("kernel_size", "stride", "dilation", "padding", "padding_mode"):
                if getattr(m, attr) != getattr(r, attr):
                    raise ValueError(f"conv {name!r}: {attr} differs from the reference's "
                                     f"({getattr(m, attr)!r} vs {getattr(r, attr)!r})")
        plans.append(LayerPlan(name, m, r, kept_in, kept_out))
    return plans


def _infer_plans(mods: dict[str, nn.Module], refs: dict[str, nn.Module]) -> list[LayerPlan]:
    """Hard-masked layers: weight == reference's with whole input columns and/or output rows zeroed."""
    plans = []
    for name, m in mods.items():
        if not is_supported(m):
            continue
        r = refs[name]
        if m.weight.shape != r.weight.shape:
            raise ValueError(
                f"layer {name!r} was shrunk ({tuple(r.weight.shape)} -> {tuple(m.weight.shape)}): which "
                "channels were kept cannot be inferred from shapes; pass targets={fqn: (kept_in, kept_out)} "
                "(e.g. from shrink_model's ShrinkResult.changes) or use fermigates.convert_from_fermi"
            )
        w, rw = weight_2d(m).detach(), weight_2d(r).detach().to(m.weight.device, m.weight.dtype)
        if torch.equal(w, rw):
            continue
        zero = w == 0
        if not torch.equal(torch.where(zero, torch.zeros_like(rw), rw), w):
            _logger.info("calibrate: %s differs from the reference beyond a mask; not a target", name)
            continue
        red = tuple(d for d in range(w.dim()) if d != 1)
        dead_in = zero.all(dim=red) if w.dim() > 1 else zero
        dead_out = zero.flatten(1).all(dim=1)
        if m.bias is not None:
            dead_out &= m.bias.detach() == 0
        groups = getattr(m, "groups", 1)
        sel_in = (~dead_in).nonzero().flatten().cpu() if groups == 1 and bool(dead_in.any()) else None
        sel_out = (~dead_out).nonzero().flatten().cpu() if groups == 1 and bool(dead_out.any()) else None
        block = w
        if sel_out is not None:
            block = block.index_select(0, sel_out.to(w.device))
        if sel_in is not None:
            block = block.index_select(1, sel_in.to(w.device))
        rblock = rw
        if sel_out is not None:
            rblock = rblock.index_select(0, sel_out.to(w.device))
        if sel_in is not None:
            rblock = rblock.index_select(1, sel_in.to(w.device))
        if bool(((block == 0) & (rblock != 0)).any()):
            _logger.warning("calibrate: %s has unstructured zeros (weight-level mask): not calibrated, since "
                            "a dense solve would refill them", name)
            continue
        plans.append(LayerPlan(name, m, r, sel_in, None, sel_in=sel_in, sel_out=sel_out))
    return plans


# -- engine ---------------------------------------------------------------------------------------------------
class _Engine:
    """Drives the suspendable forwards of both models layer by layer (see module docstring)."""

    def __init__(self, model, reference, plans, batches, ridge, report, low_memory, progress, precision,
                 recorded=None, residuals=None):
        self.model, self.reference, self.batches = model, reference, batches
        self.recorded = recorded
        self.residuals = residuals or {}
        self.resid: dict[tuple[str, int, str], torch.Tensor] = {}  # (role, batch, layer) -> residual
        self.plans = {p.name: p for p in plans}
        self.ridge, self.report, self.low_memory, self.progress = ridge, report, low_memory, progress
        self.precision = precision
        self.done: set[str] = set()
        self.live: list[co.Coroutine] = []

    def _hooks(self) -> list[Any]:
        handles = []
        for name, plan in self.plans.items():
            def pre(mod, args, name=name):
                c = co.current()
                if c is not None and c.role == "model" and name not in self.done:
                    c.suspend((name, args[0]))

            def post(mod, args, out, name=name):
                c = co.current()
                if c is not None and c.role == "reference" and name not in self.done:
                    c.suspend((name, out))

            handles.append(plan.module.register_forward_pre_hook(pre))
            handles.append(plan.reference.register_forward_hook(post))
        nets = {"model": dict(self.model.named_modules()), "reference": dict(self.reference.named_modules())}
        for name, (where, getter) in self.residuals.items():
            for role in ("model",) if self.recorded is not None else ("model", "reference"):
                def grab(mod, args, kwargs, name=name, role=role, getter=getter):
                    c = co.current()
                    if c is not None and c.role == role and name not in self.done \
                            and (role, c.index, name) not in self.resid:
                        value = getter(args, kwargs)
                        if isinstance(value, torch.Tensor):
                            self.resid[(role, c.index, name)] = value.detach()
                handles.append(nets[role][where].register_forward_pre_hook(grab, with_kwargs=True))
        return handles

    def _start(self, role: str, i: int) -> co.Coroutine:
        net = self.model if role == "model" else self.reference
        c = co.Coroutine(lambda: feed_no_grad(net, self.batches[i]), role, i)
        self.live.append(c)
        self._step(c)
        return c

    def _step(self, c: co.Coroutine) -> None:
        try:
            c.resume()
        except (co.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:
            which = "model" if c.role == "model" else "reference model"
            raise CalibrationError(f"calibration batch {c.index} failed in the {which}: "
                                   f"{type(exc).__name__}: {exc}") from exc

    def run(self) -> None:
        from tqdm.auto import tqdm

        handles = self._hooks()
        bar = tqdm(total=len(self.plans), desc="calibrate", disable=not self.progress, leave=False)
        try:
            n = len(self.batches)
            if not self.low_memory:
                pairs = [(self._start("model", i), None if self.recorded is not None else
                          self._start("reference", i)) for i in range(n)]
            while len(self.done) < len(self.plans):
                if self.low_memory:
                    pairs = [(None, None)] * n
                name = self._layer(pairs)
                if name is None:
                    missing = sorted(set(self.plans) - self.done)
                    raise ValueError(f"target layers never ran in the model's forward: {missing}")
                bar.set_postfix_str(name)
                self._solve(name, pairs)
                bar.update(1)
        finally:
            bar.close()
            for c in self.live:
                c.close()
            self.live.clear()
            for h in handles:
                h.remove()

    def _layer(self, pairs) -> str | None:
        """Next layer to solve: where the first batch's pruned forward waits."""
        for i, (m, _) in enumerate(pairs):
            if m is None:
                m = self._start("model", i)
                pairs[i] = (m, None)
            if m.pending is not None:
                return m.pending[0]
        return None

    def _solve(self, name: str, pairs) -> None:
        plan, t0 = self.plans[name], time.perf_counter()
        stats, stats_s = None, 0.0
        for i, (m, r) in enumerate(pairs):
            if m is None:
                m = self._start("model", i)
            while m.pending is not None and m.pending[0] != name and self.low_memory:
                self._step(m)  # low memory: a fresh forward may first meet layers solved later
            if m.pending is None or m.pending[0] != name:
                _logger.debug("batch %d does not reach %s at this point; skipped for it", i, name)
                continue
            if self.recorded is not None:
                reference_out = self.recorded[name][i]
            else:
                if r is None:
                    r = self._start("reference", i)
                while r.pending is not None and r.pending[0] != name:
                    self._step(r)
                if r.pending is None:
                    _logger.warning("calibrate: reference never ran %s on batch %d", name, i)
                    continue
                reference_out = r.pending[1]
            mask = attention_mask(self.batches[i])
            t_stats = time.perf_counter()
            x = plan.features(m.pending[1], mask)
            y = plan.targets(reference_out, mask)
            if name in self.residuals:
                pruned_r = self.resid.pop(("model", i, name), None)
                dense_r = (self.recorded[residual_key(name)][i] if self.recorded is not None
                           else self.resid.pop(("reference", i, name), None))
                if pruned_r is not None and dense_r is not None:
                    y = y + plan.targets(dense_r, mask) - plan.targets(pruned_r, mask, shrunk=True)
            if stats is None:
                exact = self.ridge < 1e-4 or x.dtype == torch.float64 or self.precision == "float64"
                stats = RidgeStats(x.shape[0], x.shape[2], y.shape[2], plan.has_bias, plan.module.weight.device,
                                   torch.float64 if exact else torch.float32)
            stats.add(x, y)
            stats_s += time.perf_counter() - t_stats
            del x, y, reference_out
            if r is not None:
                if self.low_memory or len(self.done) == len(self.plans) - 1:
                    r.close()  # the reference's remaining forward is not needed
                else:
                    self._step(r)
            if self.low_memory:
                m.close()
            pairs[i] = (m, None if self.low_memory else r)
        if stats is None:
            raise ValueError(f"no batch reached target layer {name!r} in both the model and the reference")
        for key in [k for k in self.resid if k[2] == name]:
            del self.resid[key]  # batches that did not reach the layer
        t_solve = time.perf_counter()
        w0 = plan.current()
        check_stats_finite(name, stats, w0)
        before = stats.error(w0)
        sol, solver = ridge_solve(stats, w0, self.ridge)
        after = stats.error(sol)
        if not (bool(torch.isfinite(sol).all()) and math.isfinite(after)):
            raise CalibrationError(f"the ridge solve of {name!r} gave NaN/inf weights (its input statistics are "
                                   "ill-conditioned); nothing was changed: raise ridge= or check the data")
        if after <= before:
            plan.write(sol)
        else:  # float rounding of an ill-conditioned solve: the layer as it was is the better fit
            solver += " (not written: no improvement)"
            after = before
        self.done.add(name)
        done = time.perf_counter()
        row = LayerCalibration.from_plan(plan, stats.n, before, after, solver, done - t0)
        row.stats_s, row.solve_s = stats_s, done - t_solve
        self.report.layers.append(row)
        if not self.low_memory:
            finished = len(self.done) == len(self.plans)
            for m, _ in pairs:
                if m is not None and m.pending is not None and m.pending[0] == name:
                    if finished:
                        m.close()
                    else:
                        self._step(m)
