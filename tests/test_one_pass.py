"""``prune(calibration="one-pass")``: the layers that lost inputs re-fitted from the selection pass's Grams."""

import copy

import pytest
import torch
from _family_models import build
from torch import nn

import fermigates as fg


def _bert_batches(n_batches=3, batch=8, seq=12):
    torch.manual_seed(1)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(0, 99, (batch, seq))
        mask = torch.ones_like(ids)
        mask[: batch // 2, seq - 4:] = 0  # padding rows must not enter the statistics
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


class _CountBatches:
    """Counts forwards of the model on full calibration batches (example inputs have batch 1)."""

    def __init__(self, model, batch):
        self.calls = 0
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)
        self.batch = batch

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[0] == self.batch:
            self.calls += 1


@pytest.mark.parametrize("granularity", ["channel", ("channel", "head")])
def test_one_pass_solves_the_first_layer_as_calibration_does_and_lands_the_budget(granularity):
    dense, _ = build("hf", "bert")
    data = _bert_batches()
    cfg = fg.FermiConfig(granularity=granularity)
    seq, one = copy.deepcopy(dense), copy.deepcopy(dense)
    r_seq = fg.prune(seq, data, cfg, budget="macs:0.6", progress=False)
    r_one = fg.prune(one, data, cfg, budget="macs:0.6", calibration="one-pass", progress=False)
    assert r_one.macs_after == r_seq.macs_after and r_one.kept.keys() == r_seq.kept.keys()
    assert [row.name for row in r_one.calibration.layers] == [row.name for row in r_seq.calibration.layers]
    assert r_one.calibration.from_selection and not r_seq.calibration.from_selection
    # the first pruned layer sees the dense model's inputs in both: the same solve
    first = r_seq.calibration.layers[0].name
    w_seq, w_one = seq.get_submodule(first), one.get_submodule(first)
    torch.testing.assert_close(w_one.weight, w_seq.weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w_one.bias, w_seq.bias, rtol=1e-4, atol=1e-5)
    assert r_one.calibration.layers[0].rows == r_seq.calibration.layers[0].rows == 3 * (8 * 12 - 4 * 4)
    for row in r_one.calibration.layers:
        assert row.err_after < row.err_before
    assert "one pass" in str(r_one.calibration)


def test_one_pass_runs_the_calibration_batches_once():
    dense, _ = build("hf", "bert")
    data = _bert_batches()
    counts = {}
    for mode in ("sequential", "one-pass"):
        model = copy.deepcopy(dense)
        counter = _CountBatches(model, batch=8)
        fg.prune(model, data, fg.FermiConfig(granularity="channel"), budget="units:0.5", calibration=mode,
                 progress=False)
        counts[mode] = counter.calls
    assert counts["one-pass"] == len(data)  # the selection pass only (the model is first tried on one sample)
    assert counts["sequential"] > counts["one-pass"]


def test_one_pass_without_shrink_writes_the_kept_columns_only():
    dense, x = build("hf", "bert")
    data = _bert_batches()
    shrunk, masked = copy.deepcopy(dense), copy.deepcopy(dense)
    fg.prune(shrunk, data, fg.FermiConfig(granularity="channel"), budget="units:0.5", calibration="one-pass",
             progress=False)
    report = fg.prune(masked, data, fg.FermiConfig(granularity="channel"), budget="units:0.5",
                      calibration="one-pass", shrink=False, progress=False)
    assert not report.shrunk
    with torch.no_grad():
        torch.testing.assert_close(masked(**x).last_hidden_state, shrunk(**x).last_hidden_state,
                                   rtol=1e-4, atol=1e-5)
    w = masked.encoder.layer[0].output.dense.weight
    assert int((w == 0).all(0).sum()) == 32  # half of the 64 neurons' columns stay zero


@pytest.mark.parametrize("kwargs,match", [({"selection": "magnitude"}, "selection='obs'"),
                                          ({"calibrate_layers": "all"}, "calibrate_layers='pruned'"),
                                          ({"calibration": "twice"}, "'sequential' or 'one-pass'")])
def test_one_pass_refuses_what_it_cannot_do(kwargs, match):
    model, x = build("hf", "bert")
    kwargs = {"calibration": "one-pass", **kwargs}
    with pytest.raises(ValueError, match=match):
        fg.prune(model, [x], budget="units:0.5", progress=False, **kwargs)
    assert not hasattr(model, "_fermigates")


def test_one_pass_on_conv_layers_names_them_and_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"one-pass.*'2'.*calibration='sequential'"):
        fg.prune(model, [torch.randn(4, 3, 8, 8)], budget="units:0.5", calibration="one-pass", progress=False)
    assert not hasattr(model, "_fermigates") and isinstance(model[0], nn.Conv2d) and type(model[0]) is nn.Conv2d
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
