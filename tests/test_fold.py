"""``fold_batchnorm``: eval-mode batch norms folded into the Conv / Linear that alone feeds them.

timm models (plain ``BatchNorm2d`` and ``BatchNormAct2d``) fold every norm with unchanged outputs; the pairs
that must stay apart (the producer's output also read elsewhere, an in-place op in between, a module called
twice, batch statistics, a Linear on 3-d input, a subclass that overrides ``forward``) are skipped with a
reason; a failed check undoes everything; ``save_shrunk`` refuses a folded model, and the intended workflow
(prune -> save_shrunk -> load_shrunk -> fold) works. The custom conv models also hold a foldable stem pair, so
a skip is not the function doing nothing.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _models import Lambda, SmallCNN, rel_diff
from torch import nn

import fermigates as fg
from fermigates.surgery.fold import FOLDED_ATTR

timm = pytest.importorskip("timm")

BN = nn.modules.batchnorm._BatchNorm
RTOL = 1e-4


@torch.no_grad()
def randomize_bn_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random gamma / beta / running statistics in every batch norm, so that folding is no identity."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if not isinstance(m, BN):
            continue
        n = m.num_features
        if m.weight is not None:
            m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.copy_(torch.randn(n, generator=gen) * 0.5)
        if m.running_mean is not None:
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
    return model


def run(model: nn.Module, x) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def n_norms(model: nn.Module) -> int:
    return sum(isinstance(m, BN) for m in model.modules())


def image(batch: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def state_of(model: nn.Module):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            [(n, type(m)) for n, m in model.named_modules()])


def assert_unchanged(model: nn.Module, before) -> None:
    tensors, types = before
    after = model.state_dict()
    assert list(after) == list(tensors)
    for k, v in tensors.items():
        assert after[k].shape == v.shape and torch.equal(after[k], v), f"{k} changed"
    assert [(n, type(m)) for n, m in model.named_modules()] == types
    assert not hasattr(model, FOLDED_ATTR)


def stem() -> nn.Sequential:
    """A foldable conv -> norm pair (3 -> 4 channels) in front of every custom model."""
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))


def fold_checked(model: nn.Module, x) -> tuple[fg.BatchNormFold, torch.Tensor, torch.Tensor]:
    """Fold ``model``; returns the report and the outputs before / after (on ``x`` and another batch)."""
    randomize_bn_(model.eval())
    expected = run(model, x)
    report = fg.fold_batchnorm(model, x)
    got = run(model, x)
    assert rel_diff(expected, got) < RTOL, rel_diff(expected, got)
    return report, expected, got


# ------------------------------------------------------------------------------------------- timm models
TIMM_CASES = {  # name -> the activation class that must survive folding
    "mobilenetv2_100": nn.ReLU6,  # BatchNormAct2d(act=ReLU6)
    "resnet18": nn.ReLU,  # plain BatchNorm2d + separate ReLU
    "efficientnet_b0": nn.SiLU,  # BatchNormAct2d(act=SiLU)
}


@pytest.mark.parametrize("name", sorted(TIMM_CASES))
def test_timm_models_fold_every_norm(name):
    model = randomize_bn_(timm.create_model(name, pretrained=False, num_classes=10).eval(), seed=1)
    x, other = image(2, seed=0), image(3, seed=5)
    act = TIMM_CASES[name]
    n_bn = n_norms(model)
    n_act = sum(isinstance(m, act) for m in model.modules())
    assert n_bn > 10 and n_act > 0
    convs_before = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    expected, expected_other = run(model, x), run(model, other)

    report = fg.fold_batchnorm(model, x)

    assert len(report.folded) == n_bn, str(report)
    assert not report.skipped
    assert len(set(report.folded.values())) == n_bn  # one norm per producer
    assert n_norms(model) == 0
    assert sum(isinstance(m, act) for m in model.modules()) == n_act
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert all(m.bias is not None for m in convs.values())
    for producer in report.folded.values():  # the affine map went into the weights
        assert not torch.equal(convs[producer].weight, convs_before[producer])
    assert getattr(model, FOLDED_ATTR) == sorted(report.folded)
    assert report.max_abs_diff is not None and report.max_abs_diff <= RTOL
    assert not model.training
    assert rel_diff(expected, run(model, x)) < RTOL
    assert rel_diff(expected_other, run(model, other)) < RTOL  # not only on the example inputs


def test_batchnormact_keeps_its_activation_after_the_fold():
    model = timm.create_model("mobilenetv2_100", pretrained=False, num_classes=10).eval()
    norm = model.bn1
    assert type(norm).__name__ == "BatchNormAct2d"
    act = norm.act
    fg.fold_batchnorm(randomize_bn_(model), image(1))
    assert isinstance(model.bn1, nn.Sequential) and list(model.bn1._modules) == ["drop", "act"]
    assert model.bn1.act is act and isinstance(act, nn.ReLU6)


def test_channels_last_after_folding_matches():
    model = randomize_bn_(timm.create_model("resnet18", pretrained=False, num_classes=10).eval(), seed=2)
    reference = copy.deepcopy(model)
    x = image(2, seed=3)
    fg.fold_batchnorm(model, x)
    model = model.to(memory_format=torch.channels_last)
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    got = run(model, x.contiguous(memory_format=torch.channels_last))
    assert rel_diff(run(reference, x), got) < RTOL


def test_model_in_training_mode_is_folded_with_its_running_statistics():
    model = randomize_bn_(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())).train()
    x = image(4, 16)
    expected = run(copy.deepcopy(model).eval(), x)
    report = fg.fold_batchnorm(model, x)
    assert report.folded == {"1": "0"} and not model.training
    assert rel_diff(expected, run(model, x)) < RTOL


# ------------------------------------------------------------------------------------------- what stays
def test_norm_whose_input_is_also_read_elsewhere_is_kept():
    def forward(s, x):
        x = s.stem(x)
        y = s.conv(x)
        return s.bn(y) + y  # the residual reads the conv output too

    model = Lambda(forward, stem=stem(), conv=nn.Conv2d(4, 4, 3, padding=1), bn=nn.BatchNorm2d(4))
    report, _, _ = fold_checked(model, image(2, 16))
    assert report.folded == {"stem.1": "stem.0"}
    assert "also read elsewhere" in report.skipped["bn"]
    assert isinstance(model.bn, nn.BatchNorm2d) and model.conv.bias is not None


@pytest.mark.parametrize("how", ["functional", "module", "method"])
def test_in_place_op_between_conv_and_norm_is_not_folded(how):
    relu = {"functional": lambda s, y: F.relu(y, inplace=True), "module": lambda s, y: s.act(y),
            "method": lambda s, y: y.relu_()}[how]

    def forward(s, x):
        return s.bn(relu(s, s.conv(s.stem(x))))

    model = Lambda(forward, stem=stem(), conv=nn.Conv2d(4, 4, 3, padding=1), act=nn.ReLU(inplace=True),
                   bn=nn.BatchNorm2d(4))
    report, _, _ = fold_checked(model, image(2, 16))
    assert list(report.folded) == ["stem.1"]
    assert "bn" in report.skipped and isinstance(model.bn, nn.BatchNorm2d)


def test_conv_called_twice_is_not_folded():
    def forward(s, x):
        x = s.stem(x)
        return s.bn(s.conv(s.conv(x)))  # shared conv: its second output feeds the norm

    model = Lambda(forward, stem=stem(), conv=nn.Conv2d(4, 4, 3, padding=1), bn=nn.BatchNorm2d(4))
    report, _, _ = fold_checked(model, image(2, 16))
    assert list(report.folded) == ["stem.1"]
    assert "called more than once" in report.skipped["bn"]


def test_conv_weight_shared_with_another_module_is_not_folded():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    twin = nn.Conv2d(4, 4, 3, padding=1)
    twin.weight = conv.weight  # tied: folding into one would change the other

    def forward(s, x):
        x = s.stem(x)
        return s.bn(s.conv(x)) + s.twin(x)

    model = Lambda(forward, stem=stem(), conv=conv, twin=twin, bn=nn.BatchNorm2d(4))
    report, _, _ = fold_checked(model, image(2, 16))
    assert list(report.folded) == ["stem.1"]
    assert "shares its weight" in report.skipped["bn"]


def test_norm_called_twice_is_not_folded():
    def forward(s, x):
        x = s.stem(x)
        return s.bn(s.conv_a(x)) + s.bn(s.conv_b(x))

    model = Lambda(forward, stem=stem(), conv_a=nn.Conv2d(4, 4, 1), conv_b=nn.Conv2d(4, 4, 1),
                   bn=nn.BatchNorm2d(4))
    report, _, _ = fold_checked(model, image(2, 16))
    assert list(report.folded) == ["stem.1"]
    assert "called more than once" in report.skipped["bn"]
    assert model.conv_a.bias is not None and isinstance(model.bn, nn.BatchNorm2d)


def test_norm_without_running_statistics_is_not_folded():
    def forward(s, x):
        return s.bn(s.conv(s.stem(x)))

    model = Lambda(forward, stem=stem(), conv=nn.Conv2d(4, 4, 1), bn=nn.BatchNorm2d(4, track_running_stats=False))
    report, _, _ = fold_checked(model, image(2, 16))
    assert list(report.folded) == ["stem.1"]
    assert "batch statistics" in report.skipped["bn"]


def test_norm_not_run_on_the_example_inputs_is_kept():
    def forward(s, x):
        return s.stem(x)

    model = Lambda(forward, stem=stem(), conv=nn.Conv2d(4, 4, 1), bn=nn.BatchNorm2d(4))
    report, _, _ = fold_checked(model, image(2, 16))
    assert list(report.folded) == ["stem.1"]
    assert "not run" in report.skipped["bn"]


def test_linear_then_batchnorm1d_folds_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 5, bias=False),
                          nn.BatchNorm1d(5, affine=False))
    x = torch.randn(7, 6)
    report, expected, got = fold_checked(model, x)
    assert report.folded == {"1": "0", "4": "3"}
    assert isinstance(model[1], nn.Identity) and isinstance(model[4], nn.Identity)
    assert model[3].bias is not None
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_linear_on_3d_input_is_not_folded_into_a_norm_over_dim_1():
    torch.manual_seed(0)
    # (B, T=8, 6) -> Linear -> (B, 8, 8): BatchNorm1d(8) normalises dim 1 (T), which has the Linear's width
    direct = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8))
    report, _, _ = fold_checked(direct, torch.randn(3, 8, 6))
    assert not report.folded and "3-d input" in report.skipped["1"]
    assert isinstance(direct[1], nn.BatchNorm1d)

    def forward(s, x):
        return s.bn(s.fc(x).transpose(1, 2))  # channels to dim 1: the norm reads the transpose

    transposed = Lambda(forward, fc=nn.Linear(6, 8), bn=nn.BatchNorm1d(8))
    report, _, _ = fold_checked(transposed, torch.randn(3, 5, 6))
    assert not report.folded and "bn" in report.skipped


class PlusOneBN(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) + 1


class PlainSubclassBN(nn.BatchNorm2d):
    """Changes nothing about the computation: may be folded like a BatchNorm2d."""


def test_batchnorm_subclasses():
    def forward(s, x):
        x = s.stem(x)
        return s.bn_plus(s.conv_a(x)) + s.bn_plain(s.conv_b(x))

    model = Lambda(forward, stem=stem(), conv_a=nn.Conv2d(4, 4, 1), bn_plus=PlusOneBN(4),
                   conv_b=nn.Conv2d(4, 4, 1), bn_plain=PlainSubclassBN(4))
    report, _, _ = fold_checked(model, image(2, 16))
    assert report.folded == {"stem.1": "stem.0", "bn_plain": "conv_b"}
    assert "BN_FOLD" in report.skipped["bn_plus"] and "overrides forward" in report.skipped["bn_plus"]
    assert isinstance(model.bn_plus, PlusOneBN) and isinstance(model.bn_plain, nn.Identity)


def test_conv_subclass_with_its_own_forward_is_not_folded():
    def forward(s, x):
        return s.bn(s.conv(s.stem(x)))

    model = Lambda(forward, stem=stem(), conv=timm.layers.StdConv2d(4, 4, 3), bn=nn.BatchNorm2d(4))
    report, _, _ = fold_checked(model, image(2, 16))
    assert list(report.folded) == ["stem.1"]
    assert "not a plain Conv" in report.skipped["bn"]
    assert model.conv.bias is None and isinstance(model.bn, nn.BatchNorm2d)


class _DoubledConv(nn.Conv2d):
    """Overrides only ``_conv_forward``: the weight it applies is not ``self.weight``."""

    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x, 2 * weight, bias)


def test_conv_overriding_conv_forward_is_not_a_producer():
    def forward(s, x):
        return s.bn(s.conv(s.stem(x)))

    model = Lambda(forward, stem=stem(), conv=_DoubledConv(4, 4, 3), bn=nn.BatchNorm2d(4))
    report, _, _ = fold_checked(model, image(2, 16))
    assert list(report.folded) == ["stem.1"]
    assert "not a plain Conv" in report.skipped["bn"]


# ------------------------------------------------------------------------------------------- refusals
def test_fermi_gated_model_is_refused_untouched():
    model = randomize_bn_(SmallCNN().eval())
    x = torch.randn(2, 3, 6, 6)
    fg.convert_to_fermi(model, fg.FermiConfig(granularity="channel"), example_inputs=x)
    before = state_of(model)
    with pytest.raises(ValueError, match="Fermi-gated"):
        fg.fold_batchnorm(model, x)
    assert_unchanged(model, before)


def test_missing_example_inputs_are_refused_untouched():
    model = randomize_bn_(SmallCNN().eval())
    before = state_of(model)
    with pytest.raises(ValueError, match="example_inputs"):
        fg.fold_batchnorm(model, None)
    assert_unchanged(model, before)


def test_failed_output_check_undoes_everything(monkeypatch):
    model = randomize_bn_(timm.create_model("mobilenetv2_100", pretrained=False, num_classes=10).eval())
    x = image(1)
    expected = run(model, x)
    before, norms = state_of(model), n_norms(model)
    monkeypatch.setattr("fermigates.surgery.fold.max_relative_diff", lambda a, b: 1.0)
    with pytest.raises(RuntimeError, match="restored"):
        fg.fold_batchnorm(model, x)
    assert_unchanged(model, before)
    assert torch.equal(run(model, x), expected)
    monkeypatch.undo()
    assert len(fg.fold_batchnorm(model, x).folded) == norms  # the restored model still folds, all of it
    assert n_norms(model) == 0 and rel_diff(expected, run(model, x)) < RTOL


def test_error_in_the_middle_of_folding_undoes_everything(monkeypatch):
    from fermigates.surgery import fold

    model = randomize_bn_(timm.create_model("resnet18", pretrained=False, num_classes=10).eval())
    x = image(1)
    before = state_of(model)
    calls = []
    real = fold._fold_into

    def failing(producer, norm):
        calls.append(1)
        if len(calls) == 5:
            raise KeyError("boom")
        real(producer, norm)

    monkeypatch.setattr(fold, "_fold_into", failing)
    with pytest.raises(KeyError, match="boom"):
        fg.fold_batchnorm(model, x)
    assert len(calls) == 5
    assert_unchanged(model, before)


# ------------------------------------------------------------------------------------------- checkpoints
def test_save_shrunk_refuses_a_folded_model(tmp_path):
    model = randomize_bn_(timm.create_model("resnet18", pretrained=False, num_classes=10).eval())
    fg.fold_batchnorm(model, image(1))
    with pytest.raises(ValueError, match="fold_batchnorm"):
        fg.save_shrunk(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="fold_batchnorm"):
        fg.save_shrunk(copy.deepcopy(model), tmp_path / "out")


def test_prune_save_load_then_fold(tmp_path):
    def build():
        return timm.create_model("mobilenetv2_100", pretrained=False, num_classes=10)

    model = randomize_bn_(build().eval(), seed=3)
    calib = image(4, seed=1)
    report = fg.prune(model, calib.split(2), fg.FermiConfig(granularity="channel"), target_sparsity=0.3,
                      progress=False)
    assert report.shrunk
    fg.save_shrunk(model, tmp_path)
    loaded = fg.load_shrunk(build(), tmp_path).eval()
    assert loaded.conv_stem.out_channels < build().conv_stem.out_channels  # the shrunk widths
    x = image(2, seed=7)
    expected = run(loaded, x)
    assert torch.equal(expected, run(model.eval(), x))
    norms = n_norms(loaded)
    folded = fg.fold_batchnorm(loaded, x)
    assert norms > 0 and len(folded.folded) == norms and not folded.skipped and n_norms(loaded) == 0
    assert rel_diff(expected, run(loaded, x)) < RTOL
    with pytest.raises(ValueError, match="fold_batchnorm"):
        fg.save_shrunk(loaded, tmp_path / "again")


# ------------------------------------------------------------------------------- shared outputs, ranks
def test_two_norms_reading_one_conv_output_are_skipped():
    def forward(s, x):
        x = s.stem(x)
        y = s.conv(x)
        return s.bn_a(y) + s.bn_b(y)

    model = Lambda(forward, stem=stem(), conv=nn.Conv2d(4, 4, 1), bn_a=nn.BatchNorm2d(4), bn_b=nn.BatchNorm2d(4))
    report, _, _ = fold_checked(model, image(2, 16))
    assert list(report.folded) == ["stem.1"]
    assert {"bn_a", "bn_b"} <= set(report.skipped)


def test_unbatched_conv_into_batchnorm1d_is_skipped():
    model = nn.Sequential(nn.Conv1d(4, 6, 1), nn.BatchNorm1d(6))
    report, _, _ = fold_checked(model, torch.randn(4, 6))  # unbatched: C=4, L=6
    assert "1" in report.skipped
