"""Attention heads ranked by block OBS on the output projection's columns, on the neurons' scale."""

import pytest
import torch
from torch import nn

import fermigates as fg
from fermigates.calibration.selection import obs_group_removal_order, obs_removal_order, output_energy
from _family_models import build


def _refit_cost(wb: torch.Tensor, h: torch.Tensor, keep: list[int]) -> float:
    """min over v on the kept columns of (wb - v)ᵀ H (wb - v): the damped least-squares refit error."""
    cross = wb @ h[:, keep]
    return float((wb @ h * wb).sum() - (cross @ torch.linalg.solve(h[keep][:, keep], cross.T)).trace())


def test_group_obs_order_is_the_brute_force_greedy_order():
    torch.manual_seed(0)
    lin = nn.Linear(12, 5)
    x = torch.randn(300, 12) @ torch.randn(12, 12)
    x1 = torch.cat([x, torch.ones(300, 1)], 1).double()
    gram = x1.T @ x1
    groups = torch.arange(12).reshape(4, 3)
    order, cost = obs_group_removal_order(lin, gram, groups, 3, ridge=1e-2)
    wb = torch.cat([lin.weight.detach(), lin.bias.detach()[:, None]], 1).double()
    h = gram.clone()
    h.diagonal()[:12] += 1e-2 * h.diagonal()[:12].mean()
    alive, want, steps, before = list(range(4)), [], [], 0.0
    for _ in range(3):
        costs = {g: _refit_cost(wb, h, [c for a in alive if a != g for c in groups[a].tolist()] + [12])
                 for g in alive}
        g = min(costs, key=costs.get)
        want.append(g)
        steps.append(costs[g] - before)
        before = costs[g]
        alive.remove(g)
    assert order.tolist() == want
    torch.testing.assert_close(cost, torch.tensor(steps, dtype=torch.float64) / 300, rtol=1e-6, atol=1e-9)


def test_group_obs_of_single_columns_is_the_column_obs():
    torch.manual_seed(1)
    lin = nn.Linear(16, 4)
    x = torch.randn(200, 16) * torch.linspace(0.1, 2.0, 16)
    x1 = torch.cat([x, torch.ones(200, 1)], 1).double()
    o_col, c_col = obs_removal_order(lin, x1.T @ x1, 7, blocks=7, loop_dtype=torch.float64)
    o_grp, c_grp = obs_group_removal_order(lin, x1.T @ x1, torch.arange(16)[:, None], 7)
    assert o_grp.tolist() == o_col.tolist()
    torch.testing.assert_close(c_grp, c_col, rtol=1e-6, atol=1e-12)
    assert output_energy(lin, x1.T @ x1) > 0


def test_bad_groups_are_refused():
    lin = nn.Linear(6, 2)
    gram = torch.eye(7, dtype=torch.float64)
    with pytest.raises(ValueError, match="groups must be"):
        obs_group_removal_order(lin, gram, torch.arange(6).reshape(2, 3) + 1, 1)  # column 6 does not exist
    with pytest.raises(ValueError, match="n_remove must be"):
        obs_group_removal_order(lin, gram, torch.arange(6).reshape(2, 3), 2)  # would empty the layer


def test_budget_removes_the_head_whose_output_the_projection_ignores():
    from fermigates.oneshot import allocate

    model, x = build("hf", "bert")
    heads = model.config.num_attention_heads
    d = model.config.hidden_size // heads
    with torch.no_grad():  # layer 1's head 2 barely reaches the output: its removal costs almost nothing
        model.encoder.layer[1].attention.output.dense.weight[:, 2 * d:3 * d].mul_(1e-4)
    fg.convert_to_fermi(model, fg.FermiConfig(granularity="head"), example_inputs=x)
    result = allocate(model, "units:0.875", example_inputs=x, data=[x], allocation="global")
    by_layer = {("layer.1." in label): kept for label, kept in result.kept.items()}
    assert by_layer == {False: (heads, heads), True: (heads - 1, heads)}, result.kept
    fg.convert_from_fermi(model)
    out = model.encoder.layer[1].attention.output.dense
    assert out.in_features == (heads - 1) * d
    assert float(out.weight.abs().amax(0).min()) > 1e-3  # the damped head 2 is the one that went
    assert model.encoder.layer[0].attention.output.dense.in_features == heads * d
