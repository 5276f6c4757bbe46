"""Perplexity of a causal language model on a token corpus or on padded batches.

Two ways to feed text:

* a corpus, a 1-D ``LongTensor`` of token ids: the model reads windows of ``context_length`` tokens that start
  every ``stride`` tokens, and each token is scored once, in the first window that reaches it (Hugging Face's
  "perplexity of fixed-length models": the first window scores all its tokens but the first, every later one
  only its last ``end - previous end`` tokens, with the rest of the window as context);
* batches (an iterable of dicts with ``input_ids`` and ``attention_mask``, or of ``(B, T)`` id tensors): every
  real token that follows a real token is scored; padding is never scored nor used as the position that
  predicts. A ``labels`` entry, when present, says what to score instead (``-100``: skip), shifted like
  transformers' causal-LM loss.

The model is called as ``model(ids)`` on a corpus and ``model(**batch)`` on dict batches (labels removed); its
output is a ``(B, T, V)`` tensor or has one in ``.logits``. Token losses are summed in float64.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

__all__ = ["PerplexityResult", "perplexity"]

_LABEL_KEYS = ("labels", "label")


@dataclass(frozen=True)
class PerplexityResult:
    """``perplexity = exp(nll)``, ``nll`` the mean negative log-likelihood (nats) over ``tokens`` scored tokens."""

    perplexity: float
    nll: float
    tokens: int

    def __str__(self) -> str:
        return f"perplexity {self.perplexity:.4f} (mean NLL {self.nll:.4f} nats over {self.tokens:,} tokens)"


def _device(model: nn.Module) -> torch.device:
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _logits(out: Any, batch: int, length: int) -> torch.Tensor:
    logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
    if logits is None and isinstance(out, Mapping):
        logits = out.get("logits")
    if logits is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        logits = out[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            f"perplexity needs a model whose output is a (B, T, V) logits tensor or has one in .logits, got "
            f"{type(out).__name__}"
        )
    if logits.dim() != 3 or tuple(logits.shape[:2]) != (batch, length):
        raise ValueError(
            f"perplexity needs (batch, tokens, vocab) = ({batch}, {length}, V) logits, got shape "
            f"{tuple(logits.shape)}: is the model a causal language model (e.g. AutoModelForCausalLM)?"
        )
    return logits


def _token_nll(logits: torch.Tensor, targets: torch.Tensor, scored: torch.Tensor) -> tuple[float, int]:
    """Sum (float64) and count of ``-log p(target)`` over positions where ``scored``; logits predict targets."""
    total, count = 0.0, 0
    for row in range(logits.shape[0]):  # one row at a time: the float32 log-softmax of a 50k vocab is large
        keep = scored[row]
        n = int(keep.sum())
        if n == 0:
            continue
        losses = F.cross_entropy(logits[row][keep].float(), targets[row][keep], reduction="none")
        total += float(losses.double().sum())
        count += n
    return total, count


def _windows(length: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first scored position)`` of every window over a corpus of ``length`` tokens."""
    out, previous_end, begin = [], 0, 0
    while True:
        end = min(begin + context, length)
        out.append((begin, end, max(previous_end, begin + 1)))
        previous_end = end
        if end == length:
            return out
        begin += stride


def _corpus(model: nn.Module, ids: torch.Tensor, context: int, stride: int, batch_size: int,
            progress: bool) -> tuple[float, int]:
    device = _device(model)
    windows = _windows(int(ids.numel()), context, stride)
    total, count = 0.0, 0
    bar = tqdm(total=len(windows), desc="perplexity", disable=not progress, leave=False)
    i = 0
    while i < len(windows):  # equal-length windows share a batch (only the last one can be shorter)
        size = windows[i][1] - windows[i][0]
        group = [windows[i]]
        while (len(group) < batch_size and i + len(group) < len(windows)
               and windows[i + len(group)][1] - windows[i + len(group)][0] == size):
            group.append(windows[i + len(group)])
        x = torch.stack([ids[b:e] for b, e, _ in group]).to(device)
        logits = _logits(model(x), len(group), size)
        scored = torch.zeros(len(group), size - 1, dtype=torch.bool, device=logits.device)
        for row, (b, _, first) in enumerate(group):
            scored[row, first - b - 1:] = True  # logits at position t predict token t + 1
        part, n = _token_nll(logits[:, :-1], x[:, 1:].to(logits.device), scored)
        total, count = total + part, count + n
        i += len(group)
        bar.update(len(group))
    bar.close()
    return total, count


def _batch_parts(batch: Any, index: int) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(model inputs, input_ids, attention mask, labels or None)`` of one batch."""
    if isinstance(batch, torch.Tensor):
        ids, inputs, mask, labels = batch, batch, torch.ones_like(batch), None
    elif isinstance(batch, Mapping):
        ids = batch.get("input_ids")
        if not isinstance(ids, torch.Tensor):
            raise TypeError(
                f"perplexity: batch {index} has no 'input_ids' tensor (keys: {sorted(batch)}); pass dicts with "
                "'input_ids' and 'attention_mask', or a 1-D tensor of token ids"
            )
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        labels = next((batch[k] for k in _LABEL_KEYS if k in batch), None)
        inputs = {k: v for k, v in batch.items() if k not in _LABEL_KEYS}
    else:
        raise TypeError(
            f"perplexity: batch {index} is a {type(batch).__name__}; pass dicts with 'input_ids' and "
            "'attention_mask', (B, T) id tensors, or a 1-D tensor of token ids"
        )
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"perplexity: batch {index} needs (batch, tokens) integer input_ids, got {ids.dtype} of shape "
            f"{tuple(ids.shape)}"
        )
    if tuple(mask.shape) != tuple(ids.shape) or (labels is not None and tuple(labels.shape) != tuple(ids.shape)):
        raise ValueError(
            f"perplexity: batch {index} has input_ids of shape {tuple(ids.shape)} but attention_mask "
            f"{tuple(mask.shape)}" + ("" if labels is None else f" and labels {tuple(labels.shape)}")
        )
    return inputs, ids, mask, labels


def _batches(model: nn.Module, data: Iterable[Any], progress: bool) -> tuple[float, int]:
    device = _device(model)
    total, count = 0.0, 0
    for index, batch in enumerate(tqdm(data, desc="perplexity", disable=not progress, leave=False)):
        inputs, ids, mask, labels = _batch_parts(batch, index)
        if isinstance(inputs, Mapping):
            out = model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()})
        else:
            out = model(inputs.to(device))
        logits = _logits(out, *ids.shape)
        mask = mask.to(logits.device).bool()
        if labels is None:
            targets = ids[:, 1:].to(logits.device)
            scored = mask[:, 1:] & mask[:, :-1]  # a real token, predicted from a real position
        else:
            targets = labels[:, 1:].to(logits.device)
            scored = (targets != -100) & mask[:, :-1]
            targets = targets.clamp_min(0)
        part, n = _token_nll(logits[:, :-1], targets, scored)
        total, count = total + part, count + n
    return total, count


def _context_length(model: nn.Module, context_length: int | None) -> int:
    if context_length is None:
        config = getattr(model, "config", None)
        for name in ("max_position_embeddings", "n_positions"):
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 1:
                return value
        raise ValueError(
            "perplexity over a token corpus needs context_length= (the model has no config with "
            "max_position_embeddings / n_positions to take it from)"
        )
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 2:
        raise ValueError(f"context_length must be an integer >= 2, got {context_length!r}")
    return context_length


@torch.no_grad()
def perplexity(
    model: nn.Module,
    data: torch.Tensor | Iterable[Any],
    *,
    context_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of causal LM ``model`` on ``data``: a 1-D token-id tensor (a corpus, read in windows of
    ``context_length`` starting every ``stride`` tokens, ``batch_size`` windows per forward) or an iterable of
    batches (dicts with ``input_ids`` / ``attention_mask``, padding excluded). See the module docstring.

    ``context_length`` defaults to the config's ``max_position_embeddings`` (or ``n_positions``); ``stride``
    to ``context_length`` (disjoint windows; a smaller stride gives every scored token more context and costs
    ``context_length / stride`` times as many forwards). The model runs in eval mode without gradients and
    gets its mode back afterwards.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    is_corpus = isinstance(data, torch.Tensor) and data.dim() == 1
    if isinstance(data, torch.Tensor) and not is_corpus:
        raise ValueError(
            f"perplexity: a tensor data must be a 1-D corpus of token ids, got shape {tuple(data.shape)}; pass "
            "a (B, T) batch inside a list, or dicts with 'input_ids' and 'attention_mask'"
        )
    if isinstance(data, (str, bytes)) or not (is_corpus or isinstance(data, Iterable)):
        raise TypeError(
            f"data must be a 1-D tensor of token ids or an iterable of batches, got {type(data).__name__}"
            + (" (tokenize the text first)" if isinstance(data, (str, bytes)) else "")
        )
    if is_corpus:
        if data.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"perplexity: the corpus must hold integer token ids, got dtype {data.dtype}")
        context = _context_length(model, context_length)
        stride = context if stride is None else stride
        if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= context:
            raise ValueError(f"stride must be an integer in [1, context_length={context}], got {stride!r}")
        if data.numel() < 2:
            raise ValueError(f"perplexity: the corpus needs at least 2 tokens, got {data.numel()}")
    elif context_length is not None or stride is not None:
        raise ValueError("context_length / stride apply to a 1-D token corpus, not to batches (already cut)")
    was_training = model.training
    model.eval()
    try:
        if is_corpus:
            total, count = _corpus(model, data.long(), context, stride, batch_size, progress)
        else:
            total, count = _batches(model, data, progress)
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("perplexity: the data has no token to score (every position padding, or no batches)")
    nll = total / count
    return PerplexityResult(perplexity=math.exp(nll), nll=nll, tokens=count)
