import copy
import warnings

import pytest
import torch
import torch.nn as nn

import fermigates as fg


def _task(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    x = torch.randn(256, 16)
    y = x[:, :4] * 2 - x[:, 4:8]
    return model, x, y


def _train(model, opt, x, y, steps, start=0):
    for i in range(start, start + steps):
        xb, yb = x[(i * 32) % 256:(i * 32) % 256 + 32], y[(i * 32) % 256:(i * 32) % 256 + 32]
        loss = nn.functional.mse_loss(model(xb), yb) + opt.sparsity_loss()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return loss.item()


@pytest.mark.parametrize("schedule,target", [("linear", 0.5), ("exponential", 0.8), ("cosine", 0.65)])
def test_annealing_reaches_the_requested_sparsity(schedule, target):
    model, x, y = _task()
    fg.convert_to_fermi(model, fg.FermiConfig(target_sparsity=target))
    opt = fg.FermiAnnealer(torch.optim.Adam(model.parameters(), lr=1e-2), model, total_steps=60,
                           temperature=(1.0, 1e-3), schedule=schedule)
    _train(model, opt, x, y, 60)
    assert opt.temperature == pytest.approx(1e-3)
    for gate in [m for m in model.modules() if isinstance(m, fg.FermiGate)]:
        assert gate.temperature.item() == pytest.approx(1e-3)
    assert abs(fg.compute_sparsity(model).overall - target) <= 0.02
    report = fg.convert_from_fermi(model)
    assert abs(report.sparsity.overall - target) <= 0.02


def test_fine_tuning_under_annealing_keeps_the_task():
    model, x, y = _task()
    dense_loss = nn.functional.mse_loss(model(x), y).item()
    fg.convert_to_fermi(model, fg.FermiConfig(target_sparsity=0.6))
    opt = fg.FermiAnnealer(torch.optim.Adam(model.parameters(), lr=1e-2), model, total_steps=150)
    _train(model, opt, x, y, 150)
    fg.convert_from_fermi(model)
    with torch.no_grad():
        final = nn.functional.mse_loss(model(x), y).item()
    assert final < 0.5 * dense_loss  # the untrained dense net is far worse than the trained sparse one


def test_sparsity_loss_pushes_mu_up_and_has_gradients():
    model, x, y = _task()
    fg.convert_to_fermi(model, fg.FermiConfig(mu_init=0.1, temperature=0.5))
    opt = fg.FermiAnnealer(torch.optim.SGD(model.parameters(), lr=0.0), model, total_steps=10, target_sparsity=0.9,
                           sparsity_schedule="constant", tolerance=0.9)
    loss = opt.sparsity_loss()
    assert loss.item() > 0
    loss.backward()
    gate = model[0].weight_gate
    assert gate.mu.grad < 0  # descending the loss raises mu
    assert model[0].weight.grad.abs().sum() > 0


def test_state_dict_round_trip_continues_bit_identically():
    def fresh():
        model, x, y = _task()
        fg.convert_to_fermi(model, fg.FermiConfig(target_sparsity=0.7))
        opt = fg.FermiAnnealer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, total_steps=60)
        return model, opt, x, y

    model, opt, x, y = fresh()
    _train(model, opt, x, y, 25)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = copy.deepcopy(opt.state_dict())  # state_dict() holds live references
    _train(model, opt, x, y, 35, start=25)
    uninterrupted = {k: v.clone() for k, v in model.state_dict().items()}

    model2, opt2, _, _ = fresh()
    model2.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    assert opt2.step_count == 25
    _train(model2, opt2, x, y, 35, start=25)
    resumed = model2.state_dict()
    assert uninterrupted.keys() == resumed.keys()
    for k in uninterrupted:
        assert torch.equal(uninterrupted[k], resumed[k]), k


def test_lr_scheduler_wraps_the_annealer():
    model, x, y = _task()
    fg.convert_to_fermi(model)
    opt = fg.FermiAnnealer(torch.optim.SGD(model.parameters(), lr=0.1), model, total_steps=30)
    assert isinstance(opt, torch.optim.Optimizer)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(30):
            _train(model, opt, x, y, 1, start=i)
            sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 3)
    assert opt.optimizer.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5)
    cosine.step()
    assert opt.param_groups[0]["lr"] < 0.1 * 0.5 ** 3


def test_schedules():
    assert fg.temperature_at(0.0, 1.0, 0.01, "exponential") == pytest.approx(1.0)
    assert fg.temperature_at(0.5, 1.0, 0.01, "exponential") == pytest.approx(0.1)
    assert fg.temperature_at(1.0, 1.0, 0.01, "cosine") == pytest.approx(0.01)
    assert fg.temperature_at(0.5, 1.0, 0.0 + 1e-9, "linear") == pytest.approx(0.5, abs=1e-6)
    values = [fg.sparsity_at(p / 10, 0.8) for p in range(11)]
    assert values[0] == 0.0 and values[-1] == pytest.approx(0.8)
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert values[1] - values[0] > values[-1] - values[-2]  # cubic: fast early, slow late
    with pytest.raises(ValueError, match="schedule must be one of"):
        fg.temperature_at(0.5, 1.0, 0.1, "step")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"temperature": (0.0, 0.1)}, r"temperature\[0\] \(T_start\) must be a finite number > 0"),
        ({"temperature": (1.0, -1.0)}, r"temperature\[1\] \(T_end\)"),
        ({"total_steps": 0}, "total_steps must be a positive int"),
        ({"schedule": "step"}, "schedule must be one of"),
        ({"sparsity_schedule": "quartic"}, "sparsity_schedule must be one of"),
        ({"target_sparsity": 1.5}, "target_sparsity must be in"),
    ],
)
def test_bad_annealer_arguments(kwargs, match):
    model, _, _ = _task()
    fg.convert_to_fermi(model)
    args = {"total_steps": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        fg.FermiAnnealer(torch.optim.SGD(model.parameters(), lr=0.1), model, **args)


def test_annealer_needs_a_converted_model():
    model, _, _ = _task()
    with pytest.raises(ValueError, match="call fermigates.convert_to_fermi"):
        fg.FermiAnnealer(torch.optim.SGD(model.parameters(), lr=0.1), model, total_steps=10)


def test_trainer_callback_anneals_like_the_wrapper():
    pytest.importorskip("transformers")
    from fermigates import fermi_trainer_callback

    model, x, y = _task()
    fg.convert_to_fermi(model, fg.FermiConfig(target_sparsity=0.5))
    callback = fermi_trainer_callback(model, temperature=(1.0, 0.01), total_steps=20)

    class State:
        global_step = 0
        max_steps = 20

    state = State()
    callback.on_train_begin(None, state, None)
    for step in range(1, 21):
        state.global_step = step
        callback.on_step_end(None, state, None)
    assert model[0].weight_gate.temperature.item() == pytest.approx(0.01)
    assert abs(fg.compute_sparsity(model).overall - 0.5) <= 0.02


def test_trainer_callback_inside_a_real_trainer(tmp_path):
    tf = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from fermigates import fermi_trainer_callback

    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=64, num_labels=3)
    model = tf.BertForSequenceClassification(cfg)
    fg.convert_to_fermi(model, fg.FermiConfig(target_sparsity=0.5))

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            ids = torch.randint(0, 99, (8,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "attention_mask": torch.ones(8, dtype=torch.long), "labels": int(ids[0] % 3)}

    args = tf.TrainingArguments(str(tmp_path), max_steps=4, per_device_train_batch_size=4, report_to=[],
                                use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True)
    callback = fermi_trainer_callback(model, temperature=(1.0, 0.01))
    tf.Trainer(model=model, args=args, train_dataset=Data(), callbacks=[callback]).train()
    gates = [m for m in model.modules() if isinstance(m, fg.FermiGate)]
    assert gates and all(g.temperature.item() == pytest.approx(0.01) for g in gates)
    assert abs(fg.compute_sparsity(model).overall - 0.5) <= 0.02
