"""Wall time and peak memory of the dependency graph and the shrink on big transformers.

Cases (random weights, batch 1 x 16 tokens as example inputs, each case in its own subprocess so that peak
memory is measured cleanly):

* ``bert-base``: ``transformers.BertModel(BertConfig())`` (12 layers, hidden 768, 12 heads, 3072 intermediate,
  ~109M parameters), float32.
* ``llama-1b``: ``LlamaForCausalLM`` in the TinyLlama-1.1B shape (hidden 2048, intermediate 5632, 22 layers,
  32 heads, 8 KV heads, vocab 32000, untied head, ~1.1B parameters), bfloat16 by default (``--llama-dtype``).
* ``bert-base-convert``: what users call — ``convert_to_fermi(model, FermiConfig(granularity=("channel",
  "head"), target_sparsity=0.5), example_inputs=...)``, gates pinned at 50% (as ``fermigates.prune`` does),
  then ``convert_from_fermi(model, example_inputs=...)`` (bake + shrink + shrunk-vs-masked check, no
  calibration data).

For the first two: ``fermigates.graph.build_dependency_graph`` then ``fermigates.shrink.shrink_model`` with a
random keep pattern (seed 0) that removes half the units of every prunable group. Reported per phase: wall
time (and process CPU time, all threads: on a busy machine wall time overstates), peak resident memory above the level at the phase's start (sampled every 5 ms, and the kernel's VmHWM
after a reset through ``/proc/self/clear_refs`` where allowed), and that peak relative to the model's size
(parameters + buffers). Goals: graph + shrink <= 5 s (BERT-base), <= 60 s (1B); peak <= 2x the model.

    python benchmarks/bench_graph_timing.py            # full sizes
    python benchmarks/bench_graph_timing.py --quick    # 2-layer versions of every case
    python benchmarks/bench_graph_timing.py --profile  # also print a cProfile of each phase (slower)
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import time
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import PeakRSS, write_results  # noqa: E402

CASES = ("bert-base", "llama-1b", "bert-base-convert")
GOAL_S = {"bert-base": 5.0, "llama-1b": 60.0, "bert-base-convert": None}
MIB = 2**20


# ------------------------------------------------------------------------------------------------ memory
def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measured(fn: Callable[[], Any], profile: bool = False) -> tuple[Any, dict[str, Any]]:
    """Run ``fn`` once: wall seconds, peak RSS above the start (sampler, and VmHWM where resettable)."""
    hwm_ok = _reset_hwm()
    rss0 = _status_kib("VmRSS")
    prof = cProfile.Profile() if profile else None
    with PeakRSS() as peak:
        t0, c0 = time.perf_counter(), time.process_time()
        if prof:
            prof.enable()
        out = fn()
        if prof:
            prof.disable()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    stats: dict[str, Any] = {"s": wall, "cpu_s": cpu, "peak_mib": peak.peak_mib}
    hwm = _status_kib("VmHWM")
    if hwm_ok and hwm is not None and rss0 is not None:
        stats["peak_mib"] = max(peak.peak_mib, (hwm - rss0) / 1024)
        stats["vmhwm_mib"] = (hwm - rss0) / 1024
    if prof:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(25)
        stats["profile"] = buf.getvalue()
    return out, stats


# ------------------------------------------------------------------------------------------------ models
def model_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build(case: str, quick: bool, llama_dtype: str) -> tuple[torch.nn.Module, dict, str]:
    import transformers

    layers = 2 if quick else None
    torch.manual_seed(0)
    if case.startswith("bert"):
        cfg = transformers.BertConfig()
        if layers:
            cfg.num_hidden_layers = layers
        model, dtype = transformers.BertModel(cfg), "float32"
        vocab = cfg.vocab_size
    else:
        cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                       num_hidden_layers=layers or 22, num_attention_heads=32,
                                       num_key_value_heads=8, max_position_embeddings=2048,
                                       tie_word_embeddings=False)
        dtype = llama_dtype
        previous = torch.get_default_dtype()
        torch.set_default_dtype(getattr(torch, dtype))  # built directly in the target dtype: no fp32 copy
        try:
            model = transformers.LlamaForCausalLM(cfg)
        finally:
            torch.set_default_dtype(previous)
        vocab = cfg.vocab_size
    model.eval()
    ids = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, dtype


def random_keep(graph: Any, seed: int = 0) -> dict[int, torch.Tensor]:
    """Half the units (at least one kept) of every prunable group, chosen at random."""
    g = torch.Generator().manual_seed(seed)
    keep = {}
    for group in graph.groups:
        if group.prunable and group.n_units > 1:
            mask = torch.zeros(group.n_units, dtype=torch.bool)
            mask[torch.randperm(group.n_units, generator=g)[: max(1, group.n_units // 2)]] = True
            keep[group.id] = mask
    return keep


# ------------------------------------------------------------------------------------------------ cases
def run_case(case: str, quick: bool, llama_dtype: str, profile: bool) -> dict[str, Any]:
    import fermigates as fg
    from fermigates.surgery.graph import build_dependency_graph
    from fermigates.surgery.shrink import shrink_model

    (model, inputs, dtype), build_stats = measured(lambda: build(case, quick, llama_dtype))
    size_mib = model_bytes(model) / MIB
    row: dict[str, Any] = {"case": case + (" (2 layers)" if quick else ""), "dtype": dtype,
                           "params": n_params(model), "model MiB": size_mib, "build s": build_stats["s"]}
    phases: dict[str, dict[str, Any]] = {}
    if case == "bert-base-convert":
        from fermigates.methods.fermi.anneal import AnnealSchedule

        cfg = fg.FermiConfig(granularity=("channel", "head"), target_sparsity=0.5)
        _, phases["convert_to_fermi"] = measured(
            lambda: fg.convert_to_fermi(model, cfg, example_inputs=inputs), profile)
        _, phases["gates_at_50%"] = measured(
            lambda: AnnealSchedule(total_steps=1, temperature=(1e-4, 1e-4), target_sparsity=0.5,
                                   sparsity_schedule="constant", tolerance=0.0).apply(model, 1), profile)
        report, phases["convert_from_fermi"] = measured(
            lambda: fg.convert_from_fermi(model, example_inputs=inputs, progress=False), profile)
        row.update({"shrunk": report.shrunk, "params after": report.params_after,
                    "max diff vs masked": report.max_abs_diff, "not shrunk": len(report.not_shrunk)})
        main_phases = ("convert_to_fermi", "gates_at_50%", "convert_from_fermi")
    else:
        graph, phases["graph"] = measured(lambda: build_dependency_graph(model, inputs), profile)
        keep = random_keep(graph)
        result, phases["shrink"] = measured(lambda: shrink_model(model, graph, keep), profile)
        with torch.no_grad():  # the shrunk model still runs
            model(**inputs)
        row.update({"groups": len(graph.groups), "prunable": sum(g.prunable for g in graph.groups),
                    "params after": result.params_after, "modules changed": len(result.changes),
                    "skipped": len(result.skipped)})
        main_phases = ("graph", "shrink")
    total = sum(phases[p]["s"] for p in main_phases)
    peak = max(phases[p]["peak_mib"] for p in main_phases)
    row.update({f"{p} s": phases[p]["s"] for p in main_phases})
    row.update({"total s": total, "total cpu s": sum(phases[p]["cpu_s"] for p in main_phases),
                "peak MiB": peak, "peak / model": peak / size_mib})
    goal = None if quick else GOAL_S[case]
    row["time goal s"] = goal
    row["meets goals"] = (goal is None or total <= goal) and peak <= 2 * size_mib
    row["phases"] = {k: {kk: vv for kk, vv in v.items() if kk != "profile"} for k, v in phases.items()}
    if profile:
        for name, st in phases.items():
            print(f"===== cProfile {case} / {name} ({st['s']:.2f} s)\n{st['profile']}", file=sys.stderr)
    return row


COLUMNS = ["case", "dtype", "params", "model MiB", "graph s", "shrink s", "convert_to_fermi s", "gates_at_50% s",
           "convert_from_fermi s", "total s", "total cpu s", "time goal s", "peak MiB", "peak / model", "meets goals"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2-layer versions of every case")
    ap.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    ap.add_argument("--llama-dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--profile", action="store_true", help="print a cProfile of every phase to stderr")
    ap.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if args.case:
        row = run_case(args.case, args.quick, args.llama_dtype, args.profile)
        print("RESULT " + json.dumps(row, default=str))
        return

    rows = []
    for case in args.cases:
        cmd = [sys.executable, os.path.abspath(__file__), "--case", case, "--llama-dtype", args.llama_dtype,
               "--threads", str(args.threads)] + (["--quick"] if args.quick else []) + \
              (["--profile"] if args.profile else [])
        print(f"--- {case}", flush=True)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(proc.stdout)
            rows.append({"case": case, "error": f"exit code {proc.returncode}"})
            continue
        row = json.loads(lines[-1][len("RESULT "):])
        print(json.dumps({k: v for k, v in row.items() if k != "phases"}, default=str), flush=True)
        rows.append(row)
    meta = {"quick": args.quick, "threads": args.threads, "llama_dtype": args.llama_dtype,
            "example_inputs": "batch 1 x 16 tokens (input_ids + attention_mask)",
            "keep": "random 50% of the units of every prunable group (seed 0)",
            "memory": "peak RSS above the level at the phase's start: max of a 5 ms sampler and VmHWM "
                      "(reset via /proc/self/clear_refs)",
            "goals": "graph+shrink <= 5 s (BERT-base), <= 60 s (1B); peak <= 2x model size"}
    print()
    write_results("bench_graph_timing", rows, columns=COLUMNS, meta=meta)


if __name__ == "__main__":
    main()
