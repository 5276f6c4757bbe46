"""Calibration without a second dense pass: the selection pass of ``prune`` records the dense outputs the ridge
fit needs; the blocked OBS removal order; per-phase timings in the calibration report."""

import copy

import pytest
import torch
import torch.nn as nn

import fermigates as fg
import fermigates.calibration.selection as selection
from fermigates.calibration.selection import obs_removal_order
from _family_models import build
from _models import SmallCNN, randomize_


def _naive_greedy_obs(w: torch.Tensor, b: torch.Tensor, gram: torch.Tensor, n_remove: int, ridge: float):
    """Greedy removal by brute force: at each step drop the column whose removal, after the ridge-damped
    least-squares refit of the remaining columns toward the layer's own outputs, costs least."""
    n = w.shape[1]
    wb = torch.cat([w, b[:, None]], 1).double()
    h = gram.double().clone()
    h.diagonal()[:n] += ridge * h.diagonal()[:n].mean()
    alive, order = list(range(n)), []
    for _ in range(n_remove):
        best = None
        for j in alive:
            keep = [c for c in alive if c != j] + [n]
            # min_v (wb - v S)ᵀ H (wb - v S) over v on the kept columns: cost = wb H wbᵀ - wb H_:K H_KK⁻¹ H_K: wbᵀ
            hk = h[keep][:, keep]
            cross = wb @ h[:, keep]
            cost = float((wb @ h * wb).sum() - (cross @ torch.linalg.solve(hk, cross.T)).trace())
            if best is None or cost < best[0]:
                best = (cost, j)
        alive.remove(best[1])
        order.append(best[1])
    return order


def test_obs_removal_order_is_the_greedy_optimal_brain_surgeon_order():
    torch.manual_seed(0)
    lin = nn.Linear(10, 4)
    x = torch.randn(200, 10) @ torch.randn(10, 10)
    x1 = torch.cat([x, torch.ones(200, 1)], 1).double()
    gram = x1.T @ x1
    order, cost = obs_removal_order(lin, gram, 6, ridge=1e-2, blocks=6)  # one column per step: exact greedy
    want = _naive_greedy_obs(lin.weight.detach(), lin.bias.detach(), gram, 6, 1e-2)
    assert order.tolist() == want
    assert (cost >= 0).all() and cost.shape == (6,)


def test_blocked_obs_removes_distinct_columns_and_is_cheaper_than_random():
    torch.manual_seed(1)
    lin = nn.Linear(96, 8)
    x = torch.randn(500, 96) * torch.linspace(0.05, 2.0, 96)
    x1 = torch.cat([x, torch.ones(500, 1)], 1).double()
    order, _ = obs_removal_order(lin, x1.T @ x1, 60, blocks=7)  # compacts the active set several times
    assert len(set(order.tolist())) == 60 and int(order.max()) < 96

    def refit_error(removed):
        keep = sorted(set(range(96)) - set(removed))
        y = lin(x).detach()
        sol = torch.linalg.lstsq(torch.cat([x[:, keep], torch.ones(500, 1)], 1), y).solution
        return float((torch.cat([x[:, keep], torch.ones(500, 1)], 1) @ sol - y).square().sum())

    random_err = min(refit_error(torch.randperm(96, generator=torch.Generator().manual_seed(s))[:60].tolist())
                     for s in range(5))
    assert refit_error(order.tolist()) < random_err


def test_obs_downdates_in_float32_keep_the_float64_removal_order():
    torch.manual_seed(2)
    lin = nn.Linear(300, 32)
    x = torch.randn(2000, 300) * torch.rand(300) + torch.randn(2000, 6) @ torch.randn(6, 300)  # correlated
    x1 = torch.cat([x, torch.ones(2000, 1)], 1).double()
    o64, c64 = obs_removal_order(lin, x1.T @ x1, 200, loop_dtype=torch.float64)
    o32, c32 = obs_removal_order(lin, x1.T @ x1, 200)
    assert o32.tolist() == o64.tolist() and c32.dtype == torch.float64
    torch.testing.assert_close(c32, c64, rtol=1e-3, atol=1e-9)


@pytest.mark.parametrize("p", [7, 8, 13])
def test_blocked_gram_equals_the_plain_product(monkeypatch, p):
    monkeypatch.setattr(selection, "GRAM_BLOCK_MIN", 8)
    x = torch.randn(50, p, dtype=torch.float64)
    g = selection.gram_of(x)
    assert g.dtype == torch.float64 and g.shape == (p, p)
    torch.testing.assert_close(g, x.T @ x)


def _minilm_like():
    model, x = build("hf", "bert")
    batches = []
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        ids = torch.randint(0, model.config.vocab_size, (4, 12), generator=g)
        mask = torch.ones(4, 12, dtype=torch.long)
        mask[1:, 9:] = 0  # padding, excluded from the statistics
        batches.append({"input_ids": ids, "attention_mask": mask})
    return model, batches


@pytest.mark.parametrize("layers", ["pruned", "all"])
def test_prune_records_the_dense_outputs_and_calibrates_exactly_as_with_the_reference(monkeypatch, layers):
    model, batches = _minilm_like()
    cfg = fg.FermiConfig(granularity=("channel", "head"))
    fast, slow = copy.deepcopy(model), copy.deepcopy(model)
    r_fast = fg.prune(fast, batches, cfg, budget="macs:0.6", calibrate_layers=layers, progress=False)
    monkeypatch.setattr(selection, "RECORD_LIMIT_BYTES", 0)  # nothing fits: calibration runs the reference
    r_slow = fg.prune(slow, batches, cfg, budget="macs:0.6", calibrate_layers=layers, progress=False)
    assert r_fast.calibration.reference_run is False
    assert r_slow.calibration.reference_run is True
    assert len(r_fast.calibration) == len(r_slow.calibration) > 0
    for (name, a), (_, b) in zip(fast.state_dict().items(), slow.state_dict().items()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), name


def test_prune_records_conv_outputs_too():
    model = randomize_(SmallCNN().eval())
    data = [torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    ref = copy.deepcopy(model)
    report = fg.prune(model, data, fg.FermiConfig(granularity="channel", target_sparsity=0.5), progress=False)
    assert report.calibration.reference_run is False and len(report.calibration) > 0
    # the same calibration with the reference run gives the same weights
    again = copy.deepcopy(ref)
    fg.convert_to_fermi(again, fg.FermiConfig(granularity="channel", target_sparsity=0.5), example_inputs=data[0][:1])
    from fermigates.allocation import allocate_share
    from fermigates.methods.registry import method_of

    method = method_of(again)  # the same share chosen the same way, with no record requested
    method.set_keep(again, allocate_share(method.allocatable(again), 0.5, data=data))
    r2 = fg.convert_from_fermi(again, calibration_data=data, reference="dense", progress=False)
    assert r2.calibration.reference_run is True
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), name


def test_a_record_is_not_used_when_the_weights_or_the_batches_changed():
    from fermigates.core.state import get_state as fermi_state
    from fermigates.oneshot import allocate

    for change in ("weights", "batches"):
        model, batches = _minilm_like()
        fg.convert_to_fermi(model, fg.FermiConfig(granularity="channel"), example_inputs=batches[0])
        fermi_state(model).record_reference = "consumers"
        allocate(model, "units:0.5", example_inputs=batches[0], data=batches, allocation="uniform")
        assert fermi_state(model).reference_record is not None
        if change == "weights":
            with torch.no_grad():
                model.encoder.layer[0].attention.self.query.weight.mul_(1.5)
            data = batches
        else:
            data = [dict(b) for b in batches]  # equal values, other objects: not the recorded batches
        report = fg.convert_from_fermi(model, calibration_data=data, reference="dense", progress=False)
        assert report.calibration.reference_run is True, change


def test_calibration_report_gives_the_time_of_each_phase():
    model, batches = _minilm_like()
    report = fg.prune(model, batches, fg.FermiConfig(granularity="channel", target_sparsity=0.5), progress=False)
    cal = report.calibration
    phases = cal.phases
    assert set(phases) == {"forward", "statistics", "solve"}
    assert all(v >= 0 for v in phases.values())
    assert sum(phases.values()) == pytest.approx(cal.seconds, rel=1e-6, abs=1e-6)
    assert all(0 < r.stats_s <= r.seconds and 0 < r.solve_s <= r.seconds for r in cal.layers)
    assert "statistics" in str(cal) and "reference not run" in str(cal)
    assert cal.to_dict()["phases"] == phases


# -- residual-aware targets ---------------------------------------------------------------------------------------
def test_residual_sources_name_the_projections_that_feed_a_residual_stream():
    from fermigates.core.registry import residual_sources

    bert, _ = build("hf", "bert")
    found = residual_sources(bert)
    assert found["encoder.layer.0.output.dense"][0] == "encoder.layer.0.output"
    assert found["encoder.layer.0.attention.output.dense"][0] == "encoder.layer.0.attention.output"
    llama, _ = build("hf", "llama")
    found = residual_sources(llama)
    assert found["model.layers.0.self_attn.o_proj"][0] == "model.layers.0.input_layernorm"
    assert found["model.layers.0.mlp.down_proj"][0] == "model.layers.0.post_attention_layernorm"
    gpt2, _ = build("hf", "gpt2")
    found = residual_sources(gpt2)
    assert found["transformer.h.0.attn.c_proj"][0] == "transformer.h.0.ln_1"
    assert found["transformer.h.0.mlp.c_proj"][0] == "transformer.h.0.ln_2"
    assert not any(k.endswith(("intermediate.dense", "up_proj", "c_fc")) for k in found)


def _final_error(model, dense, batches):
    from _family_models import run

    err = norm = 0.0
    with torch.no_grad():
        for b in batches:
            a, r = run(model, b), run(dense, b)
            err += float((a - r).square().sum())
            norm += float(r.square().sum())
    return err / norm


@pytest.mark.parametrize("name", ["bert", "llama", "gpt2"])
def test_residual_targets_bring_the_pruned_model_closer_to_the_dense_one(name):
    dense, x = build("hf", name)
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, dense.config.vocab_size, (8, 16), generator=g)} for _ in range(4)]
    errors = {}
    for residual in (False, True):
        model = copy.deepcopy(dense)
        report = fg.prune(model, batches, fg.FermiConfig(granularity="channel"), target_sparsity=0.5,
                          residual=residual, progress=False)
        assert len(report.calibration) > 0
        errors[residual] = _final_error(model, dense, batches)
    assert errors[True] < errors[False], errors
