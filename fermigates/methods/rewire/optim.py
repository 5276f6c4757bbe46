"""``DEEPR`` and ``SoftDEEPR``: the Deep Rewiring optimizers (Bellec et al. 2018, Algorithms 1 and 2).

Both take the sign-fixed connection parameters ``theta`` (a connection is active while ``theta > 0``) and
run Langevin dynamics on them: for an active connection
``theta <- theta - lr * (grad + l1) + sqrt(2 * lr * temp) * noise`` (an L1 prior and a temperature).

* ``DEEPR`` keeps exactly ``nc`` connections active: inactive connections are frozen, and after every step
  as many random inactive connections as were lost are re-activated at ``theta = reset_val``.
* ``SoftDEEPR`` has no fixed count: inactive connections also receive the noise (and are clamped at
  ``min_weight``), so they drift back above zero and reconnect at random.

They are ``torch.optim.Optimizer`` s (LR schedulers scale ``lr``; ``state_dict`` carries ``nc`` and the random
generator, so a resumed run continues bit for bit). Param groups may set ``connection=False`` for ordinary
parameters (plain SGD, no prior, no noise) and ``nonnegative=True`` to project them onto ``>= 0`` after each
step (the two parts of a ``second_bias``); ``fermigates.rewire_param_groups(model)`` builds these groups.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch.optim import Optimizer


def _check(name: str, value: Any, *, positive: bool = False, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value!r}")


class _Rewiring(Optimizer):
    """What DEEPR and SoftDEEPR share: group roles, the plain SGD step, a resumable random generator."""

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], seed: int | None) -> None:
        defaults = {"connection": True, "nonnegative": False, **defaults}
        super().__init__(params, defaults)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self._seed = int(seed)
        self._generators: dict[str, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        gen = self._generators.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self._seed + len(self._generators))
            self._generators[key] = gen
        return gen

    def _noise(self, p: torch.Tensor, std: float) -> torch.Tensor:
        if std == 0:
            return torch.zeros_like(p)
        return torch.randn(p.shape, generator=self._generator(p.device), device=p.device, dtype=p.dtype).mul_(std)

    def connection_params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups if g["connection"] for p in g["params"]]

    @torch.no_grad()
    def n_active(self) -> int:
        """How many connections are active (``theta > 0``) now."""
        return sum(int((p > 0).sum()) for p in self.connection_params())

    @staticmethod
    def _closure(closure: Callable[[], Any] | None) -> Any:
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def _connection_groups(self):
        """The groups of connection parameters; the other groups get their plain step on the way."""
        for group in self.param_groups:
            if group["connection"]:
                yield group
            else:
                self._plain_step(group)

    @torch.no_grad()
    def _plain_step(self, group: dict[str, Any]) -> None:
        for p in group["params"]:
            if p.grad is not None:
                p.add_(p.grad, alpha=-group["lr"])
            if group["nonnegative"]:
                p.clamp_(min=0)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["rewiring"] = {"seed": self._seed, "extra": self._extra_state(),
                             "generators": {k: g.get_state() for k, g in self._generators.items()}}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("rewiring", None)
        super().load_state_dict(state_dict)
        if extra is not None:
            self._seed = int(extra["seed"])
            self._load_extra_state(extra["extra"])
            self._generators = {}
            for key, gen_state in extra["generators"].items():
                self._generator(torch.device(key)).set_state(gen_state)

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass


class DEEPR(_Rewiring):
    """Deep Rewiring with a hard constraint: exactly ``nc`` connections are active after every step.

    ``nc=None`` keeps the number active at construction (what ``convert_to_fermi`` set from
    ``target_sparsity``). If more than ``nc`` are active at construction the weakest are switched off; if
    fewer, random inactive ones are switched on. ``temp=None`` means ``lr * l1**2 / 18`` (noise std
    ``lr * l1 / 3``); ``reset_val`` (> 0) is where a re-activated connection starts.
    """

    def __init__(
        self,
        params: Iterable[Any],
        nc: int | None = None,
        lr: float = 0.05,
        l1: float = 1e-4,
        reset_val: float = 1e-6,
        temp: float | None = None,
        *,
        seed: int | None = None,
    ) -> None:
        _check("lr", lr)
        _check("l1", l1)
        _check("reset_val", reset_val, positive=True)
        _check("temp", temp, allow_none=True)
        if nc is not None and (isinstance(nc, bool) or not isinstance(nc, int) or nc < 1):
            raise ValueError(f"nc (the number of active connections) must be an int >= 1 or None, got {nc!r}"
                             + (": nc=0 would switch every connection off" if nc == 0 and not isinstance(nc, bool)
                                else ""))
        super().__init__(params, {"lr": lr, "l1": l1, "reset_val": reset_val, "temp": temp}, seed)
        conn = self.connection_params()
        total = sum(p.numel() for p in conn)
        if not conn:
            raise ValueError("DEEPR got no connection parameters: pass fermigates.rewire_param_groups(model) "
                             "(or the theta parameters of a model converted with method='deepr')")
        self.nc = self.n_active() if nc is None else nc
        if self.nc == 0:
            raise ValueError("DEEPR got nc=None and no connection is active (every theta <= 0): it would keep every "
                             "connection off; pass nc >= 1")
        if self.nc > total:
            raise ValueError(f"nc={self.nc} is more than the {total} connections DEEPR was given")
        self._enforce_count()

    def _extra_state(self) -> dict[str, Any]:
        return {"nc": self.nc}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.nc = int(state["nc"])

    @torch.no_grad()
    def _enforce_count(self) -> None:
        conn = [(g, p) for g in self.param_groups if g["connection"] for p in g["params"]]
        active = self.n_active()
        if active > self.nc:  # only at construction: switch the weakest off
            flat = torch.cat([p.detach().flatten().float().cpu() for _, p in conn])
            excess = active - self.nc
            order = torch.where(flat > 0, flat, torch.full_like(flat, math.inf)).argsort(stable=True)[:excess]
            self._scatter(conn, order, lambda v, g: -v)
        elif active < self.nc:
            inactive = torch.cat([(p.detach() <= 0).flatten().cpu() for _, p in conn]).nonzero().flatten()
            device = conn[0][1].device
            pick = torch.randperm(inactive.numel(), generator=self._generator(device), device=device)
            self._scatter(conn, inactive[pick[: self.nc - active].cpu()], lambda v, g: torch.full_like(v, g["reset_val"]))

    @staticmethod
    def _scatter(conn: list, flat_index: torch.Tensor, value: Callable) -> None:
        start = 0
        for group, p in conn:
            n = p.numel()
            local = flat_index[(flat_index >= start) & (flat_index < start + n)] - start
            if local.numel():
                view = p.view(-1)
                local = local.to(p.device)
                view[local] = value(view[local], group)
            start += n

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One Langevin step on the active connections, then re-activate random ones up to ``nc``."""
        loss = self._closure(closure)
        for group in self._connection_groups():
            lr, l1 = group["lr"], group["l1"]
            temp = lr * l1**2 / 18 if group["temp"] is None else group["temp"]
            std = math.sqrt(2 * lr * temp)
            for p in group["params"]:
                active = p > 0
                update = self._noise(p, std)
                if p.grad is not None:
                    update.sub_(p.grad, alpha=lr)
                update.sub_(lr * l1)
                p.add_(update.mul_(active))
        self._enforce_count()
        return loss


class SoftDEEPR(_Rewiring):
    """Soft Deep Rewiring: no fixed count; every connection receives noise, inactive ones are clamped at
    ``min_weight`` (<= 0) and come back when the noise lifts them above zero.

    ``temp=None`` means ``lr * l1**2 / 18``; ``min_weight=None`` means ``-3 * l1``. The fraction that stays
    active is set by the balance of ``l1`` (pulls connections off) and the gradients (keep useful ones).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.05,
        l1: float = 1e-5,
        temp: float | None = None,
        min_weight: float | None = None,
        *,
        seed: int | None = None,
    ) -> None:
        _check("lr", lr)
        _check("l1", l1)
        _check("temp", temp, allow_none=True)
        if min_weight is not None and (not isinstance(min_weight, (int, float)) or isinstance(min_weight, bool)
                                       or not math.isfinite(min_weight) or min_weight > 0):
            raise ValueError(f"min_weight must be a number <= 0 (where inactive connections are clamped), "
                             f"got {min_weight!r}")
        super().__init__(params, {"lr": lr, "l1": l1, "temp": temp, "min_weight": min_weight}, seed)
        if not self.connection_params():
            raise ValueError("SoftDEEPR got no connection parameters: pass fermigates.rewire_param_groups(model)")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One Langevin step: gradient and L1 on the active connections, noise on all, clamp at min_weight."""
        loss = self._closure(closure)
        for group in self._connection_groups():
            lr, l1 = group["lr"], group["l1"]
            temp = lr * l1**2 / 18 if group["temp"] is None else group["temp"]
            floor = -3 * l1 if group["min_weight"] is None else group["min_weight"]
            std = math.sqrt(2 * lr * temp)
            for p in group["params"]:
                active = p > 0
                drift = torch.full_like(p, -lr * l1)
                if p.grad is not None:
                    drift.sub_(p.grad, alpha=lr)
                p.add_(drift.mul_(active)).add_(self._noise(p, std)).clamp_(min=floor)
        return loss
