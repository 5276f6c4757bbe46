"""The spectral method: the twin computes the layer it replaces, eigenvalue-only training moves only eigenvalues,
nodes ranked by eigenvalue are removed through the shared allocation and shrink, the shared-nodes rule, and the
seed's workflows (spectral_pretrain stops at max_delta, spectral_distill), recipes and the command line."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fermigates as fg
from fermigates.core.state import find_state
from fermigates.core.twin import is_twin
from fermigates.methods.registry import get_method, method_of
from fermigates.methods.spectral.layers import SpectralLinear, make_spectral
from fermigates.methods.spectral.optim import spectral_modules

SPECTRAL = "spectral"


def mlp(seed: int = 0, widths=(12, 32, 16, 4)) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def data(n: int = 64, seed: int = 1, features: int = 12, classes: int = 4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    return x, (x[:, :classes] + 0.3 * x[:, classes:2 * classes]).argmax(1)


def trained_mlp(seed: int = 0, steps: int = 60) -> nn.Sequential:
    """A small MLP trained in direct space (a pretrained network to convert)."""
    model = mlp(seed)
    x, y = data(256)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def config(**kw) -> fg.FermiConfig:
    kw.setdefault("target_sparsity", 0.5)
    return fg.FermiConfig(method=SPECTRAL, granularity="channel", **kw)


def convert(model: nn.Module, x=None, **kw) -> nn.Module:
    x = data(4)[0] if x is None else x
    return fg.convert_to_fermi(model, config(**kw), example_inputs=x[:1])


# -- the twin ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalize", [True, False])
def test_a_spectral_twin_computes_the_linear_it_replaces(normalize):
    torch.manual_seed(0)
    linear = nn.Linear(20, 7)
    with torch.no_grad():
        linear.weight[3] = 0  # a dead node
    x = torch.randn(5, 20)
    twin = make_spectral(linear, normalize=normalize)
    assert isinstance(twin, SpectralLinear) and isinstance(twin, nn.Linear)
    assert torch.allclose(twin(x), linear(x), rtol=1e-6, atol=1e-6)
    # w_ij = phi_ij (lambda_start_j - lambda_end_i), the papers' indexing
    w = twin.base * (twin.eig_start[None, :] - twin.eig_end[:, None])
    assert torch.allclose(twin.weight, w) and torch.allclose(twin.weight, linear.weight, atol=1e-7)
    assert torch.equal(twin.eig_start, torch.zeros(20))
    if normalize:  # unit eigenvector rows, end eigenvalues the incoming-weight norms (0 for the dead node)
        norms = linear.weight.detach().norm(dim=1)
        assert torch.allclose(twin.eig_end, norms)
        assert torch.allclose(twin.base.norm(dim=1)[norms > 0], torch.ones(6))
    else:  # the seed's initialisation: every end eigenvalue 1, phi = -W
        assert torch.equal(twin.eig_end, torch.ones(7)) and torch.equal(twin.base, -linear.weight)
    assert twin.bias is linear.bias  # shared; the linear itself is untouched
    assert set(twin.state_dict()) == {"weight", "bias", "eig_start", "eig_end"}
    assert twin.state_dict()["weight"] is not linear.weight
    plain = twin.to_plain()
    assert type(plain) is nn.Linear and torch.allclose(plain(x), linear(x), atol=1e-6)
    assert set(plain.state_dict()) == {"weight", "bias"}


def test_a_gpt2_conv1d_becomes_spectral_and_bakes_back():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    model = tf.GPT2Model(cfg).eval()
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    before = model(input_ids=ids).last_hidden_state
    fg.convert_to_fermi(model, config(), example_inputs={"input_ids": ids[:1]})
    twins = spectral_modules(model)
    assert any(type(t).__name__ == "SpectralConv1D" for t in twins.values())
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).last_hidden_state, before, rtol=1e-4, atol=1e-5)
        with method_of(model).decided(model):
            expected = model(input_ids=ids).last_hidden_state
    with pytest.warns(UserWarning, match="decided from the eigenvalues at the bake"):  # nothing was frozen
        report = fg.convert_from_fermi(model)
    assert report.shrunk and not any(is_twin(m) for m in model.modules())
    assert model.h[0].mlp.c_fc.nf == 64 and model.h[0].mlp.c_proj.nx == 64  # half of 4 x 32
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).last_hidden_state, expected, rtol=1e-4, atol=1e-5)


def test_a_pretrained_mlp_converts_with_the_same_outputs_and_only_linear_layers_become_spectral():
    model = trained_mlp()
    x, _ = data(32, seed=5)
    with torch.no_grad():
        before = model(x)
    convert(model)
    assert list(spectral_modules(model)) == ["0", "2", "4"]
    assert [len(g.judges) for g in method_of(model).record(model).groups] == [1, 1]  # the output stream is pinned
    with torch.no_grad():
        assert torch.allclose(model(x), before, rtol=1e-5, atol=1e-5)


def test_a_hf_encoder_converts_in_one_call_with_the_same_outputs():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    model = tf.BertModel(cfg).eval()
    ids = torch.randint(0, 99, (2, 10), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        before = model(**batch).last_hidden_state
    fg.convert_to_fermi(model, config())  # example inputs from the HF config
    labels = [g.label for g in method_of(model).record(model).groups]
    assert len(labels) == 2 and all("intermediate.dense" in label for label in labels)  # the MLP neurons
    with torch.no_grad():
        assert torch.allclose(model(**batch).last_hidden_state, before, rtol=1e-4, atol=1e-5)


def test_a_timm_vit_converts_in_one_call_and_prunes_its_mlp():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    fg.convert_to_fermi(model, config(), example_inputs=x[:1])
    with torch.no_grad():
        assert torch.allclose(model(x), before, rtol=1e-4, atol=1e-5)
    fg.spectral_prune(model)  # the config's share, frozen: the model now computes what the bake gives
    report = fg.convert_from_fermi(model, calibration_data=[x])
    assert report.trained_vs_baked == 0.0
    assert report.shrunk and model.blocks[0].mlp.fc1.out_features == model.blocks[0].mlp.fc2.in_features
    assert model.blocks[0].mlp.fc1.out_features == 384  # half of 768


def test_a_model_with_nothing_spectral_to_prune_is_left_as_it_was():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="nothing to convert.*spectral layers can judge"):
        fg.convert_to_fermi(model, config(), example_inputs=torch.randn(1, 3, 8, 8))
    assert find_state(model) is None and type(model[4]) is nn.Linear
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_options_are_checked_naming_the_field():
    with pytest.raises(ValueError, match="link_mode"):
        config(method_options={"link_mode": "xor"})
    with pytest.raises(TypeError, match="train_base"):
        config(method_options={"train_base": "yes"})
    with pytest.raises(ValueError, match="unknown method_options fields"):
        config(method_options={"train_everything": True})
    with pytest.raises(ValueError, match="granularity"):
        fg.FermiConfig(method=SPECTRAL, granularity="weight")


# -- training ------------------------------------------------------------------------------------------------------
def _train(model, opt, steps=10):
    x, y = data(64)
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_eigenvalue_only_training_moves_only_eigenvalues():
    model = convert(trained_mlp())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = fg.make_optimizer(model, lr=1e-2)
    assert [g["part"] for g in opt.param_groups] == ["end"]
    _train(model, opt)
    moved = sorted(k for k, v in model.state_dict().items() if not torch.equal(v, before[k]))
    assert moved == ["0.eig_end", "2.eig_end", "4.eig_end"]
    # the options pick the parts: start eigenvalues too
    model = convert(trained_mlp(), method_options={"train_start": True})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model, fg.make_optimizer(model, lr=1e-2))
    moved = sorted(k for k, v in model.state_dict().items() if not torch.equal(v, before[k]))
    assert moved == ["0.eig_end", "0.eig_start", "2.eig_end", "2.eig_start", "4.eig_end", "4.eig_start"]


def test_spectral_trainable_leaves_only_the_chosen_parts_requiring_grad():
    model = convert(trained_mlp())
    with fg.spectral_trainable(model):
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        assert names == ["0.eig_end", "2.eig_end", "4.eig_end"]
        _train(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1), steps=2)
    assert all(p.requires_grad for p in model.parameters())  # restored
    assert fg.spectral_parameters(model, base=True, end=False) == [model[0].base, model[2].base, model[4].base]


def test_the_method_optimizer_refuses_a_base_optimizer_and_fine_tune_trains_eigenvalues():
    model = convert(trained_mlp())
    with pytest.raises(ValueError, match="its own optimizer"):
        get_method(SPECTRAL).optimizer(model, base=torch.optim.SGD(model.parameters(), lr=0.1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = data(64)
    fg.fine_tune(model, [(x, y)], steps=3, lr=1e-2, progress=False)
    moved = sorted(k for k, v in model.state_dict().items() if not torch.equal(v, before[k]))
    assert moved == ["0.eig_end", "2.eig_end", "4.eig_end"]


# -- decisions: eigenvalues -> shared allocation -> shared shrink --------------------------------------------------
def _set_end(model, name, values):
    with torch.no_grad():
        dict(model.named_modules())[name].eig_end.copy_(torch.as_tensor(values, dtype=torch.float32))


def test_the_nodes_with_the_smallest_eigenvalues_go_and_the_shrunk_model_equals_the_decided_one():
    model = convert(trained_mlp(), target_sparsity=0.25)
    order = torch.randperm(32, generator=torch.Generator().manual_seed(3))
    _set_end(model, "0", (order.float() + 1) * 0.1 * torch.where(order % 2 == 0, 1.0, -1.0))  # sign is not rank
    x, _ = data(16, seed=7)
    method = method_of(model)
    with torch.no_grad(), method.decided(model):
        expected = model(x)
    with pytest.warns(UserWarning, match="decided from the eigenvalues at the bake"):
        report = fg.convert_from_fermi(model)
    kept_in = report.kept["2"][0]
    assert sorted(kept_in.tolist()) == sorted(order.argsort()[8:].tolist())  # the 8 smallest |lambda| removed
    assert model[0].out_features == 24 and model[2].in_features == 24 and model[2].out_features == 12
    with torch.no_grad():
        assert torch.allclose(model(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("budget,allocation", [("macs:0.5", "global"), ("params:0.6", "auto"),
                                               ("units:0.5", "uniform")])
def test_spectral_prune_meets_budgets_through_the_shared_allocation(budget, allocation):
    model = convert(trained_mlp())
    _train(model, fg.make_optimizer(model, lr=1e-2))
    x, _ = data(16, seed=7)
    result = fg.spectral_prune(model, budget=budget, allocation=allocation)
    assert result.kind == budget.split(":")[0] and result.selection == "magnitude"
    with torch.no_grad():
        frozen = model(x)  # frozen decisions apply in the model's own forward
        with method_of(model).decided(model):
            assert torch.equal(model(x), frozen)
    dense_macs = fg.count_macs(model, x[:1])
    report = fg.convert_from_fermi(model, calibration_data=[x])
    assert report.shrunk and report.max_abs_diff <= 1e-4
    if result.kind == "macs":
        assert abs(fg.count_macs(model, x[:1]) / dense_macs - 0.5) < 0.05


def test_prune_with_the_spectral_method_sees_the_layers_function():
    """prune's one-shot (OBS) selection reads every twin's weight, which is the layer's spectral weight: on the
    same network it chooses what it chooses for Fermi gates."""
    x, _ = data(64, seed=9)
    ours, fermi = trained_mlp(), trained_mlp()
    reports = {}
    for model, cfg in ((ours, config()), (fermi, fg.FermiConfig(granularity="channel"))):
        reports[cfg.method] = fg.prune(model, [x], cfg, budget="macs:0.5", progress=False)
    assert reports[SPECTRAL].shrunk and reports[SPECTRAL].macs_after == reports["fermi"].macs_after
    with torch.no_grad():
        assert torch.allclose(ours(x), fermi(x), rtol=1e-4, atol=1e-5)


def test_a_budget_in_the_config_decides_at_the_bake():
    model = convert(trained_mlp(), target_sparsity=None, budget="macs:0.5")
    x, _ = data(8)
    dense = fg.count_macs(model, x[:1])
    with pytest.warns(UserWarning, match="decided from the eigenvalues at the bake"):
        fg.convert_from_fermi(model)
    assert abs(fg.count_macs(model, x[:1]) / dense - 0.5) < 0.05


# -- shared nodes ------------------------------------------------------------------------------------------------
def test_a_shared_node_is_judged_by_both_layers_eigenvalues():
    """Hidden node u of 0 -> 2 is produced by layer 0 (its end eigenvalue) and consumed by layer 2 (its start
    eigenvalue, which judges once start eigenvalues train): 'and' keeps a node both rank high, 'or' one either
    does."""
    picks = {}
    for mode in ("and", "or", "mean"):
        model = convert(mlp(widths=(12, 4, 3)), method_options={"train_start": True, "link_mode": mode},
                        target_sparsity=0.5)
        end, start = _judges()
        _set_end(model, "0", end)
        with torch.no_grad():
            model[2].eig_start.copy_(start)
        (group,) = method_of(model).unit_groups(model)
        picks[mode] = (group.scores, method_of(model).current_keep(model)[group.id].nonzero().flatten().tolist())
    end, start = (v / v.mean() for v in _judges())  # each set on its own scale
    assert torch.allclose(picks["and"][0], torch.minimum(end, start)) and picks["and"][1] == [2, 3]
    assert torch.allclose(picks["or"][0], torch.maximum(end, start)) and picks["or"][1] == [0, 1]
    assert torch.allclose(picks["mean"][0], (end + start) / 2) and picks["mean"][1] == [0, 1]
    # start eigenvalues never trained are constant (0): they judge nothing, the end eigenvalues alone rank
    model = convert(mlp(widths=(12, 4, 3)))
    _set_end(model, "0", [1.0, 3.0, 2.0, 0.5])
    (group,) = method_of(model).unit_groups(model)
    assert group.scores.argsort().tolist() == [3, 0, 2, 1]


def _judges() -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes 0 and 1: one set ranks them first, the other last; nodes 2 and 3: both rank them in the middle."""
    return torch.tensor([3.0, 0.2, 1.0, 0.9]), torch.tensor([0.2, 3.0, 1.0, 0.9])


def test_several_producers_of_one_node_all_judge_it():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = tf.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 99, (1, 8), generator=torch.Generator().manual_seed(1))
    fg.convert_to_fermi(model, config(), example_inputs={"input_ids": ids})
    (group,) = method_of(model).record(model).groups
    assert sorted(name.rsplit(".", 1)[-1] for name, side, _ in group.judges) == ["gate_proj", "up_proj"]
    mlp_ = model.model.layers[0].mlp
    with torch.no_grad():
        mlp_.gate_proj.eig_end.copy_(torch.arange(16.0) + 1)
        mlp_.up_proj.eig_end.copy_(torch.arange(16.0).flip(0) + 1)
    (scored,) = method_of(model).unit_groups(model)  # 'and': the smaller of the two normalised sets
    g = torch.arange(16.0) + 1
    assert torch.allclose(scored.scores, torch.minimum(g / g.mean(), g.flip(0) / g.mean()))


# -- workflows -----------------------------------------------------------------------------------------------------
def _removed_share(model) -> float:
    return fg.compute_sparsity(model).overall


def test_spectral_pretrain_trains_eigenvalues_then_stops_at_max_delta():
    model = convert(trained_mlp())
    calls = []

    def fit(m):
        calls.append(sorted(n for n, p in m.named_parameters() if p.requires_grad))
        _train(m, torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2), steps=5)

    def evaluate(m):  # a metric that falls with the share of nodes the model's frozen decisions remove
        masked = sum(int((t.in_mask == 0).sum()) for t in spectral_modules(m).values() if t.in_mask is not None)
        return {"acc": 1.0 - (masked / 48) ** 2, "loss": 0.0}

    result = fg.spectral_pretrain(model, fit, evaluate, max_delta=0.1, compare_with="acc", step=0.1)
    assert calls == [["0.eig_end", "2.eig_end", "4.eig_end"]]
    xs = [f for f, _ in result.curve]
    assert result.curve[0] == (0.0, 1.0) and xs == sorted(xs)
    limit = 1.0 * (1 - 0.1)
    assert all(v >= limit for _, v in result.curve[:-1]) and result.curve[-1][1] < limit  # stopped past max_delta
    assert result.fraction == pytest.approx(xs[-2]) and result.metric == result.curve[-2][1]
    assert _removed_share(model) == pytest.approx(result.fraction)  # the chosen decision is frozen
    assert result.fraction == pytest.approx(13 / 48)  # 1 - f^2 >= 0.9 <=> f <= 0.316: 3+1, 6+3, 9+4 of 32+16 nodes


def test_spectral_pretrain_on_real_accuracy_and_its_plot(tmp_path):
    pytest.importorskip("matplotlib")
    model = convert(trained_mlp())
    x, y = data(256, seed=11)

    def evaluate(m):
        with torch.no_grad():
            return (m(x).argmax(1) == y).float().mean()

    fit = lambda m: _train(m, fg.make_optimizer(m, lr=1e-2), steps=20)  # noqa: E731
    result = fg.spectral_pretrain(model, fit, evaluate, max_delta=0.05, step=0.1)
    base = result.baseline
    assert all(base - v <= 0.05 * base for _, v in result.curve[:-1])
    if result.curve[-1][0] < 0.85:  # stopped early: the last point broke the limit
        assert base - result.curve[-1][1] > 0.05 * base
    with torch.no_grad():
        assert float(evaluate(model)) == pytest.approx(result.metric)
    result.plot(tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 0
    report = fg.convert_from_fermi(model)
    assert report.sparsity.overall == pytest.approx(result.fraction)
    with torch.no_grad():
        assert float(evaluate(model)) == pytest.approx(result.metric)


def test_spectral_pretrain_checks_its_arguments():
    model = convert(trained_mlp())
    with pytest.raises(ValueError, match="compare_with"):
        fg.spectral_pretrain(model, None, lambda m: 1.0, 0.1, compare_with="f1")
    with pytest.raises(ValueError, match="max_delta"):
        fg.spectral_pretrain(model, None, lambda m: 1.0, -1)
    with pytest.raises(ValueError, match="evaluate"):
        fg.spectral_pretrain(model, None, lambda m: "good", 0.1)
    with pytest.raises(ValueError, match="method='spectral'"):
        fg.spectral_pretrain(fg.convert_to_fermi(mlp(), fg.FermiConfig()), None, lambda m: 1.0, 0.1)


def test_spectral_distill_trains_eigenvalues_prunes_then_trains_the_survivors():
    model = convert(trained_mlp())
    seen = []

    def fit(m):
        seen.append(sorted(n for n, p in m.named_parameters() if p.requires_grad))
        _train(m, torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2), steps=5)

    before = copy.deepcopy(model.state_dict())
    result = fg.spectral_distill(model, fit, percentile=75)
    assert seen[0] == ["0.eig_end", "2.eig_end", "4.eig_end"]
    assert seen[1] == sorted(n for n, _ in model.named_parameters())
    assert result.fraction == pytest.approx(0.75) and result.kept
    removed = (model[2].in_mask == 0).nonzero().flatten()
    assert len(removed) == 24
    # a removed node's incoming row never moved in the full phase (it receives no gradient)
    assert torch.equal(model[0].base[removed], before["0.weight"][removed])
    x, _ = data(16)
    with torch.no_grad():
        expected = model(x)
    report = fg.convert_from_fermi(model)
    assert model[0].out_features == 8 and model[2].out_features == 4
    assert report.trained_vs_baked == 0.0
    with torch.no_grad():
        assert torch.allclose(model(x), expected, rtol=1e-5, atol=1e-6)


# -- recipes and the command line --------------------------------------------------------------------------------
def test_the_bundled_spectral_recipe_runs_end_to_end_from_the_command_line(tmp_path):
    tf = pytest.importorskip("transformers")
    from test_cli import _check_run, _tiny_bert, fermigates

    folder, text, cfg = _tiny_bert(tmp_path)
    out = tmp_path / "out"
    run = fermigates("prune", "spectral_encoder", "--model", f"hf:{folder}", "--data", text, "--out", out, "--quiet",
                     "--set", "train.steps=4", "--set", "train.batch_size=4", "--set", "calibration.samples=8",
                     "--set", "calibration.batch_size=4")
    assert run.returncode == 0, run.stderr
    names, report = _check_run(out, tf.BertModel(cfg))
    assert report["kept"]["channel"]["kept"] == report["kept"]["channel"]["total"] // 2
    assert "run_log.json" in names


def test_self_distillation_moves_eigenvalues_only_with_the_l1_penalty():
    """A pretrained network distilled toward itself starts at loss 0 with gradient 0: eigenvalue-only training
    moves nothing, unless the L1 penalty pulls the eigenvalues and the distillation holds up the needed ones."""
    x, _ = data(64, seed=3)
    moved = {}
    for l1 in (0.0, 0.05):
        model = convert(trained_mlp(), method_options={"l1": l1})
        before = model[0].eig_end.detach().clone()
        opt = fg.make_optimizer(model, lr=1e-2)
        assert opt.sparsity_loss().item() == pytest.approx(l1 * 1.0)  # every judge starts at its own scale
        fg.fine_tune(model, [x], steps=20, optimizer=opt, distill="hidden", progress=False)
        moved[l1] = (model[0].eig_end.detach() - before).abs().max().item(), model[0].eig_end.detach().abs()
    assert moved[0.0][0] == 0.0
    assert moved[0.05][0] > 0 and moved[0.05][1].mean() < before.abs().mean()
    with pytest.raises(ValueError, match="l1"):
        config(method_options={"l1": -1})


def test_a_model_where_only_some_layers_are_spectral():
    """A CNN with an MLP head: only the head's Linear layers become spectral, the convolutions are left alone
    (and stay frozen while the eigenvalues train), and the head's hidden nodes go through the shared path."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                          nn.Flatten(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 5)).eval()
    x = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 5, (32,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(x)
    fg.convert_to_fermi(model, config(), example_inputs=x[:1])
    assert list(spectral_modules(model)) == ["5", "7"] and type(model[0]) is nn.Conv2d
    assert any(name == "0" and "no spectral twin" in why for name, why in fg.summary(model).skipped)
    with torch.no_grad():
        assert torch.allclose(model(x), before, rtol=1e-5, atol=1e-5)
    conv = model[0].weight.detach().clone()

    def fit(m):
        m.train()
        opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=3e-2)
        for _ in range(10):
            loss = F.cross_entropy(m(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        m.eval()

    def evaluate(m):
        with torch.no_grad():
            return F.cross_entropy(m(x), y).item()

    result = fg.spectral_pretrain(model, fit, evaluate, max_delta=0.5, compare_with="loss", step=0.25)
    assert torch.equal(model[0].weight, conv)  # not a spectral layer: frozen during the eigenvalue training
    assert all(v <= result.baseline * 1.5 for _, v in result.curve[:-1])
    with torch.no_grad():
        expected = model(x)
    report = fg.convert_from_fermi(model)
    assert model[5].out_features == 24 - round(result.fraction * 24) and model[7].in_features == model[5].out_features
    assert report.shrunk or result.fraction == 0
    with torch.no_grad():
        assert torch.allclose(model(x), expected, rtol=1e-5, atol=1e-6)
