"""Where the residual stream is added to a projection's output (Hugging Face blocks), for calibration.

Ridge calibration fits a layer's output to the dense model's. For a projection whose output is added to a
residual stream (BERT's ``output.dense`` + ``input_tensor``, LLaMA's ``o_proj`` / ``down_proj`` + the block
input), the pruned model's residual has drifted from the dense one; fitting ``dense output + (dense residual
- pruned residual)`` instead makes the *sum* match, so each layer also repairs the drift of the layers before
it. Each entry names the module whose forward pre-hook sees the residual, and how to read it from its inputs.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch.nn as nn

from fermigates.core.registry import RESIDUALS

Getter = Callable[[tuple, dict], Any]


def _second_or_input_tensor(args: tuple, kwargs: dict) -> Any:
    return args[1] if len(args) > 1 else kwargs.get("input_tensor")


def _first(args: tuple, kwargs: dict) -> Any:
    return args[0] if args else kwargs.get("hidden_states", kwargs.get("input"))


def _has_param(module: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def hf_residuals(model: nn.Module) -> dict[str, tuple[str, Getter]]:
    """``{projection fqn: (module fqn, getter)}`` for post-norm (BERT-style) and pre-norm (LLaMA / GPT-2)
    blocks, recognised by their structure."""
    out: dict[str, tuple[str, Getter]] = {}
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        children = dict(m.named_children())
        # post-norm: LayerNorm(dropout(dense(h)) + input_tensor)
        if "dense" in children and "LayerNorm" in children and _has_param(m, "input_tensor"):
            out[f"{prefix}dense"] = (name, _second_or_input_tensor)
        # pre-norm, LLaMA / Mistral / Qwen: h + o_proj(...) after input_layernorm(h); h + down_proj(...) after
        # post_attention_layernorm(h)
        attn, mlp = children.get("self_attn"), children.get("mlp")
        if attn is not None and hasattr(attn, "o_proj") and "input_layernorm" in children:
            out[f"{prefix}self_attn.o_proj"] = (f"{prefix}input_layernorm", _first)
        if mlp is not None and hasattr(mlp, "down_proj") and "post_attention_layernorm" in children:
            out[f"{prefix}mlp.down_proj"] = (f"{prefix}post_attention_layernorm", _first)
        # pre-norm, GPT-2: h + attn.c_proj(...) after ln_1(h); h + mlp.c_proj(...) after ln_2(h)
        gpt_attn = children.get("attn")
        if gpt_attn is not None and hasattr(gpt_attn, "c_proj") and "ln_1" in children:
            out[f"{prefix}attn.c_proj"] = (f"{prefix}ln_1", _first)
        if mlp is not None and hasattr(mlp, "c_proj") and "ln_2" in children:
            out[f"{prefix}mlp.c_proj"] = (f"{prefix}ln_2", _first)
    return out


RESIDUALS.append(hf_residuals)
