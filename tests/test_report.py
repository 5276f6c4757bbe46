"""Reports: the compact summary, to_dict / JSON, the full tables, and the markdown report with its plots."""

import json
import sys

import pytest
import torch
from _models import SmallCNN

import fermigates as fg
from fermigates.report import format_summary
from fermigates.report_plot import PlotExtraMissing, write_report


@pytest.fixture(scope="module")
def report():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    data = [torch.randn(8, 3, 6, 6) for _ in range(3)]
    rep = fg.prune(model, data, fg.FermiConfig(granularity="channel", target_sparsity=0.5), progress=False)
    rep.macs_inputs = "float32[1, 3, 6, 6]"
    return rep


def test_summary_is_compact_and_says_what_macs_are_counted_on(report):
    text = str(report)
    lines = text.splitlines()
    assert 4 <= len(lines) <= 12, text
    assert "params" in text and "kept channels" in text
    assert "per forward of float32[1, 3, 6, 6]" in text
    assert "calibration" in text and "->" in text
    kept, total = report.kept_by_kind()["channel"]
    assert f"{kept:,} of {total:,}" in text and kept < total


def test_full_report_has_every_gate(report):
    full = report.full()
    assert full.startswith(str(report))
    for layer in report.sparsity.layers:
        assert layer.name in full
    assert "resized modules" in full and "err after" in full


def test_to_dict_is_json_and_carries_everything(report):
    d = json.loads(report.to_json())
    assert d["params"] == {"before": report.params_before, "after": report.params_after}
    assert d["macs"]["before"] == report.macs_before and d["macs"]["inputs"] == "float32[1, 3, 6, 6]"
    assert len(d["layers"]) == len(report.sparsity.layers) and d["layers"][0]["kind"] == "channel"
    assert d["shrunk"] is True and len(d["calibration"]["layers"]) == len(report.calibration.layers)
    assert format_summary(d) == str(report)  # `fermigates report DIR` prints the same summary


def test_markdown_report_with_plots(report, tmp_path):
    log = [{"step": s, "temperature": 0.5 ** s, "sparsity": min(0.5, 0.1 * s), "target_sparsity": 0.5}
           for s in range(1, 6)]
    md = write_report(report, tmp_path, log=log)
    text = md.read_text()
    for png in ("kept_per_layer.png", "size.png", "training.png"):
        path = tmp_path / "plots" / png
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"plots/{png}" in text
    assert "per forward of float32[1, 3, 6, 6]" in text
    other = tmp_path / "no_log"
    other.mkdir()
    write_report(report.to_dict(), other)
    assert not (other / "plots" / "training.png").exists()  # no run log: no training plot


def test_missing_plot_extra_is_a_clear_error_and_writes_nothing(report, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(PlotExtraMissing, match=r"fermigates\[plot\]"):
        write_report(report, tmp_path)
    assert list(tmp_path.iterdir()) == []
