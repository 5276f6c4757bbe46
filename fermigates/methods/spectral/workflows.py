"""The spectral workflows of the seed (``spectraltools``) over the user's own training and evaluation functions:
prune by eigenvalue, pre-train the eigenvalues and prune until the metric moves by ``max_delta``, and the
"distiller" (eigenvalues, prune, then train the survivors fully).

Each leaves the model converted with its decisions frozen: the model computes the pruned network (removed nodes
masked), and ``fermigates.convert_from_fermi(model, calibration_data=...)`` bakes it into a physically smaller
plain model (calibrated like any structured method). These functions live in the method's folder and so cannot
call the bake themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ...allocation.allocate import allocate, allocate_share
from ...allocation.budget import Budget, BudgetResult, budget_from, resolve_allocation
from ...core.state import get_state
from ..registry import method_of
from .method import SpectralMethod
from .optim import spectral_trainable

COMPARE = ("acc", "loss")
ALLOCATIONS = ("uniform", "global")


@dataclass
class SpectralResult:
    """What a spectral workflow decided: the share of nodes removed and how the metric moved on the way."""

    #: share of the nodes of every node group removed by the frozen decision
    fraction: float
    #: group label -> (kept, total) nodes
    kept: dict[str, tuple[int, int]]
    #: the metric with no node removed (``spectral_pretrain``), and at ``fraction``
    baseline: float | None = None
    metric: float | None = None
    #: ``(share of nodes removed, metric)`` for every point walked, in order (the first is ``(0, baseline)``;
    #: the last is the one that moved the metric by more than ``max_delta``, unless the walk reached its end)
    curve: list[tuple[float, float]] = field(default_factory=list)
    compare_with: str | None = None
    max_delta: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "kept": {k: list(v) for k, v in self.kept.items()},
                "baseline": self.baseline, "metric": self.metric, "curve": [list(p) for p in self.curve],
                "compare_with": self.compare_with, "max_delta": self.max_delta}

    def plot(self, path: str | Path | None = None, ax: Any = None) -> Any:
        """The walked curve (share of nodes removed vs the metric), the ``max_delta`` limit and the choice, with
        matplotlib (``pip install 'fermigates[plot]'``); saved to ``path`` when given. Returns the axes."""
        import matplotlib

        if ax is None and path is not None:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if not self.curve:
            raise ValueError("no curve to plot: only spectral_pretrain walks one")
        fig = None
        if ax is None:
            fig, ax = plt.subplots(figsize=(5, 3.4))
        xs, ys = zip(*self.curve)
        ax.plot(xs, ys, "o-", ms=3, label=f"eigenvalue pruning ({self.compare_with})")
        if self.baseline is not None and self.max_delta is not None:
            sign = -1 if self.compare_with == "acc" else 1
            limit = self.baseline * (1 + sign * self.max_delta)
            ax.axhline(limit, ls="--", lw=1, color="grey", label=f"max_delta {self.max_delta:g}")
        ax.axvline(self.fraction, ls=":", lw=1, color="C3", label=f"chosen: {self.fraction:.2f} removed")
        ax.set_xlabel("share of nodes removed")
        ax.set_ylabel(self.compare_with or "metric")
        ax.legend(fontsize=8)
        if fig is not None:
            fig.tight_layout()
            if path is not None:
                fig.savefig(path, dpi=120)
                plt.close(fig)
        return ax


def _spectral(model: nn.Module) -> SpectralMethod:
    method = method_of(model)
    if not isinstance(method, SpectralMethod):
        raise ValueError(f"model must be converted with method='spectral', got method={method.name!r}")
    return method


def _kept(method: SpectralMethod, model: nn.Module) -> tuple[float, dict[str, tuple[int, int]]]:
    report = method.sparsity(model)
    kept = {layer.name: (layer.kept, layer.total) for layer in report.layers}
    return report.overall, kept


def _decide(method: SpectralMethod, model: nn.Module, share: float, allocation: str) -> dict[int, torch.Tensor]:
    """Keep masks that remove ``share`` of the nodes by eigenvalue: of every group (uniform) or across groups."""
    target = method.allocatable(model)
    if allocation == "uniform":
        return allocate_share(target, share, selection="magnitude")
    keep, _ = allocate(target, Budget(units=max(1.0 - share, 1e-6)), example_inputs=get_state(model).example_inputs,
                       allocation="global", selection="magnitude", min_keep=1)
    return keep


def spectral_prune(model: nn.Module, *, target_sparsity: float | dict[str, float] | None = None,
                   budget: Budget | str | None = None, allocation: str = "auto",
                   min_keep: float | int = 0.1) -> BudgetResult | None:
    """Remove nodes by eigenvalue (the seed's ``spectral_pruning``) and freeze the decision on the converted
    ``model``; bake it with ``convert_from_fermi``.

    ``target_sparsity``: the share of nodes removed, of every group (``allocation="uniform"``) or across groups
    by score (``"global"``). ``budget`` (``"macs:0.5"``, ``"params:0.7"``, ``"units:0.5"``): the nodes with the
    smallest eigenvalue scores per unit of cost go until the budget is met (``allocation="auto"``: global for MAC /
    parameter budgets, uniform for units; every group keeps ``min_keep`` of its nodes). Neither: the config's
    budget or target_sparsity. Returns how a budget was met, else None.
    """
    method = _spectral(model)
    state = get_state(model)
    budget = budget_from(budget, target_sparsity, state.config, "spectral_prune")
    if budget is None:
        share = state.config.target_sparsity if target_sparsity is None else target_sparsity
        if allocation not in ("auto", *ALLOCATIONS):
            raise ValueError(f"allocation must be 'auto', 'uniform' or 'global', got {allocation!r}")
        if allocation == "global":
            if isinstance(share, dict):
                raise ValueError("allocation='global' takes one target_sparsity (a float), not one per granularity")
            method.set_keep(model, _decide(method, model, float(share), "global"))
        else:
            method.set_keep(model, allocate_share(method.allocatable(model), share, selection="magnitude"))
        return None
    if budget.kind == "latency":
        raise ValueError("spectral_prune takes a MAC, parameter or unit budget; a latency budget is measured by "
                         "fermigates.prune")
    keep, result = allocate(method.allocatable(model), budget, example_inputs=state.example_inputs,
                            allocation=resolve_allocation(allocation, budget), selection="magnitude",
                            min_keep=min_keep)
    method.set_keep(model, keep)
    return result


def _metric(value: Any, compare_with: str) -> float:
    """A number from what ``evaluate`` returned: a number, a mapping with a ``compare_with`` key, or a Keras-style
    ``(loss, acc)`` pair."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, Mapping) and compare_with in value:
        return float(value[compare_with])
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        return float(value[0 if compare_with == "loss" else 1])
    raise ValueError(f"evaluate(model) must return a number, a mapping with key {compare_with!r} or a (loss, acc) "
                     f"pair, got {value!r}")


def _eigenvalue_parts(method: SpectralMethod, model: nn.Module) -> dict[str, bool]:
    options = method.parse_options(get_state(model).config)
    start = options.train_start
    return {"start": start, "end": options.train_end or not start}


def spectral_pretrain(
    model: nn.Module,
    fit: Callable[[nn.Module], Any] | None,
    evaluate: Callable[[nn.Module], Any],
    max_delta: float,
    compare_with: str = "acc",
    *,
    step: float = 0.05,
    max_fraction: float = 0.95,
    allocation: str = "uniform",
) -> SpectralResult:
    """Train the eigenvalues only, then remove ever more nodes by eigenvalue until the metric moves by more than
    ``max_delta``; keep the largest share that stayed within it (the seed's ``spectral_pretrain``).

    ``fit(model)`` trains the model: it runs with only the eigenvalues requiring gradients (the end eigenvalues,
    and the start ones when the options train them), so an optimizer over ``[p for p in model.parameters() if
    p.requires_grad]`` (or ``fermigates.make_optimizer(model)``) trains exactly them; ``None`` skips training.
    ``evaluate(model)`` returns the metric (a number, a mapping with a ``compare_with`` key, or a ``(loss, acc)``
    pair). ``compare_with="acc"``: a larger metric is better and the walk stops once it falls below ``baseline *
    (1 - max_delta)``; ``"loss"``: once it rises above ``baseline * (1 + max_delta)``. The share grows by ``step``
    of every group (``allocation="uniform"``) or of all nodes ranked together (``"global"``) up to
    ``max_fraction``. The model is left with the chosen nodes removed (frozen; none if even the first step moved
    the metric too far); ``result.curve`` holds every point walked and ``result.plot()`` draws it.
    """
    if compare_with not in COMPARE:
        raise ValueError(f"compare_with must be one of {COMPARE}, got {compare_with!r}")
    if isinstance(max_delta, bool) or not isinstance(max_delta, (int, float)) or not max_delta >= 0:
        raise ValueError(f"max_delta must be a number >= 0 (the relative change allowed, 0.01 = 1%), got "
                         f"{max_delta!r}")
    if not (0 < step < 1) or not (0 < max_fraction < 1):
        raise ValueError(f"step and max_fraction must be in (0, 1), got step={step!r}, max_fraction={max_fraction!r}")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    if not callable(evaluate) or (fit is not None and not callable(fit)):
        raise TypeError("fit (or None) and evaluate must be callables taking the model")
    method = _spectral(model)
    method.clear_keep(model)
    if fit is not None:
        with spectral_trainable(model, **_eigenvalue_parts(method, model)):
            fit(model)
    with torch.no_grad():
        baseline = _metric(evaluate(model), compare_with)
    curve = [(0.0, baseline)]
    chosen: dict[int, torch.Tensor] | None = None
    metric = baseline
    n = 1
    while n * step <= max_fraction + 1e-9:
        keep = _decide(method, model, n * step, allocation)
        method.set_keep(model, keep)
        with torch.no_grad():
            value = _metric(evaluate(model), compare_with)
        curve.append((_kept(method, model)[0], value))
        change = (value - baseline) if compare_with == "loss" else (baseline - value)
        if change > max_delta * abs(baseline):
            break
        chosen, metric = keep, value
        n += 1
    method.clear_keep(model)
    if chosen is None:  # even the first step moved the metric too far: every node stays (frozen, so no bake cuts)
        chosen = {g.id: torch.ones(g.n_units, dtype=torch.bool) for g in method.record(model).groups}
    method.set_keep(model, chosen)
    fraction, kept = _kept(method, model)
    return SpectralResult(fraction, kept, baseline, metric, curve, compare_with, float(max_delta))


def spectral_distill(
    model: nn.Module,
    fit: Callable[[nn.Module], Any],
    percentile: float = 85,
    *,
    fit_full: Callable[[nn.Module], Any] | None = None,
    allocation: str = "uniform",
) -> SpectralResult:
    """Train the eigenvalues only, remove ``percentile`` percent of the nodes by eigenvalue, then train the
    surviving network fully (the seed's ``spectral_distiller``).

    ``fit(model)`` runs twice: first with only the eigenvalues requiring gradients, then (or ``fit_full(model)``
    when given) with every parameter of the model requiring gradients, the removed nodes masked (they receive no
    gradient). The decision stays frozen; bake it with ``convert_from_fermi``.
    """
    if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 0 <= percentile < 100:
        raise ValueError(f"percentile must be the percent of nodes removed, in [0, 100), got {percentile!r}")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    if not callable(fit) or (fit_full is not None and not callable(fit_full)):
        raise TypeError("fit (and fit_full, when given) must be callables taking the model")
    method = _spectral(model)
    method.clear_keep(model)
    with spectral_trainable(model, **_eigenvalue_parts(method, model)):
        fit(model)
    method.set_keep(model, _decide(method, model, percentile / 100, allocation))
    with spectral_trainable(model, base=True, start=True, end=True, bias=True, rest=True):
        (fit_full or fit)(model)
    fraction, kept = _kept(method, model)
    return SpectralResult(fraction, kept)
