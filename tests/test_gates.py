import math

import pytest
import torch

from fermigates import FermiGate, FermiLinear, fermi_probability


def test_larger_scores_are_kept():
    scores = torch.linspace(0, 3, 31)
    p = fermi_probability(scores, torch.tensor(1.0), 0.3)
    assert torch.all(p[1:] > p[:-1]), "P must increase with the score"
    assert p[0] < 0.05 and p[-1] > 0.99
    # the formula as printed in the FermiGates README, 1/(exp((|w|-mu)/T)+1), keeps small weights instead
    printed = 1 / (torch.exp((scores - 1.0) / 0.3) + 1)
    assert torch.all(printed[1:] < printed[:-1])
    assert torch.allclose(p, 1 - printed, atol=1e-6)


def test_approaches_step_function_as_temperature_falls():
    scores = torch.tensor([0.2, 0.9, 0.99, 1.01, 1.1, 5.0])
    step = (scores >= 1.0).float()
    errors = [float((fermi_probability(scores, torch.tensor(1.0), t) - step).abs().max()) for t in (1, 0.1, 1e-2, 1e-3)]
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-4


@pytest.mark.parametrize("temperature", [1e-6, 1e-3, 1.0, 1e3])
def test_numerically_safe_over_scales(temperature):
    scores = torch.logspace(-8, 4, 200, dtype=torch.float32).requires_grad_()
    mu = torch.tensor(0.5, requires_grad=True)
    p = fermi_probability(scores, mu, temperature)
    assert torch.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()
    (p * scores).sum().backward()
    assert torch.isfinite(scores.grad).all() and torch.isfinite(mu.grad)


def test_gradients_reach_weights_and_mu():
    torch.manual_seed(0)
    layer = FermiLinear.from_linear(torch.nn.Linear(6, 3))
    gate = layer.add_weight_gate(temperature=0.5, init=0.3)
    layer(torch.randn(4, 6)).pow(2).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert gate.mu.grad is not None and gate.mu.grad.abs() > 0


def test_hard_decision_is_p_at_least_half():
    scores = torch.rand(1000) * 3
    gate = FermiGate(1000, scale=1.0, mu=1.3, temperature=0.2)
    p = gate(scores)
    assert torch.equal(gate.keep(scores), p >= 0.5)
    gate.hard = True
    assert torch.equal(gate(scores), (p >= 0.5).float())


def test_open_gate_passes_every_weight_exactly():
    score = torch.rand(500) * 10 + 1e-6
    gate = FermiGate.for_scores(score, temperature=1.0, init="open")
    assert torch.equal(gate(score), torch.ones_like(score))


def test_percentile_init_prunes_that_fraction():
    score = torch.rand(10_000)
    gate = FermiGate.for_scores(score, temperature=1.0, init=0.3)
    assert abs(1 - gate.keep(score).float().mean().item() - 0.3) < 1e-3


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_temperature_must_be_positive(bad):
    gate = FermiGate(3, 1.0, 0.0)
    with pytest.raises(ValueError, match="temperature"):
        gate.set_temperature(bad)
