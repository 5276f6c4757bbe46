"""Streaming ridge statistics and the closed-form solve behind :func:`fermigates.calibrate`.

One :class:`LayerPlan` per calibrated layer turns the layer's input (pruned model) into rows of features
``X`` (grouped: ``(groups, n, p)``) and the reference layer's output into matching targets ``Y``
(``(groups, n, out_per_group)``); :class:`RidgeStats` accumulates ``XᵀX``, ``XᵀY`` and ``ΣY²`` in float64,
so memory does not grow with the number of samples; :func:`ridge_solve` returns the weights that minimise
``||XW - Y||² + λ||W - W0||²`` with ``λ = ridge · mean(diag(XᵀX))`` (regularised toward the current
weights ``W0``, not toward zero).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.registry import LINEAR_LIKE, lookup

_logger = logging.getLogger(__name__)

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
SUPPORTED = (nn.Linear, *CONVS)


def transposed(module: nn.Module) -> bool:
    """A registered Linear-like layer whose weight is stored ``(in, out)`` (transformers' ``Conv1D``)."""
    if isinstance(module, SUPPORTED):
        return False
    layout = lookup(LINEAR_LIKE, module)
    return layout is not None and layout.out_dim == 1


def is_supported(module: nn.Module) -> bool:
    """Layers :func:`fermigates.calibrate` can re-fit: Linear, Conv1d/2d/3d and Linear-like ``(in, out)`` ones."""
    return isinstance(module, SUPPORTED) or transposed(module)


def weight_2d(module: nn.Module) -> torch.Tensor:
    """The weight as ``(out, in, *kernel)`` (a view: writing into it writes the layer)."""
    return module.weight.T if transposed(module) else module.weight


def _explicit_padding(conv: nn.Module) -> list[tuple[int, int]]:
    """(left, right) padding per spatial dim, resolving ``padding='same'|'valid'`` like torch does."""
    nd = len(conv.kernel_size)
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return [(0, 0)] * nd
        out = []
        for k, d in zip(conv.kernel_size, conv.dilation):
            total = d * (k - 1)
            out.append((total // 2, total - total // 2))
        return out
    return [(p, p) for p in conv.padding]


def conv_patches(x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
    """Input patches of an N-d convolution as rows ``(B * positions, C * prod(kernel))``.

    Columns are ordered like ``conv.weight.flatten(1)`` (channel-major, then kernel taps) and rows like the
    output positions (batch, then spatial dims in order), for any stride, dilation, padding and padding mode.
    """
    nd = x.dim() - 2
    pad = _explicit_padding(conv)
    flat = [p for lr in reversed(pad) for p in lr]  # F.pad wants the last dim first
    if any(flat):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, flat, mode=mode)
    for i, (k, s, d) in enumerate(zip(conv.kernel_size, conv.stride, conv.dilation)):
        x = x.unfold(2 + i, (k - 1) * d + 1, s)
        if d > 1:
            x = x[..., ::d]
    channels = x.shape[1]
    perm = [0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd)]
    return x.permute(perm).reshape(-1, channels * math.prod(conv.kernel_size))


@dataclass
class LayerPlan:
    """How one layer is calibrated.

    ``ref_out``: reference output channel of each pruned output channel (``kept_out``), None = identity.
    ``sel_in`` / ``sel_out``: pruned-layer input channels / output channels that take part in the solve
    (None = all); used for hard-masked layers of unchanged shape, whose zeroed columns stay zero.
    """

    name: str
    module: nn.Module
    reference: nn.Module
    kept_in: torch.Tensor | None = None
    kept_out: torch.Tensor | None = None
    sel_in: torch.Tensor | None = None
    sel_out: torch.Tensor | None = None

    @property
    def is_conv(self) -> bool:
        return isinstance(self.module, CONVS)

    @property
    def groups(self) -> int:
        return self.module.groups if self.is_conv else 1

    @property
    def has_bias(self) -> bool:
        return self.module.bias is not None

    @property
    def ref_out(self) -> torch.Tensor | None:
        return self.kept_out

    # -- rows -------------------------------------------------------------------------------------------
    def features(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Rows of the layer's input as ``(groups, n, p)``."""
        if self.is_conv:
            if self.sel_in is not None:
                x = x.index_select(1, self.sel_in.to(x.device))
            rows = conv_patches(x, self.module)
        else:
            if self.sel_in is not None:
                x = x.index_select(-1, self.sel_in.to(x.device))
            rows = masked_rows(x, mask)
        g = self.groups
        return rows.reshape(rows.shape[0], g, -1).transpose(0, 1)

    def targets(self, y: torch.Tensor, mask: torch.Tensor | None, shrunk: bool = False) -> torch.Tensor:
        """Rows of the reference layer's output restricted to the kept outputs, ``(groups, n, og)``; ``shrunk``:
        ``y`` is already as wide as the kept outputs (a tensor of the pruned model)."""
        ch_dim = 1 if self.is_conv else -1
        if self.kept_out is not None and not shrunk:
            y = y.index_select(ch_dim, self.kept_out.to(y.device))
        if self.sel_out is not None:
            y = y.index_select(ch_dim, self.sel_out.to(y.device))
        rows = y.movedim(1, -1).reshape(-1, y.shape[1]) if self.is_conv else masked_rows(y, mask)
        g = self.groups
        return rows.reshape(rows.shape[0], g, -1).transpose(0, 1)

    # -- weights ----------------------------------------------------------------------------------------
    def _block(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        w, b = weight_2d(self.module).detach(), None if self.module.bias is None else self.module.bias.detach()
        if self.sel_out is not None:
            w = w.index_select(0, self.sel_out.to(w.device))
            b = None if b is None else b.index_select(0, self.sel_out.to(w.device))
        if self.sel_in is not None:
            w = w.index_select(1, self.sel_in.to(w.device))
        return w, b

    def current(self) -> torch.Tensor:
        """The layer's weights (and bias) as the solve's ``W0``: ``(groups, p [+1], og)`` float64."""
        w, b = self._block()
        g = self.groups
        w0 = w.reshape(g, w.shape[0] // g, -1).transpose(1, 2)
        if b is not None:
            w0 = torch.cat([w0, b.reshape(g, 1, -1)], dim=1)
        return w0.double()

    @torch.no_grad()
    def write(self, sol: torch.Tensor) -> None:
        """Write a solution shaped like :meth:`current` into the layer in place (in the layer's dtype)."""
        weight, bias = weight_2d(self.module), self.module.bias
        w, _ = self._block()
        p = w[0].numel()
        new_w = sol[:, :p, :].transpose(1, 2).reshape(w.shape).to(weight.dtype)
        so = None if self.sel_out is None else self.sel_out.to(weight.device)
        si = None if self.sel_in is None else self.sel_in.to(weight.device)
        if so is None and si is None:
            weight.copy_(new_w)
        else:
            rows = so if so is not None else torch.arange(weight.shape[0], device=weight.device)
            cols = si if si is not None else torch.arange(weight.shape[1], device=weight.device)
            weight[rows[:, None], cols[None, :]] = new_w
        if bias is not None:
            new_b = sol[:, p, :].reshape(-1).to(bias.dtype)
            if so is None:
                bias.copy_(new_b)
            else:
                bias[so] = new_b


def masked_rows(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Flatten leading dims to rows; drop rows where ``mask`` (shaped like the leading dims) is False."""
    rows = t.reshape(-1, t.shape[-1])
    if mask is not None and tuple(t.shape[:-1]) == tuple(mask.shape):
        rows = rows[mask.reshape(-1).to(rows.device)]
    return rows


class RidgeStats:
    """Float64 running sums ``XᵀX``, ``XᵀY``, ``ΣY²`` per group; a ones column models the bias.

    ``batch_dtype``: dtype of each batch's products before they are added to the float64 sums (float64 =
    exact; float32 halves the cost and is ample once the ridge term bounds the condition number).
    """

    def __init__(self, groups: int, p: int, og: int, bias: bool, device: torch.device,
                 batch_dtype: torch.dtype = torch.float64) -> None:
        p1 = p + int(bias)
        self.bias, self.batch_dtype = bias, batch_dtype
        self.xtx = torch.zeros(groups, p1, p1, dtype=torch.float64, device=device)
        self.xty = torch.zeros(groups, p1, og, dtype=torch.float64, device=device)
        self.yy = torch.zeros(groups, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add rows ``x`` ``(groups, n, p)`` and ``y`` ``(groups, n, og)``."""
        if x.shape[1] != y.shape[1]:
            raise ValueError(
                f"the pruned layer's input gives {x.shape[1]} rows but the reference output gives "
                f"{y.shape[1]}; do both layers have the same stride/padding and see the same batch?"
            )
        x = x.to(self.xtx.device, self.batch_dtype)
        y = y.to(self.xtx.device, self.batch_dtype)
        if self.bias:
            x = torch.cat([x, x.new_ones(x.shape[0], x.shape[1], 1)], dim=2)
        xt = x.transpose(1, 2)
        if self.batch_dtype == torch.float64:
            self.xtx.baddbmm_(xt, x)
            self.xty.baddbmm_(xt, y)
        else:
            self.xtx += torch.bmm(xt, x).double()
            self.xty += torch.bmm(xt, y).double()
        self.yy += y.double().square().sum(dim=(1, 2))
        self.n += x.shape[1]

    def error(self, w: torch.Tensor) -> float:
        """Relative squared error ``||XW - Y||² / ||Y||²`` from the sums alone (no second pass)."""
        sq = (w * torch.bmm(self.xtx, w)).sum() - 2 * (w * self.xty).sum() + self.yy.sum()
        return max(float(sq), 0.0) / max(float(self.yy.sum()), 1e-300)


def ridge_solve(stats: RidgeStats, w0: torch.Tensor, ridge: float) -> tuple[torch.Tensor, str]:
    """Solve ``(XᵀX + λI) W = XᵀY + λ W0`` per group; returns ``(W, solver name)``.

    Cholesky first; groups where it fails (singular system, e.g. ``ridge=0`` with dead inputs) fall back to
    an eigendecomposition pseudo-inverse of the step ``W - W0``, which leaves unidentifiable directions at
    their current value.
    """
    a, b = stats.xtx, stats.xty
    w0 = w0.to(a.device)
    p = a.shape[-1] - int(stats.bias)
    diag = a.diagonal(dim1=1, dim2=2)[:, :p]
    lam = ridge * diag.mean(dim=1)
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    a_reg = a + lam[:, None, None] * eye
    rhs = b + lam[:, None, None] * w0
    chol, info = torch.linalg.cholesky_ex(a_reg)
    sol = torch.cholesky_solve(rhs, chol)
    bad = (info != 0) | ~torch.isfinite(sol).flatten(1).all(dim=1)
    solver = "cholesky"
    if bool(bad.any()):
        idx = bad.nonzero().flatten()
        evals, evecs = torch.linalg.eigh(a_reg[idx])
        cut = evals.abs().amax(dim=1, keepdim=True) * a.shape[-1] * torch.finfo(a.dtype).eps
        inv = torch.where(evals.abs() > cut, 1.0 / evals, torch.zeros_like(evals))
        step = rhs[idx] - torch.bmm(a_reg[idx], w0[idx])
        delta = evecs @ (inv[..., None] * (evecs.transpose(1, 2) @ step))
        sol[idx] = w0[idx] + delta
        solver = "eigh" if len(idx) == len(bad) else f"cholesky+eigh({len(idx)}/{len(bad)})"
        _logger.debug("Cholesky failed for %d of %d groups; used eigh", len(idx), len(bad))
    return sol, solver
