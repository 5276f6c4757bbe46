"""Ridge calibration on a small CNN trained briefly on Fashion-MNIST: accuracy dense / pruned / calibrated.

The hidden convs' output channels are pruned (lowest filter L1 norm), structurally (conv rows, BatchNorm
entries and the consumer's input columns are sliced here directly), then the consumers (conv2, conv3, fc)
are calibrated on 1,024 training images.

    apt-get install -y dataset-fashion-mnist      # IDX .gz files in /usr/share/datasets/fashion-mnist/
    python benchmarks/bench_calibrate_cnn.py [--ratios 0.5 0.7] [--train-seconds 60]
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import PeakRSS, write_results  # noqa: E402

from fermigates.calibration.engine import calibrate  # noqa: E402

DATA = Path("/usr/share/datasets/fashion-mnist")


def load_idx(name: str) -> np.ndarray:
    path = DATA / name
    if not path.exists():
        sys.exit(f"{path} not found: install Fashion-MNIST with `apt-get update && apt-get install -y "
                 "dataset-fashion-mnist` (Debian package; IDX .gz files in /usr/share/datasets/fashion-mnist/)")
    with gzip.open(path) as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def dataset(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    prefix = "train" if split == "train" else "t10k"
    x = torch.from_numpy(load_idx(f"{prefix}-images-idx3-ubyte.gz").copy()).float().div(255).unsqueeze(1)
    y = torch.from_numpy(load_idx(f"{prefix}-labels-idx1-ubyte.gz").copy()).long()
    return (x - 0.2860) / 0.3530, y


class SmallCNN(nn.Module):
    def __init__(self, widths=(32, 64, 64)) -> None:
        super().__init__()
        c1, c2, c3 = widths
        self.conv1, self.bn1 = nn.Conv2d(1, c1, 3, padding=1), nn.BatchNorm2d(c1)
        self.conv2, self.bn2 = nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2)
        self.conv3, self.bn3 = nn.Conv2d(c2, c3, 3, padding=1), nn.BatchNorm2d(c3)
        self.fc = nn.Linear(c3, 10)
        self.pool, self.act = nn.MaxPool2d(2), nn.ReLU()

    def forward(self, x):
        x = self.pool(self.act(self.bn1(self.conv1(x))))
        x = self.pool(self.act(self.bn2(self.conv2(x))))
        x = self.act(self.bn3(self.conv3(x)))
        return self.fc(x.mean(dim=(2, 3)))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seconds: float) -> int:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    g = torch.Generator().manual_seed(0)
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        for idx in torch.randperm(len(x), generator=g).split(128):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            if time.perf_counter() - start >= seconds:
                break
    model.eval()
    return steps


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float(sum((model(xb).argmax(1) == yb).sum() for xb, yb in zip(x.split(1000), y.split(1000))) / len(y))


def _slice(t: torch.Tensor, dim: int, idx: torch.Tensor | None) -> torch.Tensor:
    return t if idx is None else t.index_select(dim, idx)


def prune(dense: SmallCNN, ratio: float) -> tuple[SmallCNN, dict]:
    """Keep the (1 - ratio) output channels of conv1..3 with the largest filter L1 norm."""
    convs = [dense.conv1, dense.conv2, dense.conv3]
    kept = [c.weight.detach().abs().flatten(1).sum(1).topk(max(1, round((1 - ratio) * c.out_channels)))
            .indices.sort().values for c in convs]
    model = SmallCNN(tuple(len(k) for k in kept))
    sd, new = dense.state_dict(), {}
    prev = None
    for i, k in enumerate(kept, start=1):
        new[f"conv{i}.weight"] = _slice(_slice(sd[f"conv{i}.weight"], 0, k), 1, prev)
        new[f"conv{i}.bias"] = sd[f"conv{i}.bias"][k]
        for s in ("weight", "bias", "running_mean", "running_var"):
            new[f"bn{i}.{s}"] = sd[f"bn{i}.{s}"][k]
        new[f"bn{i}.num_batches_tracked"] = sd[f"bn{i}.num_batches_tracked"]
        prev = k
    new["fc.weight"], new["fc.bias"] = sd["fc.weight"][:, prev], sd["fc.bias"]
    model.load_state_dict(new)
    targets = {"conv2": (kept[0], kept[1]), "conv3": (kept[1], kept[2]), "fc": (kept[2], None)}
    return model.eval(), targets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.6, 0.7])
    ap.add_argument("--train-seconds", type=float, default=45.0)
    ap.add_argument("--calib", type=int, default=1024)
    ap.add_argument("--ridge", type=float, default=1e-2)
    args = ap.parse_args()
    torch.manual_seed(0)
    xtr, ytr = dataset("train")
    xte, yte = dataset("test")
    dense = SmallCNN()
    steps = train(dense, xtr, ytr, args.train_seconds)
    acc_dense = accuracy(dense, xte, yte)
    print(f"trained {steps} steps ({args.train_seconds:.0f} s budget): test accuracy {acc_dense:.4f}")
    calib = list(zip(xtr[-args.calib:].split(128), ytr[-args.calib:].split(128)))  # (x, y) batches
    rows = []
    for ratio in args.ratios:
        model, targets = prune(dense, ratio)
        acc_pruned = accuracy(model, xte, yte)
        with PeakRSS() as mem:
            report = calibrate(model, calib, reference=dense, targets=targets, ridge=args.ridge, progress=False)
        print(report)
        rows.append({"removed": ratio, "params_dense": sum(p.numel() for p in dense.parameters()),
                     "params_pruned": sum(p.numel() for p in model.parameters()), "acc_dense": acc_dense,
                     "acc_pruned": acc_pruned, "acc_calibrated": accuracy(model, xte, yte),
                     "calib_s": report.seconds, "calib_peak_mib": mem.peak_mib})
    write_results("calibrate_cnn", rows, meta={
        "data": "Fashion-MNIST test 10k", "train_steps": steps, "train_seconds": args.train_seconds,
        "calib_images": args.calib, "ridge": args.ridge, "selection": "filter L1 norm",
        "command": "python benchmarks/bench_calibrate_cnn.py " + " ".join(sys.argv[1:])})


if __name__ == "__main__":
    main()
