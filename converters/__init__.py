"""Per-family knowledge (attention heads, Linear-like layouts, gated twins, RMS norms, example inputs).

Importing this package runs the family files' ``register(...)`` calls; none of them imports timm or
transformers at import time (classes are named by qualname, see :mod:`.registry`).
"""

from . import (  # noqa: F401  (imported for their register(...) side effects)
    attention,
    blocks,
    hf_attention,
    hf_layers,
    hf_residuals,
    registry,
    timm_attention,
    timm_layers,
)
from .attention import (
    AttentionSpec,
    HeadUnits,
    LinearLayout,
    RMSNormSpec,
    attention_spec,
    head_units,
    kept_heads,
    linear_layout,
    prune_heads,
    slice_linear,
)
from .blocks import BlockListSpec, block_list_spec
from .hf_attention import apply_hf_config_updates, hf_config_updates, layer_widths


def residual_sources(model):
    """``{projection fqn: (module fqn, getter)}`` from every family's RESIDUALS entry (see hf_residuals)."""
    out = {}
    for find in registry.RESIDUALS:
        out.update(find(model))
    return out

__all__ = [
    "residual_sources",
    "AttentionSpec",
    "BlockListSpec",
    "block_list_spec",
    "HeadUnits",
    "LinearLayout",
    "RMSNormSpec",
    "apply_hf_config_updates",
    "attention_spec",
    "head_units",
    "hf_config_updates",
    "kept_heads",
    "layer_widths",
    "linear_layout",
    "prune_heads",
    "registry",
    "slice_linear",
]
