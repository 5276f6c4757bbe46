"""``fold_batchnorm``: fold eval-mode batch norms into the convolution / Linear that feeds them.

A batch norm in eval mode is a per-channel affine map, ``y = (x - mean) * g / sqrt(var + eps) + b``; when
its input is the output of a Conv / Linear and nothing else reads that output, the map can be written into
the producer's weight and bias and the norm removed. The function is unchanged (to float rounding) and
the norm's memory-bound pass over the activations is gone: on a pruned MobileNetV2 that pass costs about
as much as the convolutions it follows, and it shrinks only linearly with the width while the MACs shrink
quadratically, so folding is what lets a shrunk model's speedup follow its MAC reduction.

Which pairs qualify is read from one run of the model on example inputs (forward hooks on the candidates,
a ``TorchFunctionMode`` counting every other use of the producer's output), not from module order: a
residual that also reads the conv output, an in-place op in between, a module called twice, a shared
weight or a norm that uses batch statistics in eval mode all keep the pair apart. Batch-norm subclasses
that do more than normalise (timm's ``BatchNormAct2d`` also applies its activation) are folded only when a
replacement for them is registered in ``converters`` (``registry.BN_FOLD``).

This is a deployment step, like ``model.eval()``: apply it after :func:`fermigates.load_shrunk` (checkpoints
keep the stock architecture so they load into a freshly built model; :func:`fermigates.save_shrunk` refuses
a folded model). ONNX Runtime does the same fusion by itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

from ..core import registry
from ..core.batches import call_model, max_relative_diff, output_tensors, walk_tensors
from ..core.layouts import CONVS
from ..core.modules import restore, snapshot
from ..core.state import find_state
from ..core.twin import is_twin
from .leaves import opaque
from .verify import SHRINK_RTOL

__all__ = ["BatchNormFold", "fold_batchnorm"]

#: set on a model whose batch norms were folded (``save_shrunk`` checks it)
FOLDED_ATTR = "_fermigates_folded_bn"

_PLAIN_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass
class BatchNormFold:
    """What :func:`fold_batchnorm` did: ``folded`` maps each removed norm to the layer that absorbed it;
    ``skipped`` maps the norms left in place to the reason."""

    folded: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    max_abs_diff: float | None = None

    def __str__(self) -> str:
        lines = [f"folded {len(self.folded)} batch norm(s), skipped {len(self.skipped)}"]
        lines += [f"  kept {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _replacement(norm: nn.Module) -> nn.Module | None:
    """What stands in for ``norm`` once its affine map is folded (``None``: unknown subclass)."""
    make = registry.BN_FOLD.get(registry.qualname(type(norm)))  # exact class: a subclass may do more
    if make is not None:
        return make(norm)
    for base in type(norm).__mro__:
        if base in _PLAIN_BN:
            return nn.Identity()  # a subclass that keeps the torch forward
        if "forward" in base.__dict__:
            return None
    return None


def _affine_producer(module: nn.Module) -> bool:
    if is_twin(module) or not isinstance(module, (nn.Linear, *CONVS)):
        return False
    return not (parametrize.is_parametrized(module) or opaque(module))


class _UseCounter(TorchFunctionMode):
    """Counts, per tensor, the calls that read it and return a tensor, outside the norms being probed."""

    def __init__(self) -> None:
        super().__init__()
        self.uses: dict[int, int] = {}
        self.inside_norm = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.inside_norm == 0 and next(walk_tensors(out), None) is not None:
            for arg in walk_tensors((args, kwargs or {})):
                self.uses[id(arg)] = self.uses.get(id(arg), 0) + 1
        return out


def _find_pairs(model: nn.Module, example_inputs: Any, report: BatchNormFold) -> tuple[list, list[torch.Tensor]]:
    """``(norm, producer, replacement)`` for each foldable pair, and the model's outputs on the run."""
    modules = dict(model.named_modules())
    norms = {n: m for n, m in modules.items() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    producers = {n: m for n, m in modules.items() if isinstance(m, (nn.Linear, *CONVS))}
    calls: dict[str, int] = {}
    made: dict[int, str] = {}  # id(output tensor) -> producer name
    read: dict[str, tuple[int, int]] = {}  # norm -> (id of its input, dim)
    keep_alive: list[torch.Tensor] = []  # ids stay unique while the run lasts
    counter = _UseCounter()
    handles = []

    def on_producer(name):
        def hook(module, args, out):
            calls[name] = calls.get(name, 0) + 1
            if isinstance(out, torch.Tensor):
                made[id(out)] = name
                keep_alive.append(out)
                counter.uses[id(out)] = 0  # the id may have served a freed tensor before
        return hook

    def norm_pre(name):
        def hook(module, args):
            calls[name] = calls.get(name, 0) + 1
            if args and isinstance(args[0], torch.Tensor):
                read[name] = (id(args[0]), args[0].dim())
                keep_alive.append(args[0])
            counter.inside_norm += 1
        return hook

    def norm_post(module, args, out):
        counter.inside_norm -= 1

    for name, module in producers.items():
        handles.append(module.register_forward_hook(on_producer(name)))
    for name, module in norms.items():
        handles.append(module.register_forward_pre_hook(norm_pre(name)))
        handles.append(module.register_forward_hook(norm_post, always_call=True))
    try:
        with torch.no_grad(), counter:
            out = call_model(model, example_inputs)
        for t in walk_tensors(out):
            counter.uses[id(t)] = counter.uses.get(id(t), 0) + 1
    finally:
        for h in handles:
            h.remove()

    owners: dict[int, int] = {}
    for module in modules.values():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    readers: dict[int, int] = {}
    for source, _ in read.values():
        readers[source] = readers.get(source, 0) + 1
    pairs, taken = [], set()
    for name, norm in norms.items():
        why = None
        source, dim = read.get(name, (None, 0))
        producer = made.get(source) if source is not None else None
        if name not in calls:
            why = "not run on the example inputs"
        elif calls[name] > 1:
            why = "called more than once"
        elif norm.running_mean is None or norm.running_var is None:
            why = "no running statistics (normalises with batch statistics)"
        elif producer is None:
            why = "its input is not the output of a Conv / Linear"
        elif counter.uses.get(source, 0) > 0 or readers[source] > 1:
            why = f"the output of {producer!r} is also read elsewhere"
        elif calls.get(producer, 0) > 1 or producer in taken:
            why = f"{producer!r} is called more than once"
        elif not _affine_producer(producers[producer]):
            why = f"{producer!r} ({type(producers[producer]).__name__}) is not a plain Conv / Linear"
        elif isinstance(producers[producer], nn.Linear) and dim != 2:
            why = f"{producer!r} is a Linear on {dim}-d input: the norm's channel axis is not its features"
        elif not isinstance(producers[producer], nn.Linear) and dim != producers[producer].weight.dim():
            why = f"{producer!r} ran unbatched: the norm's channel axis is not its output channels"
        elif any(owners.get(id(p), 0) > 1 for p in producers[producer].parameters(recurse=False)):
            why = f"{producer!r} shares its weight with another module"
        elif producers[producer].weight.shape[0] != norm.num_features:
            why = f"{producer!r} has {producers[producer].weight.shape[0]} outputs, the norm {norm.num_features}"
        else:
            replacement = _replacement(norm)
            if replacement is None:
                why = (f"{type(norm).__qualname__} overrides forward: register what replaces it after folding "
                       "in fermigates.converters.registry.BN_FOLD")
            else:
                pairs.append((name, producer, replacement))
                taken.add(producer)
        if why is not None:
            report.skipped[name] = why
    return pairs, output_tensors(out)


def _fold_into(producer: nn.Module, norm: nn.Module) -> None:
    w = producer.weight
    scale = norm.running_var.double().add(norm.eps).rsqrt()
    if norm.weight is not None:
        scale = scale * norm.weight.double()
    shift = -norm.running_mean.double() * scale
    if norm.bias is not None:
        shift = shift + norm.bias.double()
    bias = producer.bias.double() * scale + shift if producer.bias is not None else shift
    shape = (-1,) + (1,) * (w.dim() - 1)
    # new Parameters (not in-place): the snapshot taken before folding still holds the old ones
    producer.weight = nn.Parameter((w.double() * scale.view(shape)).to(w.dtype), requires_grad=w.requires_grad)
    producer.bias = nn.Parameter(bias.to(w.dtype), requires_grad=w.requires_grad)


@torch.no_grad()
def fold_batchnorm(model: nn.Module, example_inputs: Any) -> BatchNormFold:
    """Fold every eval-mode batch norm that directly follows a Conv / Linear into it, in place.

    ``example_inputs`` (a tensor, a tuple of positional args or a dict of kwargs) are run once to find the
    pairs and once more to check that the outputs did not change beyond float rounding (relative 1e-4);
    if they did, everything is undone and a ``RuntimeError`` says so. The model is left in eval mode.
    Returns what was folded and why the other norms were kept.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if find_state(model) is not None:
        raise ValueError("model is still Fermi-gated: bake it first with convert_from_fermi(model, ...)")
    if example_inputs is None:
        raise ValueError("example_inputs are required: the pairs are found by running the model once")
    model.eval()
    report = BatchNormFold()
    pairs, before = _find_pairs(model, example_inputs, report)
    if not pairs:
        return report
    saved = snapshot(model)
    try:
        for norm_name, producer_name, replacement in pairs:
            norm, producer = model.get_submodule(norm_name), model.get_submodule(producer_name)
            _fold_into(producer, norm)
            parent, _, child = norm_name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, replacement)
            report.folded[norm_name] = producer_name
        diff = max_relative_diff(before, output_tensors(call_model(model, example_inputs)))
    except BaseException:
        restore(saved)
        raise
    if not diff <= SHRINK_RTOL:
        restore(saved)
        raise RuntimeError(
            f"folding changed the outputs by {diff:.3g} (relative, > {SHRINK_RTOL}); the model was restored. "
            "Please report the model: one of the folded pairs is not what it looked like"
        )
    report.max_abs_diff = diff
    setattr(model, FOLDED_ATTR, sorted({*getattr(model, FOLDED_ATTR, []), *report.folded}))
    return report
