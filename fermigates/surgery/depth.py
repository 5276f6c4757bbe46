"""Depth pruning: score a model's blocks and remove whole blocks, in place.

``block_importance`` runs the model on calibration batches and scores each block (or each run of ``span``
consecutive blocks) by how much it changes the hidden state it reads: ShortGPT's block influence
(``"bi"``: ``1 - cos(h_in, h_out)``, Men et al. 2024) or the angular distance (``"angular"``:
``arccos(cos(h_in, h_out)) / pi``, Gromov et al. 2024), averaged over real tokens (the batches' attention mask),
or by the energy of the change relative to the stream's (``"energy"``: ``sum ||h_out - h_in||^2 / sum ||h_in||^2``
over real tokens: the scale of the output error a budget's OBS ranking uses, so that blocks and units compete).
Low scores are the blocks that matter least. ``skipping`` makes blocks compute the identity for a while.

``remove_blocks`` deletes blocks from the model's block list and updates everything that counts or indexes
blocks -- config counts (``num_hidden_layers``), per-layer config fields (``layer_types``, per-layer head
counts), the cache slot of every attention (``layer_idx``) -- from the family's entry in
``converters.blocks`` (registry ``BLOCK_LISTS``), so that the model, rebuilt from its config by its stock
class, loads the state dict strictly and generates with dynamic and static caches as the model in memory
does. It is a transaction. The removal is recorded on the model (original count, blocks kept) so that
``save_shrunk`` writes it into the manifest and ``load_shrunk`` removes the same blocks from a stock model.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core import registry

_logger = logging.getLogger(__name__)

__all__ = ["DEPTH_ATTR", "RemovedBlocks", "block_importance", "find_blocks", "remove_blocks", "skipping"]

#: model attribute recording removals: ``{container path: {"original": int, "kept": [original indices]}}``
DEPTH_ATTR = "_fermigates_removed_blocks"
METRICS = ("bi", "angular", "energy")
_LABEL_KEYS = ("labels", "label")


@dataclass
class RemovedBlocks:
    """What :func:`remove_blocks` did. ``removed``: the indices removed (numbering before the call);
    ``kept``: the indices, in the model's original numbering, of the blocks that remain; ``config``: the config
    fields changed, with their new values."""

    path: str
    removed: list[int]
    kept: list[int]
    original_count: int
    config: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return (f"removed blocks {self.removed} of {self.path!r}: {len(self.kept)} of {self.original_count} "
                f"original blocks remain")


# ------------------------------------------------------------------------------------------------ finding
def _spec(model: nn.Module) -> Any:
    return registry.lookup(registry.BLOCK_LISTS, model)


def find_blocks(model: nn.Module, path: str | None = None) -> tuple[str, nn.Module]:
    """``(path, container)`` of ``model``'s stack of blocks: ``path`` when given, else the family's
    registered paths (``converters.blocks``)."""
    if path is not None:
        try:
            container = model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"path={path!r}: {type(model).__name__} has no submodule of that name") from None
    else:
        spec = _spec(model)
        if spec is None:
            raise ValueError(
                f"no block list is registered for {type(model).__name__}; pass path= (the name of its "
                "nn.ModuleList / nn.Sequential of blocks, e.g. 'model.layers'), or register a BlockListSpec in "
                "fermigates.core.registry.BLOCK_LISTS"
            )
        found = [p for p in spec.paths if _has(model, p)]
        if not found:
            raise ValueError(f"{type(model).__name__} has none of the block lists {list(spec.paths)}; pass path=")
        path = found[0]
        container = model.get_submodule(path)
    if not isinstance(container, (nn.ModuleList, nn.Sequential)):
        raise ValueError(f"the block list {path!r} is a {type(container).__name__}, not an nn.ModuleList / "
                         "nn.Sequential")
    return path, container


def _has(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


# ------------------------------------------------------------------------------------------------ importance
def _hidden(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return getattr(value, "last_hidden_state", None) if not isinstance(value, Mapping) else None


def _device(model: nn.Module) -> torch.device:
    tensor = next(iter(model.parameters()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _call(model: nn.Module, batch: Any, device: torch.device) -> torch.Tensor | None:
    """Run one batch; return its attention mask (``(B, T)``) or None."""
    if isinstance(batch, Mapping):
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                  for k, v in batch.items() if k not in _LABEL_KEYS}
        model(**inputs)
        mask = inputs.get("attention_mask")
        return mask if isinstance(mask, torch.Tensor) else None
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"a batch must be a tensor, a tuple (inputs, ...) or a dict, got {type(batch).__name__}")
    model(batch.to(device))
    return None


@torch.no_grad()
def block_importance(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    metric: str = "bi",
    span: int = 1,
    path: str | None = None,
    progress: bool = False,
    stream_energy: str = "mean",
) -> list[float]:
    """How much each block (``span=1``) or each run of ``span`` consecutive blocks changes the hidden state,
    averaged over the real tokens of ``batches``; entry ``i`` covers blocks ``i .. i + span - 1``.

    ``metric``: ``"bi"`` (ShortGPT's block influence, ``1 - cos(h_in, h_out)``), ``"angular"``
    (``arccos(cos) / pi``, Gromov et al.; they read the last token only, we average over every real token) or
    ``"energy"`` (``sum ||h_out - h_in||^2 / sum ||h_in||^2`` over real tokens: the squared error removing the
    run adds to the stream, relative to the stream; ``stream_energy="median"``: the stream's energy as its median
    channel's mean square times the channel count, as the allocation measures it, so that a few channels of
    massive activations do not make every block they pass through look quiet).
    Lower means the block (run) is closer to an identity: remove the lowest first. ``batches``: tensors,
    ``(inputs, ...)`` tuples or dicts (an ``attention_mask`` entry excludes padding). The model runs in eval
    mode without gradients and gets its mode back. ``progress``: a progress bar over the batches.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if stream_energy not in ("mean", "median"):
        raise ValueError(f"stream_energy must be 'mean' or 'median', got {stream_energy!r}")
    path, container = find_blocks(model, path)
    n = len(container)
    if isinstance(span, bool) or not isinstance(span, int) or not 1 <= span <= n:
        raise ValueError(f"span must be an integer in [1, {n}] (the number of blocks), got {span!r}")
    if isinstance(batches, (torch.Tensor, Mapping)):
        batches = [batches]
    inputs: dict[int, torch.Tensor] = {}
    totals = torch.zeros(n - span + 1, dtype=torch.float64)
    norms: list[Any] = [0.0] * (n - span + 1)  # "energy": sum of h_in^2 per channel, per run
    count = 0.0
    mask_now: list[torch.Tensor | None] = [None]

    def pre_hook(index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            h = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
            if not isinstance(h, torch.Tensor):
                raise TypeError(f"block {path}.{index} got no tensor hidden state as its first input")
            inputs[index] = h.detach()
        return hook

    def post_hook(index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            start = index - span + 1
            if start < 0:
                return
            h_out, h_in = _hidden(out), inputs.get(start)
            if h_out is None or h_in is None or h_out.shape != h_in.shape:
                raise TypeError(f"block {path}.{index}: cannot compare its output with the input of block "
                                f"{start} (shapes {None if h_in is None else tuple(h_in.shape)} and "
                                f"{None if h_out is None else tuple(h_out.shape)})")
            if metric == "energy":
                a, b = h_in.double(), h_out.detach().double()
                weight = _token_weights(mask_now[0], a[..., 0])
                totals[start] += float(((b - a).square().sum(-1) * weight).sum().cpu())
                norms[start] = norms[start] + (a.square() * weight[..., None]).reshape(-1, a.shape[-1]).sum(0).cpu()
                return
            cos = torch.nn.functional.cosine_similarity(h_in.double(), h_out.detach().double(), dim=-1)
            value = 1.0 - cos if metric == "bi" else torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi
            weight = _token_weights(mask_now[0], value)
            totals[start] += float((value * weight).sum().cpu())
        return hook

    handles = []
    for i, block in enumerate(container):
        handles.append(block.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
        handles.append(block.register_forward_hook(post_hook(i), with_kwargs=True))
    was_training = model.training
    model.eval()
    device = _device(model)
    try:
        for batch in tqdm(batches, desc="scoring blocks", unit="batch", disable=not progress, leave=False):
            mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
            mask_now[0] = mask
            inputs.clear()
            _call(model, batch, device)
            if len(inputs) != n:
                raise RuntimeError(f"only {len(inputs)} of the {n} blocks of {path!r} ran on a batch; "
                                   "block_importance needs every block to run once per forward")
            count += float(_token_weights(mask, torch.zeros(inputs[0].shape[:-1])).sum())
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if count == 0:
        raise ValueError("block_importance: the batches hold no real token (empty data, or all padding)")
    if metric == "energy":
        energy = torch.tensor([float(c.sum() if stream_energy == "mean" else c.median() * c.numel())
                               for c in norms], dtype=torch.float64)
        return (totals / energy.clamp_min(1e-30)).tolist()
    return (totals / count).tolist()


@contextlib.contextmanager
def skipping(model: nn.Module, indices: Iterable[int], *, path: str | None = None) -> Iterator[None]:
    """While inside, the blocks at ``indices`` return their input hidden state (the model computes what it
    would without them; the blocks still run, their results are dropped). Names and indices stay as they are."""
    path, container = find_blocks(model, path)
    chosen = _check_indices(list(indices), len(container)) if list(indices) else []

    def identity(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        h = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
        if isinstance(out, torch.Tensor):
            return h
        if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
            return (h, *out[1:])
        raise TypeError(f"cannot skip a block of {path!r} that returns {type(out).__name__}")

    handles = [container[i].register_forward_hook(identity, with_kwargs=True) for i in chosen]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _token_weights(mask: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    """1 for real tokens, 0 for padding, shaped like ``value`` (per-token values, ``(B, T)`` or ``(B, N)``)."""
    if mask is None or tuple(mask.shape) != tuple(value.shape):
        return torch.ones_like(value)
    return mask.to(value.device, value.dtype)


# ------------------------------------------------------------------------------------------------ removal
def _check_indices(indices: Any, n: int) -> list[int]:
    if isinstance(indices, int) and not isinstance(indices, bool):
        indices = [indices]
    try:
        values = list(indices)
    except TypeError:
        raise TypeError(f"indices must be an int or an iterable of ints, got {type(indices).__name__}") from None
    out = []
    for v in values:
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"indices must be ints, got {v!r}")
        if not -n <= v < n:
            raise IndexError(f"block index {v} is out of range for {n} blocks")
        out.append(v % n)
    if len(set(out)) != len(out):
        raise ValueError(f"indices name a block twice: {values!r}")
    if len(out) >= n:
        raise ValueError(f"cannot remove all {n} blocks; keep at least one")
    return sorted(out)


def _subset(value: Any, kept: list[int], n: int, name: str) -> Any:
    """A per-layer config value restricted to the ``kept`` layers (lists / tuples of length ``n``, dicts keyed
    by layer index, or dicts of such lists)."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"config.{name} has {len(value)} entries for {n} blocks; cannot tell which go")
        return type(value)(value[i] for i in kept)
    if isinstance(value, dict):
        if value and all(isinstance(k, int) or (isinstance(k, str) and k.isdigit()) for k in value):
            return {(new if isinstance(k, int) else str(new)): value[k]
                    for new, old in enumerate(kept) for k in value if int(k) == old}
        return {k: _subset(v, kept, n, f"{name}.{k}") if isinstance(v, (list, tuple, dict)) else v
                for k, v in value.items()}
    return value


def _plan_config(model: nn.Module, spec: Any, kept: list[int], n: int) -> dict[str, Any]:
    config = getattr(model, "config", None)
    if config is None or spec is None:
        return {}
    updates: dict[str, Any] = {}
    for name in spec.count_fields:
        current = getattr(config, name, None)
        if isinstance(current, int) and not isinstance(current, bool):
            if current != n:
                raise ValueError(f"config.{name} is {current} but {n} blocks were found; the model and its "
                                 "config disagree, refusing to guess")
            updates[name] = len(kept)
    for name in spec.per_layer_fields:  # read from __dict__: a heterogeneous config validates attribute reads
        if name == "per_layer_config":  # transformers' heterogeneous config: overrides keyed by layer index
            hetero = vars(config).get(_HETERO)
            if hetero is not None:
                overrides = {new: copy.deepcopy(hetero.per_layer_overrides[old])
                             for new, old in enumerate(kept) if old in hetero.per_layer_overrides}
                updates[name] = overrides or None
            continue
        current = vars(config).get(name)
        if current is not None:
            updates[name] = _subset(current, kept, n, name)
    return updates


def _apply_blocks(model: nn.Module, path: str | None, indices: Any) -> tuple[RemovedBlocks, Callable[[], None]]:
    """Remove the blocks; return what was done and a function that undoes it exactly."""
    spec = _spec(model)
    path, container = find_blocks(model, path)
    n = len(container)
    removed = _check_indices(indices, n)
    kept_now = [i for i in range(n) if i not in removed]
    if spec is not None and spec.refuse is not None:
        reason = spec.refuse(model, kept_now)
        if reason:
            raise ValueError(f"cannot remove blocks {removed} of {type(model).__name__}: {reason}")
    config_updates = _plan_config(model, spec, kept_now, n)
    index_attrs = spec.index_attrs if spec is not None else ("layer_idx",)
    record = dict(getattr(model, DEPTH_ATTR, None) or {})
    previous = record.get(path)
    original = previous["original"] if previous else n
    kept_original = [previous["kept"][i] for i in kept_now] if previous else kept_now

    # everything that changes, with its old value, before anything changes
    blocks = list(container._modules.items())
    renumber = [(m, a, getattr(m, a), new) for new, old in enumerate(kept_now) for m in blocks[old][1].modules()
                for a in index_attrs if isinstance(getattr(m, a, None), int) and not isinstance(getattr(m, a), bool)]
    config = getattr(model, "config", None)
    # where each field is stored: GPT-2 keeps num_hidden_layers as n_layer, per_layer_config is a property
    aliases = {**(getattr(config, "attribute_map", None) or {}), "per_layer_config": _HETERO}
    old_config = {aliases.get(k, k): vars(config).get(aliases.get(k, k), _MISSING)
                  for k in config_updates} if config is not None else {}
    old_attrs = {k: model.__dict__.get(k, _MISSING) for k in (DEPTH_ATTR, "feature_info")}

    def undo() -> None:
        container._modules.clear()
        container._modules.update(OrderedDict(blocks))
        for module, attr, value, _ in renumber:
            setattr(module, attr, value)
        for key, value in old_config.items():
            if value is _MISSING:
                config.__dict__.pop(key, None)
            else:
                config.__dict__[key] = value
        for key, value in old_attrs.items():
            if value is _MISSING:
                model.__dict__.pop(key, None)
            else:
                model.__dict__[key] = value

    try:
        container._modules.clear()
        container._modules.update(OrderedDict((str(new), blocks[old][1]) for new, old in enumerate(kept_now)))
        for module, attr, _, new in renumber:
            setattr(module, attr, new)
        for key, value in config_updates.items():
            setattr(config, key, value)
        if spec is not None and spec.fixup is not None:
            spec.fixup(model, path, kept_now)
        record[path] = {"original": original, "kept": kept_original}
        model.__dict__[DEPTH_ATTR] = record
    except BaseException:
        undo()
        raise
    result = RemovedBlocks(path=path, removed=removed, kept=kept_original, original_count=original,
                           config=config_updates)
    _logger.info("%s", result)
    return result, undo


_MISSING = object()
_HETERO = "_heterogeneity_spec"  # where transformers keeps a config's per_layer_config


def remove_blocks(model: nn.Module, indices: int | Iterable[int], *, path: str | None = None) -> RemovedBlocks:
    """Remove the blocks at ``indices`` (current numbering) from ``model``'s block list, in place.

    The block list is ``path`` or the family's registered one (``converters.blocks``: HF LLaMA / Mistral /
    Qwen2 / Qwen3 ``model.layers``, GPT-2 ``transformer.h``, BERT / RoBERTa ``encoder.layer``, timm ViT
    ``blocks``). Remaining blocks are renumbered (module names and their ``layer_idx``), and the config's block
    count and per-layer fields are updated, so the stock class rebuilt from ``model.config`` loads
    ``model.state_dict()`` strictly. A transaction: on any error the model is exactly as it was. Removals
    compose: ``RemovedBlocks.kept`` and the record that ``save_shrunk`` writes use the original numbering.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    result, _ = _apply_blocks(model, path, indices)
    return result


def removed_blocks(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The removals recorded on ``model``: ``{path: {"original": count, "kept": [original indices]}}``."""
    return {k: {"original": v["original"], "kept": list(v["kept"])}
            for k, v in (getattr(model, DEPTH_ATTR, None) or {}).items()}


def match_removed_blocks(model: nn.Module, record: dict[str, Any], where: str) -> list[Callable[[], None]]:
    """Bring a stock ``model`` to the depth of a checkpoint's ``record`` (see :func:`removed_blocks`): a block
    list with the original count loses the removed blocks, one already at the kept count is left as it is.
    Returns the undo functions (last first), for the loader's transaction."""
    undos: list[Callable[[], None]] = []
    try:
        for path, entry in record.items():
            original, kept = int(entry["original"]), [int(i) for i in entry["kept"]]
            try:
                container = model.get_submodule(path)
            except AttributeError:
                raise ValueError(f"{where} removed blocks from {path!r}, which this "
                                 f"{type(model).__name__} does not have") from None
            if len(container) == len(kept):
                continue
            if len(container) != original:
                raise ValueError(f"{where} keeps {len(kept)} of {original} blocks of {path!r}, but this "
                                 f"{type(model).__name__} has {len(container)}: build it with {original} "
                                 f"(the original depth) or {len(kept)} blocks")
            gone = [i for i in range(original) if i not in set(kept)]
            _, undo = _apply_blocks(model, path, gone)
            undos.insert(0, undo)
    except BaseException:
        for undo in undos:
            undo()
        raise
    return undos
