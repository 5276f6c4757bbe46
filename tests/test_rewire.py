"""Deep Rewiring: sign-fixed layers, DEEPR / SoftDEEPR, each defining property of the method."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fermigates as fg


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x)).flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net()
    with torch.no_grad():
        for m in (net.conv, net.fc1, net.fc2):
            m.bias.normal_()  # both signs in every bias
    return net


def rewired(sparsity: float = 0.0, seed: int = 0, **options) -> Net:
    net = make_net(seed)
    cfg = fg.FermiConfig(method="deepr", target_sparsity=sparsity, keep_classifier=False, method_options=options)
    return fg.convert_to_fermi(net, cfg)


def data(n: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, sched=None, seed: int = 1) -> list[int]:
    """Train on random batches; the number of active connections after every step."""
    counts = []
    for i in range(steps):
        x, y = data(seed=seed + i)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        counts.append(opt.n_active())
    return counts


def n_active(model: nn.Module) -> int:
    return sum(int((m.weight > 0).sum()) for m in model.modules() if isinstance(m, fg.methods.rewire.layers.RewireMixin))


@pytest.mark.parametrize("handle_biases", ["ignore", "as_connections", "second_bias"])
def test_keep_signs_conversion_computes_the_original_function(handle_biases):
    x, _ = data()
    dense = make_net()
    model = rewired(0.0, handle_biases=handle_biases)
    assert isinstance(model.fc1, nn.Linear) and isinstance(model.fc1, fg.RewiredLinear)
    assert isinstance(model.conv, fg.RewiredConv2d)
    assert torch.equal(model(x), dense(x))
    assert set(model.state_dict()) >= {"fc1.weight", "fc1.bias", "fc1.weight_sign"}
    assert ("fc1.bias_negative" in model.state_dict()) == (handle_biases == "second_bias")


def test_initial_connectivity_keeps_the_largest_weights_of_each_layer():
    dense = make_net()
    model = rewired(0.75)
    for name in ("conv", "fc1", "fc2"):
        w, layer = getattr(dense, name).weight, getattr(model, name)
        active = layer.active_mask()
        assert int(active.sum()) == round(0.25 * w.numel())
        assert w.abs()[active].min() >= w.abs()[~active].max()
        assert torch.equal(layer.rewired_weight()[active], w[active])
        assert bool((layer.rewired_weight()[~active] == 0).all())
    assert fg.compute_sparsity(model).overall == pytest.approx(0.75, abs=0.01)


def test_random_signs_and_random_init_are_seeded():
    a, b = rewired(0.5, keep_signs=False, init="random", seed=3), rewired(0.5, keep_signs=False, init="random", seed=3)
    assert torch.equal(a.fc1.weight_sign, b.fc1.weight_sign) and torch.equal(a.fc1.weight, b.fc1.weight)
    dense_sign = torch.where(make_net().fc1.weight >= 0, 1.0, -1.0)
    flipped = (a.fc1.weight_sign != dense_sign).float().mean()
    assert 0.3 < flipped < 0.7  # random, not the pretrained signs
    magnitude = rewired(0.5, keep_signs=False, seed=3)
    assert not torch.equal(a.fc1.active_mask(), magnitude.fc1.active_mask())


def test_deepr_keeps_exactly_nc_active_after_every_step():
    model = rewired(0.8)
    nc = n_active(model)
    opt = fg.DEEPR(fg.rewire_param_groups(model), lr=0.5, l1=0.05, temp=1e-3, seed=0)
    assert opt.nc == nc
    before = torch.cat([m.active_mask().flatten() for m in (model.conv, model.fc1, model.fc2)])
    counts = train(model, opt, 15)
    assert counts == [nc] * 15
    after = torch.cat([m.active_mask().flatten() for m in (model.conv, model.fc1, model.fc2)])
    assert int((after & ~before).sum()) > 0  # connections were rewired, not just kept


@pytest.mark.parametrize("nc", [10, 200])
def test_deepr_given_nc_switches_connections_on_or_off_to_match(nc):
    model = rewired(0.8)  # about 127 active of 627
    opt = fg.DEEPR(fg.rewire_param_groups(model), nc=nc, lr=0.1, seed=0)
    assert n_active(model) == nc
    assert train(model, opt, 3) == [nc] * 3


def test_softdeepr_reactivates_connections_under_noise():
    model = rewired(0.9)
    inactive = model.fc1.weight.detach() <= 0
    opt = fg.SoftDEEPR(fg.rewire_param_groups(model), lr=0.1, l1=1e-3, temp=1e-4, min_weight=-0.01, seed=0)
    train(model, opt, 20)
    assert bool((model.fc1.weight >= -0.01).all())  # clamped at min_weight
    assert int((model.fc1.weight.detach() > 0)[inactive].sum()) > 0
    # without noise an inactive connection never comes back: the test above can fail
    model = rewired(0.9)
    opt = fg.SoftDEEPR(fg.rewire_param_groups(model), lr=0.1, l1=1e-3, temp=0.0, min_weight=-0.01, seed=0)
    train(model, opt, 20)
    assert int((model.fc1.weight.detach() > 0)[inactive].sum()) == 0


def test_second_bias_receives_gradients_and_is_trained():
    model = rewired(0.5)
    x, y = data()
    F.cross_entropy(model(x), y).backward()
    for layer in (model.conv, model.fc1, model.fc2):
        assert layer.bias.grad is not None and layer.bias_negative.grad is not None
        assert bool((layer.bias.grad != 0).any()) and bool((layer.bias_negative.grad != 0).any())
    before = model.fc2.bias_negative.detach().clone()
    groups = fg.rewire_param_groups(model)
    assert any(g.get("nonnegative") for g in groups)
    opt = fg.SoftDEEPR(groups, lr=0.5, seed=0)
    train(model, opt, 5)
    assert not torch.equal(model.fc2.bias_negative, before)
    for layer in (model.conv, model.fc1, model.fc2):
        assert bool((layer.bias >= 0).all()) and bool((layer.bias_negative >= 0).all())


def test_as_connections_biases_are_rewired_connections():
    model = rewired(0.5, handle_biases="as_connections")
    conn = fg.rewire_param_groups(model)[0]["params"]
    assert any(p is model.fc1.bias for p in conn)
    with torch.no_grad():
        model.fc1.bias[:3] = -1.0
    fg.convert_from_fermi(model)
    assert bool((model.fc1.bias[:3] == 0).all()) and bool((model.fc1.bias[3:] != 0).all())


@pytest.mark.parametrize("cls", [fg.DEEPR, fg.SoftDEEPR])
def test_a_deep_copy_trains_identically(cls):
    model = rewired(0.7)
    twin = copy.deepcopy(model)
    assert twin.fc1.weight is not model.fc1.weight
    opt_a = cls(fg.rewire_param_groups(model), lr=0.2, seed=5)
    opt_b = cls(fg.rewire_param_groups(twin), lr=0.2, seed=5)
    train(model, opt_a, 6)
    train(twin, opt_b, 6)
    for (name, a), (_, b) in zip(model.state_dict().items(), twin.state_dict().items()):
        assert torch.equal(a, b), name
    assert not torch.equal(model.fc1.weight, rewired(0.7).fc1.weight)  # it did train


@pytest.mark.parametrize("cls", [fg.DEEPR, fg.SoftDEEPR])
def test_state_dict_resume_with_an_lr_scheduler_is_exact(cls):
    def run(resume: bool) -> dict:
        model = rewired(0.7)
        opt = cls(fg.rewire_param_groups(model), lr=0.2, temp=1e-3, seed=1)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        train(model, opt, 3, sched)
        if resume:
            saved = copy.deepcopy((model.state_dict(), opt.state_dict(), sched.state_dict()))
            model = rewired(0.7)
            opt = cls(fg.rewire_param_groups(model), lr=0.2, temp=1e-3, seed=99)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
            model.load_state_dict(saved[0])
            opt.load_state_dict(saved[1])
            sched.load_state_dict(saved[2])
        train(model, opt, 3, sched, seed=10)
        assert opt.param_groups[0]["lr"] == pytest.approx(0.2 * 0.5**3)
        return model.state_dict()

    straight, resumed = run(False), run(True)
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


@pytest.mark.parametrize("handle_biases", ["ignore", "as_connections", "second_bias"])
def test_converting_back_gives_exact_zeros_and_the_same_function(handle_biases):
    model = rewired(0.8, handle_biases=handle_biases)
    opt = fg.SoftDEEPR(fg.rewire_param_groups(model), lr=0.3, l1=1e-3, seed=0)
    train(model, opt, 5)
    x, _ = data(16, seed=7)
    expected = model(x).detach()
    masks = {n: getattr(model, n).active_mask() for n in ("conv", "fc1", "fc2")}
    report = fg.convert_from_fermi(model)
    assert type(model.fc1) is nn.Linear and type(model.conv) is nn.Conv2d
    assert torch.equal(model(x), expected)
    for name, active in masks.items():
        w = getattr(model, name).weight
        assert bool((w[~active] == 0).all()) and bool((w[active] != 0).all())
    assert set(model.state_dict()) == set(make_net().state_dict())
    assert not hasattr(model, "_fermigates")
    assert isinstance(report, fg.FermiReport)
    assert report.sparsity.kept == sum(int(m.sum()) for m in masks.values())
    assert report.params_after == sum(p.numel() for p in make_net().parameters())


def test_errors_name_the_argument_and_leave_the_model_as_it_was():
    with pytest.raises(ValueError, match="granularity must be 'weight'"):
        fg.FermiConfig(method="deepr", granularity="channel")
    with pytest.raises(ValueError, match="method must be one of"):
        fg.FermiConfig(method="lottery")
    with pytest.raises(ValueError, match="handle_biases"):
        fg.FermiConfig(method="softdeepr", method_options={"handle_biases": "twice"})
    with pytest.raises(ValueError, match="unknown method_options"):
        fg.FermiConfig(method="deepr", method_options={"keepsigns": True})
    with pytest.raises(ValueError, match="takes no method_options"):
        fg.FermiConfig(method="fermi", method_options={"keep_signs": True})
    model = rewired(0.5)
    with pytest.raises(ValueError, match="nc=10000"):
        fg.DEEPR(fg.rewire_param_groups(model), nc=10000)
    with pytest.raises(ValueError, match="reset_val"):
        fg.DEEPR(fg.rewire_param_groups(model), reset_val=0.0)
    with pytest.raises(ValueError, match="min_weight"):
        fg.SoftDEEPR(fg.rewire_param_groups(model), min_weight=0.1)
    with pytest.raises(ValueError, match="no rewired layers"):
        fg.rewire_param_groups(make_net())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="calibration_data"):
        fg.convert_from_fermi(model, calibration_data=[data()[0]])
    assert isinstance(model.fc1, fg.RewiredLinear) and hasattr(model, "_fermigates")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_conversion_is_a_transaction_and_skips_what_it_cannot_rewire():
    class Odd(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.Linear(4, 4), Odd(4, 4), nn.Linear(4, 2))
    fg.convert_to_fermi(model, fg.FermiConfig(method="softdeepr", target_sparsity=0.5))
    assert isinstance(model[0], fg.RewiredLinear) and type(model[1]) is Odd and type(model[2]) is nn.Linear
    reasons = dict(fg.summary(model).skipped)
    assert "1" in reasons and "2" in reasons  # overrides forward; final classifier
    with pytest.raises(ValueError, match="already converted \\(method 'softdeepr'\\)"):
        fg.convert_to_fermi(model, fg.FermiConfig(method="deepr"))
    fresh = nn.Sequential(nn.Linear(4, 4))
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(ValueError):
        fg.convert_to_fermi(fresh, fg.FermiConfig(method="deepr", target_modules=["nothing"]))
    assert type(fresh[0]) is nn.Linear and torch.equal(fresh[0].weight, before["0.weight"])


def test_the_config_round_trips_through_yaml():
    cfg = fg.FermiConfig(method="deepr", target_sparsity=0.9, method_options={"handle_biases": "ignore"})
    again = fg.FermiConfig.from_yaml(cfg.to_yaml())
    assert again == cfg and again.method == "deepr"
    assert "handle_biases" in fg.RewireConfig.help()
