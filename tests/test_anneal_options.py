"""The annealer's options studied by ``benchmarks/bench_anneal_ablations.py``: importance while ramping (OBS refreshed,
Taylor), Lagrangian steering, the levels' learning rate, a budget allocated by the one-shot importance, inputs
recorded from the training loop when no calibration data is given, and calibration when the decisions freeze."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fermigates as fg
from fermigates.methods.fermi.model import all_gates, structured_gates
from fermigates.methods.fermi.ranking import obs_ranking
from fermigates.methods.fermi.refit import calibrate_decisions, open_reference


def _task(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g)
    y = (x @ torch.randn(12, 4, generator=g)).argmax(1)
    return x, y


def _plain(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))


def _model(sparsity=0.5, seed=0):
    model = _plain(seed)
    x, _ = _task()
    fg.convert_to_fermi(model, fg.FermiConfig(granularity="channel", target_sparsity=sparsity), example_inputs=x[:1])
    return model


def _kept(model):
    return [g.keep_units().clone() for g in structured_gates(model)]


def _prune_kept(data, **kwargs):
    """What one-shot ``prune`` keeps of the same network (layer -> [kept_in, kept_out])."""
    report = fg.prune(_plain(), data, fg.FermiConfig(granularity="channel"), example_inputs=data[0][:1],
                      progress=False, **kwargs)
    return {k: [None if t is None else t.tolist() for t in v] for k, v in report.kept.items()}


def _baked_kept(model):
    report = fg.convert_from_fermi(model, progress=False)
    return {k: [None if t is None else t.tolist() for t in v] for k, v in report.kept.items()}


def _frozen_run(steps=40, **kwargs):
    """An anneal whose weights never move (SGD, lr 0): the decisions at the freeze are those of the ranking."""
    model = _model()
    x, y = _task()
    opt = fg.FermiAnnealer(torch.optim.SGD(model.parameters(), lr=0.0), model, total_steps=steps, **kwargs)
    for i in range(opt.schedule.hard_step):
        xb, yb = x[32 * (i % 8): 32 * (i % 8 + 1)], y[32 * (i % 8): 32 * (i % 8 + 1)]
        (F.cross_entropy(model(xb), yb) + opt.sparsity_loss()).backward()
        opt.step()
        opt.zero_grad()
    assert opt.decided
    return model, opt


def test_taylor_importance_ranks_units_by_the_gradients_of_their_gates():
    model = _model()
    x, y = _task()
    opt = fg.FermiAnnealer(torch.optim.SGD(model.parameters(), lr=0.0), model, total_steps=40,
                           importance="taylor", temperature=(1e-3, 1e-4))
    last = None
    for i in range(opt.schedule.hard_step):
        xb, yb = x[32 * (i % 8): 32 * (i % 8 + 1)], y[32 * (i % 8): 32 * (i % 8 + 1)]
        (F.cross_entropy(model(xb), yb) + opt.sparsity_loss()).backward()
        opt.step()
        opt.zero_grad()
        if not opt.decided:
            last = [score.clone() for score in opt.control.tracker.scores]  # what the last re-rank read
    assert all(bool(s.sum() > 0) for s in last)
    for gate, score, keep in zip(structured_gates(model), last, _kept(model)):
        n_keep = int(keep.sum())
        assert set(keep.nonzero().flatten().tolist()) == set(score.argsort(descending=True)[:n_keep].tolist())
    with pytest.raises(ValueError, match="importance must be one of"):
        fg.FermiAnnealer(torch.optim.SGD(model.parameters(), lr=0.1), _model(), total_steps=8, importance="fisher")


def test_obs_importance_reranks_on_the_weights_as_they_are():
    x, _ = _task()
    data = list(x[:128].split(32))
    kept = {}
    for importance in ("magnitude", "obs"):
        model = _model()
        opt = fg.FermiAnnealer(torch.optim.SGD(model.parameters(), lr=0.0), model, total_steps=40,
                               importance=importance, calibration_data=data)
        unit = int(obs_ranking(model, data)[0][0][-1])  # the unit the one-shot order keeps longest
        with torch.no_grad():
            model[2].weight[:, unit] = 0.0  # made useless to its consumer (its own score is unchanged)
        while not opt.decided:
            opt.step()
        kept[importance] = bool(structured_gates(model)[0].keep_units()[unit])
    assert kept == {"magnitude": True, "obs": False}  # only a ranking on the current weights sees it
    with pytest.raises(ValueError, match="calibration"):
        fg.FermiAnnealer(torch.optim.SGD(model.parameters(), lr=0.1), _model(), total_steps=2, importance="obs")


def test_lagrangian_steering_pushes_the_levels_and_ends_at_the_target():
    model = _model()
    x, y = _task()
    opt = fg.FermiAnnealer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, total_steps=40,
                           steer="lagrangian", level_lr=0.05)
    seen_loss = False
    for i in range(40):
        xb, yb = x[32 * (i % 8): 32 * (i % 8 + 1)], y[32 * (i % 8): 32 * (i % 8 + 1)]
        term = opt.sparsity_loss()
        if term.requires_grad and any(lam[0] for lam in opt.control.lagrangian.lambdas.values()):
            seen_loss = True
            mu_grad = torch.autograd.grad(term, [g.mu for g in all_gates(model)], retain_graph=True,
                                          allow_unused=True)
            assert any(g is not None and bool(g.abs().sum() > 0) for g in mu_grad)
        (F.cross_entropy(model(xb), yb) + term).backward()
        before = copy.deepcopy(opt.control.lagrangian.lambdas)
        gaps = dict(opt.control.lagrangian.gaps)
        opt.step()
        opt.zero_grad()
        for k, gap in gaps.items():  # gradient ascent: a gate above its target is pushed down, below it up
            assert opt.control.lagrangian.lambdas[k][0] == pytest.approx(before.get(k, [0.0])[0] + 0.05 * gap)
    assert seen_loss and opt.decided
    assert all(int((~k).sum()) == 32 for k in _kept(model))  # exactly the target at the end
    state = opt.state_dict()
    other = _model()
    opt2 = fg.FermiAnnealer(torch.optim.AdamW(other.parameters(), lr=1e-2), other, total_steps=40,
                            steer="lagrangian", level_lr=0.05)
    opt2.load_state_dict(state)
    assert opt2.control.lagrangian.lambdas == opt.control.lagrangian.lambdas
    with pytest.raises(ValueError, match="steer must be one of"):
        fg.FermiAnnealer(torch.optim.SGD(model.parameters(), lr=0.1), _model(), total_steps=8, steer="pid")


def test_level_lr_puts_the_levels_in_a_group_of_their_own():
    model = _model()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    fg.FermiAnnealer(inner, model, total_steps=8, level_lr=0.05)
    levels = {id(t) for g in all_gates(model) for t in (g.mu, g.mu_offset) if t is not None}
    group = inner.param_groups[-1]
    assert {id(p) for p in group["params"]} == levels and group["lr"] == 0.05 and group["weight_decay"] == 0.0
    assert not any(id(p) in levels for g in inner.param_groups[:-1] for p in g["params"])
    n_params = sum(1 for _ in model.parameters())
    assert sum(len(g["params"]) for g in inner.param_groups) == n_params
    for bad in (0.0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="level_lr"):
            fg.FermiAnnealer(torch.optim.SGD(model.parameters(), lr=0.1), _model(), total_steps=8, level_lr=bad)


def test_a_budget_with_calibration_data_is_allocated_as_prune_allocates_it():
    x, _ = _task()
    data = list(x[:128].split(32))
    want = _prune_kept(data, budget="macs:0.5", allocation="global")
    model, opt = _frozen_run(budget="macs:0.5", allocation="global", calibration_data=data, example_inputs=x[:1])
    assert "obs" in opt.budget_result.selection
    assert _baked_kept(model) == want  # the same units, allocated across layers by the same importance


def test_without_calibration_data_the_annealer_ranks_on_the_inputs_it_is_trained_on():
    x, _ = _task()
    model, opt = _frozen_run(steps=80)  # ramp of 20 steps: the first 2 training batches are ranked on
    assert opt.schedule.ramp_start == 2 / 80
    recorded = list(x[:64].split(32))
    assert all(torch.equal(a, b) for a, b in zip(opt.control.batches[:2], recorded))
    assert _baked_kept(model) == _prune_kept(recorded, target_sparsity=0.5)
    assert len(opt.control.batches) <= 8 and opt.control.recorder._handle.id not in model._forward_pre_hooks
    # with init="scores", or calibration data, nothing is recorded and the ramp starts at once
    _, plain = _frozen_run(steps=80, init="scores")
    assert plain.control.recorder is None and plain.schedule.ramp_start == 0.0


def test_calibrate_decisions_equals_the_bake_calibrated_toward_the_same_reference():
    x, _ = _task()
    data = list(x[:128].split(32))
    model, _ = _frozen_run()
    with torch.no_grad():  # move the weights away from the dense ones, as training would
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    baked = copy.deepcopy(model)
    fg.convert_from_fermi(baked, calibration_data=data, reference=open_reference(model), progress=False)
    report = calibrate_decisions(model, data, open_reference(model))
    assert report is not None and len(report) == 2  # the two layers that lost inputs
    with torch.no_grad():
        torch.testing.assert_close(model(x), baked(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("when, toward", [("freeze", "dense"), ("freeze", "open"), ("ramp", "dense"),
                                          ("ramp", "trained")])
def test_calibration_while_annealing_refits_in_place_and_training_goes_on(when, toward):
    x, y = _task()
    data = list(x[:128].split(32))
    errors = {}
    for calibrate in (None, when):
        model = _model()
        dense = copy.deepcopy(model)
        fg.methods.fermi.model.disable_gates(dense)
        opt = fg.FermiAnnealer(torch.optim.AdamW(model.parameters(), lr=1e-3), model, total_steps=32,
                               calibration_data=data, calibrate=calibrate, calibrate_toward=toward,
                               temperature=(0.01, 1e-4))
        params = [id(p) for p in model.parameters()]
        for i in range(32):
            xb, yb = x[32 * (i % 4): 32 * (i % 4 + 1)], y[32 * (i % 4): 32 * (i % 4 + 1)]
            (F.cross_entropy(model(xb), yb) + opt.sparsity_loss()).backward()
            opt.step()
            opt.zero_grad()
            if opt.step_count == opt.schedule.hard_step:
                with torch.no_grad():
                    errors[calibrate] = float((model(x[:128]) - dense(x[:128])).pow(2).mean())
        assert [id(p) for p in model.parameters()] == params  # the optimizer's parameters are the model's
        assert fg.convert_from_fermi(model, progress=False).trained_vs_baked == 0.0
        expected = 0 if calibrate is None else 1 if when == "freeze" else 4
        assert len(opt.calibrations) == expected
        assert opt.control.original is None  # the original network's copy is dropped at the freeze
    if toward == "dense":
        assert errors[when] < errors[None]
    with pytest.raises(ValueError, match="calibrate must be"):
        fg.FermiAnnealer(torch.optim.SGD(model.parameters(), lr=0.1), _model(), total_steps=8, calibrate="always")
    with pytest.raises(ValueError, match="calibrate_toward"):
        fg.FermiAnnealer(torch.optim.SGD(model.parameters(), lr=0.1), _model(), total_steps=8, calibrate="freeze",
                         calibrate_toward="teacher")


def test_the_defaults_calibrate_and_allocate_across_layers_where_there_is_data():
    """``calibrate="auto"`` is "ramp" with calibration data and a cold start, else None; ``allocation="auto"`` is
    "global" for a MAC budget whose units are ranked on data (calibration data or recorded inputs), else the one
    share."""
    x, _ = _task()
    data = list(x[:128].split(32))
    _, opt = _frozen_run(budget="macs:0.5", calibration_data=data, example_inputs=x[:1], temperature=(0.01, 1e-4))
    assert opt.budget_result.allocation == "global" and "obs" in opt.budget_result.selection
    assert opt.control.calibrate == "ramp" and len(opt.calibrations) == 4
    _, warm = _frozen_run(budget="macs:0.5", calibration_data=data, example_inputs=x[:1])  # T from 1: no calibration
    assert warm.control.calibrate is None and warm.calibrations == [] and warm.budget_result.allocation == "global"
    _, recorded = _frozen_run(steps=80, budget="macs:0.5", example_inputs=x[:1])  # no data: inputs recorded
    assert recorded.budget_result.allocation == "global" and recorded.calibrations == []
    assert recorded.control.calibrate is None
    _, scores = _frozen_run(steps=80, budget="macs:0.5", example_inputs=x[:1], init="scores")  # nothing ranks
    assert scores.budget_result.allocation == "uniform"
    _, forced = _frozen_run(budget="macs:0.5", calibration_data=data, example_inputs=x[:1], allocation="uniform",
                            calibrate=None)
    assert forced.budget_result.allocation == "uniform" and forced.calibrations == []
    # weight gates have no units to re-fit: the default does not calibrate them, and asks nothing of them
    model = _plain()
    fg.convert_to_fermi(model, fg.FermiConfig(granularity="weight", target_sparsity=0.5), example_inputs=x[:1])
    weights = fg.FermiAnnealer(torch.optim.SGD(model.parameters(), lr=0.0), model, total_steps=8,
                               calibration_data=data, init="scores")
    assert weights.control.calibrate is None
