"""A markdown report with plots, written next to a checkpoint: kept fraction per gate, parameters, MACs, speed and
quality before / after, and the training curves (loss, sparsity, temperature) when a run log exists. Needs the
``[plot]`` extra (matplotlib, imported only here, only when called).
"""

from __future__ import annotations

import json
import os
import re
import textwrap
from pathlib import Path
from typing import Any

from .out_dir import REPORT_JSON, RUN_LOG

REPORT_MD = "report.md"
PLOT_DIR = "plots"
_KIND_COLOURS = {"channel": "tab:blue", "head": "tab:orange", "weight": "tab:green"}


class PlotExtraMissing(ImportError):
    """matplotlib is not installed: ``pip install 'fermigates[plot]'``."""


class ReportReadError(ValueError):
    """A run directory whose ``report.json`` (or run log) cannot be read."""


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
    """Write ``report.md`` and ``plots/*.png`` into ``directory`` for a ``FermiReport`` (or its ``to_dict()``, or
    a run's ``report.json``); ``log`` (a list of ``{"step", "loss", "temperature", "sparsity", ...}``) adds the
    training curves. Returns the markdown file. Raises :class:`PlotExtraMissing` (before writing anything)
    without matplotlib."""
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
        figures.append(("Kept per gate", _kept_plot(plt, d["layers"], plots / "kept_per_layer.png")))
    figures.append(("Size, speed and quality, before and after", _size_plot(plt, d, plots / "size.png")))
    if log:
        figures.append(("Training", _training_plot(plt, log, d.get("evaluation"), plots / "training.png")))
    lines = ["# fermigates report", "", "```", format_summary(d), "```", ""]
    for note in d.get("notes") or []:
        lines.append(f"- note: {note}")
    if d.get("notes"):
        lines.append("")
    for title, name in figures:
        lines += [f"## {title}", "", f"![{title}]({PLOT_DIR}/{name})", ""]
    lines += ["## Details", "", "```", format_full(d, summary=False), "```", ""]
    path = root / REPORT_MD
    path.write_text("\n".join(lines))
    return path


def _save(fig: Any, plt: Any, path: Path) -> str:
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path.name


def _kept_plot(plt: Any, layers: list[dict[str, Any]], path: Path) -> str:
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.24 * len(layers) + 1)))
    kinds = sorted({l.get("kind", "channel") for l in layers})
    names = [gate_name(l["name"], with_kind=len(kinds) > 1) for l in layers]
    fractions = [l["kept"] / max(l["total"], 1) for l in layers]
    ax.barh(range(len(layers)), fractions, color=[_KIND_COLOURS.get(l.get("kind"), "tab:gray") for l in layers])
    for i, l in enumerate(layers):
        ax.text(min(fractions[i], 1.0) + 0.01, i, f"{l['kept']:,}/{l['total']:,}", va="center", fontsize=7)
    ax.set_yticks(range(len(layers)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.15)
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.set_xlabel("kept fraction (kept / total units of the gate)")
    legend = ", ".join(f"{_KIND_COLOURS.get(k, 'tab:gray').removeprefix('tab:')}: {k}s" for k in kinds)
    shared = "; +N: N more layers produce the same units" if any(" +" in n for n in names) else ""
    ax.set_title(f"kept per gate ({legend}{shared})", fontsize=9)
    return _save(fig, plt, path)


def _bars(ax: Any, labels: list[str], values: list[float], text: list[str], title: str, colours: list[str]) -> None:
    ax.bar(labels, values, color=colours)
    top = max([v for v in values if v is not None] or [1.0])
    top = top if top > 0 else 1.0
    for i, (v, t) in enumerate(zip(values, text)):
        ax.text(i, v + 0.02 * top, t, ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, top * 1.18)
    ax.set_yticks([])
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.set_title("\n".join(textwrap.wrap(title, 34)), fontsize=8)
    ax.tick_params(axis="x", labelsize=8)


def _size_plot(plt: Any, d: dict[str, Any], path: Path) -> str:
    from .report import METRICS, PHASES, format_count

    panels: list[tuple[str, list[str], list[float], list[str]]] = []
    p = d["params"]
    panels.append(("parameters", ["before", "after"], [p["before"], p["after"]],
                   [format_count(p["before"]), f"{format_count(p['after'])} ({p['after'] / max(p['before'], 1):.2f}x)"]))
    macs = d.get("macs") or {}
    if macs.get("before") is not None and macs.get("after") is not None:
        panels.append((f"MACs per forward of {macs.get('inputs') or 'the example inputs'}", ["before", "after"],
                       [macs["before"], macs["after"]],
                       [format_count(macs["before"]),
                        f"{format_count(macs['after'])} ({macs['after'] / max(macs['before'], 1):.2f}x)"]))
    lat = d.get("latency_ms") or {}
    if lat.get("before") is not None and lat.get("after") is not None:
        batch = f" (a batch of {lat['batch']})" if lat.get("batch") else ""
        panels.append((f"latency, ms per forward{batch}", ["before", "after"], [lat["before"], lat["after"]],
                       [f"{lat['before']:.1f}", f"{lat['after']:.1f} ({lat['before'] / max(lat['after'], 1e-9):.2f}x "
                                                "as fast)"]))
    ev = d.get("evaluation") or {}
    phases = ev.get("phases") or {}
    if phases:
        metric = METRICS.get(ev.get("task"), ("",))[0]
        shown = [k for k in PHASES if k in phases and metric in phases[k]
                 and not (ev.get("task") == "fidelity" and k == "dense")]
        if shown:
            values = [phases[k][metric] for k in shown]
            panels.append((f"{metric} on {ev.get('on')}", [PHASES[k].replace("after ", "after\n") for k in shown],
                           values, [f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}" for v in values]))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2))
    axes = [axes] if len(panels) == 1 else list(axes)
    for ax, (title, labels, values, text) in zip(axes, panels):
        colours = ["tab:gray"] + ["tab:blue"] * (len(values) - 1)
        _bars(ax, labels, values, text, title, colours)
    fig.tight_layout()
    return _save(fig, plt, path)


def _training_plot(plt: Any, log: list[dict[str, float]], evaluation: dict[str, Any] | None, path: Path) -> str:
    steps = [r["step"] for r in log]
    has_loss = any("loss" in r for r in log)
    has_gates = any("sparsity" in r for r in log)
    rows = int(has_loss) + int(has_gates)
    fig, axes = plt.subplots(max(rows, 1), 1, figsize=(7, 2.6 * max(rows, 1) + 0.6), sharex=True, squeeze=False)
    axes = list(axes[:, 0])
    marks = []
    cut = ((evaluation or {}).get("phases") or {}).get("cut")
    if cut and cut.get("step") is not None:
        marks.append((cut["step"], "decisions frozen (the cut)", "tab:gray", "--"))
    baked = [r["step"] for r in log if r.get("baked")]
    if baked:
        marks.append((baked[0], "baked (the small model fine-tuned after)", "black", ":"))
    i = 0
    if has_loss:
        ax = axes[i]
        i += 1
        loss = [r.get("loss") for r in log]
        ax.plot(steps, loss, color="tab:purple", label="training loss")
        held = [p.get("loss") for p in ((evaluation or {}).get("phases") or {}).values()]
        finite = [v for v in loss + held if v is not None and v > 0]
        if finite and max(finite) / min(finite) > 100:
            ax.set_yscale("log")
        ax.set_ylabel("loss")
        _eval_marks(ax, evaluation)
        _finish(ax, marks)
    if has_gates:
        ax = axes[i]
        ax.plot(steps, [r.get("sparsity") for r in log], color="tab:blue", label="sparsity")
        if any("target_sparsity" in r for r in log):
            ax.plot(steps, [r.get("target_sparsity") for r in log], "--", color="tab:cyan", label="target sparsity")
        ax.set_ylabel("sparsity")
        ax.set_ylim(0, 1)
        if any("temperature" in r for r in log):
            ax2 = ax.twinx()
            ax2.plot(steps, [r.get("temperature") for r in log], color="tab:red", label="temperature")
            ax2.set_yscale("log")
            ax2.set_ylabel("temperature")
            _finish(ax, marks, extra=ax2)
        else:
            _finish(ax, marks)
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    return _save(fig, plt, path)


def _eval_marks(ax: Any, evaluation: dict[str, Any] | None) -> None:
    """The held-out loss of the dense, cut and fine-tuned model, where they were measured."""
    from .report import PHASES

    phases = (evaluation or {}).get("phases") or {}
    points = [(phases[k]["step"], phases[k]["loss"], PHASES[k]) for k in PHASES
              if k in phases and phases[k].get("loss") is not None and phases[k].get("step") is not None]
    if not points:
        return
    ax.plot([p[0] for p in points], [p[1] for p in points], "o", color="tab:green", label="held-out loss")
    for x, y, words in points:
        ax.annotate(f"{words}: {y:.3g}", (x, y), textcoords="offset points", xytext=(4, 6), fontsize=7)


def _finish(ax: Any, marks: list[tuple[float, str, str, str]], extra: Any = None) -> None:
    """Vertical marks, and one legend below the axes (never over the curves or an axis)."""
    for step, label, colour, style in marks:
        ax.axvline(step, color=colour, linestyle=style, linewidth=1, label=label)
    handles, labels = ax.get_legend_handles_labels()
    if extra is not None:
        more = extra.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=min(len(labels), 4),
              fontsize=7, frameon=False)


_GROUP_LABEL = re.compile(r"^(\w+) group \d+ \((\d+) units; (.*)\)$")


def gate_name(name: str, *, with_kind: bool = False, width: int = 46) -> str:
    """A gate's label as a reader wants it: ``channel group 2 (32 units; conv1.6, layer1.0.conv2)`` ->
    ``conv1.6 +1``: the first module producing the units, how many more share them (and the unit kind)."""
    match = _GROUP_LABEL.match(name)
    if match:
        producers = match.group(3)
        more = re.search(r" \+(\d+)$", producers)
        extra = int(more.group(1)) if more else 0
        listed = [p.strip() for p in re.sub(r" \+\d+$", "", producers).split(",") if p.strip()]
        head = listed[0] if listed else "?"
        count = len(listed) - 1 + extra
        name = f"{head}{f' +{count}' if count else ''}{f' ({match.group(1)}s)' if with_kind else ''}"
    return name if len(name) <= width else "..." + name[-(width - 3):]


def read_run(directory: str | os.PathLike) -> tuple[dict[str, Any], list[dict[str, float]] | None]:
    """``(report dict, run log or None)`` from a directory written by ``fermigates prune``."""
    root = Path(directory)
    path = root / REPORT_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{root} has no {REPORT_JSON} (written by `fermigates prune`; from Python, "
                                "report.to_json(path) and fermigates.write_report(report, directory))")
    for name in (REPORT_JSON, RUN_LOG):
        if not (root / name).is_file():
            continue
        try:
            value = json.loads((root / name).read_text())
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise ReportReadError(f"{root / name} is not valid JSON ({err}); rerun the prune that wrote it") from None
        if name == REPORT_JSON:
            if not isinstance(value, dict) or not isinstance(value.get("params"), dict):
                raise ReportReadError(f"{path} is not a fermigates report (no 'params' object)")
            report = value
        elif not isinstance(value, list):
            raise ReportReadError(f"{root / name} is not a run log (a list of rows)")
    log = json.loads((root / RUN_LOG).read_text()) if (root / RUN_LOG).is_file() else None
    return report, log
