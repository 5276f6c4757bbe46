"""A markdown report with plots, written next to a checkpoint: kept fraction per gate, parameters and MACs
before / after, and sparsity and temperature over training when a run log exists. Needs the ``[plot]``
extra (matplotlib, imported only here, only when called).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

REPORT_MD = "report.md"
PLOT_DIR = "plots"


class PlotExtraMissing(ImportError):
    """matplotlib is not installed: ``pip install 'fermigates[plot]'``."""


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotExtraMissing("the markdown report's plots need matplotlib: pip install 'fermigates[plot]'") \
            from None
    return plt


def write_report(report: Any, directory: str | os.PathLike, *, log: list[dict[str, float]] | None = None
                 ) -> Path:
    """Write ``report.md`` and ``plots/*.png`` into ``directory`` for a ``FermiReport`` (or its ``to_dict()``);
    ``log`` (a list of ``{"step", "temperature", "sparsity", ...}``) adds the training curves. Returns the
    markdown file. Raises :class:`PlotExtraMissing` (before writing anything) without matplotlib."""
    from .report import format_full, format_summary

    d = report if isinstance(report, dict) else report.to_dict()
    plt = _pyplot()
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"directory {str(root)!r} does not exist")
    plots = root / PLOT_DIR
    plots.mkdir(exist_ok=True)
    figures: list[tuple[str, str]] = []
    if d.get("layers"):
        figures.append(("Kept fraction per gate", _kept_plot(plt, d["layers"], plots / "kept_per_layer.png")))
    figures.append(("Parameters and MACs", _size_plot(plt, d, plots / "size.png")))
    if log:
        figures.append(("Training", _training_plot(plt, log, plots / "training.png")))
    lines = ["# fermigates report", "", "```", format_summary(d), "```", ""]
    for title, name in figures:
        lines += [f"## {title}", "", f"![{title}]({PLOT_DIR}/{name})", ""]
    lines += ["## Details", "", "```", format_full(d, summary=False), "```", ""]
    path = root / REPORT_MD
    path.write_text("\n".join(lines))
    return path


def _kept_plot(plt: Any, layers: list[dict[str, Any]], path: Path) -> str:
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.22 * len(layers) + 1)))
    names = [_short(l["name"]) for l in layers]
    fractions = [l["kept"] / max(l["total"], 1) for l in layers]
    colours = {"channel": "tab:blue", "head": "tab:orange", "weight": "tab:green"}
    ax.barh(range(len(layers)), fractions, color=[colours.get(l["kind"], "tab:gray") for l in layers])
    ax.set_yticks(range(len(layers)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("kept fraction")
    ax.set_title("kept fraction per gate (blue: channels, orange: heads, green: weights)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def _size_plot(plt: Any, d: dict[str, Any], path: Path) -> str:
    rows = [("parameters", d["params"])]
    if (d.get("macs") or {}).get("before") is not None:
        rows.append((f"MACs ({d['macs'].get('inputs') or 'example inputs'})", d["macs"]))
    fig, axes = plt.subplots(1, len(rows), figsize=(4 * len(rows), 3))
    axes = [axes] if len(rows) == 1 else list(axes)
    for ax, (title, values) in zip(axes, rows):
        ax.bar(["before", "after"], [values["before"], values["after"]], color=["tab:gray", "tab:blue"])
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def _training_plot(plt: Any, log: list[dict[str, float]], path: Path) -> str:
    steps = [r["step"] for r in log]
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(steps, [r["sparsity"] for r in log], label="sparsity")
    if "target_sparsity" in log[0]:
        ax.plot(steps, [r["target_sparsity"] for r in log], "--", label="target sparsity")
    baked = [r["step"] for r in log if r.get("baked")]
    if baked:
        ax.axvline(baked[0], color="tab:gray", linestyle=":", label="baked (small model fine-tuned after)")
    ax.set_xlabel("step")
    ax.set_ylabel("sparsity")
    ax.set_ylim(0, 1)
    if "temperature" in log[0]:  # methods without a temperature (activation gating) log none
        ax2 = ax.twinx()
        ax2.plot(steps, [r["temperature"] for r in log], color="tab:red", label="temperature")
        ax2.set_yscale("log")
        ax2.set_ylabel("temperature")
    fig.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


_GROUP_LABEL = re.compile(r"^\w+ group (\d+) \((\d+) units; ([^,)]+).*\)$")


def _short(name: str, width: int = 48) -> str:
    """``channel group 2 (1536 units; encoder.layer.0.intermediate.dense)`` -> ``encoder.layer.0.intermediate.dense
    #2``: the producer's name first, where the plot has room for it."""
    match = _GROUP_LABEL.match(name)
    if match:
        name = f"{match.group(3)} #{match.group(1)}"
    return name if len(name) <= width else "..." + name[-(width - 3):]


def read_run(directory: str | os.PathLike) -> tuple[dict[str, Any], list[dict[str, float]] | None]:
    """``(report dict, run log or None)`` from a directory written by ``fermigates prune``."""
    from .pipeline import REPORT_JSON, RUN_LOG

    root = Path(directory)
    path = root / REPORT_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{root} has no {REPORT_JSON} (written by `fermigates prune`; from Python, "
                                "report.to_json(path) and fermigates.write_report(report, directory))")
    try:
        report = json.loads(path.read_text())
        log = json.loads((root / RUN_LOG).read_text()) if (root / RUN_LOG).is_file() else None
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read the report in {root}: {err}") from None
    return report, log
