"""Structured gates end to end: convert (channel + head) -> anneal -> bake + shrink == hard-masked model."""

import pytest
import torch

import fermigates as fg
from fermigates.methods.fermi.layers import is_gated

from _family_models import FAMILIES, build, run


@pytest.mark.parametrize("family,name", FAMILIES, ids=[n for _, n in FAMILIES])
def test_structured_gates_shrink_to_the_hard_masked_model(family, name):
    model, inputs = build(family, name)
    with torch.no_grad():
        expected = run(model, inputs)
    example = {k: v[:1] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[:1]
    config = fg.FermiConfig(granularity=("channel", "head"), target_sparsity=0.5)
    fg.convert_to_fermi(model, config, example_inputs=example)
    summary = fg.summary(model)
    assert summary.n_gates > 0, str(summary)
    with torch.no_grad():
        torch.testing.assert_close(run(model, inputs), expected, rtol=1e-6, atol=1e-6)  # gates start open
    fg.AnnealSchedule(total_steps=4, temperature=(1.0, 1e-4), target_sparsity=0.5).apply(model, 4)
    assert abs(fg.compute_sparsity(model).overall - 0.5) < 0.02
    with torch.no_grad(), fg.hard_gates(model):
        hard = run(model, inputs)
    report = fg.convert_from_fermi(model)
    assert report.shrunk, str(report)
    assert not any(is_gated(m) for m in model.modules())
    assert report.params_after < report.params_before
    assert report.params_after == fg.count_parameters(model)
    assert report.macs_before is not None and report.macs_after < report.macs_before
    with torch.no_grad():
        out = run(model, inputs)  # other batch size than the example inputs
    scale = max(1.0, hard.abs().max().item())
    assert (out - hard).abs().max().item() / scale < 1e-4


def test_head_granularity_alone_gates_attention_heads():
    model, inputs = build("hf", "bert")
    fg.convert_to_fermi(model, fg.FermiConfig(granularity="head", target_sparsity=0.5),
                        example_inputs={k: v[:1] for k, v in inputs.items()})
    gated = [n for n, m in model.named_modules() if is_gated(m)]
    assert gated and all(n.endswith("attention.output.dense") for n in gated), gated
    fg.AnnealSchedule(total_steps=1, temperature=(1.0, 1e-4), target_sparsity=0.5).apply(model, 1)
    fg.convert_from_fermi(model)
    for layer in model.encoder.layer:
        assert layer.attention.self.num_attention_heads == 2
        assert layer.attention.output.dense.in_features == 2 * layer.attention.self.attention_head_size


def test_per_granularity_targets_remove_half_the_neurons_and_a_quarter_of_the_heads():
    model, inputs = build("hf", "bert")
    config = fg.FermiConfig(granularity=("channel", "head"), target_sparsity={"channel": 0.5, "head": 0.25})
    fg.convert_to_fermi(model, config, example_inputs={k: v[:1] for k, v in inputs.items()})
    opt = fg.FermiAnnealer(torch.optim.SGD(model.parameters(), lr=0.0), model, total_steps=2)
    opt.step()
    opt.step()
    fg.convert_from_fermi(model)
    for layer in model.encoder.layer:
        assert layer.attention.self.num_attention_heads == 3
        assert layer.intermediate.dense.out_features == 32
