"""Tiny models and helpers shared by the graph / shrink tests."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from fermigates.surgery.graph import DependencyGraph
from fermigates.surgery.shrink import ShrinkResult, mask_model, shrink_model


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give zero / one initialised tensors (BN gammas, biases, running stats, layer scales) random values, so
    that no branch of a random-weight model is trivially zero."""
    gen = torch.Generator().manual_seed(seed)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if not t.is_floating_point() or t.numel() == 0:
            continue
        if name.endswith("running_var") or bool((t == 1).all()):
            t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
        elif bool((t == 0).all()) or name.endswith("running_mean") or bool((t.abs() < 1e-5).all()):
            t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
    return model


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = a.abs().max().item()
    return 0.0 if scale == 0 and bool((b == 0).all()) else (a - b).abs().max().item() / max(scale, 1e-12)


def outputs(model: nn.Module, x) -> torch.Tensor:
    with torch.no_grad():
        y = model(**x) if isinstance(x, dict) else model(x)
    if isinstance(y, torch.Tensor):
        return y
    return y[0] if isinstance(y, (tuple, list)) else next(iter(y.values()))


def random_keep(graph: DependencyGraph, frac: float, seed: int) -> dict[int, torch.Tensor]:
    """Each unit of every prunable group is removed with probability ``frac``."""
    gen = torch.Generator().manual_seed(seed)
    return {g.id: torch.rand(g.n_units, generator=gen) >= frac for g in graph.prunable}


def whole_group_keep(graph: DependencyGraph, seed: int) -> dict[int, torch.Tensor]:
    """Every other prunable group loses all its units; the others lose half."""
    gen = torch.Generator().manual_seed(seed)
    keep = {}
    for i, g in enumerate(graph.prunable):
        keep[g.id] = torch.zeros(g.n_units, dtype=torch.bool) if i % 2 == 0 else torch.rand(g.n_units, generator=gen) > 0.5
    return keep


def masked_vs_shrunk(model: nn.Module, graph: DependencyGraph, keep, x) -> tuple[float, ShrinkResult, nn.Module]:
    """Relative max difference between the hard-masked and the shrunk copies of ``model``."""
    masked, shrunk = copy.deepcopy(model), copy.deepcopy(model)
    mask_model(masked, graph, keep)
    result = shrink_model(shrunk, graph, keep)
    return rel_diff(outputs(masked, x), outputs(shrunk, x)), result, shrunk


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------- tiny models
def conv_bn(cin: int, cout: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, groups=groups, bias=False), nn.BatchNorm2d(cout))


class SmallCNN(nn.Module):
    """Stem, a residual block with a depthwise conv, an SE gate, a concat and a flatten before the head."""

    def __init__(self, c: int = 8, size: int = 6) -> None:
        super().__init__()
        self.stem = conv_bn(3, c)
        self.a = conv_bn(c, 2 * c)
        self.dw = conv_bn(2 * c, 2 * c, groups=2 * c)
        self.b = conv_bn(2 * c, c)
        self.se_reduce = nn.Conv2d(c, 4, 1)
        self.se_expand = nn.Conv2d(4, c, 1)
        self.side = nn.Conv2d(c, 4, 1)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)
        self.fc = nn.Linear((c + 4) * size * size, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        y = F.relu(self.dw(F.relu(self.a(x))))
        y = self.b(y) * self.gamma.view(1, -1, 1, 1)
        x = F.relu(x + y)
        s = torch.sigmoid(self.se_expand(F.relu(self.se_reduce(x.mean((2, 3), keepdim=True)))))
        x = x * s
        x = torch.cat([x, self.side(x)], dim=1)
        return self.fc(torch.flatten(x, 1))


class SmallMLP(nn.Module):
    def __init__(self, d: int = 12, h: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(d, h)
        self.fc1 = nn.Linear(h, 2 * h)
        self.fc2 = nn.Linear(2 * h, h)
        self.fc3 = nn.Linear(h, h)
        self.out = nn.Linear(h, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.inp(x))
        a, b = self.fc1(x).chunk(2, dim=-1)
        x = x + self.fc2(torch.cat([F.gelu(a), torch.tanh(b)], dim=-1))
        x = x + self.fc3(F.silu(x))
        return self.out(x)


class Lambda(nn.Module):
    """``forward`` given as a function of (self, x): for one-off graph tests."""

    def __init__(self, fn, **modules: nn.Module) -> None:
        super().__init__()
        self.fn = fn
        for name, mod in modules.items():
            setattr(self, name, mod)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self, x)
