"""The losses the training helpers and the bake's calibration check share: task loss, distillation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F


DISTILL = ("logits", "hidden", "lm")


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None) if not isinstance(out, Mapping) else out.get(key)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find logits / a hidden state in a model output of type {type(out).__name__}")


def distill_loss(student: Any, teacher: Any, kind: str, mask: torch.Tensor | None = None,
                 temperature: float = 2.0, top_k: int | None = None) -> torch.Tensor:
    """``"logits"``: KL(teacher || student) of the softened class distributions (times ``T^2``);
    ``"hidden"``: squared error of the outputs relative to the teacher's mean square (padding excluded);
    ``"lm"``: the causal-LM form of ``"logits"``: KL(teacher || student) of the softened next-token
    distributions at every position of ``(B, T, V)`` logits, averaged over the real tokens of ``mask``
    (``(B, T)`` attention mask; all positions when ``None``), times ``T^2``. With ``top_k`` (``"lm"`` only)
    the teacher keeps its ``top_k`` largest logits per position, renormalised over them, and the student's
    full-vocabulary log-probabilities are read at those tokens (zero only when the student puts exactly the
    teacher's renormalised mass there and none elsewhere)."""
    if kind not in DISTILL:
        raise ValueError(f"kind must be one of {DISTILL}, got {kind!r}")
    if top_k is not None and (kind != "lm" or isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or a positive integer, and only applies to kind='lm'; got "
                         f"top_k={top_k!r} with kind={kind!r}")
    s, t = _logits(student).float(), _logits(teacher).float().detach()
    if kind == "lm":
        return _lm_kl(s, t, mask, temperature, top_k)
    if kind == "logits":
        return F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                        log_target=True, reduction="batchmean") * temperature ** 2
    err = (s - t).pow(2)
    norm = t.pow(2)
    if mask is not None and err.dim() == 3 and mask.shape == err.shape[:2]:
        keep = mask.to(err.device).unsqueeze(-1).float()
        return (err * keep).sum() / (norm * keep).sum().clamp_min(1e-12)
    return err.sum() / norm.sum().clamp_min(1e-12)


def _lm_kl(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None, temperature: float,
           top_k: int | None) -> torch.Tensor:
    """Per-token KL(teacher || student) of ``(B, T, V)`` logits, mean over real tokens, times ``T^2``."""
    if s.dim() != 3 or s.shape != t.shape:
        raise ValueError(f"kind='lm' needs student and teacher logits of one (batch, tokens, vocab) shape, got "
                         f"{tuple(s.shape)} and {tuple(t.shape)}")
    if mask is not None and tuple(mask.shape) != tuple(s.shape[:2]):
        raise ValueError(f"kind='lm' needs a (batch, tokens) = {tuple(s.shape[:2])} attention mask, got "
                         f"{tuple(mask.shape)}")
    log_q = F.log_softmax(s / temperature, -1)
    if top_k is None or top_k >= t.shape[-1]:
        log_p = F.log_softmax(t / temperature, -1)
        per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
    else:
        values, index = t.topk(top_k, dim=-1)
        log_p = F.log_softmax(values / temperature, -1)
        per_token = (log_p.exp() * (log_p - log_q.gather(-1, index))).sum(-1)
    if mask is None:
        return per_token.mean() * temperature ** 2
    keep = mask.to(per_token.device).float()
    return (per_token * keep).sum() / keep.sum().clamp_min(1.0) * temperature ** 2


def task_loss(out: Any, labels: torch.Tensor) -> torch.Tensor:
    """The model's own ``loss`` when its output has one (a Hugging Face model given labels), else cross-entropy
    of the logits against ``labels``."""
    loss = getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    logits = _logits(out)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1).to(logits.device))
