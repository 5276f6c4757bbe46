"""What :func:`fermigates.calibrate` did, per layer, with a readable table."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .ridge import LayerPlan, weight_2d


@dataclass
class LayerCalibration:
    """One calibrated layer.

    ``err_before`` / ``err_after``: relative squared error ``||XW - Y||² / ||Y||²`` of the layer's output
    against the reference's (kept outputs only), on the calibration rows, with the layer's weights before
    and after the solve; both use the inputs produced by the already-calibrated layers before it.
    """

    name: str
    kind: str
    in_kept: int
    in_ref: int
    out_kept: int
    out_ref: int
    groups: int
    rows: int
    err_before: float
    err_after: float
    solver: str
    #: wall time of this layer: forwards up to it, statistics, solve
    seconds: float
    #: of which: input / target rows and their ``XᵀX`` / ``XᵀY`` products
    stats_s: float = 0.0
    #: of which: the ridge solve and writing the weights back
    solve_s: float = 0.0

    @classmethod
    def from_plan(cls, plan: LayerPlan, rows: int, before: float, after: float, solver: str,
                  seconds: float) -> "LayerCalibration":
        m, r = plan.module, plan.reference
        conv = plan.is_conv
        mw, rw = weight_2d(m), weight_2d(r)
        in_ref = r.in_channels if conv else rw.shape[1]
        out_ref = rw.shape[0]
        in_kept = len(plan.sel_in) if plan.sel_in is not None else (m.in_channels if conv else mw.shape[1])
        out_kept = len(plan.sel_out) if plan.sel_out is not None else mw.shape[0]
        return cls(plan.name, type(m).__name__, in_kept, in_ref, out_kept, out_ref, plan.groups, rows,
                   before, after, solver, seconds)


@dataclass
class CalibrationReport:
    """Per-layer results of one :func:`fermigates.calibrate` call."""

    ridge: float
    n_batches: int
    layers: list[LayerCalibration] = field(default_factory=list)
    seconds: float = 0.0
    #: False when the reference's outputs were recorded beforehand (by ``prune``'s selection pass) and the
    #: reference model was not run
    reference_run: bool = True
    #: True for ``prune(calibration="one-pass")``: fitted from the selection pass's input Grams of the dense
    #: model, with no forward (``n_batches``: the batches those Grams were gathered on)
    from_selection: bool = False

    @property
    def phases(self) -> dict[str, float]:
        """Wall time by phase: ``forward`` (the pruned model and the reference), ``statistics``, ``solve``."""
        stats = sum(r.stats_s for r in self.layers)
        solve = sum(r.solve_s for r in self.layers)
        return {"forward": max(self.seconds - stats - solve, 0.0), "statistics": stats, "solve": solve}

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, name: str) -> LayerCalibration:
        for row in self.layers:
            if row.name == name:
                return row
        raise KeyError(f"no calibrated layer named {name!r}; calibrated: {[r.name for r in self.layers]}")

    def to_dict(self) -> dict[str, Any]:
        return {"ridge": self.ridge, "n_batches": self.n_batches, "seconds": self.seconds,
                "phases": self.phases, "reference_run": self.reference_run, "from_selection": self.from_selection,
                "layers": [asdict(r) for r in self.layers]}

    def __str__(self) -> str:
        head = ("layer", "kind", "in kept/ref", "out kept/ref", "rows", "err before", "err after", "time")
        rows = [(r.name, r.kind + (f" g={r.groups}" if r.groups > 1 else ""), f"{r.in_kept}/{r.in_ref}",
                 f"{r.out_kept}/{r.out_ref}", str(r.rows), f"{r.err_before:.3e}", f"{r.err_after:.3e}",
                 f"{r.seconds:.2f}s") for r in self.layers]
        widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
        line = "  ".join(h.ljust(w) for h, w in zip(head, widths))
        out = [line, "-" * len(line)]
        out += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
        ph = self.phases
        if self.from_selection:
            out.append(f"{len(self.layers)} layers calibrated in one pass, from the input Grams of the selection "
                       f"pass over {self.n_batches} batches of the dense model (no forward), ridge={self.ridge:g}, "
                       f"{self.seconds:.2f}s")
            return "\n".join(out)
        ref = "" if self.reference_run else "; reference outputs recorded, reference not run"
        out.append(f"{len(self.layers)} layers calibrated on {self.n_batches} batches, ridge={self.ridge:g}, "
                   f"{self.seconds:.2f}s (forward {ph['forward']:.2f}s, statistics {ph['statistics']:.2f}s, "
                   f"solve {ph['solve']:.2f}s{ref})")
        return "\n".join(out)
