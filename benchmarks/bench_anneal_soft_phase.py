"""What the soft phase does to a pretrained network: forward passes only, no training.

The annealer's schedule is applied to a converted model whose weights never move (the real MobileNetV2 with its
ImageNet head, the real MiniLM), and at points of the sparsity ramp the gated model's outputs are compared with the
dense model's (relative squared error of MobileNetV2's pre-logit features on 64 Fashion-MNIST images at 64 px, of
MiniLM's last hidden state on 64 held-out sentences; the models in eval mode): as trained (the soft gates) and
with hard gates (what the decisions at that point would bake, uncalibrated). Also: the mean retention probability
and the fraction of units that are soft (0.05 < P < 0.95). The start is the one-shot order (``init="obs"``) on the
calibration data; the uniform share that keeps half the MACs; 400 steps, ramp 0.25.

    OMP_NUM_THREADS=1 python benchmarks/bench_anneal_soft_phase.py [--temperatures 1,0.01 0.1,0.001 0.01,0.0001]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _anneal_tasks as at
from _common import write_results

import fermigates as fg
from fermigates.methods.fermi.model import hard_gates, soft_probabilities


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="+", default=["mobilenet", "minilm"], choices=sorted(at.TASKS))
    ap.add_argument("--temperatures", nargs="+", default=["1,0.01", "0.1,0.001", "0.01,0.0001"])
    ap.add_argument("--steps", type=int, nargs="+", default=[5, 20, 60, 99])
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.tasks:
        task = at.TASKS[name](2.0)
        if name == "mobilenet":
            from bench_calibrate_cnn import dataset
            from bench_shrink_mobilenet import load_mobilenet

            dense, _ = load_mobilenet()  # the ImageNet head: the features the network was trained for
            dense.eval()
            x = at.images64(dataset("train")[0][:64])

            def features(m):
                return m.forward_head(m.forward_features(x), pre_logits=True)
        else:
            dense = task.dense
            x = task.evals[0]

            def features(m):
                return m(**x).last_hidden_state
        with torch.no_grad():
            ref = features(dense)
        for temps in args.temperatures:
            t0, t1 = (float(v) for v in temps.split(","))
            model = copy.deepcopy(dense)
            fg.convert_to_fermi(model, task.config(target_sparsity=task.knobs["fg"]), example_inputs=task.example)
            opt = fg.FermiAnnealer(torch.optim.SGD(model.parameters(), lr=0.0), model, total_steps=400,
                                   temperature=(t0, t1), init="obs", calibration_data=task.calib)
            model.eval()
            for step in args.steps:
                opt.schedule.apply(model, step)
                with torch.no_grad():
                    p = torch.cat([q.detach().flatten() for _, q in soft_probabilities(model)])
                    soft = features(model)
                    with hard_gates(model):
                        hard = features(model)
                err = lambda out: float((out - ref).pow(2).sum() / ref.pow(2).sum())
                row = {"task": name, "temperature": f"({t0:g}, {t1:g})", "step": step,
                       "T": opt.schedule.temperature_at(step), "scheduled sparsity": opt.schedule.sparsity_at(step),
                       "mean P": float(p.mean()), "soft units": float(((p > 0.05) & (p < 0.95)).float().mean()),
                       "soft error": err(soft), "hard error": err(hard)}
                rows.append(row)
                print(row, flush=True)
    write_results("anneal_soft_phase", rows, meta={"steps": 400, "ramp": 0.25, "init": "obs", "budget": "2x MACs",
                                                   "command": "python benchmarks/bench_anneal_soft_phase.py "
                                                   + " ".join(sys.argv[1:])})


if __name__ == "__main__":
    main()
