"""The shared merge step: chains found on one run, exact composition (the border included), the cheaper-or-forced
choice, undo on mismatch, and the replaced-module records checkpoints rebuild."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fermigates.surgery import merge as mg
from fermigates.surgery.macs import count_macs
from fermigates.surgery.merge import (
    BorderBiasConv2d,
    MergeRequest,
    build_module,
    merge_layers,
    merge_savings,
    module_spec,
    replaced_paths,
    trace_chains,
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max()) if not a.requires_grad else _rel(a.detach(), b.detach())


def _randomise_norms(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)
    return model.eval()


class InvertedResidual(nn.Module):
    """MobileNetV2's block with its activations already removed (identities at ``a1`` / ``a2``)."""

    def __init__(self, c: int = 8, out: int | None = None, expand: int = 6, stride: int = 1) -> None:
        super().__init__()
        m, out = c * expand, out or c
        self.pw, self.bn1, self.a1 = nn.Conv2d(c, m, 1, bias=False), nn.BatchNorm2d(m), nn.Identity()
        self.dw, self.bn2, self.a2 = nn.Conv2d(m, m, 3, stride, 1, groups=m, bias=False), nn.BatchNorm2d(m), nn.Identity()
        self.pwl, self.bn3 = nn.Conv2d(m, out, 1, bias=False), nn.BatchNorm2d(out)
        self.skip = stride == 1 and c == out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn3(self.pwl(self.a2(self.bn2(self.dw(self.a1(self.bn1(self.pw(x))))))))
        return x + y if self.skip else y


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Identity(), nn.Linear(32, 32), nn.Identity(), nn.Linear(32, 4)).eval()


def test_a_linear_chain_merges_into_one_linear_with_the_same_outputs():
    model, x = _mlp(), torch.randn(6, 3, 8)
    ref = model(x)
    report = merge_layers(model, x, ["1", "3"])
    assert [m.members for m in report.merged] == [["0", "2", "4"]]
    assert isinstance(model[0], nn.Linear) and (model[0].in_features, model[0].out_features) == (8, 4)
    assert all(isinstance(model[i], nn.Identity) for i in (1, 2, 3, 4))
    assert _rel(model(x), ref) < 1e-5
    assert report.layers_removed == 2 and report.merged[0].macs_after < report.merged[0].macs_before
    assert replaced_paths(model) == ["0", "2", "4"]


@pytest.mark.parametrize("stride", [1, 2])
def test_an_inverted_residual_block_merges_into_one_conv_exact_at_every_input_size(stride):
    torch.manual_seed(0)
    block = _randomise_norms(InvertedResidual(stride=stride))
    original = copy.deepcopy(block)
    report = merge_layers(block, torch.randn(1, 8, 9, 9), ["a1", "a2"])
    assert [m.members for m in report.merged] == [["pw", "dw", "pwl"]]
    assert isinstance(block.pw, BorderBiasConv2d) and block.pw.kernel_size == (3, 3) and block.pw.groups == 1
    assert all(isinstance(getattr(block, n), nn.Identity) for n in ("bn1", "dw", "bn2", "pwl", "bn3"))
    for size in [(1, 1), (2, 3), (8, 8), (13, 10)]:  # the border term follows the input size
        x = torch.randn(3, 8, *size)
        assert _rel(block(x), original(x)) < 1e-5, size
    assert report.merged[0].macs_after < report.merged[0].macs_before


def test_a_prefix_without_bias_merges_into_a_plain_conv():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 16, 1, bias=False), nn.Identity(), nn.Conv2d(16, 16, 3, padding=1, groups=16,
                                                                                    bias=False),
                          nn.Identity(), nn.Conv2d(16, 4, 1)).eval()
    x = torch.randn(2, 4, 7, 7)
    ref = model(x)
    merge_layers(model, x, ["1", "3"], when="always")
    assert type(model[0]) is nn.Conv2d and model[0].kernel_size == (3, 3)
    assert _rel(model(x), ref) < 1e-5


def test_two_padded_convs_do_not_merge_and_say_why():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Identity(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    x = torch.randn(1, 3, 6, 6)
    ref = model(x)
    report = merge_layers(model, x, [MergeRequest("1", force=True)])
    assert not report.merged and "border" in report.skipped["1"]
    assert torch.equal(model(x), ref) and replaced_paths(model) == []


def test_a_kxk_conv_followed_by_an_unpadded_conv_merges_exactly_when_asked():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Identity(), nn.Conv2d(8, 6, 1)).eval()
    x = torch.randn(2, 3, 11, 11)
    ref = model(x)
    cheaper = merge_layers(copy.deepcopy(model), x, ["1"])
    assert cheaper.merged  # 3->8->6 with a 3x3 first: 3*6*9 < 3*8*9 + 8*6
    report = merge_layers(model, x, ["1"], when="always")
    assert model[0].kernel_size == (3, 3) and model[0].stride == (2, 2)
    assert _rel(model(x), ref) < 1e-5 and report.merged


def test_merging_happens_only_where_cheaper_unless_forced():
    torch.manual_seed(0)
    # depthwise 3x3 then 1x1 (MobileNet's separable conv): a dense 3x3 would cost 9x the 1x1
    model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Identity(), nn.Conv2d(16, 16, 1)).eval()
    x = torch.randn(1, 16, 8, 8)
    ref = model(x)
    report = merge_layers(copy.deepcopy(model), x, ["1"])
    assert not report.merged and "not cheaper" in report.skipped["1"]
    forced = merge_layers(model, x, [MergeRequest("1", force=True)])
    assert forced.merged and forced.merged[0].macs_after > forced.merged[0].macs_before
    assert _rel(model(x), ref) < 1e-5


def test_a_tensor_read_elsewhere_keeps_the_chain_apart():
    class Tap(nn.Module):  # a residual reads the first layer's output
        def __init__(self) -> None:
            super().__init__()
            self.a, self.act, self.b = nn.Linear(8, 8), nn.Identity(), nn.Linear(8, 8)

        def forward(self, x):
            h = self.act(self.a(x))
            return self.b(h) + h

    model, x = Tap().eval(), torch.randn(4, 8)
    report = merge_layers(model, x, ["act"], when="always")
    assert not report.merged and "read elsewhere" in report.skipped["act"]


def test_a_point_that_is_no_identity_or_between_no_linear_maps_is_reported():
    class Gated(nn.Module):  # LLaMA's MLP: the activation feeds a product, not a linear map
        def __init__(self) -> None:
            super().__init__()
            self.gate, self.up, self.down, self.act = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8), nn.Identity()

        def forward(self, x):
            return self.down(self.act(self.gate(x)) * self.up(x))

    model, x = Gated().eval(), torch.randn(3, 8)
    report = merge_layers(model, x, ["act", "missing"])
    assert not report.merged
    assert "linear maps" in report.skipped["act"] and report.skipped["missing"] == "no such module"
    relu = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)).eval()
    assert "not an identity" in merge_layers(relu, torch.randn(2, 4), ["1"]).skipped["1"]


def test_a_merge_that_changes_the_outputs_is_undone(monkeypatch):
    model, x = _mlp(), torch.randn(5, 8)
    ref = model(x)
    real = mg._compose

    def wrong(modules):
        merged = real(modules)
        merged.bias.data += 1.0
        return merged

    monkeypatch.setattr(mg, "_compose", wrong)
    report = merge_layers(model, x, ["1", "3"])
    assert not report.merged and report.undone and "changed the outputs" in report.skipped["1"]
    assert torch.equal(model(x), ref) and replaced_paths(model) == []
    assert [type(m) for m in model] == [nn.Linear, nn.Identity, nn.Linear, nn.Identity, nn.Linear]


def test_grouped_maps_stay_grouped_and_conv1d_chains_merge():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(6, 6, 3, groups=6), nn.Identity(), nn.Conv1d(6, 6, 3, groups=6)).eval()
    x = torch.randn(2, 6, 20)
    ref = model(x)
    report = merge_layers(model, x, ["1"])
    assert report.merged and model[0].groups == 6 and model[0].kernel_size == (5,)
    assert _rel(model(x), ref) < 1e-5


def test_predicted_savings_match_the_merge():
    torch.manual_seed(0)
    block = _randomise_norms(InvertedResidual(stride=2, out=12))
    x = torch.randn(1, 8, 10, 10)
    plan_copy = copy.deepcopy(block)
    from fermigates.surgery.fold import fold_batchnorm

    fold_batchnorm(plan_copy, x)
    trace = trace_chains(plan_copy, x, ["a1", "a2"])
    macs, params = merge_savings(plan_copy, trace, ["a1", "a2"])
    assert merge_savings(plan_copy, trace, ["a1"]) == (0, 0)  # pw + dw alone is dearer than apart
    before, folded_params = count_macs(block, x), sum(p.numel() for p in plan_copy.parameters())
    merge_layers(block, x, ["a1", "a2"])
    assert before - count_macs(block, x) == macs
    assert folded_params - sum(p.numel() for p in block.parameters()) == params


def test_module_specs_rebuild_modules_and_refuse_foreign_classes():
    for module in (nn.Linear(3, 5, bias=False), nn.Conv2d(4, 6, (3, 1), stride=2, padding=(1, 0), groups=2),
                   nn.Identity(), nn.ReLU6(inplace=True), BorderBiasConv2d(3, 4, 3, padding=1),
                   nn.Sequential(nn.Identity(), nn.GELU(approximate="tanh"))):
        spec = module_spec(module)
        rebuilt = build_module(spec)
        assert type(rebuilt) is type(module) and repr(rebuilt) == repr(module)
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
            {k: v.shape for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match="torch.nn or fermigates"):
        build_module({"class": "os.system", "args": {}})
