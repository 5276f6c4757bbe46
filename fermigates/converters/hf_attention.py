"""Hugging Face transformers (v5): attention specs, Conv1D layout, RMS norms, example inputs, config fix-ups.

Nothing here imports transformers at import time; classes are named by qualname. What each family's forward
reads (transformers 5.23):

* ``BertSelfAttention`` / ``BertCrossAttention`` (and RoBERTa's copies): ``query``/``key``/``value`` Linear,
  reshape with ``(-1, attention_head_size)``; the output projection is ``BertSelfOutput.dense`` outside the
  module, so the module's output tensor carries the heads. Attributes: ``num_attention_heads``,
  ``all_head_size`` (``attention_head_size`` is unchanged by head removal).
* ``ViTAttention``: ``q_proj``/``k_proj``/``v_proj``/``o_proj`` inside, reshape with ``head_dim``;
  attribute ``num_attention_heads``.
* ``GPT2Attention``: fused ``c_attn`` Conv1D (rows ``[q; k; v]``) split by ``split_size``, ``c_proj`` inside;
  attributes ``num_heads``, ``split_size`` (``embed_dim`` is read only in ``__init__``). Cross-attention
  (``q_attn`` + ``c_attn`` = ``[k; v]``) is not supported.
* ``LlamaAttention`` (and Mistral / Qwen2 / Qwen3): ``q_proj``/``k_proj``/``v_proj``/``o_proj``, reshape with
  ``head_dim``, the head counts come from the weights; ``num_key_value_groups`` feeds ``repeat_kv`` / SDPA's
  GQA and must stay ``n_q // n_kv``. KV caches (Dynamic and Static) allocate lazily from the key/value
  tensors, so ``generate()`` works after shrinking; the config only matters for a static cache that is
  initialised eagerly (``prefill_chunk_size``: sized from ``config.per_layer_config``) and for rebuilding the
  model, see :func:`hf_config_updates` / :func:`apply_hf_config_updates` (call it after shrinking).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fermigates.core import registry
from fermigates.core.layouts import CONV1D, AttentionSpec, RMSNormSpec, attention_spec, linear_layout

_logger = logging.getLogger(__name__)

_M = "transformers.models"
CONV1D_NAME = "transformers.pytorch_utils.Conv1D"
BERT_LIKE = [
    f"{_M}.bert.modeling_bert.BertSelfAttention",
    f"{_M}.bert.modeling_bert.BertCrossAttention",
    f"{_M}.roberta.modeling_roberta.RobertaSelfAttention",
    f"{_M}.roberta.modeling_roberta.RobertaCrossAttention",
]
VIT_LIKE = [f"{_M}.vit.modeling_vit.ViTAttention"]
GPT2_LIKE = [f"{_M}.gpt2.modeling_gpt2.GPT2Attention"]
LLAMA_LIKE = [
    f"{_M}.llama.modeling_llama.LlamaAttention",
    f"{_M}.mistral.modeling_mistral.MistralAttention",
    f"{_M}.qwen2.modeling_qwen2.Qwen2Attention",
    f"{_M}.qwen3.modeling_qwen3.Qwen3Attention",
]
RMS_NORM_NAMES = [
    f"{_M}.llama.modeling_llama.LlamaRMSNorm",
    f"{_M}.mistral.modeling_mistral.MistralRMSNorm",
    f"{_M}.qwen2.modeling_qwen2.Qwen2RMSNorm",
    f"{_M}.qwen3.modeling_qwen3.Qwen3RMSNorm",
]


def _out_features(module: nn.Module) -> int:
    layout = linear_layout(module)
    return int(module.weight.shape[layout.out_dim])


# ------------------------------------------------------------------------------------------------ BERT
def _bert_set_heads(m: nn.Module, kept_q: torch.Tensor, kept_kv: torch.Tensor) -> None:
    m.num_attention_heads = int(kept_q.numel())
    m.all_head_size = m.num_attention_heads * m.attention_head_size


BERT_SPEC = AttentionSpec(
    q="query", k="key", v="value", o=None,
    num_heads=lambda m: _out_features(m.query) // m.attention_head_size,
    head_dim=lambda m: m.attention_head_size,
    set_heads=_bert_set_heads,
)


# ------------------------------------------------------------------------------------------------ ViT
def _vit_set_heads(m: nn.Module, kept_q: torch.Tensor, kept_kv: torch.Tensor) -> None:
    m.num_attention_heads = int(kept_q.numel())


VIT_SPEC = AttentionSpec(
    q="q_proj", k="k_proj", v="v_proj", o="o_proj",
    num_heads=lambda m: _out_features(m.q_proj) // m.head_dim,
    head_dim=lambda m: m.head_dim,
    set_heads=_vit_set_heads,
)


# ------------------------------------------------------------------------------------------------ GPT-2
def _gpt2_set_heads(m: nn.Module, kept_q: torch.Tensor, kept_kv: torch.Tensor) -> None:
    m.num_heads = int(kept_q.numel())
    m.split_size = m.num_heads * m.head_dim


GPT2_SPEC = AttentionSpec(
    qkv="c_attn", o="c_proj",
    num_heads=lambda m: _out_features(m.c_attn) // (3 * m.head_dim),
    head_dim=lambda m: m.head_dim,
    set_heads=_gpt2_set_heads,
    unsupported=lambda m: "cross-attention (q_attn + fused [k; v])" if m.is_cross_attention else None,
)


# ------------------------------------------------------------------------------------------------ LLaMA
def _llama_set_heads(m: nn.Module, kept_q: torch.Tensor, kept_kv: torch.Tensor) -> None:
    n_q, n_kv = int(kept_q.numel()), int(kept_kv.numel())
    if n_kv == 0 or n_q % n_kv:
        raise ValueError(f"kept query heads ({n_q}) must be a multiple of kept kv heads ({n_kv})")
    m.num_key_value_groups = n_q // n_kv


LLAMA_SPEC = AttentionSpec(
    q="q_proj", k="k_proj", v="v_proj", o="o_proj",
    num_heads=lambda m: _out_features(m.q_proj) // m.head_dim,
    num_kv_heads=lambda m: _out_features(m.k_proj) // m.head_dim,
    head_dim=lambda m: m.head_dim,
    set_heads=_llama_set_heads,
    modes=("group", "slot"),
)


# ------------------------------------------------------------------------------------------------ inputs
def hf_example_inputs(model: nn.Module, batch: int = 2, seq_len: int = 8) -> dict[str, torch.Tensor] | None:
    """Random ``input_ids``/``attention_mask`` (text) or ``pixel_values`` (vision) for an HF model, else None."""
    config = getattr(model, "config", None)
    if config is None or not any(c.__module__.startswith("transformers.") for c in type(model).__mro__):
        return None
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    vocab = getattr(config, "vocab_size", None)
    if vocab:
        limit = getattr(config, "max_position_embeddings", None) or seq_len
        length = min(seq_len, int(limit))
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, int(vocab), (batch, length), generator=gen).to(device)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if getattr(config, "is_encoder_decoder", False):
            inputs["decoder_input_ids"] = ids[:, : max(1, length // 2)]
        return inputs
    size = getattr(config, "image_size", None)
    if size:
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        channels = int(getattr(config, "num_channels", 3))
        gen = torch.Generator().manual_seed(0)
        return {"pixel_values": torch.randn(batch, channels, h, w, generator=gen).to(device)}
    return None


def hf_fixed_input_width(model: nn.Module) -> dict[str, str]:
    """Classification heads of a transformers model (``classifier``, ``score`` and what lies under them):
    their input width is ``hidden_size`` in the config, so pruning the pooler (or a head's own dense layer)
    that feeds them would give a width no config can describe."""
    config = getattr(model, "config", None)
    if not hasattr(config, "to_json_string") or not type(model).__module__.startswith("transformers."):
        return {}
    heads = ("classifier", "score")
    return {
        name: "classification head of a transformers model: the config fixes its input width (hidden_size)"
        for name, module in model.named_modules()
        if name in heads or name.startswith(tuple(h + "." for h in heads))
        if isinstance(module, nn.Linear)
    }


# ------------------------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class _ConfigFields:
    """How a family's config describes per-layer widths, and which fields its constructor rebuilds from."""

    heads: str = "num_attention_heads"
    kv_heads: str | None = None
    heads_native: bool = False        # can the stock class rebuild shrunk heads from (heads, kv_heads, head_dim)?
    mlp: str | None = None            # child (suffix) whose output features are the MLP width
    mlp_field: str = "intermediate_size"
    kv_cache: bool = False            # generate() sizes eagerly initialised static caches from the config


_FAMILIES = {
    "bert": _ConfigFields(mlp="intermediate.dense"),
    "vit": _ConfigFields(heads_native=True, mlp="mlp.fc1"),
    "gpt2": _ConfigFields(mlp="mlp.c_fc", mlp_field="n_inner", kv_cache=True),
    "llama": _ConfigFields(kv_heads="num_key_value_heads", heads_native=True, mlp="mlp.up_proj", kv_cache=True),
}
_FAMILY = {**{n: "bert" for n in BERT_LIKE}, **{n: "vit" for n in VIT_LIKE}, **{n: "gpt2" for n in GPT2_LIKE},
           **{n: "llama" for n in LLAMA_LIKE}}


def _family(module: nn.Module) -> str | None:
    for base in type(module).__mro__:
        fam = _FAMILY.get(registry.qualname(base))
        if fam is not None:
            return fam
    return None


def _is_self_attention(module: nn.Module, spec: AttentionSpec | None) -> bool:
    return spec is not None and "Cross" not in type(module).__name__ and not getattr(
        module, "is_cross_attention", False)


def layer_widths(model: nn.Module) -> list[dict[str, int]]:
    """Per layer (module order): ``num_attention_heads``, ``num_key_value_heads``, ``head_dim`` and, where the
    family's MLP is known, ``intermediate_size`` -- read from the (shrunk) weights."""
    layers, mlp = [], []
    fields = None
    for name, module in model.named_modules():
        spec = attention_spec(module)
        if _is_self_attention(module, spec):
            fields = fields or _FAMILIES.get(_family(module))
            layers.append({"num_attention_heads": spec.num_heads(module),
                           "num_key_value_heads": spec.kv_heads(module), "head_dim": spec.head_dim(module)})
        elif fields is not None and fields.mlp and name.endswith("." + fields.mlp):
            mlp.append(_out_features(module))
    if len(mlp) == len(layers):
        for layer, width in zip(layers, mlp):
            layer["intermediate_size"] = width
    return layers


def hf_config_updates(model: nn.Module) -> dict[str, Any]:
    """Config fields that describe a shrunk HF ``model``'s attention heads and MLP widths (``{}``: unchanged).

    A width that every layer shares is written to the native field when the family's constructor rebuilds
    it from the config: heads for LLaMA-like (``num_attention_heads``, ``num_key_value_heads``, ``head_dim``)
    and ViT (``num_attention_heads``, ``head_dim``); the MLP width for all (``intermediate_size``, GPT-2
    ``n_inner``). A model pruned uniformly then reloads with plain ``from_pretrained``. Anything else
    (different widths per layer, or BERT / GPT-2 heads, whose head size the constructor derives as
    ``hidden_size // num_attention_heads``) keeps its native field describing the stock skeleton that
    ``load_shrunk`` resizes, and goes under ``"fermigates_per_layer"`` as list-valued fields, one value per
    layer (precedent: Gemma3n's list-valued ``intermediate_size``).

    For decoders (LLaMA-like, GPT-2) whose heads cannot be written natively, the per-layer head counts also
    go into transformers' own heterogeneous ``per_layer_config`` (read by ``generate()`` when it initialises a
    static cache eagerly, e.g. with ``prefill_chunk_size``), with ``allow_global_per_layer_attribute_access``
    so that the stock class still builds from the global fields (the skeleton ``load_shrunk`` resizes).
    """
    config = getattr(model, "config", None)
    layers = layer_widths(model)
    if config is None or not layers:
        return {}
    fam = next((f for f in map(_family, model.modules()) if f is not None), None)
    spec = _FAMILIES.get(fam, _ConfigFields())
    native: dict[str, Any] = {}
    per_layer: dict[str, list[int]] = {}

    def values(key: str) -> list[int]:
        return [layer[key] for layer in layers]

    q, kv, d = values("num_attention_heads"), values("num_key_value_heads"), values("head_dim")
    heads_changed = any(n != _global(config, spec.heads) for n in q) or (
        spec.kv_heads is not None and any(n != _global(config, spec.kv_heads) for n in kv))
    if heads_changed:
        if spec.heads_native and len(set(zip(q, kv, d))) == 1:
            native.update({spec.heads: q[0], "head_dim": d[0]})
            if spec.kv_heads is not None:
                native[spec.kv_heads] = kv[0]
        else:
            per_layer.update(num_attention_heads=q, num_key_value_heads=kv, head_dim=d)
            if spec.kv_cache and len(q) == getattr(config, "num_hidden_layers", None):
                native.update(_hf_per_layer_config(q, kv, d))
    if "intermediate_size" in layers[0]:
        widths = values("intermediate_size")
        current = _global(config, spec.mlp_field)
        if spec.mlp_field == "n_inner" and current is None:
            current = 4 * config.hidden_size
        if any(w != current for w in widths):
            if len(set(widths)) == 1:
                native[spec.mlp_field] = widths[0]
            else:
                per_layer["intermediate_size"] = widths
    if per_layer:
        native["fermigates_per_layer"] = per_layer
    native.update(_stream_fields(model, config))
    return native


def hf_hidden_multiple(model: nn.Module) -> int | None:
    """transformers' LLaMA-like configs refuse a hidden size that is not a multiple of the head count."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in _HEADS_DIVIDE_HIDDEN:
        return None
    heads = getattr(config, "num_attention_heads", None)
    return heads if isinstance(heads, int) else None


#: config model types whose validation requires hidden_size % num_attention_heads == 0
_HEADS_DIVIDE_HIDDEN = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"}


def _stream_fields(model: nn.Module, config: Any) -> dict[str, Any]:
    """``hidden_size`` (and the RMS norms' epsilon, rescaled with it) when the residual stream was pruned."""
    get_in = getattr(model, "get_input_embeddings", None)
    embed = get_in() if callable(get_in) else None
    width = getattr(embed, "embedding_dim", None)
    if not isinstance(width, int) or width == getattr(config, "hidden_size", width):
        return {}
    out: dict[str, Any] = {"hidden_size": width}
    norm = next((m for m in model.modules() if registry.lookup(registry.RMS_NORMS, m) is not None), None)
    if norm is not None and hasattr(config, "rms_norm_eps"):
        out["rms_norm_eps"] = float(getattr(norm, registry.lookup(registry.RMS_NORMS, norm)(norm).eps))
    return out


def _global(config: Any, name: str) -> Any:
    """``config.<name>``, read without the ambiguity check of a heterogeneous (per-layer) config."""
    getter = getattr(config, "_getattr_without_heterogeneous_validation", None)
    return getter(name, None) if getter is not None else getattr(config, name, None)


def _hf_per_layer_config(q: list[int], kv: list[int], d: list[int]) -> dict[str, Any]:
    layers = {i: {"num_attention_heads": a, "num_key_value_heads": b, "head_dim": c}
              for i, (a, b, c) in enumerate(zip(q, kv, d))}
    return {"allow_global_per_layer_attribute_access": True, "per_layer_config": layers}


def apply_hf_config_updates(model: nn.Module) -> dict[str, Any]:
    """Write :func:`hf_config_updates` into ``model.config`` (shared by all its submodules); returns them."""
    updates = hf_config_updates(model)
    for module in model.modules():  # MLPs that keep their width as an attribute (LlamaMLP, MistralMLP, ...)
        if isinstance(getattr(module, "intermediate_size", None), int) and hasattr(module, "up_proj"):
            module.intermediate_size = _out_features(module.up_proj)
    for key, value in updates.items():  # the access flag first: per_layer_config makes globals ambiguous
        setattr(model.config, key, value)
    if updates:
        _logger.info("updated %s config: %s", type(model).__name__, updates)
    return updates


# ------------------------------------------------------------------------------------------------ registration
registry.register(registry.LINEAR_LIKE, CONV1D_NAME, CONV1D)
registry.register(registry.SHAPE_ATTRS, CONV1D_NAME, ("nf", "nx"))
registry.register(registry.ATTENTION, BERT_LIKE, BERT_SPEC)
registry.register(registry.SHAPE_ATTRS, BERT_LIKE, ("num_attention_heads", "attention_head_size", "all_head_size"))
registry.register(registry.ATTENTION, VIT_LIKE, VIT_SPEC)
registry.register(registry.SHAPE_ATTRS, VIT_LIKE, ("num_attention_heads", "head_dim"))
registry.register(registry.ATTENTION, GPT2_LIKE, GPT2_SPEC)
registry.register(registry.SHAPE_ATTRS, GPT2_LIKE, ("num_heads", "head_dim", "split_size"))
registry.register(registry.ATTENTION, LLAMA_LIKE, LLAMA_SPEC)
registry.register(registry.SHAPE_ATTRS, LLAMA_LIKE, ("head_dim", "num_key_value_groups"))
registry.register(registry.RMS_NORMS, RMS_NORM_NAMES, RMSNormSpec(weight="weight", eps="variance_epsilon"))
# a pruned hidden size rescales the norms' epsilon with their weight (see fermigates.surgery.shrink)
registry.register(registry.SHAPE_ATTRS, RMS_NORM_NAMES, ("variance_epsilon",))
registry.EXAMPLE_INPUTS.append(hf_example_inputs)
registry.FIXED_INPUT_WIDTH.append(hf_fixed_input_width)
registry.CONFIG_UPDATES.append(hf_config_updates)
registry.HIDDEN_MULTIPLE.append(hf_hidden_multiple)
registry.CONFIG_APPLY.append(apply_hf_config_updates)
