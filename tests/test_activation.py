"""The activation-gating method: the units and their formulas, exact conversion, the annealer's schedule and
budgets, the bake's merges, and checkpoints / ONNX of merged models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fermigates as fg
from fermigates.core.state import find_state
from fermigates.core.twin import is_twin
from fermigates.methods.activation import (
    ActivationAnnealer,
    PaActivation,
    PaGELU,
    PaGLU,
    PaGTU,
    PaMishU,
    PaReGLU,
    PaSwishU,
    PaUnit,
    set_alpha,
)
from fermigates.methods.activation.model import units
from fermigates.methods.registry import get_method
from fermigates.surgery.merge import BorderBiasConv2d

X = torch.linspace(-6, 6, 241).reshape(1, -1)
ACTIVATIONS = [nn.ReLU(), nn.ReLU6(), nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU(), nn.Hardswish(), nn.Mish(),
               nn.Tanh(), nn.Sigmoid(), nn.LeakyReLU(0.1), nn.ELU(), nn.Softplus(), nn.Hardtanh()]


def _config(**kw) -> fg.FermiConfig:
    return fg.FermiConfig(method="activation", granularity=kw.pop("granularity", "unit"), **kw)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).abs().max() / b.detach().abs().max().clamp_min(1e-12))


# -- the units ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,gate", [(PaGLU, torch.sigmoid), (PaGTU, torch.tanh), (PaReGLU, F.relu),
                                      (PaGELU, F.gelu), (PaMishU, F.mish), (PaSwishU, F.silu)])
@pytest.mark.parametrize("a", [0.0, 0.3, 0.75, 1.0])
def test_each_named_unit_is_its_pagating_formula(cls, gate, a):
    unit = cls(alpha=a)
    expected = X * (a * gate(X) + (1 - a))
    assert torch.allclose(unit(X), expected, rtol=1e-6, atol=1e-6)
    if a == 1.0:
        assert torch.equal(unit(X), X * gate(X))  # the original gated unit, bit for bit
    if a == 0.0:
        assert torch.equal(unit(X), X)  # the identity


def test_paglu_at_one_is_silu_and_the_quoted_swish_form_is_not_an_identity():
    assert torch.allclose(PaGLU(alpha=1.0)(X), F.silu(X), atol=1e-6)
    wrong = X * (0.0 * torch.sigmoid(X) + (1 - 0.0) * X)  # x * (a sigmoid(x) + (1 - a) x) at a = 0
    assert torch.allclose(wrong, X * X) and not torch.allclose(wrong, X)


@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda m: repr(m))
def test_the_generic_unit_is_a_act_plus_one_minus_a_x(act):
    for a in (0.0, 0.4, 1.0):
        unit = PaUnit(act, alpha=a)
        assert torch.allclose(unit(X), a * act(X) + (1 - a) * X, rtol=1e-6, atol=1e-6)
    assert torch.equal(PaUnit(act, alpha=1.0)(X), act(X)) and torch.equal(PaUnit(act, alpha=0.0)(X), X)
    f = PaUnit(torch.tanh, alpha=0.5)  # any callable
    assert torch.allclose(f(X), 0.5 * torch.tanh(X) + 0.5 * X)


def test_learnable_and_per_channel_alpha():
    unit = PaUnit(nn.ReLU(), alpha=1.0, mode="learnable", channels=3, axis=1)
    x = torch.randn(2, 3, 4, 4)
    unit(x).sum().backward()
    assert unit.alpha.grad is not None and unit.alpha.grad.shape == (3,)
    unit.set_alpha(torch.tensor([0.0, 0.5, 1.0]))
    out = unit(x)
    assert torch.equal(out[:, 0], x[:, 0]) and torch.equal(out[:, 2], F.relu(x[:, 2]))
    with pytest.raises(ValueError, match="alpha"):
        PaUnit(nn.ReLU(), alpha=1.5)
    with pytest.raises(ValueError, match="alpha mode"):
        PaUnit(nn.ReLU(), mode="sometimes")


# -- conversion -----------------------------------------------------------------------------------------------------
class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.acts = nn.ModuleList([nn.ReLU(inplace=True), nn.ReLU6(inplace=True), nn.Hardswish(), nn.Mish()])
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)
        self.gelu, self.silu, self.tanh = nn.GELU(), nn.SiLU(inplace=True), nn.Tanh()

    def forward(self, x):
        x = self.bn(self.conv(x))
        for act in self.acts:
            x = act(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        x = self.silu(self.gelu(self.fc1(x)))
        return torch.sigmoid(self.fc2(self.tanh(x)))  # sigmoid as a function: reported, not converted


def test_conversion_computes_the_original_network_exactly_and_reports_functions():
    torch.manual_seed(0)
    model, x = Mixed().eval(), torch.randn(2, 3, 8, 8)
    ref = model(x)
    fg.convert_to_fermi(model, _config(), example_inputs=x)
    assert len(units(model)) == 7 and torch.equal(model(x), ref)
    skipped = dict(fg.summary(model).skipped)
    assert "sigmoid called as a function in Mixed.forward" in skipped["<model>"]
    # an in-place activation does not write the input the blend reads
    set_alpha(model, 0.5)
    y = model(x)
    assert torch.isfinite(y).all()
    with torch.no_grad(), get_method("activation").dense(model):
        assert torch.equal(model(x), ref)


def test_a_unit_at_zero_is_the_identity_and_per_channel_units_find_their_axis():
    torch.manual_seed(0)
    model, x = Mixed().eval(), torch.randn(2, 3, 8, 8)
    fg.convert_to_fermi(model, _config(granularity="channel"), example_inputs=x)
    found = units(model)
    assert found["acts.0"].pa_alpha.shape == (8,) and found["acts.0"].pa_axis == 1
    assert found["gelu"].pa_alpha.shape == (16,) and found["gelu"].pa_axis == -1
    set_alpha(model, {"acts.0": 0.0})
    probe = torch.randn(2, 8, 5, 5)
    assert torch.equal(found["acts.0"](probe), probe)


def test_timm_and_transformers_activation_modules_are_converted():
    timm = pytest.importorskip("timm")
    tf = pytest.importorskip("transformers")
    model = timm.create_model("mobilenetv2_035", pretrained=False, num_classes=5).eval()
    x = torch.randn(1, 3, 32, 32)
    ref = model(x)
    fg.convert_to_fermi(model, _config(), example_inputs=x)
    assert len(units(model)) == sum(1 for _ in units(model)) >= 30 and torch.equal(model(x), ref)
    cfg = tf.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, hidden_act="gelu_new")
    bert = tf.BertModel(cfg).eval()
    ids = torch.randint(0, 50, (1, 6))
    ref = bert(input_ids=ids).last_hidden_state
    fg.convert_to_fermi(bert, _config(), example_inputs={"input_ids": ids})
    assert list(units(bert)) == ["encoder.layer.0.intermediate.intermediate_act_fn", "pooler.activation"]
    assert torch.equal(bert(input_ids=ids).last_hidden_state, ref)


def test_bad_options_name_the_field_and_leave_the_model_unconverted():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    for options, field in (({"alpha": "soon"}, "alpha"), ({"merge": "maybe"}, "merge"), ({"keep": "x"}, "keep"),
                           ({"n_remove": -1}, "n_remove"), ({"alpha_init": 2.0}, "alpha_init")):
        with pytest.raises(ValueError, match=field):
            fg.convert_to_fermi(model, _config(method_options=options), example_inputs=torch.randn(1, 4))
    with pytest.raises(ValueError, match="granularity"):
        fg.FermiConfig(method="activation", granularity="weight").validate()
    with pytest.raises(ValueError, match="example_inputs"):
        fg.convert_to_fermi(model, _config(granularity="channel"))
    assert find_state(model) is None and not any(is_twin(m) for m in model.modules())


# -- training and baking --------------------------------------------------------------------------------------------
def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64), nn.SiLU(),
                         nn.Linear(64, 4)).eval()


def _train(model, x, steps, **kw):
    target = model(x).detach()
    opt = fg.make_optimizer(model, lr=1e-3, total_steps=steps, **kw)
    for _ in range(steps):
        loss = (model(x) - target).pow(2).mean() + opt.sparsity_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt


def test_the_annealer_fades_the_chosen_units_and_freezes_before_the_end():
    model, x = _mlp(), torch.randn(32, 8)
    fg.convert_to_fermi(model, _config(target_sparsity=0.7), example_inputs=x)
    opt = fg.make_optimizer(model, lr=1e-3, total_steps=20)
    assert isinstance(opt, ActivationAnnealer) and opt.hard_step == 14 and not opt.decided
    alphas = []
    for _ in range(20):
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        alphas.append(sorted(float(u.pa_alpha) for u in units(model).values()))
    assert alphas[0] == [1.0, 1.0, 1.0] and alphas[-1] == [0.0, 0.0, 1.0]  # floor(0.7 * 3) = 2 removed
    assert any(0 < a < 1 for row in alphas for a in row)  # faded, not cut
    assert opt.decided and get_method("activation").undecided_units(model) == 0
    state = opt.state_dict()
    again = _mlp()
    fg.convert_to_fermi(again, _config(target_sparsity=0.7), example_inputs=x)
    resumed = fg.make_optimizer(again, lr=1e-3, total_steps=20)
    resumed.load_state_dict(state)
    assert [u.pa_removed for u in units(again).values()] == [u.pa_removed for u in units(model).values()]


def test_learnable_alpha_has_a_sparsity_term_and_fixed_alpha_is_left_alone():
    model, x = _mlp(), torch.randn(16, 8)
    fg.convert_to_fermi(model, _config(method_options={"alpha": "learnable"}, target_sparsity=0.5),
                        example_inputs=x)
    opt = fg.make_optimizer(model, lr=1e-2, total_steps=10)
    seen = False
    for _ in range(10):
        term = opt.sparsity_loss()
        seen = seen or term.requires_grad
        loss = model(x).pow(2).mean() + term
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert seen and opt.sparsity_loss().requires_grad is False
    fixed = _mlp()
    fg.convert_to_fermi(fixed, _config(method_options={"alpha": "fixed"}), example_inputs=x)
    set_alpha(fixed, {"1": 0.0, "3": 0.5})
    opt = _train(fixed, x, 4)
    assert opt.decided and [float(u.pa_alpha) for u in units(fixed).values()] == [0.0, 0.5, 1.0]


@pytest.mark.parametrize("budget", ["macs:0.5", "params:0.5", "units:0.4"])
def test_budgets_in_users_terms(budget):
    model, x = _mlp(), torch.randn(16, 8)
    fg.convert_to_fermi(model, _config(budget=budget), example_inputs=x)
    opt = _train(model, x, 12)
    removed = [n for n, u in units(model).items() if u.pa_removed]
    report = fg.convert_from_fermi(model)
    if budget == "units:0.4":
        assert len(removed) == 1  # keep 40% of 3 -> remove floor(0.6 * 3)
    else:
        kind = budget.split(":")[0]
        kept = report.macs_after / report.macs_before if kind == "macs" else report.params_after / report.params_before
        assert opt.budget_result.predicted <= 0.5 and kept <= 0.5 + 1e-9
        assert abs(kept - opt.budget_result.predicted) < 0.02


def test_n_remove_counts_activations():
    model, x = _mlp(), torch.randn(16, 8)
    fg.convert_to_fermi(model, _config(method_options={"n_remove": 1}), example_inputs=x)
    _train(model, x, 6)
    assert sum(u.pa_removed for u in units(model).values()) == 1


def test_latency_budget_measures_baked_candidates():
    torch.manual_seed(0)  # each merge of 256 -> 2048 -> 256 into 256 -> 256 saves 8x its MACs
    model = nn.Sequential(*[m for _ in range(3) for m in (nn.Linear(256, 2048), nn.ReLU(), nn.Linear(2048, 256))],
                          nn.Linear(256, 4)).eval()
    x = torch.randn(64, 256)
    fg.convert_to_fermi(model, _config(budget="latency:0.7"), example_inputs=x)
    opt = _train(model, x, 6)
    result = opt.budget_result
    assert result.kind == "latency" and result.requested == 0.7 and result.predicted <= 0.7
    assert sum(u.pa_removed for u in units(model).values()) >= 1


# -- merges, checkpoints and ONNX -----------------------------------------------------------------------------------
class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 12, 1), nn.BatchNorm2d(12), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        return self.head(self.features(x))


class IRNet(nn.Module):
    """A stem and two MobileNetV2-style inverted residual blocks (ReLU6 inside, the second with its skip)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6())
        self.blocks = nn.ModuleList([self._block(8, 12, 2), self._block(12, 12, 1)])
        self.head = nn.Linear(12, 5)

    @staticmethod
    def _block(c, out, stride):
        m = c * 6
        return nn.ModuleDict(dict(pw=nn.Conv2d(c, m, 1, bias=False), bn1=nn.BatchNorm2d(m), act1=nn.ReLU6(),
                                  dw=nn.Conv2d(m, m, 3, stride, 1, groups=m, bias=False), bn2=nn.BatchNorm2d(m),
                                  act2=nn.ReLU6(), pwl=nn.Conv2d(m, out, 1, bias=False), bn3=nn.BatchNorm2d(out)))

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            y = b["bn3"](b["pwl"](b["act2"](b["bn2"](b["dw"](b["act1"](b["bn1"](b["pw"](x))))))))
            x = x + y if y.shape == x.shape else y
        return self.head(x.mean((2, 3)))


def _randomised(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(5)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model.eval()


def _removed_and_baked(factory, x, names, tmp_path, **options):
    torch.manual_seed(0)
    model = _randomised(factory())
    fg.convert_to_fermi(model, _config(method_options={"alpha": "fixed", **options}), example_inputs=x)
    set_alpha(model, {n: 0.0 for n in names})
    with torch.no_grad(), get_method("activation").decided(model):
        expected = model(x)
    report = fg.convert_from_fermi(model)
    with torch.no_grad():
        got = model(x)
    assert _rel(got, expected) < 1e-5
    fg.save_shrunk(model, tmp_path / "ckpt")
    loaded = fg.load_shrunk(factory(), tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), got)
    ort = pytest.importorskip("onnxruntime")
    path = fg.export_onnx(loaded, x, tmp_path / "model.onnx")
    session = ort.InferenceSession(str(path))
    onnx_out = session.run(None, {"input": x.numpy()})[0]
    assert _rel(torch.from_numpy(onnx_out), got) < 1e-5
    return model, report


def _linear_layers(model: nn.Module) -> int:
    return sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in model.modules())


def test_an_mlp_whose_units_reach_zero_merges_to_fewer_layers(tmp_path):
    x = torch.randn(8, 8)
    model, report = _removed_and_baked(_mlp, x, ["1", "3", "5"], tmp_path)
    assert _linear_layers(model) == 1 and report.merges.layers_removed == 3
    assert report.macs_after < report.macs_before and report.params_after < report.params_before


def test_a_small_cnn_whose_units_reach_zero_merges_to_fewer_layers(tmp_path):
    x = torch.randn(2, 3, 10, 10)
    model, report = _removed_and_baked(SmallCNN, x, ["features.2", "features.5"], tmp_path, merge="always")
    assert _linear_layers(model) == 2 and isinstance(model.features[0], BorderBiasConv2d)


def test_inverted_residual_blocks_merge_into_dense_convs(tmp_path):
    x = torch.randn(2, 3, 12, 12)
    names = [f"blocks.{i}.{a}" for i in (0, 1) for a in ("act1", "act2")]
    model, report = _removed_and_baked(IRNet, x, names, tmp_path)
    assert _linear_layers(model) == 4 and report.merges.layers_removed == 4
    for b in model.blocks:
        assert isinstance(b["pw"], BorderBiasConv2d) and b["pw"].kernel_size == (3, 3)
        assert all(isinstance(b[k], nn.Identity) for k in ("dw", "pwl", "bn1", "bn2", "bn3", "act1", "act2"))
    assert report.macs_after < report.macs_before


def test_a_timm_mobilenetv2_block_merges_and_reloads_into_the_stock_class(tmp_path):
    timm = pytest.importorskip("timm")
    x = torch.randn(1, 3, 32, 32)
    factory = lambda: timm.create_model("mobilenetv2_035", pretrained=False, num_classes=5).eval()  # noqa: E731
    names = ["blocks.2.0.bn1.act", "blocks.2.0.bn2.act", "blocks.2.1.bn1.act", "blocks.2.1.bn2.act"]
    model, report = _removed_and_baked(factory, x, names, tmp_path)
    assert {m.name for m in report.merges.merged} == {"blocks.2.0.conv_pw", "blocks.2.1.conv_pw"}


def test_kept_units_with_learned_alpha_bake_to_pa_activation_and_reload_with_fermigates(tmp_path):
    model, x = _mlp(), torch.randn(4, 8)
    fg.convert_to_fermi(model, _config(method_options={"alpha": "fixed", "keep": "learned"}), example_inputs=x)
    set_alpha(model, {"1": 0.0, "3": 0.5})
    with torch.no_grad(), get_method("activation").decided(model):
        expected = model(x)
    fg.convert_from_fermi(model)
    assert isinstance(model[3], PaActivation) and torch.allclose(model(x), expected, rtol=1e-5, atol=1e-6)
    fg.save_shrunk(model, tmp_path / "c")
    loaded = fg.load_shrunk(_mlp(), tmp_path / "c")
    assert isinstance(loaded[3], PaActivation) and torch.equal(loaded(x), model(x))


def test_fine_tune_trains_removes_and_the_report_lists_the_merges():
    model, x = _mlp(), torch.randn(64, 8)
    data = [(x[i:i + 16], torch.randint(0, 4, (16,))) for i in range(0, 64, 16)]
    fg.convert_to_fermi(model, _config(method_options={"n_remove": 3}), example_inputs=x[:2])
    log = fg.fine_tune(model, data, steps=12, lr=1e-3, progress=False)
    assert log.rows and all(u.pa_removed for u in units(model).values())
    report = fg.convert_from_fermi(model)
    assert "merged" in str(report) and "merged layers:" in report.full()
    assert _linear_layers(model) == 1


def test_calibration_refits_the_layer_after_a_removed_activation_before_merging():
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    dense = _mlp()
    ref = dense(x).detach()
    errors = {}
    for calibrate in (False, True):
        model = copy.deepcopy(dense)
        fg.convert_to_fermi(model, _config(method_options={"alpha": "fixed"}), example_inputs=x[:2])
        set_alpha(model, {"3": 0.0})
        report = fg.convert_from_fermi(model, calibration_data=[x[:128], x[128:]] if calibrate else None)
        if calibrate:
            assert [row.name for row in report.calibration.layers] == ["4"]  # the reader of the removed GELU
        assert [m.members for m in report.merges.merged] == [["2", "4"]]
        errors[calibrate] = float((model(x) - ref).pow(2).mean() / ref.pow(2).mean())
    assert errors[True] < 0.5 * errors[False]


def test_a_merged_bert_reloads_from_its_folder_alone(tmp_path):
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64)
    model = tf.BertModel(cfg).eval()
    ids = torch.randint(0, 60, (2, 7))
    fg.convert_to_fermi(model, _config(target_modules=r".*intermediate_act_fn", method_options={"alpha": "fixed"}),
                        example_inputs={"input_ids": ids})
    set_alpha(model, 0.0)
    report = fg.convert_from_fermi(model)
    assert [m.members[-1] for m in report.merges.merged] == [f"encoder.layer.{i}.output.dense" for i in (0, 1)]
    layer = model.encoder.layer[0]
    assert (layer.intermediate.dense.in_features, layer.intermediate.dense.out_features) == (16, 16)
    fg.save_shrunk(model, tmp_path / "bert")
    loaded = fg.from_pretrained(tmp_path / "bert")
    assert type(loaded) is type(model) and isinstance(loaded.encoder.layer[1].output.dense, nn.Identity)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state)


def test_removed_blocks_and_merged_layers_share_one_checkpoint(tmp_path):
    """A BERT with a block removed (depth record) and its MLPs merged (replaced record) reloads into a stock model
    built at the original depth; a load that fails leaves that model as it was."""
    tf = pytest.importorskip("transformers")

    def bert(seed):
        torch.manual_seed(seed)
        return tf.BertModel(tf.BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                          intermediate_size=64)).eval()

    model = bert(0)
    ids = torch.randint(0, 60, (2, 7))
    fg.remove_blocks(model, [1])
    fg.convert_to_fermi(model, _config(target_modules=r".*intermediate_act_fn", method_options={"alpha": "fixed"}),
                        example_inputs={"input_ids": ids})
    set_alpha(model, 0.0)
    report = fg.convert_from_fermi(model)
    assert [m.members[-1] for m in report.merges.merged] == [f"encoder.layer.{i}.output.dense" for i in (0, 1)]
    fg.save_shrunk(model, tmp_path / "bert")
    loaded = fg.load_shrunk(bert(1), tmp_path / "bert")
    assert len(loaded.encoder.layer) == 2 and isinstance(loaded.encoder.layer[1].output.dense, nn.Identity)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state)
    # a flipped bit in a tensor (found after the blocks are removed and the merged layers put in place): the stock
    # model keeps its depth, its modules and its weights
    weights = tmp_path / "bert" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x10
    weights.write_bytes(bytes(data))
    stock = bert(1)
    before = {k: v.clone() for k, v in stock.state_dict().items()}
    with pytest.raises(fg.CheckpointError, match="SHA-256|checksum"):
        fg.load_shrunk(stock, tmp_path / "bert")
    assert len(stock.encoder.layer) == 3 and stock.config.num_hidden_layers == 3
    assert not isinstance(stock.encoder.layer[0].output.dense, nn.Identity)
    assert stock.encoder.layer[0].intermediate.dense.out_features == 64
    assert stock.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in stock.state_dict().items())


# -- the command line ------------------------------------------------------------------------------------------------
def test_the_activation_recipe_runs_end_to_end_from_the_command_line(tmp_path):
    """``fermigates prune activation_cnn`` on a tiny timm inverted-residual net: activations removed, blocks merged,
    the report names both, and the saved model reloads into the stock class with the same outputs."""
    import json
    import os
    import subprocess
    import sys

    import numpy as np

    timm = pytest.importorskip("timm")
    rng = np.random.default_rng(0)
    data = tmp_path / "data.npz"
    np.savez(data, x=rng.standard_normal((24, 3, 32, 32)).astype("float32"), y=rng.integers(0, 5, 24))
    out = tmp_path / "out"
    args = ["prune", "activation_cnn", "--model", "timm:test_efficientnet", "--set", "model.kwargs={num_classes: 5}",
            "--set", "train.steps=4", "--set", "train.batch_size=4", "--set", "calibration.samples=8",
            "--set", r"convert.target_modules='blocks\.[1-4]\.\d+\.bn[12]\.act'", "--set", "convert.budget=latency:0.8",
            "--set", "export=[safetensors]", "--data", str(data), "--out", str(out)]
    run = subprocess.run([sys.executable, "-m", "fermigates.cli", *args], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads((out / "report.json").read_text())
    kept = report["kept"]["activation"]
    assert kept["kept"] < kept["total"]  # activations removed
    merged = report["merges"]["merged"]
    assert merged and all(len(m["members"]) >= 2 and m["across"] for m in merged)  # which layers merged, across what
    assert "merged" in run.stdout and "kept activations" in run.stdout
    stock = timm.create_model("test_efficientnet", pretrained=False, num_classes=5)
    loaded = fg.load_shrunk(stock, out)
    assert sum(p.numel() for p in loaded.parameters()) == report["params"]["after"]
    layers = sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in loaded.modules())
    fresh = sum(isinstance(m, (nn.Linear, nn.Conv2d))
                for m in timm.create_model("test_efficientnet", pretrained=False, num_classes=5).modules())
    assert layers == fresh - sum(len(m["members"]) - 1 for m in merged)
