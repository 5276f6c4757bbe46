"""Ridge calibration from statistics already gathered, with no forward pass.

``prune(calibration="one-pass")`` keeps, from its selection pass over the dense model, the input Gram
``[X, 1]ᵀ[X, 1]`` of every ``nn.Linear`` that consumes a gate. A layer that then loses input columns is re-fitted
toward its own dense output on those dense inputs: ``Y = [X, 1] [W, b]ᵀ`` gives ``XᵀY`` and ``ΣY²`` from the
Gram alone, so the solve is the one :func:`fermigates.calibrate` makes, minus the drift of the layers before it
(which only a forward of the pruned model shows).
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch
from torch import nn

from .report import CalibrationReport, LayerCalibration
from .ridge import LayerPlan, RidgeStats, ridge_solve

__all__ = ["DenseLayer", "calibrate_from_grams"]

#: a dense layer as it was before pruning: ``(weight (out, in), bias or None, kept_in, kept_out)``, the kept
#: indices relative to it (``kept_out`` None: every output)
DenseLayer = tuple[torch.Tensor, "torch.Tensor | None", torch.Tensor, "torch.Tensor | None"]


def _stats(gram: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kept_in: torch.Tensor,
           kept_out: torch.Tensor | None) -> RidgeStats:
    n = weight.shape[1]
    g = gram.double()
    w = weight.detach().double().to(g.device)
    full = torch.cat([w, bias.detach().double().to(g.device)[:, None]], 1) if bias is not None else w
    if kept_out is not None:
        full = full.index_select(0, kept_out.to(g.device))
    g_used = g if bias is not None else g[:n, :n]  # the [X, 1] columns the dense output uses
    sel = kept_in.to(g.device)
    if bias is not None:
        sel = torch.cat([sel, torch.tensor([n], device=g.device)])
    rows = g_used.index_select(0, sel)
    stats = RidgeStats(1, len(kept_in), full.shape[0], bias is not None, g.device)
    stats.xtx = rows.index_select(1, sel)[None]
    stats.xty = (rows @ full.T)[None]
    f32 = full.float()  # ΣY² only scales the reported errors: float32 is ample
    stats.yy = ((f32 @ g_used.float()) * f32).sum().double().reshape(1)
    stats.n = round(float(g[n, n]))
    return stats


@torch.no_grad()
def calibrate_from_grams(model: nn.Module, grams: Mapping[str, torch.Tensor], dense: Mapping[str, DenseLayer],
                         ridge: float = 1e-2, n_batches: int = 0) -> CalibrationReport:
    """Re-fit each layer named in ``dense`` toward its dense output, from ``grams[name]`` (``(in + 1, in + 1)``,
    the bias' ones column last) alone.

    A layer of ``model`` is either shrunk to ``kept_in`` / ``kept_out`` or of its dense shape with the other
    columns zeroed (then only the kept block is written and the zeros stay). Every solve is made before any
    layer is written, so an error leaves the model unchanged.
    """
    report = CalibrationReport(ridge=ridge, n_batches=n_batches, from_selection=True)
    start = time.perf_counter()
    modules = dict(model.named_modules())
    solved = []
    for name, (weight, bias, kept_in, kept_out) in dense.items():
        t0 = time.perf_counter()
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            raise ValueError(f"one-pass calibration re-fits nn.Linear layers; {name!r} is "
                             f"{type(module).__name__}: use the sequential calibration")
        if name not in grams:
            raise ValueError(f"no input Gram was gathered for {name!r}: use the sequential calibration")
        shrunk = module.in_features == len(kept_in)
        if not shrunk and module.in_features != weight.shape[1]:
            raise ValueError(f"layer {name!r} has {module.in_features} inputs: neither its dense width "
                             f"{weight.shape[1]} nor the {len(kept_in)} kept")
        out_shrunk = kept_out is None or module.out_features == len(kept_out)
        plan = LayerPlan(name, module, module, sel_in=None if shrunk else kept_in,
                         sel_out=None if out_shrunk else kept_out)
        stats = _stats(grams[name], weight, bias, kept_in, kept_out)
        w0 = plan.current().to(stats.xtx.device)
        before = stats.error(w0)
        t_solve = time.perf_counter()
        sol, solver = ridge_solve(stats, w0, ridge)
        after = stats.error(sol)
        if not bool(torch.isfinite(sol).all()):
            raise ValueError(f"the one-pass solve for {name!r} is not finite (inputs with NaN/inf?)")
        done = time.perf_counter()
        row = LayerCalibration(name, type(module).__name__, len(kept_in), weight.shape[1],
                               weight.shape[0] if kept_out is None else len(kept_out), weight.shape[0], 1,
                               stats.n, before, after, solver, done - t0, stats_s=t_solve - t0,
                               solve_s=done - t_solve)
        solved.append((plan, sol, row))
    for plan, sol, row in solved:
        plan.write(sol.to(plan.module.weight.device))
        report.layers.append(row)
    report.seconds = time.perf_counter() - start
    report.reference_run = False
    return report
