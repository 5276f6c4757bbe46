"""The transformers side of save/load: a ``save_pretrained``-style ``config.json`` and the rebuild from it.

The written config carries the shrunk shapes twice: native fields where the whole model is uniform (e.g. every
MLP kept 48 neurons -> ``intermediate_size: 48``, so stock ``AutoModel.from_pretrained`` can read a uniformly
shrunk folder), and a ``fermigates`` entry with the per-module attributes that the native config cannot
express (found by building the model from the new config with meta parameters and comparing).
transformers is only imported inside functions.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from fermigates.core import registry
from fermigates.io import manifest as mf

_logger = logging.getLogger(__name__)

GENERATION_NAME = "generation_config.json"

#: (config field, module-path pattern, module attribute): config fields that set every MLP's width
NATIVE_WIDTHS: list[tuple[str, re.Pattern[str], str]] = [
    ("intermediate_size", re.compile(r"(.+\.)?intermediate\.dense"), "out_features"),  # BERT, RoBERTa, ViT
    ("intermediate_size", re.compile(r"(.+\.)?mlp\.(gate_proj|up_proj)"), "out_features"),  # LLaMA family
    ("n_inner", re.compile(r"(.+\.)?mlp\.c_fc"), "nf"),  # GPT-2
]


def _native_fields(config_dict: dict[str, Any], plan: dict[str, dict[str, Any]]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name, pattern, attr in NATIVE_WIDTHS:
        if name not in config_dict or name in fields:
            continue
        values = {e["attrs"][attr] for p, e in plan.items() if pattern.fullmatch(p) and attr in e["attrs"]}
        if len(values) == 1:
            fields[name] = values.pop()
    return fields


def write_hf_config(model: nn.Module, root: Path, plan: dict[str, dict[str, Any]]) -> None:
    """Write ``root/config.json`` for a transformers ``model`` whose modules have the shapes in ``plan``."""
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    fields = _native_fields(config.to_dict(), plan)
    try:  # attention head counts: native fields when uniform and rebuildable, else "fermigates_per_layer"
        fields.update(registry.config_updates(model))
    except Exception as err:  # noqa: BLE001 - a missing or failing family helper only costs the native fields
        _logger.info("no attention config fields for %s (%s)", type(model).__name__, err)
    for name, value in fields.items():
        setattr(config, name, value)
    deviations, diffed = plan, False
    try:
        with mf.meta_parameters():
            reference = type(model)(copy.deepcopy(config))
        built = mf.module_plan(reference)
        deviations = {
            p: {
                "class": e["class"],
                "attrs": {
                    k: v for k, v in e["attrs"].items() if built.get(p, {}).get("attrs", {}).get(k) != v
                },
            }
            for p, e in plan.items()
            if built.get(p) != e
        }
        diffed = True
    except Exception as err:  # noqa: BLE001 - the full plan is always correct, only longer
        _logger.info("could not build %s from its config to diff the plan (%s)", type(model).__name__, err)
    plain = diffed and not deviations
    config.fermigates = {
        "format_version": mf.FORMAT_VERSION,
        "manifest": mf.MANIFEST_NAME,
        "loads_with": "transformers" if plain else "fermigates.from_pretrained",
        "modules": {p: e["attrs"] for p, e in deviations.items()},
    }
    if not plain:
        example = next(iter(deviations), None)
        warnings.warn(
            f"fermigates: plain transformers cannot rebuild this shrunk {type(model).__name__} from its "
            f"config.json ({len(deviations)} modules have widths the config cannot describe, e.g. "
            f"{example!r}: per-layer widths, or fewer attention heads in a family whose head size is "
            f"hidden_size / num_attention_heads, such as BERT and GPT-2); load it with "
            f"fermigates.from_pretrained({str(root)!r}), not AutoModel.from_pretrained",
            stacklevel=3,
        )
    mf.atomic_write_text(root / mf.CONFIG_NAME, config.to_json_string(use_diff=True))
    if will_write_generation(model):
        mf.atomic_write_text(root / GENERATION_NAME, model.generation_config.to_json_string(use_diff=True))


def will_write_generation(model: nn.Module) -> bool:
    """Whether ``write_hf_config`` writes a ``generation_config.json`` for ``model`` (a generative model)."""
    generation = getattr(model, "generation_config", None)
    can_generate = getattr(model, "can_generate", lambda: False)
    return generation is not None and hasattr(generation, "to_json_string") and bool(can_generate())


def hf_factory(root: Path, model_class: type | None) -> Callable[[], nn.Module]:
    """A zero-argument callable building the saved transformers class from ``root/config.json``."""
    config_path = root / mf.CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{str(root)!r} has no {mf.CONFIG_NAME}; from_pretrained needs a folder that "
            "save_shrunk wrote from a transformers model (else use load_shrunk)"
        )
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise mf.CheckpointError(f"{config_path} is not valid JSON ({err})") from None
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(root), local_files_only=True)
    if model_class is None:
        names = raw.get("architectures") or []
        model_class = getattr(transformers, names[0], None) if names else None
        if model_class is None:
            raise mf.CheckpointError(
                f"{config_path} names no transformers class in 'architectures' "
                f"(got {names!r}); pass model_class="
            )
    generation = None
    if (root / GENERATION_NAME).is_file():
        generation = transformers.GenerationConfig.from_pretrained(str(root), local_files_only=True)

    def build() -> nn.Module:
        model = model_class(config)
        if generation is not None:
            model.generation_config = generation
        return model

    return build
