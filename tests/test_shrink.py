"""Shrinking reproduces the hard-masked model: timm model matrix, property tests, rules and MAC counts."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _models import SmallCNN, SmallMLP, masked_vs_shrunk, n_params, random_keep, randomize_, whole_group_keep
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from fermigates.surgery.graph import build_dependency_graph
from fermigates.surgery.shrink import count_macs, macs_by_module, mask_model, shrink_model

TIMM_MODELS = {  # name -> (input size, prunable groups, pinned groups) with timm 1.0.x
    "resnet18": (64, 12, 1),  # 4 residual streams (the stem feeds the first), 8 block-internal; pinned: pooled output
    "resnet50": (64, 37, 1),  # stem, 4 streams, 2 per bottleneck
    "mobilenetv2_100": (64, 25, 1),  # stem, first block, 16 expansions, 6 residual streams, head
    "mobilenetv3_small_100": (64, 27, 1),
    "efficientnet_b0": (64, 40, 1),
    "convnext_atto": (64, 12, 5),  # MLP hidden per block; pinned: 4 residual streams under LayerNorm
    "regnetx_002": (64, 18, 1),  # grouped 3x3 convs pass whole groups (units of 8 channels)
}


@pytest.mark.parametrize("name", sorted(TIMM_MODELS))
def test_timm_shrunk_equals_masked(name):
    timm = pytest.importorskip("timm")
    size, n_prunable, n_pinned = TIMM_MODELS[name]
    model = randomize_(timm.create_model(name, pretrained=False).eval(), seed=1)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    graph = build_dependency_graph(model, x)
    assert (len(graph.prunable), len(graph.groups) - len(graph.prunable)) == (n_prunable, n_pinned), graph.summary()
    for g in graph.groups:
        assert g.prunable or g.reason
    patterns = [random_keep(graph, frac, seed) for seed, frac in enumerate((0.1, 0.5, 0.9))]
    patterns.append(whole_group_keep(graph, seed=7))
    for keep in patterns:
        err, result, shrunk = masked_vs_shrunk(model, graph, keep, x)
        assert err < 1e-4, (name, err)
        assert result.params_before == n_params(model)
        assert result.params_after == n_params(shrunk) < result.params_before
        assert not result.skipped


# ------------------------------------------------------------------------------------------- property tests
def _graph(model, x):
    return build_dependency_graph(model.eval(), x)


CNN, CNN_X = randomize_(SmallCNN().eval(), 3), torch.randn(1, 3, 6, 6)
CNN_GRAPH = _graph(CNN, CNN_X)
MLP, MLP_X = randomize_(SmallMLP().eval(), 4), torch.randn(3, 12)
MLP_GRAPH = _graph(MLP, MLP_X)


def keep_strategy(graph):
    return st.fixed_dictionaries({
        g.id: st.lists(st.booleans(), min_size=g.n_units, max_size=g.n_units).map(torch.tensor)
        for g in graph.prunable
    })


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(keep=keep_strategy(CNN_GRAPH))
def test_property_small_cnn(keep):
    err, result, shrunk = masked_vs_shrunk(CNN, CNN_GRAPH, keep, CNN_X)
    assert err < 1e-5
    assert result.params_after == n_params(shrunk)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(keep=keep_strategy(MLP_GRAPH))
def test_property_small_mlp(keep):
    err, result, _shrunk = masked_vs_shrunk(MLP, MLP_GRAPH, keep, MLP_X)
    assert err < 1e-5
    removed = sum(int((~k).sum()) for k in keep.values())
    assert (result.params_after < result.params_before) == (removed > 0)


# ------------------------------------------------------------------------------------------- behaviour
def test_changes_record_kept_indices_and_attrs():
    model = copy.deepcopy(MLP)
    g = next(g for g in MLP_GRAPH.prunable if g.member("fc1", "producer") is not None)
    assert g.n_units == 16 and g.member("fc1", "producer").index[1].tolist() == [1, 17]  # chunk(2) pairs rows j, j + 16
    keep = {g.id: torch.arange(16) % 4 != 0}
    result = shrink_model(model, MLP_GRAPH, keep)
    change = result.changes["fc1"]
    assert change.kept_out.tolist() == [i for i in range(32) if i % 4] and change.kept_in is None
    assert change.attrs == {"in_features": 16, "out_features": 24}
    assert change.attrs_before == {"in_features": 16, "out_features": 32}
    assert result.changes["fc2"].kept_in.tolist() == change.kept_out.tolist()
    assert model.fc1.weight.requires_grad and isinstance(model.fc1.weight, nn.Parameter)


def test_pinned_groups_are_skipped_and_bad_keep_rejected():
    model = copy.deepcopy(MLP)
    pinned = next(g for g in MLP_GRAPH.groups if not g.prunable)
    result = shrink_model(model, MLP_GRAPH, {pinned.id: torch.zeros(pinned.n_units, dtype=torch.bool)})
    assert result.skipped == [(pinned.id, pinned.reason)] and not result.changes
    with pytest.raises(ValueError, match="one per unit"):
        shrink_model(model, MLP_GRAPH, {MLP_GRAPH.prunable[0].id: torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="group ids"):
        shrink_model(model, MLP_GRAPH, {999: torch.ones(3, dtype=torch.bool)})


def test_whole_group_removal_keeps_one_zeroed_unit():
    model = copy.deepcopy(CNN)
    g = next(g for g in CNN_GRAPH.prunable if g.member("se_reduce", "producer") is not None)
    err, _result, shrunk = masked_vs_shrunk(CNN, CNN_GRAPH, {g.id: torch.zeros(g.n_units, dtype=torch.bool)}, CNN_X)
    assert err < 1e-6 and shrunk.se_reduce.out_channels == 1
    assert bool((shrunk.se_expand.weight == 0).all())
    assert model is not shrunk


def test_gated_twins_are_sliced_like_their_base():
    from fermigates.methods.fermi.layers import FermiLinear

    model = copy.deepcopy(MLP)
    model.fc1 = FermiLinear.from_linear(model.fc1)
    model.fc2 = FermiLinear.from_linear(model.fc2)
    g = next(g for g in MLP_GRAPH.prunable if g.member("fc1", "producer") is not None)
    result = shrink_model(model, MLP_GRAPH, {g.id: torch.arange(16) < 10})
    assert isinstance(model.fc1, FermiLinear) and model.fc1.weight.shape == (20, 16) and model.fc1.weight.requires_grad
    assert model.fc2.weight.shape == (16, 20) and "fc1" in result.changes
    assert model.fc2(torch.randn(2, 20)).shape == (2, 16)


def test_dtype_and_buffers_follow():
    model = copy.deepcopy(CNN).double()
    keep = random_keep(CNN_GRAPH, 0.5, 1)
    shrink_model(model, CNN_GRAPH, keep)
    bn = model.a[1]
    assert bn.running_mean.dtype == torch.float64 and bn.running_mean.shape == (bn.num_features,)
    assert model.gamma.shape[0] == model.b[0].out_channels
    model(CNN_X.double())


def test_mask_model_zeroes_consumer_columns_only():
    model = copy.deepcopy(MLP)
    g = next(g for g in MLP_GRAPH.prunable if g.member("fc1", "producer") is not None)
    mask_model(model, MLP_GRAPH, {g.id: torch.arange(16) != 5})
    assert bool((model.fc2.weight[:, [5, 21]] == 0).all()) and bool((model.fc1.weight[5] == MLP.fc1.weight[5]).all())


# ------------------------------------------------------------------------------------------- MACs
def test_count_macs_measures_linear_conv_and_attention():
    lin = nn.Linear(8, 4)
    assert count_macs(lin, torch.randn(3, 8)) == 3 * 8 * 4
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    assert count_macs(conv, torch.randn(1, 4, 5, 5)) == 6 * 25 * 2 * 9

    class Attn(nn.Module):
        def forward(self, q):
            return F.scaled_dot_product_attention(q, q, q) + (q @ q.transpose(-1, -2)) @ q

    q = torch.randn(1, 2, 5, 4)
    assert count_macs(Attn(), q) == 2 * (5 * 5 * 8) + 2 * 5 * 5 * 4 * 2
    per = macs_by_module(SmallMLP(), torch.randn(2, 12))
    assert per["fc1"] == 2 * 16 * 32 and sum(per.values()) == count_macs(SmallMLP(), torch.randn(2, 12))


def test_count_macs_falls_with_shrinking():
    model = copy.deepcopy(CNN)
    before = count_macs(model, CNN_X)
    shrink_model(model, CNN_GRAPH, random_keep(CNN_GRAPH, 0.5, 2))
    assert 0 < count_macs(model, CNN_X) < before
