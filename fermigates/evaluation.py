"""What a pruning run reached, measured on samples that no training or calibration step saw: accuracy on
labelled data, perplexity for a causal language model, otherwise the fidelity of the outputs to the dense
model's (mean cosine, relative error) -- of the dense model, after the cut and after fine-tuning.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .report import METRICS, PHASES  # what each task reports; the phases in order, with their words



@dataclass
class EvalSet:
    """Held-out batches: ``inputs`` (tensors or dicts of tensors) and, for labelled data, ``labels``."""

    inputs: list[Any]
    labels: list[torch.Tensor] | None
    source: str  # e.g. "512 held-out samples of --data" (what the report says it measured on)

    @property
    def n(self) -> int:
        first = lambda b: next(iter(b.values())) if isinstance(b, Mapping) else b  # noqa: E731
        return sum(int(first(b).shape[0]) for b in self.inputs)


def call(model: nn.Module, inputs: Any) -> Any:
    """``model`` on one batch of inputs: a tensor, a tuple of positional tensors or a dict of keyword tensors."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def main_output(out: Any) -> torch.Tensor:
    """The tensor a model's output stands for: itself, ``logits``, ``last_hidden_state`` or the first tensor."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    items = out.values() if isinstance(out, Mapping) else out
    for value in items:
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"the model's output holds no tensor: {type(out).__name__}")


def is_causal_lm(model: nn.Module) -> bool:
    return type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def task_of(model: nn.Module, eval_set: EvalSet) -> str:
    """``"accuracy"`` for labelled data, ``"perplexity"`` for a causal LM on token ids, else ``"fidelity"``."""
    if eval_set.labels is not None:
        return "accuracy"
    first = eval_set.inputs[0]
    if isinstance(first, Mapping) and "input_ids" in first and is_causal_lm(model):
        return "perplexity"
    return "fidelity"


def _pooled(out: torch.Tensor, inputs: Any) -> torch.Tensor:
    """One vector per sample: a sequence output is mean-pooled over its attention mask."""
    out = out.detach().float()
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    if out.dim() == 3 and mask is not None and mask.shape == out.shape[:2]:
        m = mask.to(out).unsqueeze(-1)
        return (out * m).sum(1) / m.sum(1).clamp_min(1.0)
    return out.reshape(out.shape[0], -1)


class Evaluator:
    """Evaluates models on one :class:`EvalSet`; the first call (the dense model) records the reference outputs
    that fidelity compares with."""

    def __init__(self, eval_set: EvalSet, task: str, *, progress: bool = True) -> None:
        if task not in METRICS:
            raise ValueError(f"task must be one of {list(METRICS)}, got {task!r}")
        self.eval_set, self.task, self.progress = eval_set, task, progress
        self.reference: list[torch.Tensor] | None = None

    @torch.no_grad()
    def __call__(self, model: nn.Module, phase: str) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            return self._run(model, phase)
        finally:
            model.train(was_training)

    def _run(self, model: nn.Module, phase: str) -> dict[str, float]:
        batches = self.eval_set.inputs
        bar = tqdm(batches, desc=f"evaluate ({PHASES.get(phase, phase)})", disable=not self.progress, leave=False)
        if self.task == "accuracy":
            correct = total = 0
            loss = 0.0
            for inputs, labels in zip(bar, self.eval_set.labels or []):
                logits = main_output(call(model, inputs)).float()
                logits = logits.reshape(labels.shape[0], -1)
                loss += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
                correct += int((logits.argmax(-1) == labels).sum())
                total += labels.shape[0]
            return {"accuracy": correct / max(total, 1), "loss": loss / max(total, 1)}
        if self.task == "perplexity":
            nll = tokens = 0.0
            for inputs in bar:
                logits = main_output(call(model, inputs)).float()[:, :-1]
                target = inputs["input_ids"][:, 1:]
                mask = inputs.get("attention_mask")
                keep = torch.ones_like(target, dtype=torch.bool) if mask is None else mask[:, 1:].bool()
                losses = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                     reduction="none").reshape(target.shape)
                nll += float(losses[keep].sum())
                tokens += int(keep.sum())
            loss = nll / max(tokens, 1)
            return {"perplexity": math.exp(min(loss, 50.0)), "loss": loss}
        outputs = [_pooled(main_output(call(model, inputs)), inputs) for inputs in bar]
        if self.reference is None:
            self.reference = outputs
        cos = torch.cat([nn.functional.cosine_similarity(o, r, dim=-1) for o, r in zip(outputs, self.reference)])
        err = sum(float((o - r).pow(2).sum()) for o, r in zip(outputs, self.reference))
        norm = sum(float(r.pow(2).sum()) for r in self.reference)
        return {"cosine": float(cos.mean()), "rel_error": err / max(norm, 1e-30)}


@torch.no_grad()
def time_models(models: list[nn.Module], inputs: Any, *, repeats: int = 25, budget_s: float = 8.0) -> list[float]:
    """Median milliseconds of an eval-mode forward of each model on ``inputs``, timed round-robin (one forward of
    each in turn), so that a machine that gets busier or quieter meanwhile affects every model alike. Fewer
    repeats (at least 3) when they would take longer than about ``budget_s``."""
    flags = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        start = time.perf_counter()
        for m in models:  # warm-up: allocator, thread pool, kernel choice
            call(m, inputs)
        once = time.perf_counter() - start
        repeats = max(3, min(repeats, int(budget_s / max(once, 1e-6))))
        times: list[list[float]] = [[] for _ in models]
        for _ in range(repeats):
            for i, m in enumerate(models):
                start = time.perf_counter()
                call(m, inputs)
                times[i].append(time.perf_counter() - start)
    finally:
        for m, flag in zip(models, flags):
            m.train(flag)
    return [1000.0 * statistics.median(t) for t in times]
