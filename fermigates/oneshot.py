"""One-shot channel selection (no training budget): which input channels of a consumer to keep.

``score_j = ||W[:, j]||₂ · rms(x_j)`` — the consumer's column norm times the channel's activation RMS on
calibration data (the structured form of Wanda's |w|·||x||); with no data, the column norm alone. The
dropped channels' contribution is then largely recovered by :func:`fermigates.calibrate`.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Iterable

import torch
from torch import nn

_logger = logging.getLogger(__name__)

__all__ = ["oneshot_channel_scores", "select_channels", "input_channel_rms"]


def oneshot_channel_scores(consumer: nn.Module, *, input_rms: torch.Tensor | None = None) -> torch.Tensor:
    """Importance of each input channel of ``consumer`` (``nn.Linear`` or ``nn.Conv*d`` with groups=1).

    ``input_rms``: per-input-channel RMS of the consumer's input (see :func:`input_channel_rms`);
    None scores by weight alone.
    """
    w = getattr(consumer, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() < 2:
        raise ValueError(f"consumer must be a Linear/Conv layer with a 2-d+ weight, got {type(consumer)!r}")
    if getattr(consumer, "groups", 1) != 1:
        raise ValueError(f"consumer must have groups=1, got groups={consumer.groups}")
    w = w.detach().float()
    scores = w.transpose(0, 1).flatten(1).norm(dim=1)
    if input_rms is not None:
        if input_rms.shape != scores.shape:
            raise ValueError(f"input_rms must have shape {tuple(scores.shape)}, got {tuple(input_rms.shape)}")
        scores = scores * input_rms.to(scores)
    return scores


def select_channels(scores: torch.Tensor, keep: float | int) -> torch.Tensor:
    """Sorted indices of the top channels: ``keep`` as a fraction in (0, 1] or a count >= 1."""
    n = scores.numel()
    if isinstance(keep, float) and 0 < keep <= 1:
        k = max(1, round(keep * n))
    elif isinstance(keep, int) and 1 <= keep <= n:
        k = keep
    else:
        raise ValueError(f"keep must be a fraction in (0, 1] or a count in [1, {n}], got {keep!r}")
    return scores.topk(k).indices.sort().values


@torch.no_grad()
def input_channel_rms(model: nn.Module, data: Iterable[Any], names: list[str],
                      max_batches: int | None = None) -> dict[str, torch.Tensor]:
    """Per-input-channel RMS of the named layers' inputs over ``data`` (batches as :func:`calibrate` takes)."""
    from .calibrate import _call, _mask

    mods = dict(model.named_modules())
    missing = [n for n in names if n not in mods]
    if missing:
        raise ValueError(f"names not found in model: {missing}")
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {n: 0 for n in names}
    state: dict[str, Any] = {}

    def hook(name: str):
        def fn(mod, args):
            x = args[0].detach()
            ch = 1 if x.dim() > 2 and not isinstance(mod, nn.Linear) else -1
            x = x.movedim(ch, -1).reshape(-1, x.shape[ch]) if ch == 1 else x
            mask = state.get("mask")
            if ch == -1 and mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape):
                x = x[mask.to(x.device)]
            x = x.reshape(-1, x.shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.square().sum(0)
            counts[name] += x.shape[0]
        return fn

    handles = [mods[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        for batch in itertools.islice(data, max_batches):
            state["mask"] = _mask(batch)
            _call(model, batch)
    finally:
        for h in handles:
            h.remove()
    return {n: (sums[n] / max(counts[n], 1)).sqrt().float() for n in names if n in sums}
