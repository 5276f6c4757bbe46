"""Steering by a Lagrangian on the expected sparsity (CoFi, Xia et al. 2022; Sheared-LLaMA, Xia et al. 2023).

Instead of clamping every gate's Fermi level into a band around the scheduled quantile (the annealer's default,
``steer="band"``), the levels move freely with their gradients during the ramp and the loss carries, per gate,

    lambda1 * (s_hat - t) + lambda2 * (s_hat - t)^2

where ``s_hat = 1 - mean(P)`` is the gate's expected sparsity and ``t`` its scheduled target; the multipliers
are raised by gradient ascent after every step (``lambda += lr * dL/dlambda``), so a gate that lags its target
is pushed harder until it meets it. A level starts at the scheduled quantile when its gate's target first
becomes positive (an open gate's probabilities are saturated and would give no gradient). At the end of the
ramp every level is pinned to its exact quantile as with the band, so the run still ends at the target.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .gates import kth_quantile
from .model import gate_scores, soft_probabilities


class LagrangianSteer:
    """The multipliers of every gate and the term they put in the loss (see the module docstring)."""

    def __init__(self, lr: float = 0.05) -> None:
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"lagrangian lr must be a finite number > 0, got {lr!r}")
        self.lr = float(lr)
        self.lambdas: dict[int, list[float]] = {}  # position of the gate -> [lambda1, lambda2]
        self.placed: set[int] = set()
        self.gaps: dict[int, float] = {}

    @torch.no_grad()
    def place(self, model: nn.Module, targets: list[float]) -> None:
        """Put each gate's level at its scheduled quantile the first time its target is positive."""
        for i, ((gate, scores), target) in enumerate(zip(gate_scores(model), targets)):
            if i not in self.placed and target > 0:
                gate.mu.fill_(kth_quantile(scores, target))
                self.placed.add(i)

    def loss(self, model: nn.Module, targets: list[float]) -> torch.Tensor:
        """``sum_g n_g [l1 (s_hat - t) + l2 (s_hat - t)^2] / sum_g n_g`` over the placed gates; records the gaps."""
        total, count = None, 0
        self.gaps = {}
        for i, ((gate, p), target) in enumerate(zip(soft_probabilities(model), targets)):
            if i not in self.placed:
                continue
            gap = (1.0 - p.float().mean()) - target
            l1, l2 = self.lambdas.setdefault(i, [0.0, 0.0])
            term = (l1 * gap + l2 * gap * gap) * p.numel()
            total = term if total is None else total + term
            count += p.numel()
            self.gaps[i] = float(gap.detach())
        return torch.zeros(()) if total is None else total / count

    def ascend(self) -> None:
        """Raise the multipliers along their gradients (the gaps of the last :meth:`loss`)."""
        for i, gap in self.gaps.items():
            lam = self.lambdas.setdefault(i, [0.0, 0.0])
            lam[0] += self.lr * gap
            lam[1] += self.lr * gap * gap

    def state_dict(self) -> dict[str, Any]:
        return {"lr": self.lr, "lambdas": {str(k): v for k, v in self.lambdas.items()}, "placed": sorted(self.placed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lr = float(state.get("lr", self.lr))
        self.lambdas = {int(k): list(v) for k, v in state.get("lambdas", {}).items()}
        self.placed = set(state.get("placed", []))
