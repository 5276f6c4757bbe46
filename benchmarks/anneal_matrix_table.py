"""The tables of ``docs/anneal-ablations.md`` from the matrix's JSONs: one table per task, a column per cell
(budget x steps), a row per method, each entry the mean over seeds, its spread (max - min) and the MACs kept.

Runs of one cell may come from several files (rows added later, seeds run in another process): every run of a
row, seed and cell is deterministic (the same batches in the same order, one thread), so a row's runs are
pooled by ``(row, seed)``; a seed run twice must give the same score, and this script refuses a file whose run
contradicts another. The best row of a cell, and every row within its spread of the best, is in bold. Then the
paired differences: ``--versus`` (default ``fine_tune defaults``) minus every other row, seed by seed.

    python benchmarks/anneal_matrix_table.py                    # every anneal_matrix_*.json in results/
    python benchmarks/anneal_matrix_table.py --task minilm --files anneal_matrix_minilm_2x_100.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def load(files: list[Path]) -> dict:
    """``{task: {(budget, steps): {row: {seed: run}}}}``, from every run in ``files``."""
    cells: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    for path in files:
        meta = json.loads(path.read_text())["meta"]
        metric = "acc" if meta["task"] == "mobilenet" else "cos"
        for run in meta["runs"]:
            runs = cells[meta["task"]][(meta["budget"], meta["steps"])][run["row"]]
            seen = runs.get(run["seed"])
            if seen is not None and abs(seen[metric] - run[metric]) > 1e-9:
                raise SystemExit(f"{path.name}: {run['row']!r} seed {run['seed']} scored {run[metric]} here and "
                                 f"{seen[metric]} in {seen['file']}: the runs are not the same run")
            runs[run["seed"]] = {**run, "file": path.name}
    for task_cells in cells.values():  # no pruning, so no budget: the dense fine-tune of the same steps and seeds
        for (budget, steps), rows in task_cells.items():
            if "dense FT" not in rows:
                for (_, other_steps), other in list(task_cells.items()):
                    if other_steps == steps and "dense FT" in other:
                        rows["dense FT"] = other["dense FT"]
                        break
    return cells


def table(task: str, cells: dict, min_seeds: int = 1) -> str:
    metric = "acc" if task == "mobilenet" else "cos"
    keys = sorted(cells)
    rows: list[str] = []
    for cell in keys:
        for name in cells[cell]:
            if name not in rows:
                rows.append(name)
    head = ["row"] + [f"{b:g}x, {s} steps" for b, s in keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    stats: dict = {}
    for cell in keys:
        for name, runs in cells[cell].items():
            if len(runs) < min_seeds:
                continue
            values = [r[metric] for r in runs.values()]
            stats[cell, name] = (statistics.mean(values), max(values) - min(values), len(values),
                                 statistics.mean(r["macs_kept"] for r in runs.values()))
    best = {}
    for cell in keys:
        pruned = {n: s for (c, n), s in stats.items() if c == cell and n != "dense FT"}
        if pruned:
            name = max(pruned, key=lambda n: pruned[n][0])
            best[cell] = pruned[name]
    for name in rows:
        entries = []
        for cell in keys:
            if (cell, name) not in stats:
                entries.append("-")
                continue
            mean, spread, n, kept = stats[cell, name]
            text = f"{mean:.4f} ± {spread / 2:.4f} ({n}), {kept:.3f}"
            top_mean, top_spread = best[cell][0], best[cell][1]
            if name != "dense FT" and mean >= top_mean - max(spread, top_spread) / 2:
                text = f"**{text}**"
            entries.append(text)
        lines.append("| " + " | ".join([name] + entries) + " |")
    return "\n".join(lines)


def paired(task: str, cells: dict, versus: str) -> str:
    """Per cell, ``versus`` minus each other row on the same seeds (the same batches in the same order): the mean
    difference in points and its range over the seeds. A range that excludes 0 is a lead (or a lag) larger than
    the seed-to-seed noise of the difference."""
    metric = "acc" if task == "mobilenet" else "cos"
    keys = [c for c in sorted(cells) if versus in cells[c]]
    rows = [n for c in keys for n in cells[c] if n != versus]
    rows = list(dict.fromkeys(rows))
    head = ["row"] + [f"{b:g}x, {s} steps" for b, s in keys]
    lines = [f"`{versus}` minus the row, points (mean [min, max] over the seeds both ran):", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in rows:
        entries = []
        for cell in keys:
            ours, theirs = cells[cell][versus], cells[cell].get(name, {})
            seeds = sorted(set(ours) & set(theirs))
            if not seeds:
                entries.append("-")
                continue
            d = [100 * (ours[s][metric] - theirs[s][metric]) for s in seeds]
            text = f"{statistics.mean(d):+.1f} [{min(d):+.1f}, {max(d):+.1f}]"
            entries.append(f"**{text}**" if min(d) > 0 else text)
        lines.append("| " + " | ".join([name] + entries) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", choices=["mobilenet", "minilm"], default=None)
    ap.add_argument("--files", nargs="+", default=None, help="JSON names in benchmarks/results (default: all)")
    ap.add_argument("--min-seeds", type=int, default=1)
    ap.add_argument("--versus", default="fine_tune defaults", help="the row the paired differences are taken from")
    args = ap.parse_args()
    files = [RESULTS / f for f in args.files] if args.files else sorted(RESULTS.glob("anneal_matrix_*.json"))
    cells = load(files)
    for task in sorted(cells):
        if args.task and task != args.task:
            continue
        print(f"\n{task}: mean ± half the spread (seeds), MACs kept\n")
        print(table(task, cells[task], args.min_seeds))
        print()
        print(paired(task, cells[task], args.versus))


if __name__ == "__main__":
    main()
