"""The Fermi-Dirac gate: a retention probability per weight or per group of weights.

``P = sigmoid((score / scale - mu) / T) = 1 / (exp((mu - score / scale) / T) + 1)``

Large scores are kept (``P -> 1``), small ones are pruned. The score is divided by ``scale``, the mean score
of the gated units when the gate was created, so ``mu`` and ``T`` are in units of "a typical score" and one
temperature schedule fits every layer whatever the scale of its weights. At any ``T > 0`` the hard decision
``P >= 0.5`` is the same as ``score / scale >= mu``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

#: the logit is clamped to +-this: beyond it ``P`` is 1.0 in float32 (or below 4e-18) anyway, and unclamped
#: logits of thousands (T = 1e-3) make sigmoid's gradients subnormal floats, which stall CPU steps 20x
LOGIT_CLAMP = 40.0

#: ``logit(1 - 1e-9)``: an "open" gate puts ``mu`` this many temperatures below the smallest score, so that
#: every ``P`` rounds to exactly 1.0 in float32 and the gated network computes the original function.
OPEN_MARGIN = 20.0


def check_temperature(value: float, name: str = "temperature") -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def fermi_probability(score: torch.Tensor, mu: torch.Tensor, temperature: torch.Tensor | float) -> torch.Tensor:
    """Retention probability ``sigmoid((score - mu) / T)``; monotone increasing in ``score``.

    Computed in float32 (or wider) whatever the dtype of ``score``, with the logit clamped to
    ``+-LOGIT_CLAMP``: safe for any ``T > 0`` and scores of any magnitude, and never subnormal.
    """
    dtype = torch.promote_types(score.dtype, torch.float32)
    logit = (score.to(dtype) - mu.to(dtype)) / temperature
    return torch.sigmoid(logit.clamp(-LOGIT_CLAMP, LOGIT_CLAMP))


class FermiGate(nn.Module):
    """Learned Fermi level ``mu`` and annealed temperature ``T`` for one set of units.

    ``scale`` normalises scores (see the module docstring). ``mu`` is a scalar per gate: one Fermi level per
    layer (weight granularity) or per coupled channel group (channel / head granularity).
    """

    def __init__(self, n_units: int, scale: float, mu: float, temperature: float = 1.0) -> None:
        super().__init__()
        self.n_units = int(n_units)
        self.mu = nn.Parameter(torch.tensor(float(mu)))
        self.register_buffer("temperature", torch.tensor(check_temperature(temperature)))
        self.register_buffer("scale", torch.tensor(float(scale) if scale > 0 else 1.0))
        #: when False the gate passes everything (P = 1): used to run the dense reference network
        self.enabled = True
        #: which granularity the gate serves ("weight", "channel", "head"): picks its sparsity target
        self.kind = "weight"
        #: when True the gate applies its hard decision (P in {0, 1}) instead of the soft probability
        self.hard = False
        #: optional per-unit offsets of the Fermi level (see :meth:`add_unit_levels`)
        self.register_parameter("mu_offset", None)
        #: the hard decision keeps a multiple of this many units (rounded up; see :meth:`keep`)
        self.round_to = 1
        #: a frozen decision (bool per unit): once set (by the annealer's hard phase) the gate applies it in
        #: every forward and bakes exactly it, whatever the weights do afterwards
        self.decided: torch.Tensor | None = None

    @classmethod
    def for_scores(
        cls, score: torch.Tensor, temperature: float = 1.0, init: str | float = "open"
    ) -> FermiGate:
        """A gate whose scale is the mean of ``score``; ``init`` is "open" or a percentile in [0, 1)."""
        score = score.detach().float().flatten()
        scale = float(score.mean()) if score.numel() else 1.0
        scale = scale if scale > 0 and math.isfinite(scale) else 1.0
        normed = score / scale
        if init == "open":
            mu = float(normed.min()) - OPEN_MARGIN * temperature if normed.numel() else 0.0
        elif isinstance(init, (int, float)) and not isinstance(init, bool) and 0.0 <= init < 1.0:
            mu = kth_quantile(normed, float(init)) if normed.numel() else 0.0
        else:
            raise ValueError(f"mu_init must be 'open' or a percentile in [0, 1), got {init!r}")
        return cls(score.numel(), scale, mu, temperature)

    def add_unit_levels(self) -> nn.Parameter:
        """Give every unit its own Fermi level ``mu + mu_offset[u]`` (offsets start at 0: nothing changes).

        With frozen weights the scores are fixed, so a single ``mu`` can only move the threshold; per-unit
        levels let gate-only training (:func:`fermigates.refine_gates`) choose *which* units stay.
        """
        if self.mu_offset is None:
            self.mu_offset = nn.Parameter(torch.zeros(self.n_units, device=self.mu.device))
        return self.mu_offset

    def normalised(self, score: torch.Tensor) -> torch.Tensor:
        """The score in the units ``mu`` is compared with: ``score / scale`` (minus the unit's offset)."""
        out = score / self.scale.to(score.dtype)
        if self.mu_offset is not None:
            out = out - self.mu_offset.to(out.dtype)
        return out

    def forward(self, score: torch.Tensor) -> torch.Tensor:
        """Soft retention probability of each unit."""
        if not self.enabled:
            return torch.ones_like(score)
        if self.hard or self.decided is not None:
            return self._touch(self.keep(score).to(score.dtype))
        return fermi_probability(self.normalised(score), self.mu, self.temperature).to(score.dtype)

    def _touch(self, hard: torch.Tensor) -> torch.Tensor:
        """``hard`` with a zero-gradient path to the levels: DistributedDataParallel requires every parameter
        to take part in every backward, also once the decisions are frozen."""
        if not torch.is_grad_enabled():
            return hard
        zero = self.mu * 0.0
        if self.mu_offset is not None:
            zero = zero + self.mu_offset.sum() * 0.0
        return hard + zero.to(hard.dtype)

    @torch.no_grad()
    def keep(self, score: torch.Tensor) -> torch.Tensor:
        """Hard decision ``P >= 0.5``, as a bool tensor.

        With ``round_to > 1`` the number kept is rounded *up* to a multiple of ``round_to`` (at most all
        units) by also keeping the pruned units closest to the threshold: kernels run faster on widths
        that fill their vector registers, and nothing is pruned beyond what the gate decided.
        A frozen decision (:attr:`decided`) is returned as it is.
        """
        if self.decided is not None:
            return self.decided.to(score.device)
        margin = self.normalised(score.float()) - self.mu.float()
        keep = margin >= 0
        step = self.round_to
        if step > 1 and keep.dim() == 1:
            kept = int(keep.sum())
            want = min(keep.numel(), -(-kept // step) * step)
            if want > kept:
                keep = torch.zeros_like(keep)
                keep[margin.topk(want).indices] = True
        return keep

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # a state dict saved with per-unit levels (an anneal started from a ranking) loads into a gate without
        # them: the levels are created first
        if self.mu_offset is None and f"{prefix}mu_offset" in state_dict:
            self.add_unit_levels()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def get_extra_state(self) -> torch.Tensor:
        """The frozen decision travels with the state dict (an empty tensor while undecided), so a model saved by
        any trainer and loaded again bakes exactly what was trained."""
        return torch.zeros(0, dtype=torch.bool) if self.decided is None else self.decided.detach().cpu()

    def set_extra_state(self, state: Any) -> None:
        if isinstance(state, torch.Tensor) and state.numel():
            self.decided = state.to(device=self.mu.device, dtype=torch.bool)
        else:
            self.decided = None

    @torch.no_grad()
    def set_temperature(self, value: float) -> None:
        self.temperature.fill_(check_temperature(value))

    def extra_repr(self) -> str:
        return f"units={self.n_units}, mu={self.mu.item():.4g}, T={self.temperature.item():.4g}"


def kth_quantile(values: torch.Tensor, q: float) -> float:
    """The ``q``-quantile of ``values`` (lower interpolation) via ``kthvalue``, which has no size limit."""
    values = values.detach().flatten()
    n = values.numel()
    k = min(max(int(math.floor(q * n)) + 1, 1), n)
    return float(values.float().kthvalue(k).values)
