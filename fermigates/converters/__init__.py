"""Per-family knowledge (attention heads, Linear-like layouts, RMS norms, residual streams, config fields,
example inputs) for timm and Hugging Face transformers.

Importing this package runs the family files' ``register(...)`` calls into the registries of
:mod:`fermigates.core.registry` (the library imports it by name the first time it looks knowledge up); none of
them imports timm or transformers at import time (classes are named by qualname). This package depends on
``fermigates.core`` only.
"""

from . import blocks, hf_activations, hf_attention, hf_residuals, timm_attention, timm_layers  # noqa: F401  (register(...))
from .blocks import BlockListSpec, block_list_spec
from .hf_attention import apply_hf_config_updates, hf_config_updates, layer_widths

__all__ = ["BlockListSpec", "apply_hf_config_updates", "block_list_spec", "hf_config_updates", "layer_widths"]
