"""Fine-tuning to a MAC budget on Fashion-MNIST: fermigates annealing vs one-shot + fine-tune vs Torch-Pruning.

A small CNN (3 convs + 2 Linear) is trained dense on the full training set, then cut to 2x / 3x / 5x fewer MACs
by each method with the **same** fine-tuning budget: the same number of AdamW steps, learning rate, batch size
and data order (per seed). Accuracy is always that of the **baked, physically shrunk** model on the 10k test
images; MACs are counted by one counter (``fermigates.count_macs``, per sample at 1x28x28) for every row, and
each library's width knob is searched so that its MACs land on the budget.

Methods:
* ``fg anneal``: ``convert_to_fermi(channel)`` -> ``fine_tune(init="scores")`` under ``FermiAnnealer`` (units
  start in their weights' magnitude order, the default before ``init="auto"``; cubic ramp over the first
  quarter, decisions frozen for the rest) -> ``convert_from_fermi(calibration_data=...)``
  (reference: the trained model). Also reported: the trained gated model, and the bake without calibration.
* ``fg anneal, early bake``: the same, with ``fine_tune(..., bake_when_decided=True)``: baked, shrunk and
  calibrated (toward the model as trained) when the decisions freeze; the small plain model is fine-tuned
  for the rest of the run.
* ``fg anneal init=obs`` / ``fg anneal init=obs, early bake``: the same two, with ``fine_tune(init="obs")`` (what ``fine_tune``'s default ``init="auto"`` does for channel gates): the
  anneal starts from the order in which the one-shot pruner would remove the channels on the calibration images
  (trainable per-unit Fermi levels), not from the weights' magnitude order.
* ``fg prune + FT``: ``fermigates.prune`` (score quantile + ridge calibration toward the dense model), then
  plain fine-tuning.
* ``TP magnitude + FT``: Torch-Pruning ``MagnitudePruner`` (L2, local) one-shot, then fine-tuning.
* ``TP magnitude iterative``: the same pruner in 8 steps spread over the first half of the run (as our ramp),
  the optimizer rebuilt after each step (Torch-Pruning's own recipe), fine-tuning in between and after.
* ``TP Taylor + FT``: ``TaylorImportance`` from the gradients of 8 calibration batches, one-shot, fine-tuning.
* ``dense FT``: the dense model fine-tuned for the same steps (the ceiling).

    apt-get install -y dataset-fashion-mnist
    python benchmarks/bench_finetune_cnn.py [--budgets 2 3 5] [--steps 938] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import write_results  # noqa: E402
from bench_calibrate_cnn import dataset  # noqa: E402

import fermigates as fg  # noqa: E402
import fermigates.bake, fermigates.finetune, fermigates.surgery.macs  # noqa: E401,E402,F401
from fermigates.oneshot import DEFAULT_SELECTION, prune as fg_prune  # noqa: E402  (loaded now: edits during a run)
from fermigates.methods.fermi.anneal import AnnealSchedule  # noqa: E402

EXAMPLE = torch.zeros(1, 1, 28, 28)
ROUND_TO = [1]  # channel multiple for both libraries (the MobileNetV2 benchmark sets 8)
METHODS = ("fg anneal", "fg anneal, global budget", "fg anneal, early bake", "fg anneal init=obs",
           "fg anneal init=obs, early bake", "fg prune + FT", "TP magnitude + FT", "TP magnitude iterative", "TP Taylor + FT", "dense FT")


class CNN(nn.Module):
    """3 convs + 2 Linear (62k parameters, 2.0M MACs per image)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.conv3, self.bn3 = nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64)
        self.fc1, self.fc2 = nn.Linear(64 * 9, 64), nn.Linear(64, 10)
        self.pool, self.act = nn.MaxPool2d(2), nn.ReLU()

    def forward(self, x):
        x = self.pool(self.act(self.bn1(self.conv1(x))))
        x = self.pool(self.act(self.bn2(self.conv2(x))))
        x = self.pool(self.act(self.bn3(self.conv3(x)))).flatten(1)
        return self.fc2(self.act(self.fc1(x)))


def train_dense(x, y, epochs: int, cache: Path) -> CNN:
    torch.manual_seed(0)  # before the model is built, so that every run starts from the same dense model
    model = CNN()
    if cache.exists():
        model.load_state_dict(torch.load(cache, weights_only=True))
        return model.eval()
    g = torch.Generator().manual_seed(0)
    batches = [(x[i], y[i]) for _ in range(epochs) for i in torch.randperm(len(x), generator=g).split(128)]
    fg.fine_tune(model, batches, steps=len(batches), lr=3e-3, progress=False)
    torch.save(model.state_dict(), cache)
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x, y) -> float:
    model.eval()
    return float(sum((model(xb).argmax(1) == yb).sum() for xb, yb in zip(x.split(1000), y.split(1000))) / len(y))


def macs(model: nn.Module) -> int:
    return int(fg.count_macs(model, EXAMPLE))


# -- width search: each library's knob set so that the shrunk model's MACs land on the budget -------------------
def fg_config(s: float) -> fg.FermiConfig:
    return fg.FermiConfig(granularity="channel", target_sparsity=s, round_to=ROUND_TO[0])


def fg_hard_prune(dense: nn.Module, s: float) -> nn.Module:
    model = copy.deepcopy(dense)
    fg.convert_to_fermi(model, fg_config(s), example_inputs=EXAMPLE)
    AnnealSchedule(1, (1e-4, 1e-4), target_sparsity=s, sparsity_schedule="constant", tolerance=0.0,
                   hard_after=1.0).apply(model, 1)
    fg.convert_from_fermi(model, progress=False)
    return model


def tp_pruner(model: nn.Module, ratio: float, importance=None, iterative_steps: int = 1):
    import torch_pruning as tp

    return tp.pruner.MagnitudePruner(
        model, EXAMPLE, importance=importance or tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio,
        global_pruning=False, ignored_layers=[classifier(model)], iterative_steps=iterative_steps,
        round_to=ROUND_TO[0] if ROUND_TO[0] > 1 else None)


def classifier(model: nn.Module) -> nn.Module:
    return model.get_classifier() if hasattr(model, "get_classifier") else model.fc2


def tp_hard_prune(dense: nn.Module, ratio: float) -> nn.Module:
    model = copy.deepcopy(dense)
    tp_pruner(model, ratio).step()
    return model


def search(prune_fn, dense: nn.Module, target_macs: float) -> float:
    """The knob in [0, 0.99] whose pruned model has MACs closest to ``target_macs`` (bisection; MACs fall
    as the knob grows)."""
    lo, hi = 0.0, 0.99
    best = (float("inf"), 0.0)
    for _ in range(18):
        mid = (lo + hi) / 2
        m = macs(prune_fn(dense, mid))
        best = min(best, (abs(m - target_macs), mid))
        lo, hi = (mid, hi) if m > target_macs else (lo, mid)
    return best[1]


# -- the methods ------------------------------------------------------------------------------------------------
ANNEAL: dict = {}  # FermiAnnealer keyword arguments from the command line (default: the library's defaults)
BAKE_EARLY = [False]


BUDGET_KEPT = [1.0]  # the MAC fraction kept at the current budget (for the budget-steered annealer)


def run_fg_anneal(dense, s, batches, calib, lr, test, bake_early=False, steer=None, init="scores"):
    model = copy.deepcopy(dense)
    fg.convert_to_fermi(model, fg_config(s), example_inputs=EXAMPLE)
    anneal = dict(ANNEAL)
    if steer is not None:  # the annealer allocates the MAC budget across layers itself
        anneal.update(budget=f"macs:{BUDGET_KEPT[0]:.6f}", allocation=steer)
    log = fg.fine_tune(model, batches, steps=len(batches), lr=lr, anneal=anneal, progress=False, init=init,
                       bake_when_decided=bake_early or BAKE_EARLY[0], calibration_data=calib)
    if log.report is not None:  # baked (and calibrated) when the decisions froze; fine-tuned small since
        return model, {"acc_trained": accuracy(model, *test), "trained_vs_baked": log.report.trained_vs_baked}
    extra = {"acc_trained": accuracy(model, *test)}
    plain = copy.deepcopy(model)
    fg.convert_from_fermi(plain, progress=False)
    extra["acc_baked_uncalibrated"] = accuracy(plain, *test)
    report = fg.convert_from_fermi(model, calibration_data=calib, progress=False)
    extra["calibration_reverted"] = report.calibration_reverted is not None
    extra["trained_vs_baked"] = report.trained_vs_baked
    return model, extra


def run_fg_prune(dense, s, batches, calib, lr, test):
    model = copy.deepcopy(dense)
    fg_prune(model, calib, fg.FermiConfig(granularity=("channel", "head"), round_to=ROUND_TO[0]), target_sparsity=s,
             example_inputs=EXAMPLE, progress=False)
    extra = {"acc_before_ft": accuracy(model, *test)}
    fg.fine_tune(model, batches, steps=len(batches), lr=lr, progress=False)
    return model, extra


def run_tp_magnitude(dense, ratio, batches, calib, lr, test):
    model = copy.deepcopy(dense)
    tp_pruner(model, ratio).step()
    extra = {"acc_before_ft": accuracy(model, *test)}
    fg.fine_tune(model, batches, steps=len(batches), lr=lr, progress=False)
    return model, extra


def run_tp_iterative(dense, ratio, batches, calib, lr, test, stages: int = 8):
    model = copy.deepcopy(dense)
    pruner = tp_pruner(model, ratio, iterative_steps=stages)
    half = len(batches) // 2
    bounds = [round(i * half / stages) for i in range(stages + 1)] + [len(batches)]
    for i in range(len(bounds) - 1):
        if i < stages:
            pruner.step()
        segment = batches[bounds[i]:bounds[i + 1]]
        if segment:
            fg.fine_tune(model, segment, steps=len(segment), lr=lr, progress=False)
    return model, {}


def run_tp_taylor(dense, ratio, batches, calib, lr, test):
    import torch_pruning as tp

    model = copy.deepcopy(dense)
    pruner = tp_pruner(model, ratio, importance=tp.importance.TaylorImportance())
    model.zero_grad()
    for xb, yb in calib:
        nn.functional.cross_entropy(model(xb), yb).backward()
    pruner.step()
    model.zero_grad()
    extra = {"acc_before_ft": accuracy(model, *test)}
    fg.fine_tune(model, batches, steps=len(batches), lr=lr, progress=False)
    return model, extra


def run_dense(dense, knob, batches, calib, lr, test):
    model = copy.deepcopy(dense)
    fg.fine_tune(model, batches, steps=len(batches), lr=lr, progress=False)
    return model, {}


RUNNERS = {"fg anneal": run_fg_anneal,
           "fg anneal, global budget": lambda *a: run_fg_anneal(*a, steer="global"),
           "fg anneal, early bake": lambda *a: run_fg_anneal(*a, bake_early=True),
           "fg anneal init=obs": lambda *a: run_fg_anneal(*a, init="obs"),
           "fg anneal init=obs, early bake": lambda *a: run_fg_anneal(*a, bake_early=True, init="obs"), "fg prune + FT": run_fg_prune, "TP magnitude + FT": run_tp_magnitude,
           "TP magnitude iterative": run_tp_iterative, "TP Taylor + FT": run_tp_taylor, "dense FT": run_dense}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budgets", type=float, nargs="+", default=[2.0, 3.0, 5.0], help="MAC reduction factors")
    ap.add_argument("--steps", type=int, default=938, help="fine-tuning steps (938 = one epoch at batch 64)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--dense-epochs", type=int, default=3)
    ap.add_argument("--calib", type=int, default=1024, help="calibration images (from the training set)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="finetune_cnn")
    ap.add_argument("--anneal", nargs="*", default=[], metavar="KEY=VALUE",
                    help="FermiAnnealer options for 'fg anneal', e.g. ramp=0.25 sparsity_weight=0")
    ap.add_argument("--bake-when-decided", action="store_true",
                    help="'fg anneal' bakes + calibrates when its decisions freeze and fine-tunes the small model")
    args = ap.parse_args()
    BAKE_EARLY[0] = args.bake_when_decided
    for item in args.anneal:
        key, value = item.split("=", 1)
        ANNEAL[key] = None if value == "None" else (tuple(map(float, value.split(","))) if "," in value
                                                     else float(value))
    torch.set_num_threads(args.threads)
    xtr, ytr = dataset("train")
    test = dataset("test")
    cache = Path("/tmp") / f"fermigates_bench_cnn16f_dense_e{args.dense_epochs}.pt"
    t0 = time.perf_counter()
    dense = train_dense(xtr, ytr, args.dense_epochs, cache)
    acc_dense, dense_macs = accuracy(dense, *test), macs(dense)
    print(f"dense: test accuracy {acc_dense:.4f}, {dense_macs:,} MACs per image ({time.perf_counter() - t0:.0f} s)")
    calib = list(zip(xtr[-args.calib:].split(128), ytr[-args.calib:].split(128)))

    rows, raw = [], []
    for budget in args.budgets:
        target = dense_macs / budget
        BUDGET_KEPT[0] = 1.0 / budget
        knobs = {"fg": search(fg_hard_prune, dense, target), "tp": search(tp_hard_prune, dense, target)}
        fg_macs, tp_macs = macs(fg_hard_prune(dense, knobs["fg"])), macs(tp_hard_prune(dense, knobs["tp"]))
        print(f"budget {budget}x: fermigates target_sparsity={knobs['fg']:.4f} ({dense_macs / fg_macs:.2f}x), "
              f"torch-pruning ratio={knobs['tp']:.4f} ({dense_macs / tp_macs:.2f}x)")
        for method in args.methods:
            accs, extras, reductions = [], [], []
            for seed in args.seeds:
                torch.manual_seed(seed)
                g = torch.Generator().manual_seed(1000 + seed)
                order = torch.cat([torch.randperm(len(xtr) - args.calib, generator=g)
                                   for _ in range(-(-args.steps * args.batch // (len(xtr) - args.calib)))])
                batches = [(xtr[i], ytr[i]) for i in order[: args.steps * args.batch].split(args.batch)]
                knob = knobs["fg"] if method.startswith("fg") else knobs["tp"]
                start = time.perf_counter()
                model, extra = RUNNERS[method](dense, knob, batches, calib, args.lr, test)
                seconds = time.perf_counter() - start
                acc = accuracy(model, *test)
                reductions.append(dense_macs / macs(model))
                accs.append(acc)
                extras.append(extra)
                raw.append({"budget": budget, "method": method, "seed": seed, "acc": acc,
                            "mac_reduction": reductions[-1], "seconds": seconds, **extra})
                print(f"  {method:24s} seed {seed}: acc {acc:.4f} ({reductions[-1]:.2f}x MACs, {seconds:.0f} s) {extra}")
            row = {"budget": f"{budget:g}x", "method": method, "MAC reduction": statistics.mean(reductions),
                   "acc mean": statistics.mean(accs), "acc spread": max(accs) - min(accs),
                   "accs": " / ".join(f"{a:.4f}" for a in accs)}
            for key in ("acc_trained", "acc_baked_uncalibrated", "acc_before_ft"):
                if extras and key in extras[0]:
                    row[key] = statistics.mean(e[key] for e in extras)
            rows.append(row)
    columns = ["budget", "method", "MAC reduction", "acc mean", "acc spread", "accs", "acc_trained",
               "acc_baked_uncalibrated", "acc_before_ft"]
    write_results(args.out, rows, columns=columns, meta={
        "dense_accuracy": acc_dense, "dense_macs_per_image": dense_macs, "steps": args.steps, "batch": args.batch,
        "lr": args.lr, "optimizer": "AdamW (weight_decay 0)", "seeds": args.seeds, "calib_images": args.calib,
        "fg_prune_selection": DEFAULT_SELECTION,
        "anneal_options": ANNEAL, "bake_when_decided": args.bake_when_decided, "runs": raw, "command": "python benchmarks/bench_finetune_cnn.py " + " ".join(sys.argv[1:])})


if __name__ == "__main__":
    main()
