"""Reliability of the library core under the ways users really hold models and data: trained models copied,
pickled and reloaded; one-shot iterators; data and weights at the edge of float range; bad arguments."""

from __future__ import annotations

import copy
import io
import time

import pytest
import torch
from torch import nn

import fermigates as fg
from fermigates.core.state import find_state
from fermigates.methods.fermi.model import all_gates

from _family_models import TokenLabels, tiny_bert_classifier


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()


def _trained(steps: int = 6, total: int = 12):
    """The issue's example: an MLP with channel gates, trained part of an anneal in the user's own loop."""
    m, x = _mlp(), torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    fg.convert_to_fermi(m, fg.FermiConfig(granularity="channel", target_sparsity=0.5), example_inputs=x[:1])
    opt = fg.FermiAnnealer(torch.optim.AdamW(m.parameters(), lr=1e-2), m, total_steps=total, init="scores")
    for _ in range(steps):
        (m(x).logsumexp(-1).mean() + opt.sparsity_loss()).backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad(), fg.hard_gates(m):
        trained = m(x)
    return m, x, trained


def _gap(model, x, trained) -> float:
    with torch.no_grad():
        return float((model(x) - trained).norm() / trained.norm())


def _pickled(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _state_dict_round_trip(model):
    fresh = _mlp()
    x = torch.randn(1, 16)
    fg.convert_to_fermi(fresh, fg.FermiConfig(granularity="channel", target_sparsity=0.5), example_inputs=x)
    fresh.load_state_dict(model.state_dict())
    return fresh


@pytest.mark.parametrize("how", ["original", "deepcopy", "pickle", "state_dict"])
def test_a_trained_model_bakes_to_what_was_trained_however_it_travelled(how):
    m, x, trained = _trained()
    model = {"original": lambda: m, "deepcopy": lambda: copy.deepcopy(m), "pickle": lambda: _pickled(m),
             "state_dict": lambda: _state_dict_round_trip(m)}[how]()
    report = fg.convert_from_fermi(model, calibration_data=[x[:8]], progress=False)
    assert report.reference == "trained"
    assert _gap(model, x, trained) < 1e-6, how


def test_an_untrained_model_calibrates_toward_the_dense_network():
    m, x = _mlp(), torch.randn(64, 16)
    fg.convert_to_fermi(m, fg.FermiConfig(granularity="channel", target_sparsity=0.5), example_inputs=x[:1])
    report = fg.convert_from_fermi(copy.deepcopy(m), calibration_data=[x[:8]], progress=False)
    assert report.reference == "dense"


def test_a_model_trained_inside_a_real_trainer_is_known_as_trained(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    tf, model = tiny_bert_classifier()
    ids = torch.randint(0, 99, (2, 8))
    fg.convert_to_fermi(model, fg.FermiConfig(granularity="channel", target_sparsity=0.5),
                        example_inputs={"input_ids": ids})
    args = tf.TrainingArguments(str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                                report_to=[], save_strategy="no", use_cpu=True, logging_steps=1)
    tf.Trainer(model=model, args=args, train_dataset=TokenLabels(16),
               callbacks=[fg.fermi_trainer_callback(model, total_steps=3)]).train()
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    for baked in (copy.deepcopy(model), _pickled(model), model):
        report = fg.convert_from_fermi(baked.eval(), calibration_data=[batch], progress=False)
        assert report.reference == "trained"


def test_calibration_is_undone_when_it_raises_the_task_loss_whatever_the_reference():
    m, x, _ = _trained(steps=12)
    y = torch.randint(0, 8, (64,), generator=torch.Generator().manual_seed(3))
    before = copy.deepcopy(m)
    report = fg.convert_from_fermi(m, calibration_data=[(x, y)], reference="dense", progress=False)
    fg.convert_from_fermi(before, progress=False)  # the same bake without calibration
    loss = nn.functional.cross_entropy
    with torch.no_grad():
        assert float(loss(m(x), y)) <= float(loss(before(x), y)) + 1e-6
    assert report.calibration is not None


# -- data loops -----------------------------------------------------------------------------------------------------
def _labelled(n: int):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 16, generator=g), torch.randint(0, 8, (8,), generator=g)) for _ in range(n)]


def test_a_generator_shorter_than_the_run_stops_with_a_clear_error_in_seconds():
    m = _mlp()
    fg.convert_to_fermi(m, fg.FermiConfig(granularity="channel"), example_inputs=torch.randn(1, 16))
    batches = _labelled(3)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="ran out after 3 batches.*one-shot iterator"):
        fg.fine_tune(m, (b for b in batches), steps=5, progress=False)
    assert time.perf_counter() - start < 30


@pytest.mark.parametrize("kind", ["generator", "list"])
def test_every_batch_is_trained_on_none_lost_to_a_peek(kind):
    m = _mlp()
    fg.convert_to_fermi(m, fg.FermiConfig(granularity="channel"), example_inputs=torch.randn(1, 16))
    batches = _labelled(6)
    seen: list[int] = []
    marks = {id(x): i for i, (x, _) in enumerate(batches)}
    m[0].register_forward_pre_hook(lambda mod, args: seen.append(marks.get(id(args[0]), -1)) if mod.training else None)
    data = (b for b in batches) if kind == "generator" else batches
    fg.fine_tune(m, data, steps=6, progress=False)
    assert seen == list(range(6))


def test_a_failed_fine_tune_leaves_the_model_as_it_was():
    m = _mlp()
    fg.convert_to_fermi(m, fg.FermiConfig(granularity="channel"), example_inputs=torch.randn(1, 16))
    m.eval()
    names = [n for n, _ in m.named_parameters()]
    with pytest.raises(ValueError, match="ramp"):
        fg.fine_tune(m, _labelled(2), steps=4, anneal={"ramp": 2.0}, progress=False)
    assert not m.training and [n for n, _ in m.named_parameters()] == names
    assert all(g.mu_offset is None and g.decided is None for g in all_gates(m))


# -- non-finite values ------------------------------------------------------------------------------------------------
def test_a_nan_ridge_is_refused_and_the_model_left_as_it_was():
    m = _mlp()
    data = [torch.randn(16, 16)]
    state = copy.deepcopy(m.state_dict())
    for bad in (float("nan"), float("inf"), -1.0, "0.1", True):
        with pytest.raises(ValueError, match="ridge must be a finite number"):
            fg.prune(m, data, fg.FermiConfig(granularity="channel"), ridge=bad, progress=False)
        assert find_state(m) is None and all(torch.equal(v, m.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("scale", [1e19, 1e20, 1e25])
def test_calibration_data_too_large_to_square_is_a_clear_error(scale):
    m = _mlp()
    data = [torch.randn(32, 16, generator=torch.Generator().manual_seed(0)) * scale]
    state = copy.deepcopy(m.state_dict())
    with pytest.raises(ValueError, match="too large"):
        fg.prune(m, data, fg.FermiConfig(granularity="channel", target_sparsity=0.5), progress=False)
    assert find_state(m) is None and all(torch.equal(v, m.state_dict()[k]) for k, v in state.items())
    assert [type(layer) for layer in m] == [nn.Linear, nn.ReLU, nn.Linear]


def test_huge_weights_still_give_finite_channel_scores():
    m = _mlp()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1e20)
    fg.convert_to_fermi(m, fg.FermiConfig(granularity="channel", target_sparsity=0.5),
                        example_inputs=torch.randn(1, 16))
    for group in fg.get_method("fermi").unit_groups(m):
        assert bool(torch.isfinite(group.scores).all())
    assert fg.compute_sparsity(m).total == 32


# -- arguments ---------------------------------------------------------------------------------------------------------
def test_a_config_takes_a_budget_or_a_sparsity_not_both():
    with pytest.raises(ValueError, match="either budget= or target_sparsity="):
        fg.FermiConfig(granularity="channel", budget="macs:0.5", target_sparsity=0.3)
    assert fg.FermiConfig(granularity="channel").target_sparsity == 0.5
    config = fg.FermiConfig(granularity="channel", budget="macs:0.5")
    assert config.target_sparsity is None and fg.FermiConfig.from_dict(config.to_dict()) == config


def test_wrong_first_arguments_name_what_was_expected():
    with pytest.raises(TypeError, match="model must be a converted torch.nn.Module"):
        fg.convert_from_fermi("abc")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fg.prune("abc", [torch.randn(2, 16)])


def test_refine_with_no_steps_adds_no_levels():
    m = _mlp()
    fg.convert_to_fermi(m, fg.FermiConfig(granularity="channel"), example_inputs=torch.randn(1, 16))
    names = [n for n, _ in m.named_parameters()]
    fg.refine_gates(m, [torch.randn(8, 16)], steps=0, progress=False)
    assert [n for n, _ in m.named_parameters()] == names
    assert all(g.decided is not None for g in all_gates(m))


def test_a_bake_skips_calibration_toward_a_model_it_already_is():
    m, x, trained = _trained(steps=12)  # the whole run: the decisions froze, the model trained is the one baked
    report = fg.convert_from_fermi(m, calibration_data=[x[:8]], progress=False)
    assert report.trained_vs_baked == 0.0 and report.calibration is None
    assert "computes what the model as trained does" in report.calibration_skipped
    assert "not needed" in str(report) and _gap(m, x, trained) < 1e-6


def test_a_wrong_shrink_is_undone_and_the_tolerance_grows_only_with_the_modules_resized(monkeypatch):
    from fermigates import bake
    from fermigates.surgery.verify import MAX_RTOL, SHRINK_RTOL, shrink_tolerance

    assert shrink_tolerance(0) == SHRINK_RTOL and shrink_tolerance(240) == pytest.approx(4.8e-4)
    assert shrink_tolerance(10**6) == MAX_RTOL
    m, x, trained = _trained(steps=12)
    real = bake.shrink_model

    def wrong(model, graph, keep):  # a shrink that changes the function: what the check is there to catch
        result = real(model, graph, keep)
        with torch.no_grad():
            model[2].bias = nn.Parameter(model[2].bias + 1.0)  # as a shrink does: new tensors
        return result

    monkeypatch.setattr(bake, "shrink_model", wrong)
    with pytest.warns(UserWarning, match="shrink undone"):
        report = fg.convert_from_fermi(m, progress=False)
    assert not report.shrunk and "differ from the hard-masked ones" in report.not_shrunk[0][1]
    assert m[0].out_features == 32 and _gap(m, x, trained) < 1e-6  # full size, hard-masked, as trained
