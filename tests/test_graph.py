"""Dependency-graph unit tests on tiny hand-built modules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _models import Lambda, SmallCNN, SmallMLP, masked_vs_shrunk, random_keep
from torch import nn

from fermigates.surgery.graph import build_dependency_graph


def group_of(graph, module: str, role: str = "producer"):
    hits = [g for g in graph.groups if g.member(module, role) is not None]
    assert hits, f"no group with {role} {module}: {graph.groups}"
    return hits[0]


def roles(group) -> set[tuple[str, str]]:
    return {(m.module, m.role) for m in group.members}


def head(c: int) -> nn.Linear:
    return nn.Linear(c, 2)


def pooled_head(self, x):
    return self.head(x.mean((2, 3)))


def test_residual_add_couples_producers():
    def fn(self, x):
        y = self.a(x) + self.b(x)
        return pooled_head(self, self.c(y))

    m = Lambda(fn, a=nn.Conv2d(3, 6, 1), b=nn.Conv2d(3, 6, 3, padding=1), c=nn.Conv2d(6, 4, 1), head=head(4))
    g = group_of(build_dependency_graph(m, torch.randn(1, 3, 5, 5)), "a")
    assert g.prunable and g.n_units == 6
    assert roles(g) == {("a", "producer"), ("b", "producer"), ("c", "consumer")}
    assert torch.equal(g.member("a").index, g.member("b").index)


def test_cat_concatenates_units():
    def fn(self, x):
        return pooled_head(self, self.c(torch.cat([self.a(x), self.b(x)], dim=1)))

    m = Lambda(fn, a=nn.Conv2d(3, 2, 1), b=nn.Conv2d(3, 3, 1), c=nn.Conv2d(5, 4, 1), head=head(4))
    graph = build_dependency_graph(m, torch.randn(1, 3, 4, 4))
    ga, gb = group_of(graph, "a"), group_of(graph, "b")
    assert ga.id != gb.id and ga.prunable and gb.prunable
    assert ga.member("c", "consumer").index.reshape(-1).tolist() == [0, 1]
    assert gb.member("c", "consumer").index.reshape(-1).tolist() == [2, 3, 4]


def test_flatten_before_linear_gives_spatial_width():
    def fn(self, x):
        return self.fc(torch.flatten(F.relu(self.conv(x)), 1))

    m = Lambda(fn, conv=nn.Conv2d(3, 4, 3, padding=1), fc=nn.Linear(4 * 9, 5))
    g = group_of(build_dependency_graph(m, torch.randn(1, 3, 3, 3)), "conv")
    assert g.prunable and g.n_units == 4
    assert torch.equal(g.member("fc", "consumer").index, torch.arange(36).reshape(4, 9))


def test_depthwise_and_batchnorm_pass_through():
    def fn(self, x):
        return pooled_head(self, self.pw(F.relu(self.bn(self.dw(self.a(x))))))

    m = Lambda(fn, a=nn.Conv2d(3, 6, 1), dw=nn.Conv2d(6, 6, 3, padding=1, groups=6), bn=nn.BatchNorm2d(6),
               pw=nn.Conv2d(6, 4, 1), head=head(4))
    g = group_of(build_dependency_graph(m, torch.randn(1, 3, 5, 5)), "a")
    assert g.prunable and g.n_units == 6
    assert {("dw", "passthrough"), ("bn", "passthrough"), ("pw", "consumer")} <= roles(g)


def test_grouped_conv_units_are_whole_groups():
    def fn(self, x):
        return pooled_head(self, self.c(self.g(self.a(x))))

    m = Lambda(fn, a=nn.Conv2d(3, 8, 1), g=nn.Conv2d(8, 8, 3, padding=1, groups=2), c=nn.Conv2d(8, 4, 1),
               head=head(4))
    graph = build_dependency_graph(m, torch.randn(1, 3, 5, 5))
    g = group_of(graph, "a")
    assert g.prunable and g.n_units == 2 and g.member("a").width == 4
    assert g.member("c", "consumer").width == 4
    err, result, _ = masked_vs_shrunk(m, graph, {g.id: torch.tensor([False, True])}, torch.randn(1, 3, 5, 5))
    assert err < 1e-5 and result.changes["g"].attrs["groups"] == 1


def test_squeeze_excitation_couples_gate_with_features():
    def fn(self, x):
        x = self.a(x)
        s = torch.sigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True)))))
        return pooled_head(self, self.c(x * s))

    m = Lambda(fn, a=nn.Conv2d(3, 6, 1), reduce=nn.Conv2d(6, 2, 1), expand=nn.Conv2d(2, 6, 1),
               c=nn.Conv2d(6, 4, 1), head=head(4))
    graph = build_dependency_graph(m, torch.randn(1, 3, 4, 4))
    g = group_of(graph, "a")
    assert roles(g) == {("a", "producer"), ("expand", "producer"), ("reduce", "consumer"), ("c", "consumer")}
    inner = group_of(graph, "reduce")
    assert inner.prunable and roles(inner) == {("reduce", "producer"), ("expand", "consumer")}


def test_chunk_couples_positions_of_each_chunk():
    def fn(self, x):
        a, b = self.a(x).chunk(2, dim=-1)
        return self.p(a * torch.sigmoid(b))

    m = Lambda(fn, a=nn.Linear(4, 6), p=nn.Linear(3, 2))
    x = torch.randn(1, 4)
    graph = build_dependency_graph(m, x)
    g = group_of(graph, "a")
    assert g.prunable and g.member("a").index.tolist() == [[0, 3], [1, 4], [2, 5]]
    err, result, _ = masked_vs_shrunk(m, graph, {g.id: torch.tensor([True, False, True])}, x)
    assert err < 1e-6 and result.changes["a"].kept_out.tolist() == [0, 2, 3, 5]


@pytest.mark.parametrize("pick", [
    lambda h: h.split([2, 4], dim=-1)[1],
    lambda h: h[..., 1:],
    lambda h: h[..., :-1],
    lambda h: h.view(1, 2, 3).sum(1),
    lambda h: h.index_select(-1, torch.tensor([5, 4, 3, 2, 1, 0])),
    lambda h: h.roll(1, dims=-1),
])
def test_size_dependent_structural_ops_pin(pick):
    width = pick(torch.zeros(1, 6)).shape[-1]
    m = Lambda(lambda self, x: self.p(pick(self.a(x))), a=nn.Linear(4, 6), p=nn.Linear(width, 2))
    g = group_of(build_dependency_graph(m, torch.randn(1, 4)), "a")
    assert not g.prunable and "number of channels" in g.reason


def test_size_free_structural_ops_keep_channels():
    def fn(self, x):
        h = self.a(x)                                  # (1, 5, 6)
        h = h.transpose(1, 2).reshape(1, -1, 5).flip(-1)[:, :, 1:].transpose(1, 2)
        h = torch.cat([h[:, :1], h], dim=1).repeat(1, 2, 1)
        return self.p(h.flatten(0, 1)[0])

    m = Lambda(fn, a=nn.Linear(4, 6), p=nn.Linear(6, 2))
    g = group_of(build_dependency_graph(m, torch.randn(1, 5, 4)), "a")
    assert g.prunable, g.reason


def test_unknown_op_pins_with_reason():
    def fn(self, x):
        return self.b(torch.logit(torch.sigmoid(self.a(x))))

    m = Lambda(fn, a=nn.Linear(4, 6), b=nn.Linear(6, 2))
    g = group_of(build_dependency_graph(m, torch.randn(1, 4)), "a")
    assert not g.prunable and "unknown op logit" in g.reason


def test_output_reaching_channels_are_pinned():
    def fn(self, x):
        h = self.a(x)
        return self.b(h), h

    m = Lambda(fn, a=nn.Linear(4, 6), b=nn.Linear(6, 2))
    graph = build_dependency_graph(m, torch.randn(1, 4))
    assert "model output" in group_of(graph, "a").reason
    assert "model output" in group_of(graph, "b").reason


@pytest.mark.parametrize("mix, word", [
    (lambda self, h, x: h + x, "no prunable origin"),
    (lambda self, h, x: F.layer_norm(h, h.shape[-1:]), "layer_norm"),
    (lambda self, h, x: torch.softmax(h, dim=-1), "softmax"),
    (lambda self, h, x: h / h.norm(dim=-1, keepdim=True), "reduces over channels"),
    (lambda self, h, x: h @ h.transpose(-1, -2) @ h, "matmul"),
])
def test_channel_mixing_pins(mix, word):
    m = Lambda(lambda self, x: self.b(mix(self, self.a(x), x)), a=nn.Linear(4, 4), b=nn.Linear(4, 2))
    g = group_of(build_dependency_graph(m, torch.randn(1, 3, 4)), "a")
    assert not g.prunable and word in g.reason


def test_reduction_over_tokens_keeps_channels():
    m = Lambda(lambda self, x: self.b(torch.softmax(self.a(x), dim=1).mean(1)), a=nn.Linear(4, 6), b=nn.Linear(6, 2))
    assert group_of(build_dependency_graph(m, torch.randn(1, 5, 4)), "a").prunable


def test_layer_scale_parameter_is_a_member():
    m = SmallCNN()
    graph = build_dependency_graph(m, torch.randn(1, 3, 6, 6))
    g = group_of(graph, "stem.0")
    gamma = [mm for mm in g.members if mm.param == "gamma"]
    assert g.prunable and len(gamma) == 1 and gamma[0].module == "" and gamma[0].axis == 0


def test_tied_weights_are_pinned():
    emb, proj = nn.Linear(4, 6), nn.Linear(6, 4)
    m = Lambda(lambda self, x: self.mid(torch.relu(self.emb(x))).sum(-1), emb=emb, mid=proj)
    other = nn.Linear(6, 4)
    other.weight = proj.weight
    m.other = other
    g = group_of(build_dependency_graph(m, torch.randn(1, 4)), "emb")
    assert not g.prunable and "shares a weight" in g.reason


def test_module_called_twice_joins_its_columns():
    def fn(self, x):
        return self.shared(torch.relu(self.a(x))) + self.shared(torch.relu(self.b(x)))

    m = Lambda(fn, a=nn.Linear(4, 5), b=nn.Linear(4, 5), shared=nn.Linear(5, 2))
    g = group_of(build_dependency_graph(m, torch.randn(1, 4)), "a")
    assert g.prunable and g.member("b") is not None and g.n_units == 5


def test_attention_heads_are_units():
    timm = pytest.importorskip("timm")
    from timm.layers import Attention

    m = Lambda(lambda self, x: self.fc(self.attn(F.gelu(self.inp(x))).mean(1)),
               inp=nn.Linear(8, 16), attn=Attention(16, num_heads=4), fc=nn.Linear(16, 3))
    x = torch.randn(1, 5, 8)
    graph = build_dependency_graph(m, x)
    heads = [g for g in graph.groups if g.kind == "head"]
    assert len(heads) == 1 and heads[0].n_units == 4 and heads[0].prunable
    assert roles(heads[0]) == {("attn", "attention"), ("attn.qkv", "producer"), ("attn.proj", "consumer")}
    assert heads[0].member("attn.qkv").width == 12
    keep = {heads[0].id: torch.tensor([True, False, True, False])}
    err, _result, shrunk = masked_vs_shrunk(m, graph, keep, x)
    assert err < 1e-5 and shrunk.attn.num_heads == 2 and shrunk.attn.qkv.out_features == 24
    assert timm is not None


def test_models_and_inputs_of_all_forms():
    m = SmallMLP()
    x = torch.randn(2, 12)
    for inputs in (x, (x,), {"x": x}):
        graph = build_dependency_graph(m, inputs)
        assert [g.n_units for g in graph.prunable] == [16, 16]
    with pytest.raises(TypeError, match="example_inputs"):
        build_dependency_graph(m, 3)


def test_trace_leaves_model_state_alone():
    m = SmallCNN().train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    build_dependency_graph(m, torch.randn(1, 3, 6, 6))
    assert m.training and all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert not m._forward_hooks and not m.stem[0]._forward_pre_hooks


def test_small_models_shrink_exactly():
    for m, x in ((SmallCNN(), torch.randn(1, 3, 6, 6)), (SmallMLP(), torch.randn(2, 12))):
        graph = build_dependency_graph(m.eval(), x)
        err, _, _ = masked_vs_shrunk(m, graph, random_keep(graph, 0.5, 0), x)
        assert err < 1e-5


def test_dataclass_outputs_are_pinned():
    from dataclasses import dataclass

    @dataclass
    class Out:
        features: torch.Tensor

    m = Lambda(lambda self, x: Out(self.a(x)), a=nn.Linear(4, 6))
    assert "model output" in group_of(build_dependency_graph(m, torch.randn(1, 4)), "a").reason


@pytest.mark.parametrize("write", ["setitem", "view_copy", "view_add"])
def test_writes_into_a_channel_range_pin(write):
    def fn(self, x):
        h = self.a(x)
        if write == "setitem":
            h[:, :3] = self.b(x)
        elif write == "view_copy":
            h.narrow(1, 0, 3).copy_(self.b(x))
        else:
            h[:, :3] += self.b(x)
        return self.c(h)

    m = Lambda(fn, a=nn.Linear(4, 6), b=nn.Linear(4, 3), c=nn.Linear(6, 2))
    graph = build_dependency_graph(m, torch.randn(1, 4))
    assert not group_of(graph, "a").prunable and not group_of(graph, "b").prunable


def test_in_place_add_into_a_full_view_joins():
    def fn(self, x):
        h = self.a(x)[:, :6]
        h += self.b(x)
        return self.c(h)

    m = Lambda(fn, a=nn.Linear(4, 6), b=nn.Linear(4, 6), c=nn.Linear(6, 2))
    x = torch.randn(1, 4)
    graph = build_dependency_graph(m, x)
    g = group_of(graph, "a")
    assert g.prunable and g.member("b") is not None
    err, _, _ = masked_vs_shrunk(m, graph, {g.id: torch.arange(6) % 2 == 0}, x)
    assert err < 1e-6


def test_depthwise_multiplier_shrinks_exactly():
    def fn(self, x):
        return pooled_head(self, self.c(F.relu(self.dw(self.a(x)))))

    m = Lambda(fn, a=nn.Conv2d(3, 4, 1), dw=nn.Conv2d(4, 8, 3, padding=1, groups=4), c=nn.Conv2d(8, 3, 1),
               head=head(3))
    x = torch.randn(1, 3, 5, 5)
    graph = build_dependency_graph(m, x)
    g = group_of(graph, "a")
    assert g.prunable and g.member("dw", "passthrough").width == 2 and g.member("c", "consumer").width == 2
    err, _result, shrunk = masked_vs_shrunk(m, graph, {g.id: torch.tensor([True, False, False, True])}, x)
    assert err < 1e-6 and (shrunk.dw.in_channels, shrunk.dw.out_channels, shrunk.dw.groups) == (2, 4, 2)


def test_transposed_conv_consumes_and_produces():
    def fn(self, x):
        return pooled_head(self, self.c(F.relu(self.up(F.relu(self.a(x))))))

    m = Lambda(fn, a=nn.Conv2d(3, 6, 1), up=nn.ConvTranspose2d(6, 4, 2, stride=2), c=nn.Conv2d(4, 3, 1),
               head=head(3))
    x = torch.randn(1, 3, 4, 4)
    graph = build_dependency_graph(m, x)
    ga, gu = group_of(graph, "a"), group_of(graph, "up")
    assert ga.prunable and gu.prunable and ("up", "consumer") in roles(ga)
    keep = {ga.id: torch.arange(6) % 2 == 0, gu.id: torch.tensor([True, False, True, True])}
    err, _, shrunk = masked_vs_shrunk(m, graph, keep, x)
    assert err < 1e-6 and (shrunk.up.in_channels, shrunk.up.out_channels) == (3, 3)


def test_one_channel_gate_broadcast_over_channels_is_pinned_alone():
    def fn(self, x):
        h = self.a(x)
        return pooled_head(self, self.c(h * torch.sigmoid(self.gate(h))))

    m = Lambda(fn, a=nn.Conv2d(3, 6, 1), gate=nn.Conv2d(6, 1, 3, padding=1), c=nn.Conv2d(6, 4, 1), head=head(4))
    graph = build_dependency_graph(m, torch.randn(1, 3, 5, 5))
    assert group_of(graph, "a").n_units == 6 and group_of(graph, "a").prunable
    assert "broadcasts" in group_of(graph, "gate").reason
