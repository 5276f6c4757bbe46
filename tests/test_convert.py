import copy

import pytest
import torch
import torch.nn as nn

import fermigates as fg
from fermigates.methods.fermi.layers import is_gated

from _family_models import FAMILIES, build, run


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, modules_before, state_before):
    assert [type(m) for m in model.modules()] == [type(m) for m in modules_before]
    after = model.state_dict()
    assert after.keys() == state_before.keys()
    assert all(torch.equal(after[k], state_before[k]) for k in after)
    assert not hasattr(model, "_fermigates")


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


@pytest.mark.parametrize("family,name", FAMILIES, ids=[n for _, n in FAMILIES])
def test_families_convert_exactly_and_bake_to_the_hard_masked_model(family, name):
    model, inputs = build(family, name)
    with torch.no_grad():
        expected = run(model, inputs)
    fg.convert_to_fermi(model, fg.FermiConfig(granularity="weight", target_sparsity=0.5))
    assert fg.summary(model).modules, "nothing was gated"
    with torch.no_grad():
        torch.testing.assert_close(run(model, inputs), expected, rtol=1e-6, atol=1e-6)
    # anneal to the end of a schedule: T = 1e-4, mu at the 50% quantile of every layer
    fg.AnnealSchedule(total_steps=10, temperature=(1.0, 1e-4), target_sparsity=0.5).apply(model, 10)
    assert abs(fg.compute_sparsity(model).overall - 0.5) < 0.01
    with torch.no_grad(), fg.hard_gates(model):
        hard = run(model, inputs)
    report = fg.convert_from_fermi(model)
    assert not any(is_gated(m) for m in model.modules())
    assert not any(n.endswith("mu") for n, _ in model.named_parameters())
    with torch.no_grad():
        assert torch.equal(run(model, inputs), hard)
    assert abs(report.sparsity.overall - 0.5) < 0.01
    plain = {layer.name: layer for layer in fg.compute_sparsity(model).layers}
    for layer in report.sparsity.layers:  # the zeros of the baked weights are the gates' decisions
        assert plain[layer.name].kept <= layer.kept


def test_classifier_and_embeddings_are_left_alone_by_default():
    from _family_models import hf_model, timm_model

    model, _ = timm_model("resnet18")
    fg.convert_to_fermi(model)
    assert not is_gated(model.fc) and is_gated(model.conv1)
    gpt, _ = hf_model("gpt2")
    fg.convert_to_fermi(gpt)
    assert not is_gated(gpt.lm_head) and type(gpt.transformer.wte) is nn.Embedding
    assert is_gated(gpt.transformer.h[0].attn.c_attn)
    assert gpt.lm_head.weight is gpt.transformer.wte.weight  # tie intact


def test_targets_by_regex_list_exclude_and_filter_fn():
    model = _mlp()
    fg.convert_to_fermi(model, fg.FermiConfig(target_modules=r"[02]", keep_classifier=False))
    assert [n for n, m in model.named_modules() if is_gated(m)] == ["0", "2"]
    model = _mlp()
    fg.convert_to_fermi(model, fg.FermiConfig(target_modules=["2", "4"], exclude_modules=["4"], keep_classifier=False))
    assert [n for n, m in model.named_modules() if is_gated(m)] == ["2"]
    model = _mlp()
    seen = []
    fg.convert_to_fermi(model, filter_fn=lambda m, fqn: seen.append((type(m), fqn)) or fqn == "0")
    assert [n for n, m in model.named_modules() if is_gated(m)] == ["0"]
    assert (nn.Linear, "2") in seen


def test_shared_module_is_swapped_everywhere():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(4, 2))
    fg.convert_to_fermi(model)
    assert model[0] is model[2] and is_gated(model[0])


@pytest.mark.parametrize(
    "make_model,kwargs,error,match",
    [
        (lambda: nn.Sequential(nn.ReLU(), nn.Embedding(5, 3)), {}, ValueError, "nothing to convert"),
        (_mlp, {"config": "weight"}, TypeError, "config must be a fermigates.FermiConfig"),
        (_mlp, {"filter_fn": 3}, TypeError, "filter_fn"),
        (_mlp, {"cfg": {"target_modules": "nope.*"}}, ValueError, "target_modules='nope.*' matches no module"),
        (_mlp, {"cfg": {"target_modules": ["missing"]}}, ValueError, r"target_modules entries \['missing'\]"),
        (_mlp, {"cfg": {"exclude_modules": "(("}}, ValueError, "not a valid regular expression"),
        (_mlp, {"filter_fn": lambda m, n: False}, ValueError, "nothing to convert"),
    ],
)
def test_bad_input_is_a_clear_error_and_the_model_is_unchanged(make_model, kwargs, error, match):
    model = make_model()
    modules, state = list(model.modules()), _state(model)
    kwargs = dict(kwargs)
    if "cfg" in kwargs:
        kwargs["config"] = fg.FermiConfig(**kwargs.pop("cfg"))
    with pytest.raises(error, match=match):
        fg.convert_to_fermi(model, **kwargs)
    _same(model, modules, state)


@pytest.mark.parametrize(
    "cfg,match",
    [
        ({"temperature": 0.0}, "temperature must be a finite number > 0"),
        ({"temperature": -1.0}, "temperature must be a finite number > 0"),
        ({"granularity": "neuron"}, "granularity must be one of"),
        ({"target_sparsity": 1.0}, "target_sparsity must be in"),
        ({"mu_init": 2.0}, "mu_init must be"),
    ],
)
def test_bad_config_names_the_field(cfg, match):
    with pytest.raises(ValueError, match=match):
        fg.FermiConfig(**cfg)


def test_non_module_is_rejected():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got dict"):
        fg.convert_to_fermi({"weight": torch.zeros(3)})


def test_converting_twice_is_an_error_and_changes_nothing():
    model = _mlp()
    fg.convert_to_fermi(model)
    modules, state = list(model.modules()), _state(model)
    with pytest.raises(ValueError, match="already converted"):
        fg.convert_to_fermi(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in modules]


def test_failure_in_the_middle_of_the_swap_leaves_the_model_as_it_was(monkeypatch):
    import fermigates.convert as convert

    model = _mlp()
    modules, state = list(model.modules()), _state(model)
    calls = {"n": 0}
    original_setitem = dict.__setitem__

    class Exploding(dict):
        def __setitem__(self, key, value):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("boom")
            original_setitem(self, key, value)

    for m in model.modules():
        m._modules = Exploding(m._modules)
    with pytest.raises(RuntimeError, match="boom"):
        convert.convert_to_fermi(model, fg.FermiConfig(keep_classifier=False))
    _same(model, modules, state)


def test_structured_without_example_inputs_is_a_clear_error():
    model = _mlp()
    modules, state = list(model.modules()), _state(model)
    with pytest.raises(ValueError, match="needs example_inputs"):
        fg.convert_to_fermi(model, fg.FermiConfig(granularity="channel"))
    _same(model, modules, state)


def test_config_yaml_round_trip(tmp_path):
    cfg = fg.FermiConfig(granularity=("channel", "head"), target_sparsity=0.3, mu_init=0.2, target_modules=["fc1"])
    path = tmp_path / "c.yaml"
    cfg.to_yaml(path)
    assert fg.FermiConfig.from_yaml(path) == cfg
    with pytest.raises(ValueError, match="unknown FermiConfig fields"):
        fg.FermiConfig.from_dict({"granularity": "weight", "sparsity": 0.5})
    assert "granularity" in fg.FermiConfig.help()


def test_deepcopy_of_a_converted_model_is_independent():
    model = _mlp()
    fg.convert_to_fermi(model)
    clone = copy.deepcopy(model)
    clone[0].weight_gate.mu.data.fill_(123.0)
    assert model[0].weight_gate.mu.item() != 123.0
