"""What you fine-tune is what you bake: decided gates, the bake equals the trained model, calibration toward the
trained model never hurts, distillation, the Trainer callback, no subnormal stalls."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fermigates as fg
from fermigates.methods.fermi.gates import fermi_probability
from fermigates.methods.fermi.model import all_gates


def _task(seed=0, n=512):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g)
    w = torch.randn(12, 4, generator=g)
    y = (x @ w).argmax(1)
    return x, y


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))


def _converted(granularity="channel", sparsity=0.5, seed=0):
    model = _mlp(seed)
    x, y = _task()
    fg.convert_to_fermi(model, fg.FermiConfig(granularity=granularity, target_sparsity=sparsity),
                        example_inputs=x[:1])
    return model, x, y


def _batches(x, y, bs=32):
    return list(zip(x.split(bs), y.split(bs)))


@pytest.mark.parametrize("granularity", ["channel", "weight"])
def test_annealing_ends_with_every_unit_decided_and_the_bake_equals_the_trained_model(granularity):
    model, x, y = _converted(granularity)
    opt = fg.FermiAnnealer(torch.optim.AdamW(model.parameters(), lr=3e-3), model, total_steps=60)
    assert opt.undecided_units() == 0  # open gates: P == 1 exactly
    for step, (xb, yb) in zip(range(60), _batches(x, y) * 4):
        loss = F.cross_entropy(model(xb), yb) + opt.sparsity_loss()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step == 8:  # mid-ramp (the ramp is the first quarter): soft gates leave units in between
            assert not opt.decided and opt.undecided_units() > 0
    assert opt.decided and opt.undecided_units() == 0
    assert opt.soft_hard_gap(x) == 0.0
    assert opt.stats()["sparsity"] == pytest.approx(0.5, abs=0.02)
    with torch.no_grad():
        trained = model(x)
    report = fg.convert_from_fermi(model, progress=False)
    assert report.trained_vs_baked == 0.0
    with torch.no_grad():
        torch.testing.assert_close(model(x), trained, rtol=1e-5, atol=1e-6)


def test_decisions_are_frozen_in_the_hard_phase_and_resume_exactly():
    model, x, y = _converted()
    opt = fg.FermiAnnealer(torch.optim.AdamW(model.parameters(), lr=3e-2), model, total_steps=40, hard_after=0.5)
    data = _batches(x, y) * 3
    masks = []
    for step in range(40):
        xb, yb = data[step]
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
        opt.zero_grad()
        if step == 25:
            state, model_state = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
        if opt.decided:
            masks.append([g.keep_units().clone() for g in fg.methods.fermi.model.all_gates(model)])
    assert all(all(torch.equal(a, b) for a, b in zip(m, masks[0])) for m in masks)  # no unit changed side
    # resume: a fresh converted model with the same weights continues with the same decisions
    other, _, _ = _converted()
    other.load_state_dict(model_state)
    with torch.no_grad():  # weights moved since: re-deciding from them could differ; the state dict must not
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    opt2 = fg.FermiAnnealer(torch.optim.AdamW(other.parameters(), lr=3e-2), other, total_steps=40, hard_after=0.5)
    opt2.load_state_dict(state)
    got = [g.keep_units() for g in fg.methods.fermi.model.all_gates(other)]
    assert all(torch.equal(a, b) for a, b in zip(got, masks[0]))


def test_bake_warns_when_the_baked_model_is_not_the_trained_one():
    model, x, y = _converted()
    opt = fg.FermiAnnealer(torch.optim.AdamW(model.parameters(), lr=3e-3), model, total_steps=40, hard_after=1.0,
                           temperature=(1.0, 0.5))
    for xb, yb in _batches(x, y)[:10]:
        (F.cross_entropy(model(xb), yb) + opt.sparsity_loss()).backward()
        opt.step()
        opt.zero_grad()
    with pytest.warns(UserWarning, match="differs from the trained one"):
        report = fg.convert_from_fermi(model, progress=False)
    assert report.trained_vs_baked > 1e-3


def test_tiny_temperatures_make_no_subnormal_floats():
    score = torch.linspace(0.0, 2.0, 1000, requires_grad=True)
    for t in (1e-2, 1e-3, 1e-5):
        p = fermi_probability(score, torch.tensor(1.0), t)
        p.sum().backward()
        for v in (p.detach(), score.grad):
            tiny = (v != 0) & (v.abs() < torch.finfo(torch.float32).tiny)
            assert not bool(tiny.any()), t
        score.grad = None
    # the open gate still computes exactly 1.0
    assert bool((fermi_probability(torch.tensor([1.0]), torch.tensor(1.0 - 20 * 0.5), 0.5) == 1.0).all())


def _loss(model, batches):
    with torch.no_grad():
        return sum(float(F.cross_entropy(model(xb), yb)) for xb, yb in batches) / len(batches)


@pytest.mark.parametrize("hard_after", [None, 1.0])
def test_calibration_after_training_never_makes_the_task_loss_worse(hard_after):
    model, x, y = _converted(sparsity=0.6)
    data = _batches(x, y)
    fg.fine_tune(model, data, steps=60, lr=1e-2, anneal={"hard_after": hard_after, "temperature": (1.0, 0.05)},
                 progress=False)
    calib = data[:8]
    baked = copy.deepcopy(model)
    fg.convert_from_fermi(baked, progress=False)
    report = fg.convert_from_fermi(model, calibration_data=calib, progress=False)
    assert report.reference == "trained"  # the weights were trained: fit toward the model as trained
    assert _loss(model, calib) <= _loss(baked, calib) + 1e-6


def test_reference_dense_for_untrained_weights_and_explicit_choices():
    model, x, y = _converted()
    fg.FermiAnnealer(torch.optim.SGD(model.parameters(), lr=0.0), model, total_steps=1, ramp=1.0).schedule.apply(model, 1)
    fg.freeze_decisions(model)
    report = fg.convert_from_fermi(copy.deepcopy(model), calibration_data=x.split(64), progress=False)
    assert report.reference == "dense"  # nothing trained: the original network is the reference
    with pytest.raises(ValueError, match="reference must be one of"):
        fg.convert_from_fermi(model, calibration_data=x.split(64), reference="original")
    dense = _mlp()
    report = fg.convert_from_fermi(model, calibration_data=x.split(64), reference=dense, progress=False)
    assert report.reference == "module"


def test_kept_indices_let_calibrate_run_on_its_own_after_a_bake():
    dense = _mlp()
    model, x, y = _converted()
    fg.FermiAnnealer(torch.optim.SGD(model.parameters(), lr=0.0), model, total_steps=1, ramp=1.0).schedule.apply(model, 1)
    fg.freeze_decisions(model)
    report = fg.convert_from_fermi(model, progress=False)
    assert report.kept and all(k in dict(model.named_modules()) for k in report.kept)
    with torch.no_grad():
        before = float((model(x) - dense(x)).pow(2).mean())
    fg.calibrate(model, x.split(64), reference=dense, targets=report.kept, progress=False)
    with torch.no_grad():
        after = float((model(x) - dense(x)).pow(2).mean())
    assert after < before


def test_distillation_on_unlabeled_data_moves_toward_the_teacher():
    teacher = _mlp(1)
    model = copy.deepcopy(teacher)
    x, _ = _task()
    fg.convert_to_fermi(model, fg.FermiConfig(granularity="channel", target_sparsity=0.5), example_inputs=x[:1])
    log = fg.fine_tune(model, list(x.split(32)), steps=80, lr=3e-3, log_every=10, progress=False)
    assert log.distill == "logits" and len(log.rows) == 8
    assert log.rows[-1]["undecided"] == 0
    pruned = copy.deepcopy(teacher)  # the same cut with no training: magnitude ranking, baked as it is
    fg.convert_to_fermi(pruned, fg.FermiConfig(granularity="channel", target_sparsity=0.5), example_inputs=x[:1])
    fg.FermiAnnealer(torch.optim.SGD(pruned.parameters(), lr=0.0), pruned, total_steps=1, ramp=1.0).schedule.apply(pruned, 1)
    fg.convert_from_fermi(pruned, progress=False)
    fg.convert_from_fermi(model, progress=False)
    with torch.no_grad():
        err_tuned = float(F.mse_loss(model(x), teacher(x)))
        err_oneshot = float(F.mse_loss(pruned(x), teacher(x)))
    assert err_tuned < err_oneshot


def test_fine_tune_refuses_bad_input():
    model, x, y = _converted()
    with pytest.raises(ValueError, match="steps must be a positive int"):
        fg.fine_tune(model, _batches(x, y), steps=0)
    with pytest.raises(ValueError, match="distill must be"):
        fg.fine_tune(model, _batches(x, y), steps=1, distill="kl")
    with pytest.raises(ValueError, match="data is empty"):
        fg.fine_tune(model, [], steps=1)
    bad = [(x[:8] * float("nan"), y[:8])]
    with pytest.raises(ValueError, match="data batch 0"):  # the default start ranks units on these batches
        fg.fine_tune(model, bad, steps=1, progress=False)
    assert all(g.mu_offset is None for g in all_gates(model))  # refused before anything was set
    with pytest.raises(FloatingPointError, match="loss is nan"):
        fg.fine_tune(model, bad, steps=1, init="scores", progress=False)


class _TokenLabels(torch.utils.data.Dataset):
    """32 fixed random 8-token sequences (vocabulary 99) with 3 classes, for the Trainer tests."""

    def __len__(self):
        return 32

    def __getitem__(self, i):
        ids = torch.randint(0, 99, (8,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "attention_mask": torch.ones(8, dtype=torch.long), "labels": int(ids[0] % 3)}


def _tiny_bert(layers):
    """transformers (skipped without it and accelerate) and a random 32-wide BERT classifier."""
    tf = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=64, num_labels=3)
    return tf, tf.BertForSequenceClassification(cfg)


def test_trainer_callback_adds_the_sparsity_term_and_logs(tmp_path):
    tf, model = _tiny_bert(1)
    fg.convert_to_fermi(model, fg.FermiConfig(target_sparsity=0.5))

    args = tf.TrainingArguments(str(tmp_path), max_steps=8, per_device_train_batch_size=4, report_to=[],
                                use_cpu=True, save_strategy="no", logging_steps=2, disable_tqdm=True,
                                learning_rate=0.0)  # lr 0: only the sparsity term can move anything
    callback = fg.fermi_trainer_callback(model, temperature=(1.0, 0.01), sparsity_weight=1.0)
    seen = []
    original = callback.on_pre_optimizer_step

    def spy(*a, **k):
        original(*a, **k)
        seen.append(any(p.grad is not None and bool(p.grad.abs().sum() > 0)
                        for g in fg.methods.fermi.model.all_gates(model) for p in [g.mu]))
    callback.on_pre_optimizer_step = spy
    trainer = tf.Trainer(model=model, args=args, train_dataset=_TokenLabels(), callbacks=[callback])
    trainer.train()
    assert any(seen)  # the sparsity term reached the gates' Fermi levels
    logged = [h for h in trainer.state.log_history if "fermi/sparsity" in h]
    assert logged and {"fermi/temperature", "fermi/undecided", "fermi/target_sparsity"} <= set(logged[0])
    assert logged[-1]["fermi/undecided"] == 0
    assert abs(fg.compute_sparsity(model).overall - 0.5) <= 0.02


def test_trainer_callback_steers_to_a_budget(tmp_path):
    tf, model = _tiny_bert(2)
    example = {"input_ids": torch.randint(0, 99, (1, 8))}
    fg.convert_to_fermi(model, fg.FermiConfig(granularity="channel", budget="macs:0.6"), example_inputs=example)
    before = fg.count_macs(model, example)

    args = tf.TrainingArguments(str(tmp_path), max_steps=8, per_device_train_batch_size=4, report_to=[],
                                use_cpu=True, save_strategy="no", disable_tqdm=True, learning_rate=1e-3)
    with pytest.raises(ValueError, match="either budget= or target_sparsity="):
        fg.fermi_trainer_callback(model, budget="macs:0.5", target_sparsity=0.5)
    callback = fg.fermi_trainer_callback(model)  # the budget comes from the model's FermiConfig
    trainer = tf.Trainer(model=model, args=args, train_dataset=_TokenLabels(), callbacks=[callback])
    trainer.train()
    assert callback.budget_result.kind == "macs"
    logged = trainer.state.log_history[-1]
    # the logged target is the budget's unit share, which the decided gates then hold exactly
    assert logged["fermi/target_sparsity"] == pytest.approx(logged["fermi/sparsity"], abs=0.01)
    fg.convert_from_fermi(model, example_inputs=example, progress=False)
    got = fg.count_macs(model, example) / before
    assert abs(got - 0.6) <= 0.02 * 0.6, (got, callback.budget_result)


def test_bake_when_decided_trains_the_small_model_after_the_freeze():
    model, x, y = _converted()
    data = _batches(x, y)
    log = fg.fine_tune(model, data, steps=40, lr=3e-3, calibration_data=data[:4], bake_when_decided=True,
                       progress=False)
    assert log.report is not None and log.report.shrunk and log.report.trained_vs_baked == 0.0
    after = [r for r in log.rows if r.get("baked")]  # the rows of the small model's run keep the decisions
    assert after and after[-1]["step"] == 40 and after[0]["sparsity"] == pytest.approx(0.5, abs=0.02)
    assert not hasattr(model, "_fermigates") and model[0].out_features == 32
    assert not any(isinstance(m, fg.FermiGate) for m in model.modules())
    with pytest.raises(ValueError, match="needs a converted model"):
        fg.fine_tune(_mlp(), data, steps=2, bake_when_decided=True, progress=False)


def test_group_probabilities_are_shared_within_a_forward_and_fresh_for_the_next():
    """Gradient accumulation (two forwards, two backwards, no step in between) and deep copies after a forward
    both work while a forward's probabilities are shared by every consumer of a group."""
    model, x, y = _converted()
    opt = fg.FermiAnnealer(torch.optim.SGD(model.parameters(), lr=0.1), model, total_steps=50)
    for _ in range(3):
        opt.step()  # into the soft phase
    grads = []
    for _ in range(2):
        F.cross_entropy(model(x[:32]), y[:32]).backward()  # a second backward needs a second graph
        grads.append(model[2].weight.grad.clone())
    torch.testing.assert_close(grads[1], 2 * grads[0])
    twin = copy.deepcopy(model)  # no graph-carrying tensor inside the modules
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x))


def test_sparsity_loss_after_the_task_backward_still_works_with_channel_gates():
    """The Trainer callback adds the sparsity term after the task loss's backward: the shared probabilities
    of that forward have been used by a backward and must not be reused."""
    model, x, y = _converted()
    opt = fg.FermiAnnealer(torch.optim.SGD(model.parameters(), lr=0.1), model, total_steps=50)
    opt.step()
    F.cross_entropy(model(x[:32]), y[:32]).backward()
    loss = opt.sparsity_loss()
    assert loss.requires_grad
    loss.backward()  # a freed graph would raise here


def _kept_by_prune(data, selection):
    model = _mlp()
    report = fg.prune(model, data, fg.FermiConfig(granularity="channel"), target_sparsity=0.5,
                      example_inputs=data[0][0][:1], selection=selection, progress=False)
    return {k: [None if t is None else t.tolist() for t in v] for k, v in report.kept.items()}


def _kept_at_the_freeze(init, data):
    model, _, _ = _converted()
    opt = fg.FermiAnnealer(torch.optim.SGD(model.parameters(), lr=0.0), model, total_steps=8, init=init,
                           calibration_data=data)
    opt.schedule.apply(model, opt.schedule.hard_step)  # weights unchanged: the decisions of the starting order
    report = fg.convert_from_fermi(model, progress=False)
    return {k: [None if t is None else t.tolist() for t in v] for k, v in report.kept.items()}


def test_init_obs_starts_the_anneal_from_the_one_shot_selection():
    x, y = _task()
    data = _batches(x, y)[:4]
    obs = _kept_at_the_freeze("obs", data)
    assert obs == _kept_by_prune(data, "obs")
    assert _kept_at_the_freeze("scores", data) == _kept_by_prune(data, "magnitude")
    assert obs != _kept_by_prune(data, "magnitude")  # the prior changed which units the anneal starts from


def test_init_obs_levels_are_trained_and_validated():
    model, x, y = _converted()
    data = _batches(x, y)
    inner = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    opt = fg.FermiAnnealer(inner, model, total_steps=20, init="obs", calibration_data=data[:4])
    offsets = [g.mu_offset for g in all_gates(model)]
    assert all(o is not None and o.requires_grad for o in offsets)
    assert {id(p) for p in inner.param_groups[-1]["params"]} == {id(o) for o in offsets}
    assert inner.param_groups[-1]["weight_decay"] == 0.0
    start = [o.detach().clone() for o in offsets]
    for xb, yb in data[:3]:
        (F.cross_entropy(model(xb), yb) + opt.sparsity_loss()).backward()
        opt.step()
        opt.zero_grad()
    assert any(not torch.equal(o, s) for o, s in zip(offsets, start))
    with pytest.raises(ValueError, match="calibration_data"):
        fg.FermiAnnealer(torch.optim.SGD(model.parameters(), lr=0.1), model, total_steps=4, init="obs")
    with pytest.raises(ValueError, match="init must be one of"):
        fg.FermiAnnealer(torch.optim.SGD(model.parameters(), lr=0.1), model, total_steps=4, init="taylor")
    weights, _, _ = _converted("weight")
    with pytest.raises(ValueError, match="channel"):
        fg.FermiAnnealer(torch.optim.SGD(weights.parameters(), lr=0.1), weights, total_steps=4, init="obs",
                         calibration_data=data[:4])
    assert all(g.mu_offset is None for g in all_gates(weights))  # refused: nothing was added
    with pytest.raises(ValueError, match="init="):
        fg.fine_tune(_mlp(), data, steps=2, init="obs", progress=False)


def test_init_auto_starts_channel_gates_from_the_one_shot_selection_and_weight_gates_from_scores():
    x, y = _task()
    data = _batches(x, y)
    assert _kept_at_the_freeze("auto", data[:4]) == _kept_at_the_freeze("obs", data[:4])
    bare, _, _ = _converted()
    fg.FermiAnnealer(torch.optim.SGD(bare.parameters(), lr=0.1), bare, total_steps=4)  # no calibration data
    assert all(g.mu_offset is None for g in all_gates(bare))

    default, _, _ = _converted()
    explicit, _, _ = _converted()
    fg.fine_tune(default, data, steps=1, lr=0.0, progress=False)  # lr 0: the levels stay where they started
    fg.fine_tune(explicit, data, steps=1, lr=0.0, init="obs", calibration_data=data[:8], progress=False)
    levels = [g.mu_offset for g in all_gates(default)]
    assert all(o is not None for o in levels) and any(bool(o.abs().sum() > 0) for o in levels)
    for a, b in zip(levels, (g.mu_offset for g in all_gates(explicit))):
        torch.testing.assert_close(a, b)  # the default ranks on the first 8 training batches

    weights, _, _ = _converted("weight")
    fg.fine_tune(weights, data, steps=1, progress=False)
    assert all(g.mu_offset is None for g in all_gates(weights))
    scores, _, _ = _converted()
    fg.fine_tune(scores, data, steps=1, anneal={"init": "scores"}, progress=False)
    assert all(g.mu_offset is None for g in all_gates(scores))
    with pytest.raises(ValueError, match="init given twice"):
        fg.fine_tune(scores, data, steps=1, init="obs", anneal={"init": "scores"}, progress=False)
    with pytest.raises(ValueError, match="init must be one of"):
        fg.fine_tune(scores, data, steps=1, init="taylor", progress=False)


def test_distilling_bake_when_decided_calibrates_toward_the_teacher(monkeypatch):
    import fermigates.finetune as ft

    dense = _mlp()
    model, x, _ = _converted()
    seen = {}
    real = ft._bake_and_continue

    def spy(model, reference, *args):
        with torch.no_grad():
            seen["gap"] = float((reference(x) - dense(x)).abs().max())
        return real(model, reference, *args)

    monkeypatch.setattr(ft, "_bake_and_continue", spy)
    data = list(x.split(32))  # no labels: distillation toward the model as it was (the teacher)
    log = fg.fine_tune(model, data, steps=24, lr=3e-3, init="obs", calibration_data=data[:4],
                       bake_when_decided=True, progress=False)
    assert log.distill == "logits" and log.report is not None and log.report.reference == "module"
    assert seen["gap"] == 0.0  # the reference was the original network, not the student as trained
    assert model[0].out_features == 32


def test_trainer_callback_init_obs_puts_the_levels_in_the_trainers_optimizer(tmp_path):
    tf, model = _tiny_bert(1)
    calib = [{"input_ids": torch.randint(0, 99, (4, 8))} for _ in range(2)]
    fg.convert_to_fermi(model, fg.FermiConfig(granularity=("channel", "head"), target_sparsity=0.5),
                        example_inputs={"input_ids": calib[0]["input_ids"][:1]})
    with pytest.raises(ValueError, match="calibration_data"):
        fg.fermi_trainer_callback(model, init="obs")
    callback = fg.fermi_trainer_callback(model, init="obs", calibration_data=calib)
    offsets = [g.mu_offset for g in all_gates(model)]
    assert offsets and all(o is not None for o in offsets) and any(bool(o.abs().sum() > 0) for o in offsets)
    args = tf.TrainingArguments(str(tmp_path), max_steps=16, per_device_train_batch_size=4, report_to=[],
                                use_cpu=True, save_strategy="no", disable_tqdm=True, learning_rate=1e-2)
    trainer = tf.Trainer(model=model, args=args, train_dataset=_TokenLabels(), callbacks=[callback])
    start = [o.detach().clone() for o in offsets]
    trainer.train()
    held = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(id(o) in held for o in offsets)
    assert any(not torch.equal(o.detach(), s) for o, s in zip(offsets, start))


def test_distilling_toward_the_original_cuts_at_the_first_step_and_calibrates_toward_it(monkeypatch):
    import fermigates.methods.fermi.anneal as anneal

    calls = []
    real = anneal.calibrate_decisions
    monkeypatch.setattr(anneal, "calibrate_decisions", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, y = _task()
    decided = {}

    def run(data, **kwargs):
        model, _, _ = _converted()
        calls.clear()
        fg.fine_tune(model, data, steps=20, lr=3e-3, progress=False,
                     on_decided=lambda m, step: decided.__setitem__("step", step), **kwargs)
        return decided.pop("step"), len(calls)

    # no labels, no teacher: toward the original -> the one-shot cut at step 1, calibrated toward the original
    assert run(list(x.split(32))) == (1, 1)
    # labels: the anneal (sparsity ramped over the first 25% of the run, no calibration while annealing)
    assert run(_batches(x, y)) == (5, 0)
    # a schedule the user set replaces the whole preset
    assert run(list(x.split(32)), anneal={"temperature": (1.0, 0.01)}) == (5, 0)
    # a teacher the user gave is a task of its own: the anneal
    assert run(list(x.split(32)), teacher=_mlp(1)) == (5, 0)
