"""One-shot channel selection (no training budget): which input channels of a consumer to keep.

Two selectors for a consumer ``nn.Linear``:

* :func:`oneshot_channel_scores` + :func:`select_channels`: ``score_j = ||W[:, j]||₂ · rms(x_j)``, the column
  norm times the channel's activation RMS (the structured form of Wanda's |w|·||x||); no data: the norm.
* :func:`select_channels_obs`: greedy Optimal-Brain-Surgeon removal of whole input columns with the input
  Gram matrix ``XᵀX`` (:func:`input_gram`): each step drops the column whose removal, after the best
  least-squares compensation by the remaining ones, costs least. It chooses what :func:`fermigates.calibrate`
  can best recover afterwards.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.batches import attention_mask, feed_no_grad
from .ridge import masked_rows

_logger = logging.getLogger(__name__)

#: at most this many bytes of recorded reference outputs (beyond it, calibration runs the reference again)
RECORD_LIMIT_BYTES = 2 << 30

__all__ = ["oneshot_channel_scores", "select_channels", "input_channel_rms", "input_gram", "select_channels_obs",
           "input_stats", "obs_removal_order", "obs_group_removal_order",
           "output_energy"]


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


def _stream(model: nn.Module, data: Iterable[Any], hooks: dict[str, Any], state: dict[str, Any],
            max_batches: int | None, progress: bool = False, total: int | None = None) -> None:
    """Run ``data`` through ``model`` with forward pre-hooks on the named modules; ``state["mask"]`` holds
    the current batch's attention mask (or None) for the hooks."""
    mods = dict(model.named_modules())
    handles = [mods[n].register_forward_pre_hook(fn) for n, fn in hooks.items()]
    batches = itertools.islice(data, max_batches)
    if progress:
        batches = tqdm(batches, total=total, desc="selection pass (input statistics)", unit="batch", leave=False)
    try:
        for batch in batches:
            state["mask"] = attention_mask(batch)
            feed_no_grad(model, batch)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def input_channel_rms(model: nn.Module, data: Iterable[Any], names: list[str],
                      max_batches: int | None = None) -> dict[str, torch.Tensor]:
    """Per-input-channel RMS of the named layers' inputs over ``data`` (batches as :func:`calibrate` takes)."""
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

    _stream(model, data, {n: hook(n) for n in names}, state, max_batches)
    return {n: (sums[n] / max(counts[n], 1)).sqrt().float() for n in names if n in sums}


@torch.no_grad()
def input_gram(model: nn.Module, data: Iterable[Any], names: list[str],
               max_batches: int | None = None) -> dict[str, torch.Tensor]:
    """Float64 Gram ``[X, 1]ᵀ[X, 1]`` of the named Linear layers' inputs (padding rows excluded)."""
    mods = dict(model.named_modules())
    bad = [n for n in names if not isinstance(mods.get(n), nn.Linear)]
    if bad:
        raise ValueError(f"names must be nn.Linear modules of model, got {bad}")
    grams: dict[str, torch.Tensor] = {}
    state: dict[str, Any] = {}

    def hook(name: str):
        def fn(mod, args):
            x = masked_rows(args[0].detach(), state.get("mask")).double()
            x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
            grams[name] = grams.get(name, 0) + x.T @ x
        return fn

    _stream(model, data, {n: hook(n) for n in names}, state, max_batches)
    return grams


@torch.no_grad()
def _weight_and_bias(consumer: nn.Linear, dtype: torch.dtype) -> torch.Tensor:
    """``[W, b]`` of ``consumer`` (a zero column without a bias), the layout of a Gram with its ones column."""
    w = consumer.weight.detach().to(dtype)
    b = consumer.bias.detach().to(dtype)[:, None] if consumer.bias is not None else w.new_zeros(w.shape[0], 1)
    return torch.cat([w, b], dim=1)


def _damped(gram: torch.Tensor, ridge: float) -> torch.Tensor:
    """A copy of ``gram`` with ``ridge`` times its mean input diagonal added to the input diagonal (not the
    ones column's)."""
    h = gram.clone()
    n = h.shape[0] - 1
    h.diagonal()[:n] += ridge * h.diagonal()[:n].mean()
    return h


def select_channels_obs(consumer: nn.Linear, gram: torch.Tensor, keep: float | int,
                        ridge: float = 1e-2) -> torch.Tensor:
    """Input channels of ``consumer`` to keep, by greedy OBS removal (see module docstring).

    ``gram``: ``(in + 1, in + 1)`` from :func:`input_gram` (last row/column: the bias' ones column, never
    removed). Cost of removing column ``j``: ``||w_j||² / [H⁻¹]_jj`` with ``H = gram + λI``; after each removal
    ``H⁻¹`` and ``W`` are updated in closed form. ``O(in² · removed)``.
    """
    n = consumer.in_features
    if gram.shape != (n + 1, n + 1):
        raise ValueError(f"gram must have shape {(n + 1, n + 1)} (input_gram's), got {tuple(gram.shape)}")
    k = select_channels(torch.zeros(n), keep).numel()
    h = _damped(gram.double(), ridge)
    hinv = torch.linalg.inv(h)
    w = _weight_and_bias(consumer, torch.float64)
    alive = torch.ones(n + 1, dtype=torch.bool)
    for _ in range(n - k):
        d = hinv.diagonal()[:n].clamp_min(1e-30)
        cost = w[:, :n].square().sum(0) / d
        cost[~alive[:n]] = float("inf")
        j = int(cost.argmin())
        w -= w[:, j:j + 1] * (hinv[j] / hinv[j, j])[None, :]
        hinv -= torch.outer(hinv[:, j], hinv[j]) / hinv[j, j]
        alive[j] = False
        w[:, j] = 0
        hinv[j, :] = 0
        hinv[:, j] = 0
    return alive[:n].nonzero().flatten()


#: from this many columns a Gram is taken as three products of half blocks (the lower-left block is the
#: transpose of the upper-right one): 3/4 of the multiply-adds, 21% faster at 1,537 columns on one thread
GRAM_BLOCK_MIN = 1024


def gram_of(x: torch.Tensor) -> torch.Tensor:
    """``xᵀx`` of rows ``x`` ``(n, p)`` in ``x``'s dtype, as a float64 tensor."""
    p = x.shape[1]
    if p < GRAM_BLOCK_MIN:
        return (x.T @ x).double()
    h = p // 2
    a, b = x[:, :h], x[:, h:]
    g = torch.empty(p, p, dtype=torch.float64, device=x.device)
    g[:h, :h] = a.T @ a
    g[:h, h:] = a.T @ b
    g[h:, h:] = b.T @ b
    g[h:, :h] = g[:h, h:].T
    return g


@torch.no_grad()
def input_stats(model: nn.Module, data: Iterable[Any], gram_names: list[str], moment_names: list[str],
                max_batches: int | None = None, record: Iterable[str] = (),
                record_inputs: dict[str, tuple[str, Any]] | None = None,
                record_limit: int | None = None, progress: bool = False,
                energies: dict[str, float] | None = None,
                energy_inputs: dict[str, tuple[str, Any]] | None = None) -> tuple[dict, dict, dict | None]:
    """One pass over ``data``: the float64 Gram ``[X, 1]ᵀ[X, 1]`` of the ``gram_names`` Linear layers' inputs
    and the per-input-channel mean square of the ``moment_names`` layers' inputs (padding rows excluded);
    with ``record``, also the outputs of those layers (first call per batch, one list entry per batch), and
    with ``record_inputs`` (``{key: (module name, getter(args, kwargs))}``) what the getter reads from that
    module's inputs, or None for all when they would take more than ``record_limit`` bytes (default
    :data:`RECORD_LIMIT_BYTES`). Linear outputs are kept as their non-padding rows.

    With ``energy_inputs`` (the same form as ``record_inputs``) the mean squared norm per row of what each
    getter reads (a residual stream a layer adds to) is written into ``energies``, nothing kept.

    Each batch's Gram product is taken in float32 for float32 inputs and summed in float64.
    """
    mods = dict(model.named_modules())
    missing = [n for n in [*gram_names, *moment_names] if n not in mods]
    if missing:
        raise ValueError(f"names not found in model: {missing}")
    grams: dict[str, torch.Tensor] = {}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {n: 0 for n in moment_names}
    state: dict[str, Any] = {}

    def rows(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if isinstance(mod, nn.modules.conv._ConvNd):
            return x.movedim(1, -1).reshape(-1, x.shape[1])
        return masked_rows(x, state.get("mask"))

    def hook(name: str, gram: bool, moment: bool):
        def fn(mod, args):
            x = rows(mod, args[0].detach())
            if gram:
                xf = x if x.dtype == torch.float32 else x.double()
                xf = torch.cat([xf, xf.new_ones(xf.shape[0], 1)], dim=1)
                if name in grams:
                    grams[name] += gram_of(xf)
                else:
                    grams[name] = gram_of(xf).double()
            if moment:
                sums[name] = sums.get(name, 0) + x.double().square().sum(0)
                counts[name] += x.shape[0]
        return fn

    record = list(dict.fromkeys(record))
    record_inputs = dict(record_inputs or {})
    record_limit = RECORD_LIMIT_BYTES if record_limit is None else record_limit
    keys = [*record, *record_inputs]
    outputs: dict[str, list] | None = {n: [] for n in keys} if keys else None
    used = [0]

    def keep(key: str, mod: nn.Module, value: Any) -> None:
        nonlocal outputs
        if outputs is None or not isinstance(value, torch.Tensor) or len(outputs[key]) > state["batch"]:
            return
        value = value.detach()
        if not isinstance(mod, nn.modules.conv._ConvNd):
            value = masked_rows(value, state.get("mask"))  # padding rows are never calibration rows
        used[0] += value.numel() * value.element_size()
        if used[0] > record_limit:
            outputs = None  # too large to keep: calibration will run the reference instead
            return
        outputs[key].append(value)

    def keep_output(name: str):
        def fn(mod, args, out):
            keep(name, mod, out)
        return fn

    def keep_input(key: str, getter: Any):
        def fn(mod, args, kwargs):
            keep(key, mod, getter(args, kwargs))
        return fn

    names = dict.fromkeys([*gram_names, *moment_names])
    hooks = {n: hook(n, n in gram_names, n in moment_names) for n in names}
    missing = [n for n in [*record, *(w for w, _ in record_inputs.values())] if n not in mods]
    if missing:
        raise ValueError(f"record names not found in model: {missing}")
    energy_inputs = dict(energy_inputs or {})
    sq_sums: dict[str, float] = {k: 0.0 for k in energy_inputs}
    sq_rows: dict[str, int] = {k: 0 for k in energy_inputs}

    def measure_input(key: str, getter: Any):
        def fn(mod, args, kwargs):
            value = getter(args, kwargs)
            if isinstance(value, torch.Tensor):
                r = masked_rows(value.detach(), state.get("mask"))
                sq_sums[key] += float(r.double().square().sum())
                sq_rows[key] += r.shape[0]
        return fn

    handles = [mods[n].register_forward_hook(keep_output(n)) for n in record]
    handles += [mods[w].register_forward_pre_hook(measure_input(k, g), with_kwargs=True)
                for k, (w, g) in energy_inputs.items()]
    handles += [mods[w].register_forward_pre_hook(keep_input(k, g), with_kwargs=True)
                for k, (w, g) in record_inputs.items()]
    state["batch"] = -1

    def counting(batches):
        for b in batches:
            state["batch"] += 1
            yield b
    try:
        total = len(data) if hasattr(data, "__len__") else None
        _stream(model, counting(data), hooks, state, max_batches, progress, total)
    finally:
        for h in handles:
            h.remove()
    if outputs is not None and any(len(v) != state["batch"] + 1 for v in outputs.values()):
        outputs = None  # a layer that did not run on every batch
    if energies is not None:
        energies.update({k: sq_sums[k] / sq_rows[k] for k in energy_inputs if sq_rows[k]})
    return grams, {n: (sums[n] / max(counts[n], 1)).float() for n in moment_names if n in sums}, outputs


def output_energy(consumer: nn.Linear, gram: torch.Tensor) -> float:
    """The mean squared output ``||[x, 1] [W, b]ᵀ||²`` of ``consumer`` per row of its input Gram ``gram``."""
    w = _weight_and_bias(consumer, torch.float32)
    g = gram.to(w.device).float()
    return float(((w @ g) * w).sum()) / max(float(g[-1, -1]), 1.0)


@torch.no_grad()
def obs_removal_order(consumer: nn.Linear, gram: torch.Tensor, n_remove: int, ridge: float = 1e-2,
                      blocks: int = 64, loop_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy OBS removal of ``n_remove`` input columns of ``consumer``, in about ``blocks`` steps.

    Returns ``(order, cost)``: the removed column indices in removal order, and each one's cost (the increase
    of the squared output error per calibration row, after least-squares compensation by the remaining
    columns; :func:`output_energy` is the layer's output on that scale). Each step removes the cheapest columns of that step
    together (their joint closed-form update), so ``blocks`` trades exactness of the greedy order for speed.
    ``loop_dtype``: the dtype of the per-step downdates of ``H⁻¹`` (formed in float64 first); float32 halves
    their cost and, with the ridge bounding the condition number, keeps the same removal order in practice.
    """
    n = consumer.in_features
    if gram.shape != (n + 1, n + 1):
        raise ValueError(f"gram must have shape {(n + 1, n + 1)} (input_gram's), got {tuple(gram.shape)}")
    if not 0 <= n_remove < n:
        raise ValueError(f"n_remove must be in [0, {n}), got {n_remove!r}")
    if n_remove == 0:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64)
    w = _weight_and_bias(consumer, torch.float64)
    g = gram.double()
    n_rows = max(float(g[n, n]), 1.0)  # the ones column's square sum
    h = _damped(g, ridge)
    chol, info = torch.linalg.cholesky_ex(h)
    hinv = torch.cholesky_inverse(chol) if int(info) == 0 else torch.linalg.pinv(h, hermitian=True)
    # the inverse is formed in float64; its low-rank downdates below run in ``loop_dtype``
    hinv, w = hinv.to(loop_dtype), w.to(loop_dtype)
    # removed columns' rows of ``hinv`` and columns of ``w`` become zero through the update itself; the
    # matrices are compacted (by ``index``: position -> column; the bias column stays last) once a quarter is dead
    index = torch.arange(n)
    alive = torch.ones(n, dtype=torch.bool)
    order, costs = [], []
    step = max(1, -(-n_remove // max(blocks, 1)))
    done = 0
    while done < n_remove:
        b = min(step, n_remove - done)
        done += b
        m = index.numel()
        cost = w[:, :m].square().sum(0) / hinv.diagonal()[:m].clamp_min(1e-30)
        cost[~alive] = float("inf")
        picked = cost.topk(b, largest=False).indices
        sub_inv = torch.linalg.pinv(hinv[picked][:, picked], hermitian=True)
        wp = w[:, picked]
        joint = float(((wp @ sub_inv) * wp).sum())
        per = cost[picked] * (joint / float(cost[picked].sum().clamp_min(1e-30)))  # shares of the joint cost
        rows = sub_inv @ hinv[picked]
        w.addmm_(wp, rows, alpha=-1)
        hinv.addmm_(hinv[:, picked], rows, alpha=-1)
        alive[picked] = False
        order.append(index[picked])
        costs.append((per / n_rows).double())
        if int(alive.sum()) < 0.75 * m and done < n_remove:
            live = alive.nonzero().flatten()
            keep = torch.cat([live, torch.tensor([m])])
            w, hinv = w.index_select(1, keep), hinv.index_select(0, keep).index_select(1, keep)
            index, alive = index[live], torch.ones(live.numel(), dtype=torch.bool)
    return torch.cat(order), torch.cat(costs)


def obs_group_removal_order(consumer: nn.Linear, gram: torch.Tensor, groups: torch.Tensor, n_remove: int,
                            ridge: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy block-OBS removal of ``n_remove`` groups of input columns of ``consumer`` (an attention head's
    columns of the output projection), one group per step.

    ``groups``: ``(n_groups, size)`` column indices. Returns ``(order, cost)``: the removed groups in removal
    order and each one's cost, ``tr(W_S [H⁻¹]_SS⁻¹ W_Sᵀ)`` for its columns ``S`` after the previous removals'
    compensation, per calibration row (the scale of :func:`obs_removal_order`'s, so heads and neurons can be
    ranked against each other).
    """
    n = consumer.in_features
    if gram.shape != (n + 1, n + 1):
        raise ValueError(f"gram must have shape {(n + 1, n + 1)} (input_gram's), got {tuple(gram.shape)}")
    if groups.dim() != 2 or int(groups.max()) >= n or int(groups.min()) < 0:
        raise ValueError(f"groups must be a (n_groups, size) tensor of column indices below {n}, "
                         f"got shape {tuple(groups.shape)}")
    if not 0 <= n_remove < groups.shape[0]:
        raise ValueError(f"n_remove must be in [0, {groups.shape[0]}), got {n_remove!r}")
    if n_remove == 0:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64)
    w = _weight_and_bias(consumer, torch.float64)
    g = gram.double()
    n_rows = max(float(g[n, n]), 1.0)
    h = _damped(g, ridge)
    hinv = torch.linalg.pinv(h, hermitian=True)
    groups = groups.to(torch.long).cpu()
    alive = torch.ones(groups.shape[0], dtype=torch.bool)
    order, costs = [], []
    for _ in range(n_remove):
        sub_inv = torch.linalg.pinv(hinv[groups[:, :, None], groups[:, None, :]], hermitian=True)  # (G, s, s)
        wg = w[:, groups].permute(1, 0, 2)  # (G, out, s)
        cost = ((wg @ sub_inv) * wg).sum((1, 2))
        cost[~alive] = float("inf")
        j = int(cost.argmin())
        cols = groups[j]
        rows = sub_inv[j] @ hinv[cols]
        w.addmm_(w[:, cols], rows, alpha=-1)
        hinv.addmm_(hinv[:, cols], rows, alpha=-1)
        alive[j] = False
        order.append(j)
        costs.append(float(cost[j]) / n_rows)
    return torch.tensor(order, dtype=torch.long), torch.tensor(costs, dtype=torch.float64)
