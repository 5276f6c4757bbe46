"""The seed's setting (Buffoni et al. 2022): MLPs trained from scratch on Fashion-MNIST, accuracy against the share
of hidden nodes removed, for ranking by eigenvalue vs by incoming-weight magnitude, next to fermigates' one-shot
``prune`` and Fermi channel gates. Every row in one run, over several seeds.

Architectures: 784-500-10 and 784-300-100-10 (ReLU), PyTorch's default initialisation. Data: the 60k training
images split into 55k for training and the last 5k for validation (only ``spectral_pretrain``'s stopping rule
reads them), the 10k test images for every accuracy reported. Every model trains with Adam, batch 128, on one
data order per seed.

Rows (each at every share ``f`` of hidden nodes removed, the same share of every hidden layer):
* ``spectral, eigenvalues only``: the MLP (biases zeroed: the seed's layer has none) converted with
  ``FermiConfig(method="spectral")`` -- phi the random initial rows (unit norm), lambda_end their norms -- and
  trained with ``fermigates.spectral_pretrain``: ``--pretrain-steps`` steps of the end eigenvalues only (one per
  node, 510 / 410 trainable parameters; lr ``--eig-lr`` 0.03, the best validation accuracy of ``--probe-lr 0.003
  0.01 0.03 0.1 0.3`` on both architectures: 0.717 / 0.748 / 0.755 / 0.756 / 0.741 and 0.737 / 0.758 / 0.764 /
  0.759 / 0.735), then its walk over node shares on the validation split
  (``max_delta`` 1% of accuracy, step 5%; the curve it walked is in the JSON and plotted). For each ``f``: the
  nodes with the smallest |lambda_end| removed (``spectral_prune``), baked (no calibration: the papers' setting).
* ``spectral, eigenvalues only, random nodes`` (a control): the same trained network, the same number of nodes
  removed at random (one fixed generator per seed) instead of by eigenvalue.
* ``spectral, eigenvalues + eigenvectors``: the same, but phi, the eigenvalues and biases all trained (the papers'
  full spectral training, lr 1e-3), nodes still removed by |lambda_end|.
* ``magnitude``: the MLP trained in direct space (all weights, ``--pretrain-steps`` steps, lr 1e-3), nodes with the
  smallest sum of absolute incoming weights removed (the papers' "absolute value of the incoming connectivity";
  sliced by hand, no calibration).
* ``fg prune``: the same direct-space MLP, ``fermigates.prune(target_sparsity=f)`` (OBS selection, ridge
  calibration on 1,024 training images).
* ``fermi anneal``: the same direct-space MLP, ``convert_to_fermi(channel, target_sparsity=f)`` and
  ``fine_tune`` for the fine-tuning steps under the default ``FermiAnnealer`` (``init="auto"``: the one-shot order
  on the calibration images), baked with calibration. It has no "before fine-tuning" model.

``acc_before_ft``: the pruned, baked model right after pruning. ``acc``: after the **same fine-tune** for every row
(``--ft-steps`` Adam steps, lr 1e-3, every parameter of the shrunk plain model, the same batches); for ``fermi
anneal`` those steps are its anneal. Reference rows at ``f = 0``: each trained network before any removal.

    apt-get install -y dataset-fashion-mnist
    OMP_NUM_THREADS=1 python benchmarks/bench_spectral_fmnist.py [--seeds 0 1 2] [--quick]

Sized for 2 shared cores: the defaults (2 architectures x 3 seeds x 6 shares x 6 rows; 1,500 pre-training steps,
about 3.5 epochs, and 300 fine-tuning steps) take about 25 minutes on one thread of a loaded machine (20 minutes
measured for the first five rows). ``--quick`` (few steps, one share, results to the temp
directory) only checks that it runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS, write_results  # noqa: E402
from bench_calibrate_cnn import dataset  # noqa: E402

import fermigates as fg  # noqa: E402
import fermigates.bake  # noqa: E402,F401  everything the run uses is loaded now (the library may change meanwhile)
import fermigates.finetune  # noqa: E402,F401
import fermigates.methods.spectral.workflows  # noqa: E402,F401
import fermigates.oneshot  # noqa: E402,F401
from fermigates.methods.registry import method_of  # noqa: E402

ARCHS = {"784-500-10": (784, 500, 10), "784-300-100-10": (784, 300, 100, 10)}
SHARES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
METHODS = ("spectral, eigenvalues only", "spectral, eigenvalues only, random nodes",
           "spectral, eigenvalues + eigenvectors", "magnitude", "fg prune", "fermi anneal")
BATCH = 128
LR = 1e-3


def mlp(widths: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class Data:
    def __init__(self) -> None:
        x, y = dataset("train")
        self.train_x, self.train_y = x[:55_000], y[:55_000]
        self.val_x, self.val_y = x[55_000:], y[55_000:]
        self.test_x, self.test_y = dataset("test")

    def batches(self, steps: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(seed)
        n = len(self.train_x)
        order = torch.cat([torch.randperm(n, generator=g) for _ in range(-(-steps * BATCH // n))])
        return [(self.train_x[i], self.train_y[i]) for i in order[:steps * BATCH].split(BATCH)]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in zip(x.split(2000), y.split(2000)))
    return correct / len(y)


def train(model: nn.Module, params: list, batches: list, lr: float) -> None:
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()


def slice_mlp(model: nn.Sequential, keeps: list[torch.Tensor]) -> nn.Sequential:
    """The MLP with hidden layer ``i`` keeping the nodes ``keeps[i]`` (bool): rows of its producer, columns of its
    consumer."""
    model = copy.deepcopy(model)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for i, keep in enumerate(keeps):
            idx = keep.nonzero().flatten()
            a, b = linears[i], linears[i + 1]
            a.weight = nn.Parameter(a.weight[idx].clone())
            a.bias = nn.Parameter(a.bias[idx].clone())
            a.out_features = len(idx)
            b.weight = nn.Parameter(b.weight[:, idx].clone())
            b.in_features = len(idx)
    return model


def share_keep(scores: torch.Tensor, share: float) -> torch.Tensor:
    """Keep all but the ``floor(share * n)`` lowest scores (at least one), as fermigates' uniform share does."""
    n = len(scores)
    removed = min(int(share * n), n - 1)
    keep = torch.ones(n, dtype=torch.bool)
    keep[scores.argsort(stable=True)[:removed]] = False
    return keep


def magnitude_prune(dense: nn.Sequential, share: float) -> nn.Sequential:
    linears = [m for m in dense if isinstance(m, nn.Linear)]
    keeps = [share_keep(lin.weight.detach().abs().sum(dim=1), share) for lin in linears[:-1]]
    return slice_mlp(dense, keeps)


def random_prune(model: nn.Module, share: float, seed: int) -> nn.Module:
    """The spectral network with the same share of every group's nodes removed at random, baked."""
    pruned = copy.deepcopy(model)
    method = method_of(pruned)
    method.clear_keep(pruned)
    g = torch.Generator().manual_seed(seed)
    method.set_keep(pruned, {grp.id: share_keep(torch.rand(grp.n_units, generator=g), share)
                             for grp in method.unit_groups(pruned)})
    fg.convert_from_fermi(pruned, progress=False)
    return pruned


def spectral_config(**options) -> fg.FermiConfig:
    return fg.FermiConfig(method="spectral", granularity="channel", method_options=options or None)


def spectral_trained(widths, seed: int, data: Data, batches: list, args, full: bool):
    """A fresh MLP (seeded like the dense one), converted to spectral form and trained: eigenvalues only through
    ``spectral_pretrain`` (which also walks the node shares on the validation split), or every part."""
    torch.manual_seed(seed)
    model = mlp(widths)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.bias.zero_()
    options = {"train_base": True, "train_bias": True} if full else {}
    fg.convert_to_fermi(model, spectral_config(**options), example_inputs=data.train_x[:1])
    if full:
        train(model, fg.spectral_parameters(model, base=True, end=True, bias=True), batches, LR)
        return model, None
    fit = lambda m: train(m, [p for p in m.parameters() if p.requires_grad], batches, args.eig_lr)  # noqa: E731
    evaluate = lambda m: accuracy(m, data.val_x, data.val_y)  # noqa: E731
    result = fg.spectral_pretrain(model, fit, evaluate, max_delta=args.max_delta, step=0.05)
    return model, result


def spectral_prune_at(model: nn.Module, share: float) -> nn.Module:
    pruned = copy.deepcopy(model)
    method_of(pruned).clear_keep(pruned)
    fg.spectral_prune(pruned, target_sparsity=share)
    fg.convert_from_fermi(pruned, progress=False)
    return pruned


def fermi_anneal(dense: nn.Module, share: float, ft: list, calib: list) -> nn.Module:
    model = copy.deepcopy(dense)
    fg.convert_to_fermi(model, fg.FermiConfig(granularity="channel", target_sparsity=share),
                        example_inputs=calib[0][0][:1])
    fg.fine_tune(model, ft, steps=len(ft), lr=LR, calibration_data=calib, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fg.convert_from_fermi(model, calibration_data=calib, progress=False)
    return model


def run_seed(name: str, widths, seed: int, data: Data, args, shares) -> tuple[list[dict], dict]:
    pre = data.batches(args.pretrain_steps, seed)
    ft = data.batches(args.ft_steps, 10_000 + seed)
    calib = [(data.train_x[i:i + BATCH], data.train_y[i:i + BATCH]) for i in range(0, 1024, BATCH)]
    test = (data.test_x, data.test_y)
    hidden = sum(widths[1:-1])
    out: list[dict] = []
    t0 = time.perf_counter()

    torch.manual_seed(seed)
    dense = mlp(widths)
    train(dense, list(dense.parameters()), pre, LR)
    eig, walk = spectral_trained(widths, seed, data, pre, args, full=False)
    full, _ = spectral_trained(widths, seed, data, pre, args, full=True)
    with method_of(eig).dense(eig):  # every node (spectral_pretrain left its chosen removal frozen)
        eig_acc = accuracy(eig, *test)
    trained = {"dense": accuracy(dense, *test), "eigenvalues only": eig_acc,
               "eigenvalues + eigenvectors": accuracy(full, *test)}
    pretrain_s = time.perf_counter() - t0

    for share in shares:
        for method in METHODS:
            t1 = time.perf_counter()
            before = None
            if method == "fermi anneal":
                model = fermi_anneal(dense, share, ft, calib)
            else:
                if method == "spectral, eigenvalues only":
                    model = spectral_prune_at(eig, share)
                elif method == "spectral, eigenvalues only, random nodes":
                    model = random_prune(eig, share, 20_000 + seed)
                elif method == "spectral, eigenvalues + eigenvectors":
                    model = spectral_prune_at(full, share)
                elif method == "magnitude":
                    model = magnitude_prune(dense, share)
                else:
                    model = copy.deepcopy(dense)
                    fg.prune(model, calib, fg.FermiConfig(granularity="channel"), target_sparsity=share,
                             progress=False)
                before = accuracy(model, *test)
                train(model, list(model.parameters()), ft, LR)
            kept = sum(m.out_features for m in model if isinstance(m, nn.Linear)) - widths[-1]
            out.append({"arch": name, "method": method, "share": share, "seed": seed,
                        "removed": 1 - kept / hidden, "acc_before_ft": before, "acc": accuracy(model, *test),
                        "seconds": time.perf_counter() - t1})
            print(f"  {name} seed {seed} f={share:.2f} {method:38s} before {before if before is None else round(before, 4)}"
                  f" after {out[-1]['acc']:.4f} ({out[-1]['seconds']:.0f} s)", flush=True)
    info = {"arch": name, "seed": seed, "trained_acc": trained, "pretrain_s": pretrain_s,
            "walk": walk.to_dict() if walk is not None else None}
    return out, info


def probe(args) -> None:
    """How ``--eig-lr`` was chosen: eigenvalue-only training of each architecture at several lrs, validation
    accuracy (the test images are never read)."""
    torch.set_num_threads(args.threads)
    data = Data()
    for name in args.archs:
        batches = data.batches(args.pretrain_steps, 0)
        for lr in args.probe_lr:
            torch.manual_seed(0)
            model = mlp(ARCHS[name])
            with torch.no_grad():
                for m in model:
                    if isinstance(m, nn.Linear):
                        m.bias.zero_()
            fg.convert_to_fermi(model, spectral_config(), example_inputs=data.train_x[:1])
            train(model, fg.spectral_parameters(model), batches, lr)
            print(f"{name} eigenvalue-only lr {lr:g}: validation accuracy {accuracy(model, data.val_x, data.val_y):.4f}",
                  flush=True)


def mean_spread(values: list) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), max(values) - min(values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    ap.add_argument("--shares", type=float, nargs="+", default=list(SHARES))
    ap.add_argument("--pretrain-steps", type=int, default=1500)
    ap.add_argument("--ft-steps", type=int, default=300)
    ap.add_argument("--eig-lr", type=float, default=3e-2, help="Adam lr of the eigenvalue-only training")
    ap.add_argument("--max-delta", type=float, default=0.01, help="spectral_pretrain: relative accuracy drop allowed")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="few steps, one share, one seed; results to the temp dir")
    ap.add_argument("--probe-lr", type=float, nargs="+", default=None,
                    help="only print the validation accuracy of the eigenvalue-only training at these lrs (seed 0)")
    args = ap.parse_args()
    if args.probe_lr:
        return probe(args)
    if args.quick:
        args.seeds, args.shares, args.pretrain_steps, args.ft_steps = args.seeds[:1], [0.9], 40, 10
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    data = Data()
    raw, infos = [], []
    for name in args.archs:
        for seed in args.seeds:
            runs, info = run_seed(name, ARCHS[name], seed, data, args, args.shares)
            raw += runs
            infos.append(info)
    rows = []
    for name in args.archs:
        ref = [i["trained_acc"] for i in infos if i["arch"] == name]
        for key, label in (("dense", "trained in direct space (before removal)"),
                           ("eigenvalues only", "spectral, eigenvalues only (before removal)"),
                           ("eigenvalues + eigenvectors", "spectral, eigenvalues + eigenvectors (before removal)")):
            acc, spread = mean_spread([r[key] for r in ref])
            rows.append({"arch": name, "method": label, "share": 0.0, "acc_before_ft": acc,
                         "acc_before_ft_spread": spread})
        for share in args.shares:
            for method in METHODS:
                runs = [r for r in raw if r["arch"] == name and r["method"] == method and r["share"] == share]
                before, before_spread = mean_spread([r["acc_before_ft"] for r in runs])
                acc, spread = mean_spread([r["acc"] for r in runs])
                rows.append({"arch": name, "method": method, "share": share,
                             "removed": statistics.mean(r["removed"] for r in runs), "acc_before_ft": before,
                             "acc_before_ft_spread": before_spread, "acc": acc, "acc_spread": spread,
                             "seconds": statistics.mean(r["seconds"] for r in runs)})
    out_dir = Path(tempfile.gettempdir()) if args.quick else RESULTS
    path = write_results("spectral_fmnist", rows, out_dir=out_dir,
                         columns=["arch", "method", "share", "removed", "acc_before_ft", "acc_before_ft_spread",
                                  "acc", "acc_spread", "seconds"],
                         meta={"seeds": args.seeds, "shares": args.shares, "pretrain_steps": args.pretrain_steps,
                               "ft_steps": args.ft_steps, "batch": BATCH, "lr": LR, "eig_lr": args.eig_lr,
                               "max_delta": args.max_delta, "train_images": 55_000, "val_images": 5_000,
                               "test_images": 10_000, "runs": raw, "per_seed": infos,
                               "wall_s": time.perf_counter() - t_start})
    try:  # the walk of spectral_pretrain for the first seed of each architecture, drawn next to the JSON
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(args.archs), figsize=(5 * len(args.archs), 3.4), squeeze=False)
        for ax, name in zip(axes[0], args.archs):
            info = next(i for i in infos if i["arch"] == name)
            walk = info["walk"]
            result = fg.SpectralResult(walk["fraction"], {}, walk["baseline"], walk["metric"],
                                       [tuple(p) for p in walk["curve"]], walk["compare_with"], walk["max_delta"])
            result.plot(ax=ax)
            ax.set_title(f"{name}, seed {info['seed']}: spectral_pretrain (validation)", fontsize=9)
        fig.tight_layout()
        fig.savefig(path.with_name("spectral_fmnist_pretrain.png"), dpi=110)
        print(f"wrote {path.with_name('spectral_fmnist_pretrain.png')}")
    except ImportError:
        pass
    json.loads(path.read_text())  # written and readable


if __name__ == "__main__":
    main()
