"""timm: attention specs, RMS norms and example inputs (nothing imports timm at import time).

* ``timm.layers.attention.Attention`` (ViT, DeiT, ...): fused ``qkv`` Linear reshaped to
  ``(B, N, 3, num_heads, head_dim)`` -- rows ``[q; k; v]``, head-major -- and ``proj`` inside. The forward reads
  ``num_heads``, ``head_dim`` and ``attn_dim``. ``q_norm``/``k_norm`` act on ``head_dim`` (per head, unchanged
  by head removal) on both the fused-SDPA and the manual path. ``gated=True`` adds ``gate``, a Linear whose rows
  follow the query layout. ``scale_norm=True`` normalises across all heads, so heads cannot be removed exactly.
* ``timm.layers.attention.AttentionRope`` (EVA-style): fused ``qkv`` or separate ``q_proj``/``k_proj``/
  ``v_proj`` with grouped-query attention (``num_kv_heads``); also reads ``num_kv_groups`` and ``kv_dim``.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
from torch import nn

from fermigates.core import registry
from fermigates.core.layouts import AttentionSpec, RMSNormSpec

_logger = logging.getLogger(__name__)

ATTENTION_NAME = "timm.layers.attention.Attention"
ROPE_NAME = "timm.layers.attention.AttentionRope"
RMS_NORM_NAMES = ["timm.layers.norm.RmsNorm", "timm.layers.norm.RmsNormFp32"]


def _scale_norm_reason(m: nn.Module) -> str | None:
    if not isinstance(getattr(m, "norm", None), nn.Identity):
        return "scale_norm normalises the context across all heads"
    return None


def _timm_set_heads(m: nn.Module, kept_q: torch.Tensor, kept_kv: torch.Tensor) -> None:
    m.num_heads = int(kept_q.numel())
    m.attn_dim = m.num_heads * m.head_dim
    if hasattr(m, "num_kv_heads"):
        n_kv = int(kept_kv.numel())
        if n_kv == 0 or m.num_heads % n_kv:
            raise ValueError(f"kept query heads ({m.num_heads}) must be a multiple of kept kv heads ({n_kv})")
        m.num_kv_heads = n_kv
        m.num_kv_groups = m.num_heads // n_kv
        m.kv_dim = n_kv * m.head_dim


ATTENTION_SPEC = AttentionSpec(
    qkv="qkv", o="proj", q_like=("gate",),
    num_heads=lambda m: m.qkv.weight.shape[0] // (3 * m.head_dim),
    head_dim=lambda m: m.head_dim,
    set_heads=_timm_set_heads,
    unsupported=_scale_norm_reason,
)

_ROPE_FUSED = replace(ATTENTION_SPEC)
_ROPE_SEPARATE = AttentionSpec(
    q="q_proj", k="k_proj", v="v_proj", o="proj", q_like=("gate",),
    num_heads=lambda m: m.q_proj.weight.shape[0] // m.head_dim,
    num_kv_heads=lambda m: m.k_proj.weight.shape[0] // m.head_dim,
    head_dim=lambda m: m.head_dim,
    set_heads=_timm_set_heads,
    unsupported=_scale_norm_reason,
    modes=("group", "slot"),
)
ROPE_SPEC = AttentionSpec(
    qkv="qkv", num_heads=ATTENTION_SPEC.num_heads, head_dim=ATTENTION_SPEC.head_dim, set_heads=_timm_set_heads,
    select=lambda m: _ROPE_FUSED if getattr(m, "qkv", None) is not None else _ROPE_SEPARATE,
)


def timm_example_inputs(model: nn.Module, batch: int = 2) -> torch.Tensor | None:
    """A random image batch at the model's input size (``pretrained_cfg``, or the patch embed's fixed size)."""
    cfg = getattr(model, "pretrained_cfg", None)
    if not isinstance(cfg, dict) or not any(c.__module__.startswith("timm.") for c in type(model).__mro__):
        return None
    c, h, w = cfg.get("input_size", (3, 224, 224))
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    if img_size is not None and not getattr(patch_embed, "dynamic_img_size", False):
        h, w = img_size
    c = int(getattr(model, "in_chans", c) or c)
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch, c, int(h), int(w), generator=gen).to(device)


registry.register(registry.ATTENTION, ATTENTION_NAME, ATTENTION_SPEC)
registry.register(registry.SHAPE_ATTRS, ATTENTION_NAME, ("num_heads", "head_dim", "attn_dim"))
registry.register(registry.ATTENTION, ROPE_NAME, ROPE_SPEC)
registry.register(registry.SHAPE_ATTRS, ROPE_NAME,
                  ("num_heads", "num_kv_heads", "num_kv_groups", "head_dim", "attn_dim", "kv_dim"))
registry.register(registry.RMS_NORMS, RMS_NORM_NAMES, RMSNormSpec(weight="weight", eps="eps"))
registry.register(registry.SHAPE_ATTRS, RMS_NORM_NAMES, ("normalized_shape", "eps"))
registry.EXAMPLE_INPUTS.append(timm_example_inputs)
