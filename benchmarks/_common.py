"""Shared by the benchmarks: a markdown table on stdout and ``benchmarks/results/<name>.json``."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

RESULTS = Path(__file__).resolve().parent / "results"
#: environment variables that set thread counts: recorded with every result, and put in front of its command
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def environment() -> dict[str, Any]:
    """Where the numbers were measured."""
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def invocation(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """How this process was started: the script (relative to the working directory), its arguments, the
    thread settings, and one shell line that reruns it from the same directory."""
    import torch

    argv = list(sys.argv if argv is None else argv)
    script = os.path.relpath(os.path.abspath(argv[0]), os.getcwd()) if argv and argv[0] else ""
    env = {k: os.environ.get(k) for k in THREAD_VARS}
    prefix = [f"{k}={shlex.quote(v)}" for k, v in env.items() if v is not None]
    return {
        "command": " ".join(prefix + ["python", shlex.join([script, *argv[1:]])]),
        "script": script,
        "argv": argv[1:],
        "torch_threads": torch.get_num_threads(),
        "env": env,
    }


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.0f}"
    return "" if value is None else str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub markdown table of ``rows`` (dicts), columns in ``columns`` order (default: first row's)."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |",
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += ["| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |" for row in cells]
    return "\n".join(out)


def write_results(name: str, rows: Sequence[dict[str, Any]], *, columns: Sequence[str] | None = None,
                  meta: dict[str, Any] | None = None, out_dir: Path | None = None) -> Path:
    """Print the markdown table and write ``<out_dir>/<name>.json`` (rows, meta, environment and the
    invocation: command line and thread settings) atomically."""
    table = markdown_table(rows, columns)
    print(table)
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    payload = {"benchmark": name, "rows": list(rows), "meta": meta or {}, "environment": environment(),
               "invocation": invocation(), "table": table}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(path)
    print(f"wrote {path}")
    return path


class PeakRSS:
    """Context manager: peak resident memory (MiB) above the level at entry, sampled every 5 ms."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.peak_mib, self._stop = interval, 0.0, threading.Event()

    @staticmethod
    def rss_mib() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_mib = max(self.peak_mib, self.rss_mib() - self.base)
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.base = self.rss_mib()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mib = max(self.peak_mib, self.rss_mib() - self.base)
