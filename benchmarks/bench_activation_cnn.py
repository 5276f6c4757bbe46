"""Removing non-linearities and merging the layers they separated vs channel pruning at the same latency budget,
on Fashion-MNIST: an MLP and a small MobileNet-style CNN, every row in one run, several seeds.

Each model is trained dense on the training set (cached in /tmp), then every method gets the **same** fine-tuning
budget (AdamW, ``--steps`` steps at batch 64, lr 1e-3, the same data order per seed) and is scored as the
**baked** model (activations removed and layers merged, or channels cut) on the 10k test images.

* ``activations removed + merged``: ``convert_to_fermi(FermiConfig(method="activation", granularity="unit",
  budget="latency:L"))`` -> ``fine_tune`` under the method's ``ActivationAnnealer`` (it measures the baked, merged
  candidates at batch 1 to choose how many activations go, then fades them out in order of least output
  distortion, decisions frozen at 70% of the run) -> ``convert_from_fermi`` (the shared merge step).
* ``channels pruned + FT``: ``fermigates.prune(FermiConfig(granularity="channel"), budget="macs:f")`` (OBS
  selection, global allocation, ridge calibration) then the same fine-tune, ``f`` bisected so that the pruned
  model's latency (CPU time at the latency batch, see below) equals the activation row's (seed 0): the same
  measured latency, not the same request (``prune``'s own latency budget times wall-clock and lands far off on a
  loaded machine).
* ``dense FT``: the dense model fine-tuned for the same steps.

Latency budgets are measured at batch ``--latency-batch`` (64: at batch 1 these sub-millisecond models are timed
mostly as call overhead and scheduling noise on a shared machine). Every final model is then timed against the
dense model in the same process, round-robin, as the CPU time of the (single) torch thread per forward
(``cpu_times``: medians of 9 rounds; the machine is shared, and wall-clock time there counts the time other
processes hold the core), at batch 1 and at a serving batch (``--serve-batch``, default 256), ``--repeats`` times;
the table shows the median ratio to the dense time. The latency budgets themselves are measured by the library
(``prune``'s tables, the annealer's candidates) in wall-clock time, so on a loaded machine they land less exactly.
"layers" counts the Linear / Conv layers the final model runs.

    apt-get install -y dataset-fashion-mnist
    OMP_NUM_THREADS=1 python benchmarks/bench_activation_cnn.py [--steps 500] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import write_results  # noqa: E402
from bench_calibrate_cnn import dataset  # noqa: E402

import fermigates as fg  # noqa: E402
import fermigates.bake  # noqa: E401,E402,F401  (loaded now)
import fermigates.finetune
import fermigates.oneshot
from fermigates.methods.activation.model import units  # noqa: E402
from fermigates.methods.activation.select import thread_times  # noqa: E402

EXAMPLE = torch.zeros(1, 1, 28, 28)
#: what the latency budgets are measured on (at batch 1 a 0.3 ms model is timed mostly as call overhead and noise)
LATENCY_X = [torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(1))]


class MLP(nn.Module):
    """784 -> 512 -> 512 -> 512 -> 10, ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                                 nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))

    def forward(self, x):
        return self.net(x)


class Block(nn.Module):
    """MobileNetV2's inverted residual block (expand 1x1, depthwise 3x3, project 1x1; ReLU6; skip when shapes
    allow)."""

    def __init__(self, c: int, out: int, stride: int, expand: int = 4) -> None:
        super().__init__()
        m = c * expand
        self.pw, self.bn1, self.act1 = nn.Conv2d(c, m, 1, bias=False), nn.BatchNorm2d(m), nn.ReLU6()
        self.dw, self.bn2 = nn.Conv2d(m, m, 3, stride, 1, groups=m, bias=False), nn.BatchNorm2d(m)
        self.act2 = nn.ReLU6()
        self.pwl, self.bn3 = nn.Conv2d(m, out, 1, bias=False), nn.BatchNorm2d(out)
        self.skip = stride == 1 and c == out

    def forward(self, x):
        y = self.bn3(self.pwl(self.act2(self.bn2(self.dw(self.act1(self.bn1(self.pw(x))))))))
        return x + y if self.skip else y


class CNN(nn.Module):
    """A stem conv and four inverted residual blocks (16 -> 24 -> 24 -> 32 -> 32 channels), mean pool, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.blocks = nn.Sequential(Block(16, 24, 2), Block(24, 24, 1), Block(24, 32, 2), Block(32, 32, 1))
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


MODELS = {"MLP": MLP, "CNN": CNN}


def train_dense(name: str, x, y, epochs: int) -> nn.Module:
    torch.manual_seed(0)
    model = MODELS[name]()
    cache = Path(tempfile.gettempdir()) / f"fermigates_bench_activation_{name}_e{epochs}.pt"
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


def layers(model: nn.Module) -> int:
    return sum(isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) for m in model.modules())


def cpu_times(jobs: dict, rounds: int = 9, burst: float = 0.005) -> dict[str, float]:
    """Median CPU seconds of this thread per call of each job (the activation method's own timer, with more rounds
    and longer bursts): time descheduled on the shared machine is not counted."""
    return thread_times(jobs, rounds=rounds, burst=burst)


def latency_ratio(model: nn.Module, dense: nn.Module, batch: int, repeats: int) -> float:
    """Model / dense CPU time per forward (:func:`cpu_times`), the median of ``repeats`` round-robin runs."""
    x = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    model, dense = model.eval(), dense.eval()
    ratios = []
    for _ in range(repeats):
        t = cpu_times({"dense": lambda: dense(x), "model": lambda: model(x)})
        ratios.append(t["model"] / t["dense"])
    return statistics.median(ratios)


def run_activation(dense, budget, batches, calib):
    model = copy.deepcopy(dense)
    fg.convert_to_fermi(model, fg.FermiConfig(method="activation", granularity="unit", budget=f"latency:{budget}"),
                        example_inputs=EXAMPLE)
    n = len(units(model))
    log = fg.fine_tune(model, batches, steps=len(batches), lr=1e-3, calibration_data=calib, progress=False,
                       anneal={"example_inputs": LATENCY_X[0]})
    report = fg.convert_from_fermi(model, progress=False)
    removed = n - report.sparsity.kept
    return model, {"activations removed": f"{removed}/{n}",
                   "planned latency": log.budget.predicted if log.budget is not None else None,
                   "merged": report.merges.layers_removed if report.merges else 0}


def matched_channels(dense, calib, target: float, iterations: int) -> tuple[nn.Module, float, float]:
    """``fermigates.prune`` to the MAC budget whose model's CPU-time latency ratio (at the latency batch) is
    closest to ``target``: bisection over the MAC fraction kept. Returns the model, the fraction, its ratio."""
    lo, hi, best = 0.02, 1.0, None
    for _ in range(iterations):
        mid = (lo + hi) / 2
        model = copy.deepcopy(dense)
        fg.prune(model, calib, fg.FermiConfig(granularity="channel"), budget=f"macs:{mid:.4f}",
                 example_inputs=EXAMPLE, progress=False)
        r = latency_ratio(model, dense, LATENCY_X[0].shape[0], 3)
        if best is None or abs(r - target) < abs(best[2] - target):
            best = (model, mid, r)
        lo, hi = (lo, mid) if r > target else (mid, hi)
    return best


def run_channels(pruned, batches):
    model = copy.deepcopy(pruned)
    fg.fine_tune(model, batches, steps=len(batches), lr=1e-3, progress=False)
    return model, {}


def run_dense(dense, batches):
    model = copy.deepcopy(dense)
    fg.fine_tune(model, batches, steps=len(batches), lr=1e-3, progress=False)
    return model, {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.7, 0.5], help="latency kept (of the dense)")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--dense-epochs", type=int, default=2)
    ap.add_argument("--calib", type=int, default=512)
    ap.add_argument("--serve-batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--latency-batch", type=int, default=64, help="the batch latency budgets are measured on")
    ap.add_argument("--search-iterations", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="activation_cnn")
    ap.add_argument("--quick", action="store_true", help="20 steps, 1 seed, 1 repeat; results to the temp dir")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.seeds, args.repeats = 20, [0], 1
    torch.set_num_threads(args.threads)
    LATENCY_X[0] = torch.randn(args.latency_batch, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    xtr, ytr = dataset("train")
    test = dataset("test")
    calib = list(zip(xtr[-args.calib:].split(128), ytr[-args.calib:].split(128)))
    pool = len(xtr) - args.calib
    rows, raw, matched = [], [], {}
    t_start = time.perf_counter()
    for name in args.models:
        dense = train_dense(name, xtr, ytr, args.dense_epochs)
        dense_acc, dense_macs = accuracy(dense, *test), fg.count_macs(dense, EXAMPLE)
        dense_params = fg.count_parameters(dense)
        print(f"{name}: dense accuracy {dense_acc:.4f}, {dense_macs:,} MACs, {layers(dense)} layers", flush=True)
        plans = [("dense FT", None)] + [(m, b) for b in args.budgets
                                       for m in ("activations removed + merged", "channels pruned + FT")]
        channel_models: dict = {}
        for method, budget in plans:
            if method.startswith("channels") and budget not in channel_models:
                channel_models[budget] = matched_channels(dense, calib, matched[f"{name} {budget}"], args.search_iterations)
            runs = []
            for seed in args.seeds:
                torch.manual_seed(seed)
                g = torch.Generator().manual_seed(1000 + seed)
                order = torch.randperm(pool, generator=g).repeat(-(-args.steps * 64 // pool))[: args.steps * 64]
                batches = [(xtr[i], ytr[i]) for i in order.split(64)]
                t0 = time.perf_counter()
                if method == "dense FT":
                    model, extra = run_dense(dense, batches)
                elif method.startswith("activations"):
                    model, extra = run_activation(dense, budget, batches, calib)
                    if seed == args.seeds[0]:  # the latency the channel-pruned row is matched to
                        matched[f"{name} {budget}"] = latency_ratio(model, dense, LATENCY_X[0].shape[0], args.repeats)
                else:
                    model, extra = run_channels(channel_models[budget][0], batches)
                    extra = {"macs budget": channel_models[budget][1], "matched latency": channel_models[budget][2]}
                seconds = time.perf_counter() - t0
                run = {"model": name, "method": method, "budget": budget, "seed": seed, "acc": accuracy(model, *test),
                       "layers": layers(model), "macs_kept": fg.count_macs(model, EXAMPLE) / dense_macs,
                       "params_kept": fg.count_parameters(model) / dense_params,
                       "lat_b1": latency_ratio(model, dense, 1, args.repeats),
                       f"lat_b{args.serve_batch}": latency_ratio(model, dense, args.serve_batch, args.repeats),
                       "seconds": seconds, **extra}
                runs.append(run)
                raw.append(run)
                print(f"  {method:30s} {budget} seed {seed}: acc {run['acc']:.4f}, {run['layers']} layers, "
                      f"MACs {run['macs_kept']:.3f}, latency b1 {run['lat_b1']:.3f} / b{args.serve_batch} "
                      f"{run[f'lat_b{args.serve_batch}']:.3f} ({seconds:.0f} s) {extra}", flush=True)
            accs = [r["acc"] for r in runs]
            rows.append({
                "model": name, "method": method, "latency budget": "-" if budget is None else f"{budget:g}",
                "layers": f"{runs[0]['layers']}/{layers(dense)}", "activations removed": runs[0].get(
                    "activations removed", "-"), "MACs kept": statistics.mean(r["macs_kept"] for r in runs),
                "latency b1": statistics.median(r["lat_b1"] for r in runs),
                f"latency b{args.serve_batch}": statistics.median(r[f"lat_b{args.serve_batch}"] for r in runs),
                "acc mean": statistics.mean(accs), "acc spread": max(accs) - min(accs),
                "accs": " / ".join(f"{a:.4f}" for a in accs)})
        rows.append({"model": name, "method": "dense (no fine-tune)", "latency budget": "-",
                     "layers": f"{layers(dense)}/{layers(dense)}", "activations removed": "-", "MACs kept": 1.0,
                     "latency b1": 1.0, f"latency b{args.serve_batch}": 1.0, "acc mean": dense_acc})
    columns = ["model", "method", "latency budget", "layers", "activations removed", "MACs kept", "latency b1",
               f"latency b{args.serve_batch}", "acc mean", "acc spread", "accs"]
    write_results(args.out, rows, columns=columns, out_dir=tempfile.gettempdir() if args.quick else None, meta={
        "steps": args.steps, "batch": 64, "lr": 1e-3, "seeds": args.seeds, "calib_images": args.calib,
        "dense_epochs": args.dense_epochs, "latency": "ratio to the dense model, same process, round-robin medians "
        f"of thread CPU time per forward (cpu_times), median of {args.repeats} repeats, {args.threads} thread(s)",
        "matched_latency": matched,
        "wall_s": time.perf_counter() - t_start, "runs": raw,
        "command": "OMP_NUM_THREADS=1 python benchmarks/bench_activation_cnn.py " + " ".join(sys.argv[1:])})


if __name__ == "__main__":
    main()
