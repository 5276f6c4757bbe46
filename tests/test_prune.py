import pytest
import torch
import torch.nn as nn

import fermigates as fg


def _redundant_mlp():
    """Hidden neurons 8..15 are exact doubles of 0..7: half of them can go with no loss after calibration."""
    torch.manual_seed(0)
    first = nn.Linear(6, 16)
    with torch.no_grad():
        first.weight[8:] = 2 * first.weight[:8]
        first.bias[8:] = 2 * first.bias[:8]
    return nn.Sequential(first, nn.ReLU(), nn.Linear(16, 3))


def test_one_shot_prune_recovers_a_redundant_layer_exactly():
    model = _redundant_mlp()
    data = torch.randn(512, 6)
    with torch.no_grad():
        expected = model(data)
    report = fg.prune(model, data.split(128), target_sparsity=0.5, ridge=1e-9, progress=False)
    assert model[0].out_features == 8 and model[2].in_features == 8
    assert report.params_after < report.params_before
    with torch.no_grad():
        torch.testing.assert_close(model(data), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("refine_steps", [0, 2])
def test_prune_reads_a_generator_once(refine_steps):
    # a generator can be iterated once: example inputs, refinement and calibration must share one reading
    model = _redundant_mlp()
    batches = list(torch.randn(512, 6).split(128))
    report = fg.prune(model, (b for b in batches), target_sparsity=0.5, refine_steps=refine_steps, progress=False)
    assert report.calibration.n_batches == len(batches)
    assert model[0].out_features == 8
    assert (report.refine is not None) == bool(refine_steps)  # the refinement's losses reach the user


def test_one_shot_without_calibration_error_is_what_calibration_fixes():
    model, data = _redundant_mlp(), torch.randn(256, 6)
    with torch.no_grad():
        expected = model(data)
    fg.convert_to_fermi(model, fg.FermiConfig(granularity="channel", target_sparsity=0.5), example_inputs=data[:1])
    fg.AnnealSchedule(total_steps=1, temperature=(1e-4, 1e-4), target_sparsity=0.5, tolerance=0.0).apply(model, 1)
    fg.convert_from_fermi(model)
    with torch.no_grad():
        assert (model(data) - expected).abs().max() > 1e-2  # pruning alone loses the removed neurons


@pytest.mark.parametrize(
    "data,error,match",
    [
        ([], ValueError, "calibration_data is empty"),
        (torch.zeros(0, 6), ValueError, "empty tensor"),
        ([torch.randn(4, 5)], ValueError, "rejects the first calibration batch"),
        (42, TypeError, "calibration_data must be"),
    ],
)
def test_bad_calibration_data_leaves_the_model_untouched(data, error, match):
    model = _redundant_mlp()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    with pytest.raises(error, match=match):
        fg.prune(model, data, progress=False)
    assert [type(m) for m in model.modules()] == types
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_prune_refuses_unstructured_granularity():
    with pytest.raises(ValueError, match="structured pruning"):
        fg.prune(_redundant_mlp(), torch.randn(4, 6), fg.FermiConfig(granularity="weight"))
