"""Where each family keeps its stack of blocks, and what removing a block must update (depth pruning).

Keyed by the model class's qualname (looked up along the MRO, so one entry covers a family's base model and
every head class: ``LlamaPreTrainedModel`` covers ``LlamaModel`` and ``LlamaForCausalLM``). Read by
:mod:`fermigates.surgery.depth`. Nothing here imports transformers or timm.

What the families' code reads (transformers 5.25, timm 1.0):

* LLaMA / Mistral / Qwen2 / Qwen3: ``model.layers`` (``ModuleList``); the model loops over
  ``layers[: config.num_hidden_layers]``, caches (Dynamic and Static) size themselves from
  ``num_hidden_layers`` and ``layer_types`` (Qwen2 / Qwen3: per-layer sliding or full attention), and each
  attention writes its keys / values into the cache slot ``self_attn.layer_idx``.
* GPT-2: ``transformer.h``; ``n_layer`` (alias ``num_hidden_layers``); ``attn.layer_idx`` indexes the cache.
  With ``scale_attn_by_inverse_layer_idx`` the attention scale is ``1 / (layer_idx + 1)``, fixed at
  construction: renumbered blocks would compute another function once rebuilt, so that case is refused.
* BERT / RoBERTa: ``encoder.layer``; ``num_hidden_layers``; ``layer_idx`` for the decoder caches.
* timm ``VisionTransformer``: ``blocks`` (``nn.Sequential``); no config, ``feature_info`` names ``blocks.{i}``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from fermigates.core import registry

#: config fields that hold one entry per block, whatever the family: transformers' per-layer attention
#: kinds, SmolLM3's NoPE flags, transformers' heterogeneous ``per_layer_config`` (a dict keyed by layer
#: index) and fermigates' own per-layer widths (a dict of lists, see converters.hf_attention)
COMMON_PER_LAYER_FIELDS = ("layer_types", "no_rope_layers", "per_layer_config", "fermigates_per_layer")


@dataclass(frozen=True)
class BlockListSpec:
    """How to find a model's stack of blocks and what removing blocks must update.

    ``paths``: candidate paths of the ``ModuleList`` / ``Sequential`` of blocks, the first that exists wins.
    ``count_fields``: config fields that hold the number of blocks. ``per_layer_fields``: config fields with
    one entry per block (lists, or dicts keyed by block index), subset and renumbered with the blocks.
    ``index_attrs``: integer attributes of a block's modules that hold the block's index (cache slots);
    renumbered to the new position. ``refuse(model, kept)``: why these blocks cannot be removed (or None),
    ``kept`` the old indices of the blocks that stay. ``fixup(model, path, kept)``: other model attributes
    that name blocks by index (timm's ``feature_info``).
    """

    paths: tuple[str, ...]
    count_fields: tuple[str, ...] = ()
    per_layer_fields: tuple[str, ...] = ()
    index_attrs: tuple[str, ...] = ("layer_idx",)
    refuse: Callable[[nn.Module, list[int]], str | None] | None = None
    fixup: Callable[[nn.Module, str, list[int]], None] | None = field(default=None)


def _gpt2_refuse(model: nn.Module, kept: list[int]) -> str | None:
    config = getattr(model, "config", None)
    if getattr(config, "scale_attn_by_inverse_layer_idx", False) and any(old != new for new, old in enumerate(kept)):
        return ("config.scale_attn_by_inverse_layer_idx is set: GPT-2 scales each attention by 1 / (layer_idx + "
                "1), fixed when the block is built, so a renumbered block would compute another function once "
                "the model is rebuilt from its config; only the last blocks can be removed from this model")
    return None


def _timm_feature_info(model: nn.Module, path: str, kept: list[int]) -> None:
    info = getattr(model, "feature_info", None)
    if not isinstance(info, list):
        return
    new_index = {old: new for new, old in enumerate(kept)}
    out = []
    for entry in info:
        name = entry.get("module", "") if isinstance(entry, dict) else ""
        head, _, tail = name.rpartition(".")
        if head == path and tail.isdigit():
            if int(tail) not in new_index:
                continue
            entry = {**entry, "module": f"{path}.{new_index[int(tail)]}"}
        out.append(entry)
    model.feature_info = out


_M = "transformers.models"
_DECODERS = {
    "llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3",
}
for module, prefix in _DECODERS.items():
    registry.register(registry.BLOCK_LISTS, f"{_M}.{module}.modeling_{module}.{prefix}PreTrainedModel",
                      BlockListSpec(paths=("model.layers", "layers"), count_fields=("num_hidden_layers",),
                                    per_layer_fields=COMMON_PER_LAYER_FIELDS))
registry.register(registry.BLOCK_LISTS, f"{_M}.gpt2.modeling_gpt2.GPT2PreTrainedModel",
                  BlockListSpec(paths=("transformer.h", "h"), count_fields=("num_hidden_layers",),
                                per_layer_fields=COMMON_PER_LAYER_FIELDS, refuse=_gpt2_refuse))
registry.register(registry.BLOCK_LISTS, f"{_M}.bert.modeling_bert.BertPreTrainedModel",
                  BlockListSpec(paths=("bert.encoder.layer", "encoder.layer"), count_fields=("num_hidden_layers",),
                                per_layer_fields=COMMON_PER_LAYER_FIELDS))
registry.register(registry.BLOCK_LISTS, f"{_M}.roberta.modeling_roberta.RobertaPreTrainedModel",
                  BlockListSpec(paths=("roberta.encoder.layer", "encoder.layer"),
                                count_fields=("num_hidden_layers",), per_layer_fields=COMMON_PER_LAYER_FIELDS))
registry.register(registry.BLOCK_LISTS, "timm.models.vision_transformer.VisionTransformer",
                  BlockListSpec(paths=("blocks",), fixup=_timm_feature_info))


def block_list_spec(model: nn.Module) -> Any:
    """The registered :class:`BlockListSpec` of ``model``'s class (or a base class), else None."""
    return registry.lookup(registry.BLOCK_LISTS, model)
