"""Per-family knowledge (attention heads, Linear-like layouts, RMS norms, example inputs).

Importing this package runs the family files' ``register(...)`` calls; none of them imports timm or
transformers at import time (classes are named by qualname, see :mod:`.registry`).
"""

from . import registry
from . import attention
from . import hf_attention
from . import hf_layers
from . import timm_attention
from . import timm_layers
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
from .hf_attention import apply_hf_config_updates, hf_config_updates, layer_widths

__all__ = [
    "AttentionSpec", "HeadUnits", "LinearLayout", "RMSNormSpec", "attention_spec", "head_units", "kept_heads",
    "linear_layout", "prune_heads", "slice_linear", "hf_config_updates", "apply_hf_config_updates",
    "layer_widths", "registry",
]

from . import hf_layers, timm_layers  # noqa: E402,F401  (gated twins of Conv1D / timm Linear)
