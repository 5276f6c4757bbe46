"""Cost of a training step with Fermi gates, relative to the dense step of the same model.

Every variant is a copy of the same model: dense, and converted with channel / head / weight gates; each
gated variant is timed twice, in the annealing phase (soft gates: scores, probabilities, the sparsity term
and the annealer's steering every step) and in the hard phase (decisions frozen). One step = forward,
loss (+ ``sparsity_loss()``), backward, ``AdamW`` step (wrapped in ``FermiAnnealer`` for gated models). Steps
are interleaved round-robin in one process so that machine noise hits every variant alike; the table gives
the median step time and its ratio to the dense median. Goals (issue 13): <= 1.2x for channel / head gates,
<= 1.5x for weight gates.

    python benchmarks/bench_gated_step.py [--rounds 30] [--models resnet18 bert]
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import write_results  # noqa: E402

import fermigates as fg  # noqa: E402


def resnet18():
    import timm

    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    x = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(1))
    return model, x, (lambda m: F.cross_entropy(m(x), y)), ("channel", "weight")


def bert():
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = transformers.BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                  intermediate_size=3072, num_labels=3)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg)
    ids = torch.randint(0, cfg.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[:, 0] % 3}
    return model, {"input_ids": ids[:1], "attention_mask": torch.ones_like(ids[:1])}, \
        (lambda m: m(**batch).loss), ("channel", "head", "weight")


MODELS = {"resnet18": resnet18, "bert": bert}


def variants(name: str, rounds: int):
    model, example, loss_fn, kinds = MODELS[name]()
    out = {"dense": (model, torch.optim.AdamW(model.parameters(), lr=1e-4), loss_fn)}
    for kind in kinds:
        for phase in ("anneal", "hard"):
            m = copy.deepcopy(model)
            fg.convert_to_fermi(m, fg.FermiConfig(granularity=kind, target_sparsity=0.5), example_inputs=example)
            # a long run, so the annealing phase lasts the whole measurement; "hard": at its last step
            total = 100 * rounds
            opt = fg.FermiAnnealer(torch.optim.AdamW(m.parameters(), lr=1e-4), m, total_steps=total)
            if phase == "hard":
                opt.step_count = total - rounds - 5
                opt.schedule.apply(m, opt.step_count)
            out[f"{kind} ({phase})"] = (m, opt, loss_fn)
    return out


def step(model, opt, loss_fn) -> None:
    loss = loss_fn(model)
    if isinstance(opt, fg.FermiAnnealer):
        loss = loss + opt.sparsity_loss()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        runs = variants(name, args.rounds)
        for key, (m, opt, loss_fn) in runs.items():
            m.train()
            for _ in range(args.warmup):
                step(m, opt, loss_fn)
        times = {k: [] for k in runs}
        for _ in range(args.rounds):
            for key, (m, opt, loss_fn) in runs.items():
                t0 = time.perf_counter()
                step(m, opt, loss_fn)
                times[key].append(1e3 * (time.perf_counter() - t0))
        dense = statistics.median(times["dense"])
        for key, t in times.items():
            med = statistics.median(t)
            q = statistics.quantiles(t, n=4)
            rows.append({"model": name, "variant": key, "step ms (median)": med, "IQR ms": q[2] - q[0],
                         "x dense": med / dense})
    write_results("gated_step", rows, meta={
        "rounds": args.rounds, "threads": args.threads, "resnet18": "timm, batch 8, 64x64",
        "bert": "BERT-base size (12 x 768), batch 4 x 64 tokens, sequence classification",
        "command": "python benchmarks/bench_gated_step.py " + " ".join(sys.argv[1:])})


if __name__ == "__main__":
    main()
