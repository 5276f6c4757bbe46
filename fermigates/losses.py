"""The losses the training helpers and the bake's calibration check share: task loss, distillation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F


DISTILL = ("logits", "hidden")


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
                 temperature: float = 2.0) -> torch.Tensor:
    """``"logits"``: KL(teacher || student) of the softened class distributions (times ``T^2``);
    ``"hidden"``: squared error of the outputs relative to the teacher's mean square (padding excluded)."""
    s, t = _logits(student).float(), _logits(teacher).float().detach()
    if kind == "logits":
        return F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                        log_target=True, reduction="batchmean") * temperature ** 2
    err = (s - t).pow(2)
    norm = t.pow(2)
    if mask is not None and err.dim() == 3 and mask.shape == err.shape[:2]:
        keep = mask.to(err.device).unsqueeze(-1).float()
        return (err * keep).sum() / (norm * keep).sum().clamp_min(1e-12)
    return err.sum() / norm.sum().clamp_min(1e-12)


def task_loss(out: Any, labels: torch.Tensor) -> torch.Tensor:
    """The model's own ``loss`` when its output has one (a Hugging Face model given labels), else cross-entropy
    of the logits against ``labels``."""
    loss = getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    logits = _logits(out)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1).to(logits.device))
