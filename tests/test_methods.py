"""The method interface: one convert -> train -> bake -> save -> load path and one report for every method."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fermigates as fg
from fermigates.methods.registry import method_names

TRAIN_KWARGS = {
    "fermi": {"lr": 1e-2, "total_steps": 30},
    "deepr": {"lr": 0.05},
    "softdeepr": {"lr": 0.05},
    "spectral": {"lr": 1e-2},
}
#: registered methods without a weight granularity, tested by tests/test_method_contract.py and their own file
NOT_WEIGHT_LEVEL = {"activation"}


def make_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def test_every_builtin_method_is_registered_and_tested():
    assert set(method_names()) == set(TRAIN_KWARGS) | NOT_WEIGHT_LEVEL
    assert isinstance(fg.get_method("deepr"), fg.Method)


@pytest.mark.parametrize("method", sorted(m for m in TRAIN_KWARGS if "weight" in fg.get_method(m).granularities))
def test_convert_train_bake_save_load(method, tmp_path):
    model = make_mlp()
    fg.convert_to_fermi(model, fg.FermiConfig(method=method, granularity="weight", target_sparsity=0.5))
    assert fg.summary(model).modules == ["0", "2"]  # the classifier is kept whole by every method
    opt = fg.make_optimizer(model, **TRAIN_KWARGS[method])
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        x = torch.randn(16, 12, generator=g)
        loss = F.cross_entropy(model(x), x[:, :4].argmax(1))
        if hasattr(opt, "sparsity_loss"):
            loss = loss + opt.sparsity_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = torch.randn(8, 12, generator=g)
    with torch.no_grad():
        decided = fg.compute_sparsity(model)
        if method == "fermi":
            with fg.hard_gates(model):
                expected = model(x)
        else:
            expected = model(x)

    report = fg.convert_from_fermi(model)

    assert isinstance(report, fg.FermiReport)
    assert [type(m) for m in model.modules() if isinstance(m, nn.Linear)] == [nn.Linear] * 3
    assert torch.allclose(model(x), expected, rtol=1e-5, atol=1e-6)
    assert report.sparsity.overall == pytest.approx(0.5, abs=0.1)
    assert [(l.name, l.kept, l.total) for l in report.sparsity.layers] == \
        [(l.name, l.kept, l.total) for l in decided.layers]
    plain = fg.compute_sparsity(model)  # the baked zeros are the method's decisions, exactly
    for layer in report.sparsity.layers:
        assert plain[layer.name].kept == layer.kept
    assert report.params_after == sum(p.numel() for p in make_mlp().parameters())
    assert report.params_before == report.params_after  # single weights: zeros, no smaller shapes
    text = str(report)
    assert f"{report.sparsity.kept:,}" in text and f"{report.sparsity.total:,}" in text

    fg.save_shrunk(model, tmp_path / "out")
    loaded = fg.load_shrunk(make_mlp(seed=1), tmp_path / "out")
    assert torch.equal(loaded(x), model(x))
