"""``FermiConfig(round_to=k)``: channel gates keep a multiple of ``k`` channels (rounded up, never above all).

The gate's rounding (``FermiGate.keep``: the extra units are the best-scoring pruned ones), a property test
of it, the config's validation and round trips, and end to end through ``prune``: MobileNetV2 widths become
multiples of 8 (and are not without rounding), grouped convs (RegNetX, units of 8 channels) round in
channels, attention heads and weight gates are never rounded.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from _models import SmallMLP, randomize_
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fermigates as fg
from fermigates.methods.fermi.gates import FermiGate
from fermigates.methods.fermi.layers import GroupGate

timm = pytest.importorskip("timm")


def rounded(k: int, step: int, n: int) -> int:
    return min(n, math.ceil(k / step) * step)


# ------------------------------------------------------------------------------------------- the gate
def _gate_keeping(k: int, n: int = 20, scale: float = 2.0) -> tuple[FermiGate, torch.Tensor]:
    """A gate over ``n`` units with distinct scores whose hard decision keeps the ``k`` best."""
    scores = (torch.randperm(n, generator=torch.Generator().manual_seed(k)).float() + 1) * scale  # 1..n, * scale
    mu = n + 1 - k - 0.5  # normalised scores are 1..n: keep those >= n + 1 - k
    return FermiGate(n, scale, mu), scores


@pytest.mark.parametrize("k", [0, 1, 3, 8, 13, 16, 17, 20])
def test_gate_rounds_the_kept_count_up_with_the_best_pruned_units(k):
    n = 20
    gate, scores = _gate_keeping(k, n)
    plain = gate.keep(scores)
    assert int(plain.sum()) == k  # round_to defaults to 1: unchanged
    gate.round_to = 8
    keep = gate.keep(scores)
    want = rounded(k, 8, n)  # 0 stays 0, 8 and 16 stay, 17 -> 20 (capped), 13 -> 16
    assert keep.dtype == torch.bool and int(keep.sum()) == want
    assert bool(keep[plain].all())  # nothing the gate kept is dropped
    assert set(keep.nonzero().flatten().tolist()) == set(scores.topk(want).indices.tolist())
    gate.hard = True
    assert torch.equal(gate(scores), keep.float())  # the hard forward applies the rounded decision


def test_gate_round_to_one_is_the_plain_threshold():
    gate, scores = _gate_keeping(13)
    gate.round_to = 1
    assert torch.equal(gate.keep(scores), scores / 2.0 >= gate.mu.detach())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    values=st.lists(st.integers(0, 1000), min_size=1, max_size=64),
    mu_quarters=st.integers(-4, 4004),
    scale=st.sampled_from([0.25, 0.5, 1.0, 2.0, 4.0]),
    step=st.integers(1, 24),
)
def test_property_rounded_keep(values, mu_quarters, scale, step):
    # integer scores, power-of-two scale and mu in quarters: score / scale - mu is exact, ties are real ties
    scores = torch.tensor(values, dtype=torch.float32)
    n = scores.numel()
    gate = FermiGate(n, scale, mu_quarters / 4 / scale)
    plain = gate.keep(scores)
    gate.round_to = step
    keep = gate.keep(scores)
    k = int(plain.sum())
    assert int(keep.sum()) == rounded(k, step, n)
    assert bool(keep[plain].all())  # a superset of the unrounded decision
    if keep.any() and (~keep).any():
        assert scores[keep].min() >= scores[~keep].max()  # the extra units are the best pruned ones


# ------------------------------------------------------------------------------------------- the config
@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "8", None])
def test_config_rejects_bad_round_to(bad):
    with pytest.raises(ValueError, match="round_to"):
        fg.FermiConfig(granularity="channel", round_to=bad)
    with pytest.raises(ValueError, match="round_to"):
        fg.FermiConfig.from_dict({"granularity": "channel", "round_to": bad})
    with pytest.raises(ValueError, match="round_to"):
        dataclasses.replace(fg.FermiConfig(), round_to=bad)


def test_config_round_to_round_trips(tmp_path):
    assert fg.FermiConfig().round_to == 1
    config = fg.FermiConfig(granularity=("channel", "head"), round_to=16)
    assert config.to_dict()["round_to"] == 16
    assert fg.FermiConfig.from_dict(config.to_dict()) == config
    assert fg.FermiConfig.from_yaml(config.to_yaml()) == config
    path = tmp_path / "config.yaml"
    config.to_yaml(path)
    assert fg.FermiConfig.from_yaml(path).round_to == 16
    assert "round_to" in fg.FermiConfig.help()
    assert fg.load_recipe("channel50").fermi_config().round_to == 8


# ------------------------------------------------------------------------------------------- end to end
def _conv_widths(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    return {n: (m.in_channels, m.out_channels, m.groups) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def _prune_timm(name: str, round_to: int, sparsity: float):
    model = randomize_(timm.create_model(name, pretrained=False, num_classes=10).eval(), seed=1)
    before = _conv_widths(model)
    calib = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    report = fg.prune(model, calib.split(2), fg.FermiConfig(granularity="channel", round_to=round_to),
                      target_sparsity=sparsity, progress=False)
    return before, _conv_widths(model), report, model


def _off_grid(before, after, k: int, only_grouped: bool = False) -> list:
    """Channel counts (in and out) that changed and are not multiples of ``k``."""
    return [(name, before[name], w) for name, w in after.items()
            if (not only_grouped or w[2] > 1)
            and any(a != b and a % k for a, b in zip(w[:2], before[name][:2]))]


def _rounded_widths(before, unrounded, k: int) -> dict[str, int]:
    """Each conv's output width rounded up from the unrounded prune: same scores, same thresholds."""
    return {n: min(before[n][1], math.ceil(unrounded[n][1] / k) * k) for n in before}


def test_prune_mobilenet_widths_are_multiples_of_8():
    target = 0.37
    before, after, report, model = _prune_timm("mobilenetv2_100", 8, target)
    assert report.shrunk and report.max_abs_diff <= 1e-4, str(report)
    assert after != before  # something was pruned
    assert not _off_grid(before, after, 8)
    assert model.classifier.in_features % 8 == 0
    assert report.sparsity.overall <= target

    before1, after1, report1, _ = _prune_timm("mobilenetv2_100", 1, target)
    assert before1 == before
    assert _off_grid(before1, after1, 8)  # without rounding, widths land off the grid (the test can fail)
    # rounding only adds the next-best units: every width is the unrounded one rounded up, the sparsity lower
    assert {n: w[1] for n, w in after.items()} == _rounded_widths(before, after1, 8)
    assert report.sparsity.overall < report1.sparsity.overall <= target
    assert report.params_after > report1.params_after


def test_prune_regnet_grouped_convs_round_in_channels():
    # regnetx_002: grouped 3x3 convs of 8 channels per group, one unit per group: step = k // gcd(k, 8) units
    before, after1, report1, _ = _prune_timm("regnetx_002", 1, 0.37)
    assert report1.shrunk
    for k in (8, 16):
        b, after, report, _ = _prune_timm("regnetx_002", k, 0.37)
        assert b == before
        assert report.shrunk and report.max_abs_diff <= 1e-4, str(report)
        assert after != before
        assert not _off_grid(before, after, k)
        grouped = {n: w for n, w in after.items() if w[2] > 1}
        assert grouped and all(w[1] // w[2] == 8 for w in grouped.values())  # still 8 channels per group
        # k=8: a group of 8 channels already fills the step (grouped widths as unrounded: one unit per step,
        # not 8 groups); k=16: two groups per step
        assert {n: w[1] for n, w in after.items()} == _rounded_widths(before, after1, k)
    assert _off_grid(before, after1, 8)  # unrounded, the (ungrouped) stem lands off the grid of 8
    assert _off_grid(before, after1, 16, only_grouped=True)  # grouped widths are not all multiples of 16 unrounded


def test_heads_and_weight_gates_are_not_rounded():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    # round_to=16 over heads of 8 channels would be a step of 2 heads if heads were rounded
    config = fg.FermiConfig(granularity=("channel", "head"), round_to=16)

    torch.manual_seed(0)
    gated = transformers.BertModel(cfg).eval()
    fg.convert_to_fermi(gated, config, example_inputs=inputs)
    gates = [m for m in gated.modules() if isinstance(m, GroupGate)]
    heads = [g for g in gates if g.kind == "head"]
    channels = [g for g in gates if g.kind == "channel"]
    assert heads and channels
    assert all(g.round_to == 1 for g in heads)
    assert all(g.round_to == 16 for g in channels)  # one channel per unit: step 16

    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    report = fg.prune(model, [inputs], config, target_sparsity={"channel": 0.6, "head": 0.75}, progress=False)
    assert report.shrunk, str(report)
    for layer in model.encoder.layer:
        assert layer.attention.self.query.out_features == 8  # 1 of 4 heads of 8: not rounded up to 2
        width = layer.intermediate.dense.out_features
        assert width == 32  # 64 * 0.4 = 25.6 -> 32

    mlp = SmallMLP()
    fg.convert_to_fermi(mlp, fg.FermiConfig(granularity="weight", round_to=8))
    weight_gates = [m for m in mlp.modules() if isinstance(m, FermiGate)]
    assert weight_gates and all(g.round_to == 1 for g in weight_gates)


class _Grouped(nn.Module):
    """A grouped conv with ``c_in`` input and ``c_out`` output channels per group: a unit spans ``c_in``
    channels of ``c1``'s output and ``c_out`` of ``c2``'s output / ``c3``'s input."""

    def __init__(self, c_in: int, c_out: int, groups: int = 16) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, c_in * groups, 1)
        self.c2 = nn.Conv2d(c_in * groups, c_out * groups, 3, padding=1, groups=groups)
        self.c3 = nn.Conv2d(c_out * groups, 5, 1)

    def forward(self, x):
        return self.c3(torch.relu(self.c2(torch.relu(self.c1(x)))))


def test_units_of_3_channels_round_to_8_units():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    unrounded = _Grouped(3, 3).eval()
    model = _Grouped(3, 3).eval()
    model.load_state_dict(unrounded.state_dict())
    fg.prune(unrounded, x, fg.FermiConfig(granularity="channel"), target_sparsity=0.8, progress=False)
    assert unrounded.c2.out_channels == 12  # 4 of 16 units: 12 channels, not a multiple of 8
    report = fg.prune(model, x, fg.FermiConfig(granularity="channel", round_to=8), target_sparsity=0.8,
                      progress=False)
    assert report.shrunk and report.max_abs_diff <= 1e-4
    assert (model.c1.out_channels, model.c2.out_channels, model.c2.groups, model.c3.in_channels) == (24, 24, 8, 24)


# ------------------------------------------------------------------------------------------- uneven units
def test_uneven_unit_widths_round_every_layer():
    torch.manual_seed(0)
    model = _Grouped(2, 3).eval()
    x = torch.randn(2, 3, 8, 8)
    report = fg.prune(model, x, fg.FermiConfig(granularity="channel", round_to=8), target_sparsity=0.8,
                      progress=False)
    assert report.shrunk
    assert model.c1.out_channels < 32
    assert model.c1.out_channels % 8 == 0 and model.c2.out_channels % 8 == 0 and model.c3.in_channels % 8 == 0
