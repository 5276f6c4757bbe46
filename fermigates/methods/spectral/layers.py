"""Spectral twins of ``nn.Linear`` and of registered Linear-like layers (transformers' ``Conv1D``).

Giambagli et al. (2021) write the map between a layer of ``N_in`` start nodes and one of ``N_out`` end nodes as
the off-diagonal block of ``A = Phi Lambda Phi^-1``, where ``Phi`` is the identity plus the eigenvector block
``phi`` (``N_out x N_in``, below the diagonal, so ``Phi^-1 = I - phi``) and ``Lambda = diag(lambda_start,
lambda_end)``. That block, ``phi Lambda_start - Lambda_end phi``, is the weight::

    w_ij = phi_ij * (lambda_start_j - lambda_end_i)      i: end node (output feature), j: start node (input)

which is the seed's ``kernel = base * (diag_start - diag_end)`` in its ``(in, out)`` layout. A twin keeps that
form: the Parameter registered under the layer's ``weight`` key holds ``phi`` (so state-dict keys and the
parameter counts of the layer stay; read it as ``twin.base``), ``eig_start`` and ``eig_end`` hold the
eigenvalues, and the *attribute* ``twin.weight`` is the weight the layer computes with, ``phi * (lambda_start -
lambda_end)`` (a tensor with gradients to ``phi`` and the eigenvalues). Everything that reads ``.weight``
(MAC counting, the one-shot selection, user code) therefore sees the layer's function.

Converted from a pretrained layer with ``normalize=True``: ``phi_i = -W_i / ||W_i||``, ``lambda_end_i =
||W_i||``, ``lambda_start = 0``, so ``w_ij = W_ij`` (to rounding) and ``|lambda_end_i|`` starts as node ``i``'s
incoming-weight norm; with ``normalize=False``: ``phi = -W``, ``lambda_end = 1`` (the seed's initialisation).

Decided nodes are removed by an input mask (``in_mask``, a non-persistent buffer): the columns of removed start
nodes are multiplied by 0 while ``mask_on``, exactly what the shared shrink gives when it cuts them.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...core.layouts import LinearLayout, linear_like, plain_base
from ...core.twin import Twin, make_twin, plain_copy

#: what a twin adds to the layer it replaces (dropped when it is baked back)
_ATTRS = ("mask_on", "_out_dim", "_weight_requires_grad")
_PARAMS = ("eig_start", "eig_end")
_BUFFERS = ("in_mask",)


class SpectralMixin(Twin):
    """Shared behaviour of every spectral twin. ``_out_dim`` is the axis of ``base`` indexing output features."""

    _out_dim: int = 0
    mask_on: bool = True
    eig_start: nn.Parameter
    eig_end: nn.Parameter
    in_mask: torch.Tensor | None
    bias: nn.Parameter | None

    @property
    def base(self) -> nn.Parameter:
        """The eigenvector block ``phi`` (the Parameter stored under the layer's ``weight`` key)."""
        return self._parameters["weight"]

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        """The weight the layer computes with before any node is removed: ``phi * (lambda_start - lambda_end)``."""
        return self.spectral_weight()

    def eigenvalue_factor(self) -> torch.Tensor:
        """``lambda_start_j - lambda_end_i``, shaped like ``base``."""
        if self._out_dim == 0:
            return self.eig_start.unsqueeze(0) - self.eig_end.unsqueeze(1)
        return self.eig_start.unsqueeze(1) - self.eig_end.unsqueeze(0)

    def spectral_weight(self) -> torch.Tensor:
        return self.base * self.eigenvalue_factor()

    def applied_weight(self) -> torch.Tensor:
        """The weight of the forward: the spectral weight with removed start nodes' columns zeroed."""
        weight = self.spectral_weight()
        mask = self.in_mask
        if self.mask_on and mask is not None:
            weight = weight * (mask.unsqueeze(0) if self._out_dim == 0 else mask.unsqueeze(1)).to(weight.dtype)
        return weight

    @property
    def n_in(self) -> int:
        return int(self.base.shape[1 - self._out_dim])

    @property
    def n_out(self) -> int:
        return int(self.base.shape[self._out_dim])

    @torch.no_grad()
    def to_plain(self) -> nn.Module:
        """The original class with ``weight`` = the spectral weight (a new Parameter; no node removed), the
        bias shared."""
        weight = nn.Parameter(self.spectral_weight().detach().clone(), requires_grad=self._weight_requires_grad)
        plain = plain_copy(self, drop_attrs=_ATTRS, drop_params=_PARAMS, drop_buffers=_BUFFERS)
        plain._parameters["weight"] = weight
        plain._non_persistent_buffers_set = set(self._non_persistent_buffers_set) - set(_BUFFERS)
        return plain

    def _spectral_repr(self) -> str:
        removed = 0 if self.in_mask is None else int((self.in_mask == 0).sum())
        return f"spectral: {self.n_in} start / {self.n_out} end eigenvalues, {removed} start nodes removed"


class SpectralLinear(SpectralMixin, nn.Linear):
    """``nn.Linear`` whose weight is ``phi * (lambda_start - lambda_end)``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, self.applied_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{nn.Linear.extra_repr(self)}, {self._spectral_repr()}"


@functools.lru_cache(maxsize=None)
def _linear_like_class(base: type, layout: LinearLayout) -> type:
    """A spectral twin of a registered Linear-like class that stores its weight as ``(in, out)``
    (transformers' ``Conv1D``): ``y = x @ W + b``."""

    class SpectralLinearLike(SpectralMixin, base):
        _out_dim = 1

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            weight = self.applied_weight()
            flat = x.reshape(-1, x.shape[-1])
            out = flat @ weight if self.bias is None else torch.addmm(self.bias, flat, weight)
            return out.view(*x.shape[:-1], weight.shape[1])

        def __repr__(self) -> str:
            return f"Spectral{base.__name__}({self._spectral_repr()})"

    SpectralLinearLike.__name__ = SpectralLinearLike.__qualname__ = f"Spectral{base.__name__}"
    return SpectralLinearLike


def spectral_class(module: nn.Module) -> type | None:
    """The spectral twin class of ``module``, or None: only ``nn.Linear`` (and subclasses that compute its
    function) and registered Linear-like layers with an ``(in, out)`` weight have one."""
    if isinstance(module, SpectralMixin):
        return None
    if plain_base(module) is nn.Linear:
        return SpectralLinear
    layout = linear_like(module)
    if layout is not None and layout.out_dim == 1 and "forward" in type(module).__dict__:
        return _linear_like_class(type(module), layout)
    return None


def is_spectral(module: nn.Module) -> bool:
    return isinstance(module, SpectralMixin)


@torch.no_grad()
def make_spectral(module: nn.Module, *, normalize: bool = True) -> nn.Module:
    """A spectral twin of ``module`` that computes its function (``module`` is left as it is): the twin shares
    its bias and holds new Parameters for ``phi`` and the eigenvalues (see the module docstring)."""
    cls = spectral_class(module)
    if cls is None:
        raise TypeError(f"{type(module).__name__} has no spectral twin (nn.Linear or a registered Linear-like "
                        "layer with an (in, out) weight only)")
    twin = make_twin(module, cls)
    out_dim = cls._out_dim
    w = module.weight.detach()
    rows = w.movedim(out_dim, 0)  # (out, in)
    if normalize:
        norm = rows.float().norm(dim=1).to(w.dtype)
        scale = torch.where(norm > 0, norm, torch.ones_like(norm))
        end = norm  # a dead row (all zero) gets lambda_end = 0: it ranks last
    else:
        scale = torch.ones(rows.shape[0], dtype=w.dtype, device=w.device)
        end = scale.clone()
    phi = (-rows / scale.unsqueeze(1)).movedim(0, out_dim).contiguous()
    twin._out_dim = out_dim
    twin._weight_requires_grad = module.weight.requires_grad
    twin._parameters["weight"] = nn.Parameter(phi, requires_grad=module.weight.requires_grad)
    twin._parameters["eig_start"] = nn.Parameter(torch.zeros(rows.shape[1], dtype=w.dtype, device=w.device))
    twin._parameters["eig_end"] = nn.Parameter(end.clone())
    twin._buffers["in_mask"] = None
    twin._non_persistent_buffers_set = set(twin._non_persistent_buffers_set) | {"in_mask"}
    twin.mask_on = True
    return twin
