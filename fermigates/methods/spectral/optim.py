"""What trains a spectral model: its parts (eigenvector blocks, start / end eigenvalues, biases, the rest of the
model), an optimizer over the parts chosen, and a context that lets only those parts require gradients."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn

from .layers import is_spectral

PARTS = ("base", "start", "end", "bias", "rest")


def spectral_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if is_spectral(m)}


def parameter_parts(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Every parameter of ``model`` by part: ``base`` (eigenvector blocks), ``start`` / ``end`` (eigenvalues),
    ``bias`` (of the spectral layers), ``rest`` (everything else). A parameter shared by several modules is
    listed once, under its first part."""
    modules = spectral_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no spectral layers: convert it with "
                         "fermigates.convert_to_fermi(model, FermiConfig(method='spectral', granularity='channel'))")
    parts: dict[str, list[nn.Parameter]] = {p: [] for p in PARTS}
    seen: set[int] = set()

    def add(part: str, p: nn.Parameter | None) -> None:
        if p is not None and id(p) not in seen:
            seen.add(id(p))
            parts[part].append(p)

    for m in modules.values():
        add("base", m.base)
        add("start", m.eig_start)
        add("end", m.eig_end)
        add("bias", m.bias)
    for p in model.parameters():
        add("rest", p)
    return parts


def spectral_parameters(model: nn.Module, *, base: bool = False, start: bool = False, end: bool = True,
                        bias: bool = False, rest: bool = False) -> list[nn.Parameter]:
    """The parameters of the parts named True (default: the end eigenvalues only), for an optimizer of your own."""
    chosen = {"base": base, "start": start, "end": end, "bias": bias, "rest": rest}
    parts = parameter_parts(model)
    return [p for part in PARTS if chosen[part] for p in parts[part]]


@contextlib.contextmanager
def spectral_trainable(model: nn.Module, *, base: bool = False, start: bool = False, end: bool = True,
                       bias: bool = False, rest: bool = False) -> Iterator[nn.Module]:
    """Within this context only the parts named True require gradients (default: the end eigenvalues only, the
    papers' eigenvalue-only training), so a training function that optimizes ``[p for p in
    model.parameters() if p.requires_grad]`` trains exactly them; every flag is restored afterwards."""
    chosen = {"base": base, "start": start, "end": end, "bias": bias, "rest": rest}
    if not any(chosen.values()):
        raise ValueError("spectral_trainable needs at least one part to train (base, start, end, bias, rest)")
    parts = parameter_parts(model)
    before = [(p, p.requires_grad) for ps in parts.values() for p in ps]
    try:
        for part, params in parts.items():
            for p in params:
                p.requires_grad_(chosen[part])
        yield model
    finally:
        for p, flag in before:
            p.requires_grad_(flag)


class SpectralOptimizer(torch.optim.AdamW):
    """AdamW over the parts of a spectral model that train (one param group per part, ``group["part"]`` names
    it). ``parts``: ``{"base", "start", "end", "bias", "rest"} -> bool``; weight decay applies to none of them
    unless given (it would pull every eigenvalue, and so every node, toward 0).

    ``sparsity_loss()`` is ``l1 * penalty()`` (the training loop adds it to the loss): with the method's
    ``penalty``, an L1 pull of the eigenvalues that judge nodes toward 0, each over the magnitude it started from.
    """

    def __init__(self, model: nn.Module, parts: dict[str, bool], lr: float = 1e-3, weight_decay: float = 0.0,
                 *, l1: float = 0.0, penalty: Callable[[], torch.Tensor] | None = None, **adamw: Any) -> None:
        if isinstance(l1, bool) or not isinstance(l1, (int, float)) or not l1 >= 0:
            raise ValueError(f"l1 must be a number >= 0, got {l1!r}")
        if l1 and penalty is None:
            raise ValueError("l1 > 0 needs the penalty it weighs (the method's optimizer passes it)")
        unknown = sorted(set(parts) - set(PARTS))
        if unknown:
            raise ValueError(f"parts must be among {PARTS}, got {unknown}")
        available = parameter_parts(model)
        groups = [{"params": available[part], "part": part} for part in PARTS
                  if parts.get(part) and available[part]]
        if not groups:
            raise ValueError(f"nothing to train: the parts chosen ({[p for p in PARTS if parts.get(p)]}) have no "
                             "parameters; set train_end=True (or another part) in the spectral options")
        super().__init__(groups, lr=lr, weight_decay=weight_decay, **adamw)
        self.parts = {p: bool(parts.get(p)) for p in PARTS}
        self.l1, self._penalty = float(l1), penalty
        self._device = groups[0]["params"][0].device

    def sparsity_loss(self) -> torch.Tensor:
        """The L1 term to add to the loss (0 when ``l1`` is 0)."""
        if not self.l1:
            return torch.zeros((), device=self._device)
        return self.l1 * self._penalty()
