"""Depth inside ``prune``: a ``layers:`` budget, depth as a choice inside MAC budgets, the stream calibration after
removed blocks, and the pruned model reloading and generating as stock transformers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fermigates as fg
from fermigates.core.state import find_state

tf = pytest.importorskip("transformers")

N_LAYERS = 4


def llama(quiet: tuple[int, ...] = ()) -> nn.Module:
    """A tiny LLaMA whose blocks ``quiet`` barely change the stream (their writers scaled down)."""
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=N_LAYERS, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)).eval()
    with torch.no_grad():
        for i in quiet:
            model.model.layers[i].self_attn.o_proj.weight.mul_(1e-3)
            model.model.layers[i].mlp.down_proj.weight.mul_(1e-3)
    return model


def batches(n: int = 4, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 61, (4, 12), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def logits(model: nn.Module, data: list[dict]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(**b).logits for b in data])


def rel_error(model: nn.Module, dense: nn.Module, data: list[dict]) -> float:
    a, b = logits(model, data), logits(dense, data)
    return float((a - b).pow(2).sum() / b.pow(2).sum())


def test_layers_budget_removes_the_blocks_that_change_the_stream_least():
    model = llama(quiet=(1, 2))
    dense = copy.deepcopy(model)
    report = fg.prune(model, batches(), budget="layers:0.5", progress=False)
    assert report.removed_blocks.removed == [1, 2] and report.removed_blocks.kept == [0, 3]
    assert report.budget.kind == "layers" and report.budget.measured == 0.5
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    scores = report.budget.depth["scores"]
    assert max(scores[1], scores[2]) < min(scores[0], scores[3])
    assert rel_error(model, dense, batches(seed=7)) < 1e-3
    assert "2 of 4 kept in 'model.layers'" in str(report)


def test_the_writers_after_a_removed_block_are_calibrated_toward_the_dense_stream():
    model = llama()
    dense = copy.deepcopy(model)
    plain = copy.deepcopy(model)
    fg.remove_blocks(plain, [1])
    calib = batches(8)
    report = fg.prune(model, calib, budget="layers:0.75", progress=False)
    assert report.removed_blocks.removed == [report.budget.removed_blocks[0]]
    gone = report.budget.removed_blocks[0]
    fg.remove_blocks(plain := copy.deepcopy(dense), [gone])
    fitted = {row.name for row in report.calibration.layers}
    after = gone + 1
    assert fitted == {f"model.layers.{after}.self_attn.o_proj", f"model.layers.{after}.mlp.down_proj"}
    held_out = batches(seed=9)
    assert rel_error(model, dense, held_out) < 0.9 * rel_error(plain, dense, held_out)


def test_depth_is_chosen_inside_a_mac_budget_when_blocks_are_cheap():
    model = llama(quiet=(1, 2))
    report = fg.prune(model, batches(), budget="macs:0.5", depth=True, progress=False)
    assert report.removed_blocks is not None and set(report.removed_blocks.removed) <= {1, 2}
    assert abs(report.budget.measured - 0.5) <= 0.02 * 0.5
    candidates = report.budget.depth["candidates"]
    errors = [c["error"] for c in candidates if c["error"] is not None]
    chosen = next(c for c in candidates if c["blocks"] == report.budget.removed_blocks)
    assert chosen["error"] == min(errors) and len(candidates) >= 2


def test_width_wins_when_every_block_matters():
    model = llama()
    with torch.no_grad():  # every block writes a large change into the stream
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(20.0)
            layer.mlp.down_proj.weight.mul_(20.0)
    report = fg.prune(model, batches(), budget="macs:0.8", depth=True, progress=False)
    assert report.removed_blocks is None and len(model.model.layers) == N_LAYERS
    assert report.budget.depth["candidates"][0]["blocks"] == []


def test_a_given_block_count_and_the_checkpoint_reloads_and_generates(tmp_path):
    model = llama(quiet=(2,))
    report = fg.prune(model, batches(), budget="macs:0.6", depth=1, progress=False,
                      config=fg.FermiConfig(granularity=("channel", "head")))
    assert report.removed_blocks.removed == [2] and model.config.num_hidden_layers == N_LAYERS - 1
    assert abs(report.budget.measured - 0.6) <= 0.02 * 0.6
    data = batches(1, seed=5)
    prompt = data[0]["input_ids"][:1, :5]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    want, tokens = logits(model, data), model.generate(prompt, **kwargs)
    with pytest.warns(UserWarning, match="per-layer widths"):  # global allocation: widths differ per block
        fg.save_shrunk(model, tmp_path)
    loaded = fg.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(loaded, data), want, rtol=0, atol=1e-6)
    assert torch.equal(loaded.generate(prompt, **kwargs), tokens)
    assert torch.equal(loaded.generate(prompt, cache_implementation="static", **kwargs), tokens)


def test_depth_alone_reloads_into_the_stock_class(tmp_path):
    model = llama(quiet=(1, 2))
    fg.prune(model, batches(), budget="layers:0.5", progress=False)
    data = batches(1, seed=5)
    want = logits(model, data)
    fg.save_shrunk(model, tmp_path)
    stock = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(stock) is tf.LlamaForCausalLM and stock.config.num_hidden_layers == 2
    torch.testing.assert_close(logits(stock, data), want, rtol=0, atol=1e-6)


def test_encoder_and_vit_blocks():
    torch.manual_seed(0)
    bert = tf.BertModel(tf.BertConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                      num_attention_heads=4, max_position_embeddings=64)).eval()
    fg.prune(bert, batches(), budget="layers:0.5", progress=False)
    assert bert.config.num_hidden_layers == 2 and len(bert.encoder.layer) == 2
    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=4).eval()
    images = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    report = fg.prune(vit, images, budget="layers:0.75", progress=False)
    assert len(vit.blocks) == 3 and report.budget.measured == 0.75
    assert vit(images[0]).shape == (4, 1000)


def _state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kwargs, match", [
    (dict(budget="units:0.5", depth=True), "depth= goes with"),
    (dict(budget="macs:0.5", depth=True, selection="magnitude"), "selection='obs'"),
    (dict(budget="macs:0.5", depth=-1), "depth must be"),
    (dict(budget="macs:0.5", depth=N_LAYERS), "every one of the"),
    (dict(target_sparsity=0.5, blocks_path="model.layers"), "blocks_path= names"),
])
def test_bad_depth_arguments_leave_the_model_alone(kwargs, match):
    model = llama()
    before = _state(model)
    with pytest.raises(ValueError, match=match):
        fg.prune(model, batches(), progress=False, **kwargs)
    assert find_state(model) is None and model.config.num_hidden_layers == N_LAYERS
    after = _state(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_a_model_without_a_block_list_is_refused_with_what_to_pass():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(ValueError, match="pass path="):
        fg.prune(mlp, [torch.randn(8, 8)], budget="layers:0.5", progress=False)
    assert isinstance(mlp[0], nn.Linear) and type(mlp[0]) is nn.Linear


def test_a_failure_while_removing_blocks_leaves_the_model_as_it_was(monkeypatch):
    import fermigates.bake as bake

    model = llama(quiet=(1,))
    before = _state(model)
    data = batches(1, seed=3)
    want = logits(model, data)

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(bake, "remove_blocks", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        fg.prune(model, batches(), budget="macs:0.6", depth=1, progress=False)
    assert find_state(model) is None and len(model.model.layers) == N_LAYERS
    after = _state(model)
    assert all(torch.equal(after[k], before[k]) for k in before)
    torch.testing.assert_close(logits(model, data), want, rtol=0, atol=0)
