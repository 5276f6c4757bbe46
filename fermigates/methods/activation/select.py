"""Which activations to remove: what removing each one costs (output distortion measured on a few batches) and
what it saves (MACs / parameters of the merges it enables, predicted by the shared merge planner, or measured
latency), chosen greedily to meet a count or a budget."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn

from ...allocation.latency import compare_latency
from ...core.batches import call_model, feed, output_tensors
from ...core.sparsity import count_parameters
from ...surgery.macs import count_macs
from ...surgery.merge import MergeRequest, fold_norms, merge_layers, merge_savings, trace_chains
from .model import plain_copy, units, view


@torch.no_grad()
def distortion(model: nn.Module, names: list[str], batches: list) -> dict[str, float]:
    """Relative squared output error of switching each unit in ``names`` to the identity, alone, on ``batches``
    (the model as it is now is the reference; eval mode, restored after)."""
    was = model.training
    model.eval()
    try:
        refs = [output_tensors(feed(model, b)) for b in batches]
        norm = sum(float(t.float().pow(2).sum()) for ref in refs for t in ref) or 1.0
        out = {}
        for name in names:
            err = 0.0
            with view(model, "identity", [name]):
                for b, ref in zip(batches, refs):
                    for o, r in zip(output_tensors(feed(model, b)), ref):
                        err += float((o.float() - r.float()).pow(2).sum())
            out[name] = err / norm
    finally:
        model.train(was)
    return out


class MergePlan:
    """The chains of linear maps that removing activations could merge, found once on a copy of the model with
    every unit an identity; predicts the MACs / parameters kept for any set of removed units."""

    def __init__(self, model: nn.Module, example: Any, when: str) -> None:
        names = list(units(model))
        self.when = when
        self.copy = plain_copy(model, identity=names)
        self.dense_macs = max(1, count_macs(self.copy, example))
        self.dense_params = max(1, count_parameters(self.copy))
        fold_norms(self.copy, example)
        self.trace = trace_chains(self.copy, example, names)
        self.points = [p for pts in self.trace.across.values() for p in pts]
        self.chains = [sorted({p for a, b in zip(c, c[1:]) for p in self.trace.across[(a, b)]})
                       for c in self.trace.chains]

    def kept(self, removed: set[str], kind: str) -> float:
        """The fraction of MACs (``kind="macs"``) or parameters kept if ``removed`` were removed and merged."""
        if self.when == "never":
            return 1.0
        macs, params = merge_savings(self.copy, self.trace, removed, when=self.when)
        return 1.0 - (macs / self.dense_macs if kind == "macs" else params / self.dense_params)


def by_count(candidates: list[str], err: dict[str, float], k: int) -> list[str]:
    """The ``k`` candidates whose removal distorts the output least."""
    return sorted(candidates, key=lambda n: (err.get(n, 0.0), candidates.index(n)))[:max(0, k)]


def by_budget(selected: list[str], candidates: list[str], err: dict[str, float], plan: MergePlan, kind: str,
              target: float, limit: int | None = None) -> list[str]:
    """Units to add to ``selected`` until the predicted ``kind`` kept reaches ``target``: greedily the single unit
    or the rest of one chain with the most ``kind`` saved per unit of distortion (only moves that save
    something). ``limit`` stops after that many units (an order for the latency search)."""
    chosen: list[str] = []
    current = set(selected)
    left = [c for c in candidates if c not in current]
    floor = 1e-6 + 1e-3 * (sum(err.values()) / max(len(err), 1))
    kept = plan.kept(current, kind)
    while kept > target and left and (limit is None or len(chosen) < limit):
        moves = [[c] for c in left]
        moves += [[p for p in chain if p in left] for chain in plan.chains if len([p for p in chain if p in left]) > 1]
        best, best_score, best_kept = None, 0.0, kept
        for move in moves:
            k = plan.kept(current | set(move), kind)
            gain = kept - k
            if gain <= 1e-12:
                continue
            score = gain / (sum(err.get(p, 0.0) for p in move) + floor)
            if score > best_score:
                best, best_score, best_kept = move, score, k
        if best is None:
            break
        chosen += best
        current |= set(best)
        left = [c for c in left if c not in current]
        kept = best_kept
    return chosen


def latency_ratio(model: nn.Module, example: Any, removed: list[str], when: str, dense: nn.Module | None = None,
                  repeats: int = 3) -> float:
    """Measured latency of the baked, merged model with ``removed`` units removed, over the dense model's (both
    timed round-robin on ``example``; the median of ``repeats`` comparisons). With one torch thread the time is
    the thread's CPU time (:func:`thread_times`), else wall-clock time (``compare_latency``)."""
    dense = dense if dense is not None else plain_copy(model)
    cand = plain_copy(model, identity=removed)
    if when != "never" and removed:
        merge_layers(cand, example, [MergeRequest(n, force=when == "always") for n in removed])
    jobs = {"dense": lambda: call_model(dense, example), "cand": lambda: call_model(cand, example)}
    ratios = []
    for _ in range(repeats):
        times = thread_times(jobs) if torch.get_num_threads() == 1 else compare_latency(jobs)
        ratios.append(times["cand"] / times["dense"])
    return statistics.median(ratios)


def thread_times(jobs: dict, rounds: int = 7, burst: float = 0.002) -> dict[str, float]:
    """Median CPU seconds of this thread per call of each job, round-robin in bursts of at least ``burst``. With
    one torch thread every op runs on the calling thread, so this is the forward's compute time whatever else the
    machine runs (wall-clock time would count the time other processes hold the core)."""
    with torch.inference_mode():
        repeat = {}
        for key, fn in jobs.items():
            fn()
            t0 = time.thread_time()
            fn()
            repeat[key] = max(1, min(1000, int(burst / max(time.thread_time() - t0, 1e-6)) + 1))
        times: dict[str, list[float]] = {k: [] for k in jobs}
        for _ in range(rounds):
            for key, fn in jobs.items():
                t0 = time.thread_time()
                for _ in range(repeat[key]):
                    fn()
                times[key].append((time.thread_time() - t0) / repeat[key])
    return {k: statistics.median(v) for k, v in times.items()}


def by_latency(model: nn.Module, example: Any, order: list[str], target: float, when: str) -> tuple[int, float]:
    """The shortest prefix of ``order`` whose measured latency ratio is at most ``target`` (bisection over the
    prefix length, the whole order when none is); ``(length, measured ratio)``."""
    dense = plain_copy(model)
    lo, hi = 0, len(order)
    ratio_hi = latency_ratio(model, example, order, when, dense) if order else 1.0
    if ratio_hi > target:
        return hi, ratio_hi
    best = (hi, ratio_hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        r = latency_ratio(model, example, order[:mid], when, dense)
        if r <= target:
            hi, best = mid, (mid, r)
        else:
            lo = mid
    return best
