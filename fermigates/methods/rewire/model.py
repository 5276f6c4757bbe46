"""Deep Rewiring behind the method interface: which layers get sign-fixed twins, their parameter groups,
their sparsity, and how they bake."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..base import Method
from .config import RewireConfig
from .layers import is_rewired, make_rewired, rewired_class


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
        RewireConfig.from_dict(config.method_options)

    def convert(self, model: nn.Module, config: Any, targets: dict[str, nn.Module], state: Any,
                example_inputs: Any = None) -> dict[str, nn.Module]:
        options = RewireConfig.from_dict(config.method_options)
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
    def sparsity(self, model: nn.Module) -> Any:
        from ...report import LayerSparsity, SparsityReport

        report = SparsityReport()
        for name, module in rewired_modules(model).items():
            active = module.active_mask()
            report.layers.append(LayerSparsity(name, "connections", int(active.sum()), active.numel()))
        return report

    def training_only_parameters(self, model: nn.Module) -> int:
        return sum(m.bias_negative.numel() for m in rewired_modules(model).values() if m.bias_pair())

    def plain_replacements(self, model: nn.Module) -> dict[int, nn.Module]:
        return {id(m): m.to_plain() for m in rewired_modules(model).values()}

    def optimizer(self, model: nn.Module, **kwargs: Any) -> torch.optim.Optimizer:
        from .optim import DEEPR, SoftDEEPR

        cls = DEEPR if self.name == "deepr" else SoftDEEPR
        return cls(rewire_param_groups(model), **kwargs)
