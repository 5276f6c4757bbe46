import pytest
import torch
import torch.nn as nn

from fermigates import FermiConv1d, FermiConv2d, FermiConv3d, FermiLinear
from fermigates.methods.fermi.layers import is_gated, twin_factory

CONVS = [
    nn.Conv1d(4, 6, 3),
    nn.Conv1d(4, 8, 5, stride=2, padding=2, dilation=2, groups=2, bias=False),
    nn.Conv2d(3, 5, 3, padding=1),
    nn.Conv2d(6, 6, 3, padding=1, groups=6),  # depthwise
    nn.Conv2d(6, 12, 3, padding=1, groups=6),  # depthwise with multiplier
    nn.Conv2d(4, 8, 3, stride=2, dilation=2, padding=2, groups=4, bias=False),
    nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
    nn.Conv2d(3, 4, 3, padding=2, padding_mode="circular"),
    nn.Conv2d(3, 4, 3, padding=1, padding_mode="replicate"),
    nn.Conv2d(3, 4, (1, 3), padding="same"),
    nn.Conv3d(2, 3, 3, padding=1),
    nn.Conv3d(4, 4, 3, groups=4, bias=False),
]


def _input(conv):
    return torch.randn((2, conv.in_channels) + (9,) * (conv.weight.dim() - 2))


@pytest.mark.parametrize("conv", CONVS, ids=lambda c: repr(c))
def test_open_conv_twin_equals_original(conv):
    torch.manual_seed(0)
    x = _input(conv)
    expected = conv(x)
    twin = twin_factory(conv)(conv)
    twin.add_weight_gate(temperature=1.0, init="open")
    assert isinstance(twin, type(conv)) and is_gated(twin)
    assert type(twin) in (FermiConv1d, FermiConv2d, FermiConv3d)
    torch.testing.assert_close(twin(x), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bias", [True, False])
def test_open_linear_twin_equals_original(bias):
    lin = nn.Linear(7, 5, bias=bias)
    x = torch.randn(3, 2, 7)
    twin = FermiLinear.from_linear(lin)
    twin.add_weight_gate()
    torch.testing.assert_close(twin(x), lin(x), rtol=0, atol=1e-6)


def test_twin_shares_parameters_and_loads_the_original_state_dict():
    lin = nn.Linear(4, 3)
    twin = FermiLinear.from_linear(lin)
    twin.add_weight_gate()
    assert twin.weight is lin.weight and twin.bias is lin.bias
    other = nn.Linear(4, 3)
    result = twin.load_state_dict(other.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert all(k.startswith("weight_gate.") for k in result.missing_keys)
    assert torch.equal(twin.weight, other.weight)


def test_masked_twin_bakes_to_the_plain_class():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    twin = twin_factory(conv)(conv)
    gate = twin.add_weight_gate(temperature=1e-3, init=0.5)
    x = torch.randn(1, 3, 6, 6)
    gate.hard = True
    hard = twin(x)
    plain = twin.to_plain()
    assert type(plain) is nn.Conv2d and not is_gated(plain)
    assert "weight_gate" not in dict(plain.named_modules()) and not hasattr(plain, "_slots")
    assert torch.equal(plain(x), hard)
    assert abs((plain.weight == 0).float().mean().item() - 0.5) < 0.05


def test_custom_forward_subclass_is_not_gated():
    class Standardised(nn.Conv2d):
        def forward(self, x):
            w = (self.weight - self.weight.mean()) / self.weight.std()
            return self._conv_forward(x, w, self.bias)

    assert twin_factory(Standardised(3, 3, 1)) is None
    assert twin_factory(nn.Conv2d(3, 3, 1)) is not None


def test_extra_repr_tells_the_gate():
    twin = FermiLinear.from_linear(nn.Linear(3, 2))
    twin.add_weight_gate()
    assert "weight_gate(mu=" in repr(twin) and "in_features=3" in repr(twin)
