"""Deep Rewiring behind the method interface: which layers get sign-fixed twins, their parameter groups,
their sparsity, and how they bake."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from ...core.modules import attribute_set
from ...core.sparsity import LayerSparsity, SparsityReport
from ..base import Decisions, Method
from .config import RewireConfig
from .layers import is_rewired, make_rewired, rewired_class
from .optim import DEEPR, SoftDEEPR


def rewired_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if is_rewired(m)}


def rewire_param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Param groups for ``DEEPR`` / ``SoftDEEPR`` over a rewired model: the connections (``theta`` of every
    weight, and of biases with ``handle_biases="as_connections"``); the two parts of every ``second_bias``
    (``connection=False, nonnegative=True``); every other trainable parameter (``connection=False``: plain
    SGD). Empty groups are left out. Pass the first group alone to rewire with one optimizer and train the
    rest with another (then keep the ``second_bias`` parts non-negative yourself, or they may stop learning).
    """
    modules = rewired_modules(model)
    if not modules:
        raise ValueError(
            f"{type(model).__name__} has no rewired layers: convert it with "
            "fermigates.convert_to_fermi(model, FermiConfig(method='deepr' or 'softdeepr')) first"
        )
    connections, pairs, seen = [], [], set()
    for module in modules.values():
        for p in module.connection_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                connections.append(p)
        for p in module.bias_pair():
            if id(p) not in seen:
                seen.add(id(p))
                pairs.append(p)
    others = [p for p in model.parameters() if id(p) not in seen and p.requires_grad]
    groups = [{"params": connections, "connection": True},
              {"params": pairs, "connection": False, "nonnegative": True},
              {"params": others, "connection": False}]
    return [g for g in groups if g["params"]]


class RewireMethod(Method):
    """``method="deepr"`` (a fixed number of active connections) or ``"softdeepr"`` (noise, no fixed count):
    the same sign-fixed layers; the name picks the optimizer ``make_optimizer`` builds."""

    granularities = ("weight",)
    options = RewireConfig

    def __init__(self, name: str) -> None:
        self.name = name

    def check_config(self, config: Any) -> None:
        if config.granularities != ("weight",):
            raise ValueError(
                f"method={self.name!r} rewires single connections: granularity must be 'weight', "
                f"got {config.granularity!r}"
            )
        if isinstance(config.target_sparsity, dict):
            raise ValueError(f"method={self.name!r} takes one target_sparsity (a float), got {config.target_sparsity!r}")
        self.parse_options(config)

    def target(self, module: nn.Module, config: Any) -> bool | str:
        if is_rewired(module):
            return False
        if rewired_class(module) is not None:
            return True
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            return f"{type(module).__name__} has no sign-fixed twin (plain Linear / Conv only)"
        return False

    def convert(self, model: nn.Module, config: Any, targets: dict[str, nn.Module], state: Any,
                example_inputs: Any = None) -> dict[str, nn.Module]:
        options = self.parse_options(config)
        if example_inputs is not None:
            state.example_inputs = example_inputs  # for the report's MAC counts
        generator = None
        if options.seed is not None:
            generator = torch.Generator().manual_seed(options.seed)
        owners: dict[int, int] = {}
        for module in model.modules():
            for p in module.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
        twins: dict[str, nn.Module] = {}
        summary = state.summary
        for name, module in targets.items():
            if rewired_class(module) is None:
                summary.skipped.append((name, f"{type(module).__name__} has no sign-fixed twin (Linear / Conv only)"))
                continue
            if any(owners.get(id(p), 0) > 1 for p in module.parameters(recurse=False)):
                summary.skipped.append((name, "its weight is shared with another module (tied); left whole"))
                continue
            twins[name] = make_rewired(
                module, keep_fraction=1.0 - float(config.target_sparsity), handle_biases=options.handle_biases,
                keep_signs=options.keep_signs, init=options.init, generator=generator,
            )
            summary.n_gates += 1
            summary.n_units += module.weight.numel()
        if not twins:
            reasons = "; ".join(f"{n}: {w}" for n, w in summary.skipped[:5])
            raise ValueError(f"nothing to rewire in {type(model).__name__} ({reasons or 'no targets'})")
        return twins

    def is_twin(self, module: nn.Module) -> bool:
        return is_rewired(module)

    @torch.no_grad()
    def sparsity(self, model: nn.Module) -> SparsityReport:
        report = SparsityReport()
        for name, module in rewired_modules(model).items():
            active = module.active_mask()
            report.layers.append(LayerSparsity(name, "connections", int(active.sum()), active.numel()))
        return report

    def own_tensors(self, model: nn.Module) -> list[torch.Tensor]:
        """The negative bias parts and the fixed signs (the plain layer folds them into one weight / bias)."""
        out = []
        for m in rewired_modules(model).values():
            out += [t for name, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]
                    if name in ("bias_negative", "weight_sign", "bias_sign")]
        return out

    def dense(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return _all_active(model)

    def make_dense(self, model: nn.Module) -> None:
        for m in rewired_modules(model).values():
            m.all_active = True

    @torch.no_grad()
    def decisions(self, model: nn.Module) -> Decisions:
        return Decisions({id(m): m.to_plain() for m in rewired_modules(model).values()})

    def is_method_optimizer(self, optimizer: Any) -> bool:
        return isinstance(optimizer, (DEEPR, SoftDEEPR))

    def optimizer(self, model: nn.Module, *, lr: float = 1e-3, total_steps: int | None = None,
                  base: torch.optim.Optimizer | None = None, calibration_data: Any = None, progress: bool = False,
                  **kwargs: Any) -> torch.optim.Optimizer:
        """``DEEPR`` / ``SoftDEEPR`` over :func:`rewire_param_groups` (``lr`` and their keywords). A ``base``
        optimizer cannot be wrapped: the rewiring optimizers are the whole update rule."""
        cls = DEEPR if self.name == "deepr" else SoftDEEPR
        if base is not None:
            raise ValueError(f"method={self.name!r} trains with its own optimizer ({cls.__name__}), not around "
                             f"{type(base).__name__}: pass no optimizer")
        return cls(rewire_param_groups(model), lr=lr, **kwargs)


@contextlib.contextmanager
def _all_active(model: nn.Module) -> Iterator[nn.Module]:
    with attribute_set(rewired_modules(model).values(), "all_active", True):
        yield model
