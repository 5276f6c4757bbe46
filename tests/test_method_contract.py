"""The method contract, over the registry: every registered method and granularity goes through the same
convert -> train -> bake -> shrink -> save -> load path, with no branch of its own here. A method that joins
the registry joins this test. And a structured method defined in this file, knowing nothing of Fermi gates,
is pruned to a MAC budget by the shared ``prune``."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fermigates as fg
from fermigates.allocation import UnitGroup
from fermigates.core.state import find_state, get_state
from fermigates.core.twin import Twin, is_twin, make_twin, plain_copy
from fermigates.methods.base import Decisions, Method
from fermigates.methods.registry import METHODS, get_method, method_names, method_of
from fermigates.surgery.graph import build_dependency_graph
from fermigates.core.sparsity import LayerSparsity, SparsityReport

STEPS = 8


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 24, 3, padding=1, stride=2), nn.BatchNorm2d(24), nn.ReLU(),
            nn.Conv2d(24, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _cnn():
    torch.manual_seed(0)
    return (lambda: SmallCNN().eval()), torch.randn(4, 3, 12, 12)


def _hf(name):
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if name == "bert":
        cfg = tf.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=64)
        factory = lambda: tf.BertModel(cfg).eval()  # noqa: E731
    else:
        cfg = tf.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        factory = lambda: tf.LlamaForCausalLM(cfg).eval()  # noqa: E731
    ids = torch.randint(0, 99, (2, 10), generator=torch.Generator().manual_seed(1))
    return factory, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


MODELS = {"cnn": _cnn, "bert": lambda: _hf("bert"), "llama": lambda: _hf("llama")}


def _out(model, x) -> torch.Tensor:
    out = model(**x) if isinstance(x, dict) else model(x)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _cases():
    return [(name, g) for name in method_names() for g in get_method(name).granularities]


@pytest.mark.parametrize("method_name,granularity", _cases())
def test_every_method_converts_trains_bakes_saves_and_loads(method_name, granularity, tmp_path):
    converted = 0
    for model_name, build in MODELS.items():
        factory, x = build()
        torch.manual_seed(0)
        model = factory()
        config = fg.FermiConfig(method=method_name, granularity=granularity, target_sparsity=0.5)
        try:
            fg.convert_to_fermi(model, config, example_inputs=x)
        except ValueError as err:  # e.g. attention heads in a CNN: the model has no units of this kind
            assert "nothing to convert" in str(err), err
            continue
        converted += 1
        method = method_of(model)
        opt = fg.make_optimizer(model, lr=1e-2, total_steps=STEPS)
        for _ in range(STEPS):
            loss = _out(model, x).float().pow(2).mean()
            regularizer = getattr(opt, "sparsity_loss", None)
            if regularizer is not None:
                loss = loss + regularizer()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad(), method.decided(model):
            expected = _out(model, x)
            decided = fg.compute_sparsity(model)

        report = fg.convert_from_fermi(model)

        assert find_state(model) is None and not any(is_twin(m) for m in model.modules())
        with torch.no_grad():
            got = _out(model, x)
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5), (model_name, (got - expected).abs().max())
        assert [(l.name, l.kept, l.total) for l in report.sparsity.layers] == \
            [(l.name, l.kept, l.total) for l in decided.layers]
        assert 0 < report.sparsity.kept < report.sparsity.total
        assert report.params_after <= report.params_before
        if report.shrunk:  # structured decisions: physically smaller
            assert report.params_after < report.params_before and report.macs_after < report.macs_before
        assert f"({report.params_after / report.params_before:.3f}x)" in str(report)  # the summary tells the size

        fg.save_shrunk(model, tmp_path / model_name)
        loaded = fg.load_shrunk(factory(), tmp_path / model_name)
        with torch.no_grad():
            assert torch.equal(_out(loaded, x), got)
    assert converted >= 1, f"{method_name}/{granularity} converted none of {list(MODELS)}"


# -- a structured method that is not Fermi ------------------------------------------------------------------------
class _ColumnMasked(Twin):
    """A consumer whose input columns are multiplied by a fixed 0/1 mask (the decision of the method below)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.col_mask if self.mask_on else torch.ones_like(self.col_mask)
        shape = [1] * self.weight.dim()
        shape[1] = -1
        weight = self.weight * mask.view(shape).to(self.weight.dtype)
        if isinstance(self, nn.Linear):
            return F.linear(x, weight, self.bias)
        return self._conv_forward(x, weight, self.bias)


class _MaskedLinear(_ColumnMasked, nn.Linear):
    pass


class _MaskedConv2d(_ColumnMasked, nn.Conv2d):
    pass


class ColumnMaskMethod(Method):
    """Keeps whole channels by masking their consumers' columns; scores a unit by its producers' weight norm."""

    name = "colmask_test"
    granularities = ("channel",)

    def target(self, module, config):
        return type(module) in (nn.Linear, nn.Conv2d)

    def convert(self, model, config, targets, state, example_inputs=None):
        graph = build_dependency_graph(model, example_inputs)
        state.graph, state.example_inputs = graph, example_inputs
        modules, twins, groups = dict(model.named_modules()), {}, {}
        for group in graph.groups:
            consumers = [m for m in group.members if m.role == "consumer"]
            if group.kind != "channel" or not group.prunable or not consumers or \
                    any(m.module not in targets for m in consumers):
                continue
            for member in consumers:
                if member.module not in twins:
                    module = modules[member.module]
                    twin = make_twin(module, _MaskedLinear if isinstance(module, nn.Linear) else _MaskedConv2d)
                    twin.col_mask, twin.mask_on = torch.ones(module.weight.shape[1]), True
                    twins[member.module] = twin
            producers = [m for m in group.members if m.role == "producer"]
            score = sum(modules[m.module].weight.detach().flatten(1).pow(2).sum(1)[m.index].sum(1)
                        for m in producers).sqrt()
            groups[group.id] = (group.n_units, score / score.mean(), [(m.module, m.index) for m in consumers])
            state.summary.n_gates += 1
            state.summary.n_units += group.n_units
        if not twins:
            raise ValueError(f"nothing to convert in {type(model).__name__}")
        state.extra.update(groups=groups, keep={})
        return twins

    def is_twin(self, module):
        return isinstance(module, _ColumnMasked)

    def unit_groups(self, model):
        return [UnitGroup(gid, n, scores=s, label=f"group {gid}")
                for gid, (n, s, _) in get_state(model).extra["groups"].items()]

    def set_keep(self, model, keep):
        state, modules = get_state(model), dict(model.named_modules())
        for gid, mask in keep.items():
            state.extra["keep"][gid] = mask.bool().cpu()
            for name, index in state.extra["groups"][gid][2]:
                modules[name].col_mask[index[~mask.bool().cpu()].reshape(-1)] = 0.0

    @contextlib.contextmanager
    def dense(self, model):
        twins = self.twins(model).values()
        for t in twins:
            t.mask_on = False
        try:
            yield model
        finally:
            for t in twins:
                t.mask_on = True

    def make_dense(self, model):
        for t in self.twins(model).values():
            t.mask_on = False

    def decisions(self, model):
        twins = self.twins(model)
        zero = [(t.weight, (t.col_mask == 0).view(1, -1, *[1] * (t.weight.dim() - 2)).expand_as(t.weight))
                for t in twins.values()]
        plain = {id(t): plain_copy(t, drop_attrs=("col_mask", "mask_on")) for t in twins.values()}
        return Decisions(plain, zero, dict(get_state(model).extra["keep"]))

    def sparsity(self, model):
        state = get_state(model)
        return SparsityReport([LayerSparsity(f"group {gid}", "units", int(state.extra["keep"].get(
            gid, torch.ones(n, dtype=torch.bool)).sum()), n, kind="channel")
            for gid, (n, _, _) in state.extra["groups"].items()])

    def unconvert(self, model):
        return {id(t): plain_copy(t, drop_attrs=("col_mask", "mask_on")) for t in self.twins(model).values()}


@pytest.fixture
def colmask():
    METHODS[ColumnMaskMethod.name] = ColumnMaskMethod()
    yield ColumnMaskMethod.name
    METHODS.pop(ColumnMaskMethod.name)


@pytest.mark.parametrize("selection", ["obs", "magnitude"])
def test_prune_serves_a_method_that_is_not_fermi(colmask, selection):
    """prune, allocation and the bake reach the units only through the method interface: a method defined here
    is pruned to 2x fewer MACs, and chooses exactly what the Fermi method chooses from the same scores."""
    factory, x = _cnn()
    data = [torch.randn(8, 3, 12, 12, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    ours, fermi = factory(), factory()
    fermi.load_state_dict(ours.state_dict())
    reports = {}
    for model, name in ((ours, colmask), (fermi, "fermi")):
        reports[name] = fg.prune(model, data, fg.FermiConfig(method=name, granularity="channel"),
                                 budget="macs:0.5", selection=selection, progress=False)
    report = reports[colmask]
    assert report.shrunk and report.max_abs_diff <= 1e-4
    assert abs(report.budget.measured - 0.5) <= 0.02 * 0.5 + 0.02
    assert not any(is_twin(m) for m in ours.modules()) and find_state(ours) is None
    assert [type(m) for m in ours.modules() if isinstance(m, (nn.Linear, nn.Conv2d))] == \
        [nn.Conv2d, nn.Conv2d, nn.Conv2d, nn.Linear]
    assert report.macs_after == reports["fermi"].macs_after
    with torch.no_grad():
        assert torch.allclose(ours(x), fermi(x), rtol=1e-5, atol=1e-6)


def test_a_method_conversion_that_fails_leaves_the_model_as_it_was(colmask):
    factory, x = _cnn()
    model = factory()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="granularity"):
        fg.convert_to_fermi(model, fg.FermiConfig(method=colmask, granularity="head"), example_inputs=x)
    assert find_state(model) is None and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
