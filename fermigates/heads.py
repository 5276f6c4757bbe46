"""Fit a classifier to the data: replace a head whose width differs from the number of classes, and fit the new
one to the training samples' features (a linear probe, the backbone frozen), so that the dense model's accuracy
is a real baseline before anything is pruned.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

_logger = logging.getLogger(__name__)


def head_width(model: nn.Module, classifier: tuple[str, ...]) -> int | None:
    """Outputs of the model's classifier (the first of ``classifier`` that is an ``nn.Linear``), or None."""
    layer = _classifier(model, classifier)
    return None if layer is None else int(layer.out_features)


def _classifier(model: nn.Module, classifier: tuple[str, ...]) -> nn.Linear | None:
    for name in classifier:
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(layer, nn.Linear):
            return layer
    return None


def resize_head(model: nn.Module, classifier: tuple[str, ...], classes: int) -> str | None:
    """Give the model a new ``classes``-wide classifier (timm: ``reset_classifier``; a Hugging Face
    ``classifier`` / ``score`` Linear: replaced, ``config.num_labels`` updated). Returns the name of the new
    layer, or None when the model has no classifier this knows how to replace."""
    layer = _classifier(model, classifier)
    if layer is None:
        return None
    name = next(n for n in classifier if _classifier(model, (n,)) is layer)
    if hasattr(model, "reset_classifier") and hasattr(model, "num_classes"):  # timm
        model.reset_classifier(classes)
    else:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new = nn.Linear(layer.in_features, classes, bias=layer.bias is not None, device=layer.weight.device,
                        dtype=layer.weight.dtype)
        setattr(parent, attr, new)
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "num_labels"):
            config.num_labels = classes  # also resets id2label / label2id
    if hasattr(model, "num_labels"):
        model.num_labels = classes
    return name


@torch.no_grad()
def _features(model: nn.Module, layer: nn.Linear, batches: list, call: Callable[[nn.Module, Any], Any],
              progress: Any) -> torch.Tensor:
    """The inputs of ``layer`` over ``batches`` (the classifier's features), one eval forward each."""
    seen: list[torch.Tensor] = []

    def grab(_module: nn.Module, args: tuple) -> None:
        seen.append(args[0].detach().float().reshape(-1, args[0].shape[-1]).cpu())

    handle = layer.register_forward_pre_hook(grab)
    try:
        model.eval()
        for batch in progress(batches):
            call(model, batch)
    finally:
        handle.remove()
    return torch.cat(seen)


def fit_head(model: nn.Module, classifier: tuple[str, ...], batches: list, labels: list[torch.Tensor], *,
             call: Callable[[nn.Module, Any], Any], progress: Any = iter, weight_decay: float = 1e-4,
             iterations: int = 100) -> float:
    """Fit the classifier to ``batches`` (inputs) and ``labels`` with the rest of the model frozen: multinomial
    logistic regression on its input features by L-BFGS, written into the layer. Returns the training
    accuracy of the fitted head."""
    layer = _classifier(model, classifier)
    if layer is None:
        raise ValueError(f"no nn.Linear classifier among {classifier}")
    x = _features(model, layer, batches, call, progress)
    y = torch.cat(labels).long()
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"the classifier saw {x.shape[0]} feature rows for {y.shape[0]} labels (a classifier "
                         "applied per token?); model.head: keep leaves the head alone")
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    xs = (x - mean) / std  # standardised: L-BFGS converges in a few dozen iterations
    w = torch.zeros(layer.out_features, x.shape[1], requires_grad=True)
    b = torch.zeros(layer.out_features, requires_grad=layer.bias is not None)
    opt = torch.optim.LBFGS([w, b] if layer.bias is not None else [w], lr=1.0, max_iter=iterations,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(xs @ w.T + b, y) + weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():  # fold the standardisation into the layer: W' = W / std, b' = b - W' mean
        weight = w / std
        bias = b - weight @ mean
        layer.weight.copy_(weight.to(layer.weight))
        if layer.bias is not None:
            layer.bias.copy_(bias.to(layer.bias))
        accuracy = float(((xs @ w.T + b).argmax(1) == y).float().mean())
    _logger.info("fitted the classifier on %d samples: training accuracy %.3f", len(y), accuracy)
    return accuracy
