"""What holds the annealer back: ablations of the annealing path on the real MobileNetV2 and the real MiniLM.

Every variant is one change from a baseline, trained on the same data in the same order per seed with the same
number of steps, and baked, shrunk and scored like every row of ``bench_anneal_matrix.py`` (the tasks and rows
live in ``_anneal_tasks.py``). Variants (``--variants``; default: all):

soft phase
  ``baseline``       the anneal before this study: ``fine_tune`` with ``init="obs"`` (the one-shot order), one
                     share of every gate, T 1 -> 0.01, ramp 0.25, band steering, magnitude scores while training
  ``T/10``, ``T/100`` temperature (0.1, 0.001) / (0.01, 0.0001): fewer units soft during the ramp
  ``ramp 0.1``, ``ramp 0.5``  the sparsity ramp over 10% / 50% of the run (decisions frozen where it ends)
  ``hard ramp``      no soft phase: T 1e-4 (every gate hard from the first step; gradual pruning, as GMP)
sparsity term and levels
  ``sw 0``, ``sw 10``  ``sparsity_weight`` 0 / 10
  ``level lr x10``   the Fermi levels (mu, per-unit offsets) at 10x the weights' learning rate
start order
  ``scores start``   ``init="scores"``: units start in their weights' magnitude order
steering
  ``lagrangian``     ``steer="lagrangian"``: a Lagrangian on the expected sparsity instead of the band (CoFi),
                     the levels at 10x the weights' learning rate (CoFi trains its masks at their own rate)
importance while training
  ``obs refresh``    ``importance="obs"``: the one-shot OBS ranking recomputed on the current weights while ramping
  ``taylor``         ``importance="taylor"``: units ranked by accumulated first-order Taylor scores of their gates
allocation
  ``global obs``     ``budget="macs:…"`` with ``allocation="global"``: shares across gates by the OBS importance
                     ``prune`` uses (instead of one share of every gate)
calibration at the freeze
  ``early bake``     ``fine_tune(bake_when_decided=True)``: baked, calibrated (toward the teacher when distilling,
                     else toward the model as trained) and shrunk when the decisions freeze
  ``freeze calib dense`` / ``freeze calib open``  ``calibrate="freeze"``: the layers that lost inputs re-fitted
                     in place when the decisions freeze, toward the original network / the current weights with
                     every gate open
  ``ramp calib dense`` / ``ramp calib open``  ``calibrate="ramp"``: the same at 4 points of the ramp and at the
                     freeze (with T/100, so that the model trained is close to the hard one calibrated)
references
  ``prune + FT``     ``fermigates.prune`` (global, OBS, calibrated) + ``fine_tune`` for every step

    OMP_NUM_THREADS=1 python benchmarks/bench_anneal_ablations.py --task mobilenet --budget 2 --steps 300 --seeds 0 1
    OMP_NUM_THREADS=1 python benchmarks/bench_anneal_ablations.py --task minilm --budget 2 --steps 100 --seeds 0 1

The JSON (``anneal_ablations_<task>_<budget>x_<steps>.json`` unless ``--out``) is rewritten after every run, so an
interrupted run keeps what finished.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _anneal_tasks as at
from _common import write_results

VARIANTS: dict[str, tuple[Any, dict]] = {
    "baseline": (at.anneal_fine_tune, {"init": "obs"}),
    "T/10": (at.anneal_fine_tune, {"init": "obs", "temperature": (0.1, 0.001)}),
    "T/100": (at.anneal_fine_tune, {"init": "obs", "temperature": (0.01, 0.0001)}),
    "hard ramp": (at.anneal_fine_tune, {"init": "obs", "temperature": (1e-4, 1e-4)}),
    "ramp 0.1": (at.anneal_fine_tune, {"init": "obs", "ramp": 0.1}),
    "ramp 0.5": (at.anneal_fine_tune, {"init": "obs", "ramp": 0.5}),
    "sw 0": (at.anneal_fine_tune, {"init": "obs", "sparsity_weight": 0.0}),
    "sw 10": (at.anneal_fine_tune, {"init": "obs", "sparsity_weight": 10.0}),
    "level lr x10": (at.anneal_fine_tune, {"init": "obs", "level_lr_x": 10.0}),
    "scores start": (at.anneal_fine_tune, {"init": "scores"}),
    "lagrangian": (at.anneal_fine_tune, {"init": "obs", "steer": "lagrangian", "level_lr_x": 10.0}),
    "obs refresh": (at.anneal_fine_tune, {"init": "obs", "importance": "obs"}),
    "taylor": (at.anneal_fine_tune, {"init": "obs", "importance": "taylor"}),
    "global obs": (at.anneal_fine_tune, {"init": "obs", "budget": True, "allocation": "global"}),
    "early bake": (at.anneal_fine_tune, {"init": "obs", "bake_when_decided": True}),
    "freeze calib dense": (at.anneal_fine_tune, {"init": "obs", "calibrate": "freeze", "calibrate_toward": "dense"}),
    "freeze calib open": (at.anneal_fine_tune, {"init": "obs", "calibrate": "freeze", "calibrate_toward": "open"}),
    "ramp calib dense": (at.anneal_fine_tune, {"init": "obs", "calibrate": "ramp", "calibrate_toward": "dense",
                                               "temperature": (0.01, 0.0001)}),
    "ramp calib open": (at.anneal_fine_tune, {"init": "obs", "calibrate": "ramp", "calibrate_toward": "open",
                                              "temperature": (0.01, 0.0001)}),
    "prune + FT": (at.prune_fine_tune, {}),
    # a candidate default: all of the changes that measured better, together
    "combined": (at.anneal_fine_tune, {"init": "obs", "temperature": (0.01, 0.0001), "budget": True,
                                       "allocation": "global", "calibrate": "ramp", "calibrate_toward": "dense"}),
}


def parse_variant(spec: str) -> tuple[str, Any, dict]:
    """A named variant, or ``name@key=value@key=value`` on top of a named one (values: Python literals)."""
    import ast

    base, *overrides = spec.split("@")
    runner, kwargs = VARIANTS[base]
    kwargs = dict(kwargs)
    for item in overrides:
        key, value = item.split("=", 1)
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    return spec, runner, kwargs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", choices=sorted(at.TASKS), default="mobilenet")
    ap.add_argument("--budget", type=float, default=2.0, help="MAC reduction factor")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS),
                    help=f"named variants {list(VARIANTS)}, or NAME@key=value (e.g. 'baseline@ramp=0.1')")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    variants = [parse_variant(v) for v in args.variants]
    out = args.out or f"anneal_ablations_{args.task}_{args.budget:g}x_{args.steps}"
    t_start = time.perf_counter()
    task = at.TASKS[args.task](args.budget)
    streams = {seed: task.stream(args.steps, seed) for seed in args.seeds}
    rows, raw = [], []
    metrics = [task.metric] + (["nn"] if task.name == "minilm" else [])
    for name, runner, kwargs in variants:
        runs = []
        for seed in args.seeds:
            run = at.run_row(task, runner, streams[seed], seed, **kwargs)
            run.update(variant=name, seed=seed)
            runs.append(run)
            raw.append(run)
            at.print_run(name, seed, run, width=28)
            row = at.summarise("variant", name, runs, metrics)
            current = rows + [row]
            write_results(out, current, meta={
                "task": task.name, "budget": args.budget, "steps": args.steps, "seeds": args.seeds, "lr": task.lr,
                "batch": task.batch, "knobs": task.knobs, "knob_macs_kept": task.knob_kept,
                "dense_macs": task.dense_macs, "variants": {n: repr(k) for n, _, k in variants},
                "runs": raw, "wall_s": time.perf_counter() - t_start})
        rows.append(row)


if __name__ == "__main__":
    main()
