"""Gate-only refinement: with frozen weights the gates learn which units to keep."""

import pytest
import torch
import torch.nn as nn

import fermigates as fg


def _misleading_mlp():
    """Hidden neurons 0..3 have the largest weights but their outputs are all but ignored downstream;
    neurons 4..7 are small and carry the function. Ranking by weight score keeps the wrong half."""
    torch.manual_seed(0)
    first, second = nn.Linear(6, 8), nn.Linear(8, 3)
    with torch.no_grad():
        first.weight[:4] *= 10.0
        first.weight[4:] *= 0.5
        second.weight[:, :4] *= 1e-3
        second.weight[:, 4:] = second.weight[:, 4:].sign() * 2.0
    return nn.Sequential(first, nn.Tanh(), second)


def _gate(model):
    return model[2]._slots[0].gate


def _converted(model, x):
    return fg.convert_to_fermi(model, fg.FermiConfig(granularity="channel", target_sparsity=0.5),
                               example_inputs=x[:1])


@pytest.mark.parametrize("match", ["layers", "output"])
def test_refinement_finds_the_units_that_matter_and_leaves_weights_alone(match):
    x = torch.randn(256, 6, generator=torch.Generator().manual_seed(1))
    model = _converted(_misleading_mlp(), x)
    weights = {k: v.clone() for k, v in model.state_dict().items() if "gate" not in k}
    fg.AnnealSchedule(1, (1e-4, 1e-4), target_sparsity=0.5, tolerance=0.0).apply(model, 1)
    assert _gate(model).keep_units().tolist() == [True] * 4 + [False] * 4  # the score ranking is wrong here
    result = fg.refine_gates(model, x.split(64), steps=100, lr=0.1, match=match, progress=False)
    assert _gate(model).keep_units().tolist() == [False] * 4 + [True] * 4
    assert result.changed == 8 and result.units == 8
    assert result.loss_end < 0.1 * result.loss_start
    after = {k: v for k, v in model.state_dict().items() if "gate" not in k}
    assert all(torch.equal(after[k], v) for k, v in weights.items())
    assert all(p.requires_grad for p in model.parameters())  # the user's flags are restored


def test_prune_with_refinement_beats_the_score_ranking():
    x = torch.randn(512, 6, generator=torch.Generator().manual_seed(2))
    errors = {}
    for steps in (0, 100):
        model = _misleading_mlp()
        with torch.no_grad():
            expected = model(x)
        fg.prune(model, x.split(128), target_sparsity=0.5, refine_steps=steps, selection="magnitude",
                 progress=False)  # the score ranking as the baseline
        assert model[0].out_features == 4
        with torch.no_grad():
            errors[steps] = float((model(x) - expected).square().mean() / expected.square().mean())
    assert errors[100] < 0.5 * errors[0]


def test_refinement_of_a_model_without_group_gates_is_a_clear_error():
    model = fg.convert_to_fermi(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)),
                                fg.FermiConfig(granularity="weight", keep_classifier=False))
    with pytest.raises(ValueError, match="granularity 'channel'"):
        fg.refine_gates(model, torch.randn(8, 4), progress=False)


def test_refinement_needs_a_converted_model_and_sane_arguments():
    x = torch.randn(16, 6)
    with pytest.raises(ValueError, match="convert_to_fermi"):
        fg.refine_gates(_misleading_mlp(), x, progress=False)
    model = _converted(_misleading_mlp(), x)
    with pytest.raises(ValueError, match="steps"):
        fg.refine_gates(model, x, steps=-1, progress=False)
    with pytest.raises(ValueError, match="init"):
        fg.refine_gates(model, x, init="magic", progress=False)
    with pytest.raises(ValueError, match="match"):
        fg.refine_gates(model, x, match="everything", progress=False)
    with pytest.raises(ValueError, match="empty"):
        fg.refine_gates(model, [], progress=False)


def test_a_failing_batch_leaves_the_gates_as_they_were():
    x = torch.randn(64, 6)
    model = _converted(_misleading_mlp(), x)
    gate = _gate(model)
    mu, temperature = gate.mu.detach().clone(), gate.temperature.clone()
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        fg.refine_gates(model, [x[:32], torch.randn(32, 5)], steps=4, progress=False)
    assert gate.mu_offset is None
    assert torch.equal(gate.mu.detach(), mu) and torch.equal(gate.temperature, temperature)


def test_prune_whose_refinement_fails_gives_back_the_original_model():
    model = _misleading_mlp()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        fg.prune(model, [torch.randn(32, 6), torch.randn(32, 5)], target_sparsity=0.5, refine_steps=4,
                 progress=False)
    assert [type(m) for m in model] == [nn.Linear, nn.Tanh, nn.Linear]
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def _near_duplicates():
    """Hidden neurons 8..15 are 1.01x copies of 0..7 (ReLU keeps the relation linear); pair norms spread out,
    so ranking by score keeps both members of the largest pairs and loses the smallest pairs for good."""
    torch.manual_seed(0)
    first = nn.Linear(6, 16)
    with torch.no_grad():
        first.weight[:8] *= torch.linspace(0.5, 3.0, 8)[:, None]
        first.bias[:8] *= torch.linspace(0.5, 3.0, 8)
        first.weight[8:] = 1.01 * first.weight[:8]
        first.bias[8:] = 1.01 * first.bias[:8]
    return nn.Sequential(first, nn.ReLU(), nn.Linear(16, 3))


@pytest.mark.parametrize("init", ["scores", "obs"])
def test_obs_init_keeps_what_calibration_can_repair(init):
    x = torch.randn(512, 6, generator=torch.Generator().manual_seed(3))
    model = _near_duplicates()
    with torch.no_grad():
        expected = model(x)
    _converted(model, x)
    fg.refine_gates(model, x.split(128), steps=0, init=init, progress=False)
    kept = _gate(model).keep_units()
    assert int(kept.sum()) == 8
    fg.convert_from_fermi(model, calibration_data=x.split(128), ridge=1e-9, progress=False)
    with torch.no_grad():
        err = float((model(x) - expected).square().mean() / expected.square().mean())
    if init == "obs":
        assert (kept[:8] ^ kept[8:]).all()  # one neuron of every pair
        assert err < 1e-8
    else:
        assert not (kept[:8] ^ kept[8:]).all() and err > 1e-4


def test_calibrating_all_layers_refits_more_and_never_touches_tied_weights():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from _family_models import hf_model

    counts = {}
    for scope in ("pruned", "all"):
        model, inputs = hf_model("gpt2")
        wte = model.transformer.wte.weight.detach().clone()
        report = fg.prune(model, [inputs, inputs], target_sparsity=0.5, calibrate_layers=scope, progress=False)
        assert model.lm_head.weight is model.transformer.wte.weight
        assert torch.equal(model.transformer.wte.weight, wte)
        counts[scope] = len(report.calibration)
    assert counts["all"] > counts["pruned"], counts
    model, inputs = hf_model("llama")
    report = fg.prune(model, [inputs, inputs], target_sparsity=0.5, calibrate_layers="all", progress=False)
    assert len(report.calibration) > 2 * 2  # every projection of both blocks, not just the two down_proj
    model = hf_model("llama")[0]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for bad in ({"calibrate_layers": "every"}, {"refine_steps": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            fg.prune(model, [inputs], progress=False, **bad)
        assert not any(type(m).__name__.startswith("Fermi") for m in model.modules())
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
