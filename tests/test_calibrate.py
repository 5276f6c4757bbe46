"""fermigates.calibration: known optima, conv/depthwise/no-bias layers, masks, engines, and error cases."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

from fermigates.calibration.engine import CalibrationError, calibrate
from fermigates.calibration.selection import input_channel_rms, oneshot_channel_scores, select_channels

D = torch.float64


def _slice_linear(lin: nn.Linear, kept_in=None, kept_out=None) -> nn.Linear:
    w = lin.weight.detach()
    w = w if kept_out is None else w[kept_out]
    w = w if kept_in is None else w[:, kept_in]
    new = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None).to(w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if lin.bias is not None:
            new.bias.copy_(lin.bias if kept_out is None else lin.bias[kept_out])
    return new


def _slice_conv(conv: nn.Conv2d, kept_in=None, kept_out=None, groups=None) -> nn.Conv2d:
    w = conv.weight.detach()
    w = w if kept_out is None else w[kept_out]
    w = w if kept_in is None or conv.groups > 1 else w[:, kept_in]
    groups = groups or conv.groups
    new = nn.Conv2d(w.shape[1] * groups, w.shape[0], conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, groups, conv.bias is not None, conv.padding_mode).to(w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if conv.bias is not None:
            new.bias.copy_(conv.bias if kept_out is None else conv.bias[kept_out])
    return new


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("low_memory", [False, True])
def test_linear_known_optimum(bias, low_memory):
    torch.manual_seed(0)
    lin = nn.Linear(8, 5, bias=bias).to(D)
    kept = torch.arange(6)  # the removed inputs 6, 7 are linear combinations of the kept ones
    ref, model = _pair(lin, _slice_linear(lin, kept_in=kept), torch.randn(2, 6, dtype=D))
    x = torch.randn(300, 6, dtype=D)
    rep = calibrate(model, x, reference=ref, targets={"layer": (kept, None)}, ridge=0.0,
                    batch_size=64, low_memory=low_memory, progress=False)
    assert torch.allclose(model(x), ref(x), atol=1e-6, rtol=0)
    assert rep["layer"].err_before > 1e-3 and rep["layer"].err_after < 1e-12
    assert rep["layer"].in_kept == 6 and rep["layer"].in_ref == 8


class _Feed(nn.Module):
    """Feeds ``layer`` the free channels, plus (``expand``) fixed linear combinations of them."""

    def __init__(self, layer: nn.Module, mix: torch.Tensor, expand: bool):
        super().__init__()
        self.register_buffer("mix", mix)
        self.layer, self.expand = layer, expand

    def forward(self, free):
        x = torch.cat([free, torch.einsum("dc,nc...->nd...", self.mix, free)], dim=1) if self.expand else free
        return self.layer(x)


def _pair(ref_layer: nn.Module, pruned_layer: nn.Module, mix: torch.Tensor):
    return _Feed(ref_layer, mix, True), _Feed(pruned_layer, mix, False)


@pytest.mark.parametrize("kw", [dict(padding=1), dict(stride=2, padding=2, dilation=2),
                                dict(padding="same", padding_mode="reflect"), dict(padding=0, bias=False)])
def test_conv2d_known_optimum(kw):
    torch.manual_seed(1)
    conv = nn.Conv2d(6, 4, 3, **kw).to(D)
    mix = torch.randn(2, 4, dtype=D)
    kept = torch.arange(4)
    ref, model = _pair(conv, _slice_conv(conv, kept_in=kept), mix)
    x = torch.randn(40, 4, 9, 9, dtype=D)
    rep = calibrate(model, x, reference=ref, targets={"layer": (kept, None)}, ridge=0.0, batch_size=8,
                    progress=False)
    assert torch.allclose(model(x), ref(x), atol=1e-6, rtol=0)
    assert rep["layer"].err_after < 1e-12 < rep["layer"].err_before


def test_conv1d_and_grouped_conv_shapes():
    torch.manual_seed(2)
    for conv in (nn.Conv1d(6, 4, 3, padding=1), nn.Conv2d(6, 4, 3, groups=2, padding=1)):
        ref = nn.Sequential(conv).to(D)
        model = copy.deepcopy(ref)
        with torch.no_grad():
            model[0].weight.add_(0.3 * torch.randn_like(model[0].weight))
        x = torch.randn(16, 6, *([10] if isinstance(conv, nn.Conv1d) else [7, 7]), dtype=D)
        calibrate(model, x, reference=ref, targets={"0": (None, None)}, ridge=0.0, progress=False)
        assert torch.allclose(model(x), ref(x), atol=1e-8)


def test_depthwise_conv_shrunk():
    torch.manual_seed(3)
    ref = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=8)).to(D)
    kept = torch.tensor([0, 2, 3, 6, 7])
    model = nn.Sequential(_slice_conv(ref[0], kept_out=kept), _slice_conv(ref[1], kept, kept, groups=5))
    with torch.no_grad():
        model[1].weight.mul_(0.5)
        model[1].bias.add_(1.0)
    x = torch.randn(12, 3, 8, 8, dtype=D)
    rep = calibrate(model, x, reference=ref, targets={"1": (kept, kept)}, ridge=0.0, progress=False)
    assert torch.allclose(model(x), ref(x)[:, kept], atol=1e-8)
    assert rep["1"].groups == 5 and rep["1"].out_kept == 5


class _Tok(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 3)

    def forward(self, x, attention_mask=None):
        return self.proj(x)


def test_attention_mask_excludes_padding():
    torch.manual_seed(4)
    ref = _Tok().to(D)
    model = copy.deepcopy(ref)
    with torch.no_grad():
        model.proj.weight.mul_(0.7)  # equal shape, differing weights: explicit target
    x = torch.randn(4, 10, 6, dtype=D)
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[:, 7:] = 0
    padded = x.clone()
    padded[:, 7:] = 1e3 * torch.randn(4, 3, 6, dtype=D)  # garbage in padding positions

    def run(batches, reference):
        m = copy.deepcopy(model)
        calibrate(m, batches, reference=reference, targets={"proj": (None, None)}, progress=False)
        return m.proj.weight.detach()

    w_masked = run([{"x": padded, "attention_mask": mask}], ref)
    w_clean = run([{"x": x[:, :7], "attention_mask": torch.ones(4, 7)}], ref)
    assert torch.allclose(w_masked, w_clean, atol=1e-10)


def test_many_batches_equal_one_shot():
    torch.manual_seed(5)
    ref = nn.Sequential(nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 4))
    kept = torch.tensor([0, 1, 3, 4, 6, 8])
    model = copy.deepcopy(ref)
    model[0] = _slice_linear(ref[0], kept_out=kept)
    model[2] = _slice_linear(ref[2], kept_in=kept)
    targets = {"0": (None, kept), "2": (kept, None)}
    x = torch.randn(2000, 12)
    ws = []
    for batches in (list(x.split(37)), [x]):
        m = copy.deepcopy(model)
        calibrate(m, batches, reference=ref, targets=targets, progress=False)
        ws.append(torch.cat([m[2].weight.flatten(), m[2].bias, m[0].weight.flatten()]))
    assert torch.allclose(ws[0], ws[1], atol=1e-5)


def test_engines_agree_and_sequential_order():
    torch.manual_seed(6)
    ref = nn.Sequential(nn.Linear(10, 16), nn.GELU(), nn.Linear(16, 10), nn.GELU(), nn.Linear(10, 3))
    k1 = torch.arange(0, 16, 2)
    model = copy.deepcopy(ref)
    model[0] = _slice_linear(ref[0], kept_out=k1)
    model[2] = _slice_linear(ref[2], kept_in=k1)
    targets = {"4": (None, None), "2": (k1, None)}  # dict order is not network order
    x = torch.randn(256, 10)
    out = []
    for low in (False, True):
        m = copy.deepcopy(model)
        rep = calibrate(m, x, reference=ref, targets=targets, low_memory=low, batch_size=50, progress=False)
        assert [r.name for r in rep.layers] == ["2", "4"]
        out.append(m(x))
    assert torch.allclose(out[0], out[1], atol=1e-6)
    # coroutine threads are joined (other threads: tqdm's monitor, or one an earlier test of the full suite left)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("fermigates-calibrate-")]


def test_targets_none_masked_layers_keep_zero_columns():
    torch.manual_seed(7)
    ref = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 4))
    model = copy.deepcopy(ref)
    dead = torch.tensor([1, 5, 9])
    with torch.no_grad():
        model[2].weight[:, dead] = 0
    x = torch.randn(500, 8)
    before = (model(x) - ref(x)).pow(2).mean()
    rep = calibrate(model, x, reference=ref, progress=False)
    assert [r.name for r in rep.layers] == ["2"] and rep["2"].in_kept == 9
    assert torch.all(model[2].weight[:, dead] == 0)
    assert (model(x) - ref(x)).pow(2).mean() < 0.5 * before
    assert "2" in str(rep) and "err before" in str(rep)


def test_tuple_batches_and_dataloader():
    torch.manual_seed(8)
    ref = nn.Sequential(nn.Linear(5, 3))
    model = copy.deepcopy(ref)
    with torch.no_grad():
        model[0].weight[:, 0] = 0
    ds = torch.utils.data.TensorDataset(torch.randn(64, 5), torch.randint(0, 3, (64,)))
    rep = calibrate(model, torch.utils.data.DataLoader(ds, batch_size=16), reference=ref, max_batches=2,
                    progress=False)
    assert rep.n_batches == 2 and rep["0"].rows == 32


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, snap):
    return all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


def _pruned_mlp():
    torch.manual_seed(9)
    ref = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 2))
    kept = torch.arange(5)
    model = copy.deepcopy(ref)
    model[0] = _slice_linear(ref[0], kept_out=kept)
    model[2] = _slice_linear(ref[2], kept_in=kept)
    return ref, model, {"0": (None, kept), "2": (kept, None)}


def test_error_empty_data():
    ref, model, targets = _pruned_mlp()
    with pytest.raises(ValueError, match="empty"):
        calibrate(model, [], reference=ref, targets=targets, progress=False)


@pytest.mark.parametrize("low_memory", [False, True])
def test_error_bad_batch_leaves_model_untouched(low_memory):
    ref, model, targets = _pruned_mlp()
    snap = _snapshot(model)
    data = [torch.randn(8, 6), torch.randn(8, 6), torch.randn(8, 7)]
    with pytest.raises(CalibrationError, match="batch 2"):
        calibrate(model, data, reference=ref, targets=targets, low_memory=low_memory, progress=False)
    assert _unchanged(model, snap)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("fermigates-calibrate-")]


def test_error_mismatched_reference():
    ref, model, targets = _pruned_mlp()
    snap = _snapshot(model)
    other = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 2), nn.Linear(2, 2))
    with pytest.raises(ValueError, match="names differ"):
        calibrate(model, torch.randn(8, 6), reference=other, targets=targets, progress=False)
    bad = {"0": (None, torch.arange(4)), "2": targets["2"]}
    with pytest.raises(ValueError, match="weight shape"):
        calibrate(model, torch.randn(8, 6), reference=ref, targets=bad, progress=False)
    with pytest.raises(ValueError, match="targets"):  # shrunk layers need explicit targets
        calibrate(model, torch.randn(8, 6), reference=ref, progress=False)
    assert _unchanged(model, snap)


def test_oneshot_selection():
    torch.manual_seed(10)
    lin = nn.Linear(6, 3)
    with torch.no_grad():
        lin.weight[:, 2] = 0
    scores = oneshot_channel_scores(lin)
    keep = select_channels(scores, 0.5)
    assert len(keep) == 3 and 2 not in keep.tolist() and torch.equal(keep, keep.sort().values)
    model = nn.Sequential(lin)
    x = torch.randn(32, 6)
    x[:, 0] *= 100
    rms = input_channel_rms(model, [x], ["0"])["0"]
    assert 0 in select_channels(oneshot_channel_scores(lin, input_rms=rms), 1).tolist()
    with pytest.raises(ValueError, match="keep"):
        select_channels(scores, 1.5)


def test_transformers_conv1d_known_optimum():
    """GPT-2's ``Conv1D`` stores its weight (in, out): calibrated through the registered layout."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    mix = torch.randn(2, 6, dtype=D)

    class Ref(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = Conv1D(5, 8).to(D)

        def forward(self, free):
            return self.layer(torch.cat([free, free @ mix.T], dim=-1))

    class Pruned(nn.Module):
        def __init__(self, ref):
            super().__init__()
            self.layer = Conv1D(5, 6).to(D)
            with torch.no_grad():
                self.layer.weight.copy_(ref.layer.weight[:6])
                self.layer.bias.copy_(ref.layer.bias)

        def forward(self, free):
            return self.layer(free)

    ref = Ref()
    model = Pruned(ref)
    x = torch.randn(4, 50, 6, dtype=D)
    rep = calibrate(model, x, reference=ref, targets={"layer": (torch.arange(6), None)}, ridge=0.0, progress=False)
    assert rep["layer"].err_before > 1e-3
    assert torch.allclose(model(x), ref(x), atol=1e-6, rtol=0)
