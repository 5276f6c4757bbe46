"""LeNet-300-100 on Fashion-MNIST at 90% / 95% weight sparsity: Fermi weight gates vs DEEPR vs SoftDEEPR vs
global magnitude pruning + fine-tune, and the seed's own ``deep-rewire`` package, with the same budget.

Every method starts from the same dense model (trained ``--dense-epochs``) and gets ``--epochs`` epochs of
sparse training over the 60k training images (batch 128); the baked model's test accuracy (10k images) is
reported per method and sparsity as mean and spread (sample std) over ``--seeds``. Sparsity is counted over
all three layers' weights (the classifier too, as in Han et al. 2015). SoftDEEPR has no fixed count: it
starts at the target, and if it ends with more connections than the budget the weakest are cut at bake time
(the ``sparsity_trained`` column says where it ended by itself).

    apt-get install -y dataset-fashion-mnist      # IDX .gz files in /usr/share/datasets/fashion-mnist/
    pip install --no-deps deep-rewire==1.0.5      # the seed package (its row is skipped if absent)
    python benchmarks/bench_rewire_lenet.py [--epochs 3] [--dense-epochs 3] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import write_results  # noqa: E402
from bench_calibrate_cnn import dataset  # noqa: E402  (Fashion-MNIST from the Debian package's IDX files)

import fermigates as fg  # noqa: E402

METHODS = ("fermi", "deepr", "softdeepr", "magnitude", "deep-rewire (seed)")
BATCH = 128
#: DEEPR / SoftDEEPR (ours and the seed's): SGD step size, L1 prior; the paper's MNIST settings
REWIRE_LR, REWIRE_L1, SOFT_L1 = 0.05, 1e-4, 1e-5


def lenet_300_100() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                         nn.Linear(100, 10))


def batches(n: int, seed: int, epochs: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        yield from torch.randperm(n, generator=g).split(BATCH)


def fit(model: nn.Module, opt, data, epochs: int, seed: int, extra_loss=None) -> None:
    x, y = data
    model.train()
    for idx in batches(len(x), seed, epochs):
        loss = F.cross_entropy(model(x[idx]), y[idx])
        if extra_loss is not None:
            loss = loss + extra_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, data) -> float:
    model.eval()
    x, y = data
    return float(sum((model(xb).argmax(1) == yb).sum() for xb, yb in zip(x.split(2000), y.split(2000))) / len(y))


def linears(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def weight_sparsity(model: nn.Module) -> float:
    ws = [m.weight for m in linears(model)]
    return 1.0 - sum(int((w != 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def n_steps(n: int, epochs: int) -> int:
    return epochs * -(-n // BATCH)


def run_fermi(model, sparsity, train, epochs, seed):
    fg.convert_to_fermi(model, fg.FermiConfig(granularity="weight", target_sparsity=sparsity, keep_classifier=False))
    opt = fg.FermiAnnealer(torch.optim.AdamW(model.parameters(), lr=1e-3), model,
                           total_steps=n_steps(len(train[0]), epochs), temperature=(1.0, 0.01))
    fit(model, opt, train, epochs, seed, extra_loss=opt.sparsity_loss)
    fg.convert_from_fermi(model)
    return {}


def _rewire_config(method, sparsity):
    return fg.FermiConfig(method=method, target_sparsity=sparsity, keep_classifier=False,
                          method_options={"handle_biases": "ignore"})


def run_deepr(model, sparsity, train, epochs, seed):
    fg.convert_to_fermi(model, _rewire_config("deepr", sparsity))
    opt = fg.DEEPR(fg.rewire_param_groups(model), lr=REWIRE_LR, l1=REWIRE_L1, seed=seed)
    fit(model, opt, train, epochs, seed)
    fg.convert_from_fermi(model)
    return {}


def run_softdeepr(model, sparsity, train, epochs, seed):
    fg.convert_to_fermi(model, _rewire_config("softdeepr", sparsity))
    budget = sum(int((m.weight > 0).sum()) for m in linears(model))
    opt = fg.SoftDEEPR(fg.rewire_param_groups(model), lr=REWIRE_LR, l1=SOFT_L1, seed=seed)
    fit(model, opt, train, epochs, seed)
    thetas = [m.weight for m in linears(model)]
    total = sum(t.numel() for t in thetas)
    active = sum(int((t > 0).sum()) for t in thetas)
    if active > budget:  # cut the weakest so that every method ends at the same count
        flat = torch.cat([t.detach().flatten() for t in thetas])
        threshold = flat.topk(budget).values.min()
        with torch.no_grad():
            for t in thetas:
                t[(t > 0) & (t < threshold)] = -1.0
    fg.convert_from_fermi(model)
    return {"sparsity_trained": 1.0 - active / total}


def run_magnitude(model, sparsity, train, epochs, seed):
    import torch.nn.utils.prune as prune

    params = [(m, "weight") for m in linears(model)]
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=sparsity)
    fit(model, torch.optim.AdamW(model.parameters(), lr=1e-3), train, epochs, seed)
    for m, name in params:
        prune.remove(m, name)
    return {}


def run_seed_package(model, sparsity, train, epochs, seed):
    import deep_rewire

    sparse, other = deep_rewire.convert(model, handle_biases="ignore", keep_signs=True)
    nc = round((1 - sparsity) * sum(p.numel() for p in sparse))
    torch.manual_seed(seed)
    opt = deep_rewire.DEEPR(sparse, nc=nc, lr=REWIRE_LR, l1=REWIRE_L1)
    opt_other = torch.optim.SGD(other, lr=REWIRE_LR)

    class Both:
        def zero_grad(self):
            opt.zero_grad()
            opt_other.zero_grad()

        def step(self):
            opt.step()
            opt_other.step()

    fit(model, Both(), train, epochs, seed)
    deep_rewire.reconvert(model)
    return {}


RUNNERS = {"fermi": run_fermi, "deepr": run_deepr, "softdeepr": run_softdeepr, "magnitude": run_magnitude,
           "deep-rewire (seed)": run_seed_package}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=3, help="sparse-training budget per method, in epochs")
    ap.add_argument("--dense-epochs", type=int, default=3, help="epochs of the dense model every method starts from")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    methods = list(args.methods)
    if "deep-rewire (seed)" in methods:
        try:
            import deep_rewire  # noqa: F401
        except ImportError:
            print("deep-rewire is not installed (pip install --no-deps deep-rewire==1.0.5): its row is skipped")
            methods.remove("deep-rewire (seed)")
    train, test = dataset("train"), dataset("test")
    acc: dict[tuple[str, float], list[float]] = {}
    extra: dict[tuple[str, float], list[dict]] = {}
    seconds: dict[tuple[str, float], list[float]] = {}
    dense_acc = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        dense = lenet_300_100()
        fit(dense, torch.optim.AdamW(dense.parameters(), lr=1e-3), train, args.dense_epochs, seed)
        dense_acc.append(accuracy(dense, test))
        print(f"seed {seed}: dense {dense_acc[-1]:.4f}", flush=True)
        for sparsity in args.sparsities:
            for method in methods:
                model = copy.deepcopy(dense)
                torch.manual_seed(seed)
                start = time.perf_counter()
                info = RUNNERS[method](model, sparsity, train, args.epochs, seed + 1)
                seconds.setdefault((method, sparsity), []).append(time.perf_counter() - start)
                got = weight_sparsity(model)
                assert got >= sparsity - 1e-3, f"{method} ended at sparsity {got:.4f} < {sparsity}"
                a = accuracy(model, test)
                acc.setdefault((method, sparsity), []).append(a)
                extra.setdefault((method, sparsity), []).append({"sparsity": got, **info})
                print(f"  {method:20s} sparsity {got:.4f}: {a:.4f}", flush=True)

    def spread(values):
        return statistics.stdev(values) if len(values) > 1 else 0.0

    rows = [{"method": "dense", "sparsity": 0.0, "accuracy_mean": statistics.mean(dense_acc),
             "accuracy_std": spread(dense_acc), "accuracies": dense_acc}]
    for sparsity in args.sparsities:
        for method in methods:
            values = acc[(method, sparsity)]
            row = {"method": method, "sparsity": sparsity, "accuracy_mean": statistics.mean(values),
                   "accuracy_std": spread(values), "accuracies": values,
                   "sparsity_baked": statistics.mean(e["sparsity"] for e in extra[(method, sparsity)]),
                   "seconds": statistics.mean(seconds[(method, sparsity)])}
            trained = [e["sparsity_trained"] for e in extra[(method, sparsity)] if "sparsity_trained" in e]
            if trained:
                row["sparsity_trained"] = statistics.mean(trained)
            rows.append(row)
    meta = {"epochs": args.epochs, "dense_epochs": args.dense_epochs, "seeds": args.seeds, "batch": BATCH,
            "rewire_lr": REWIRE_LR, "deepr_l1": REWIRE_L1, "softdeepr_l1": SOFT_L1,
            "fermi": "AdamW lr 1e-3, FermiAnnealer T 1.0 -> 0.01, per-layer target",
            "magnitude": "torch.nn.utils.prune.global_unstructured L1, then AdamW lr 1e-3 fine-tune",
            "deepr/softdeepr": "SGD (the optimizers' own step), global count, magnitude init, handle_biases=ignore",
            "seed_package": "deep_rewire 1.0.5 DEEPR, keep_signs=True (its own random initial connections)"}
    write_results("bench_rewire_lenet", rows, meta=meta, out_dir=args.out,
                  columns=["method", "sparsity", "accuracy_mean", "accuracy_std", "sparsity_baked",
                           "sparsity_trained", "seconds"])


if __name__ == "__main__":
    main()
