"""Depth pruning: block_importance and remove_blocks on tiny random LLaMA / Qwen2 / Mistral / GPT-2 / BERT / ViT."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fermigates as fg
from fermigates.surgery import depth
from fermigates.core import registry
from fermigates.converters.blocks import BlockListSpec

tf = pytest.importorskip("transformers")

DECODERS = ("llama", "qwen2", "mistral", "gpt2")
FAMILIES = DECODERS + ("bert",)
N_LAYERS = 4


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=N_LAYERS,
                  num_attention_heads=4, max_position_embeddings=64)
    if name == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(num_key_value_heads=2, **common))
    elif name == "qwen2":  # sliding-window layers: per-layer layer_types
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
                                                   max_window_layers=2, **common))
    elif name == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(num_key_value_heads=2, sliding_window=None, **common))
    elif name == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=61, n_embd=32, n_layer=N_LAYERS, n_head=4, n_positions=64,
                                                 bos_token_id=0, eos_token_id=0))
    elif name == "bert":
        model = tf.BertModel(tf.BertConfig(**common))
    else:
        raise KeyError(name)
    return model.eval()


def inputs(pad: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 61, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if pad:
        mask[1, -pad:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def output(model: nn.Module, batch: dict) -> torch.Tensor:
    out = model(**batch)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


class Skip(nn.Module):
    """A block that returns its hidden-state input unchanged."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def blocks_of(model: nn.Module) -> nn.ModuleList:
    return depth.find_blocks(model)[1]


def layer_count(model: nn.Module) -> int:
    return model.config.num_hidden_layers


@pytest.mark.parametrize("name", FAMILIES)
def test_remove_blocks_equals_skipping_them(name):
    model = build(name)
    reference = copy.deepcopy(model)
    ref_blocks = blocks_of(reference)
    for i in (1, 2):
        ref_blocks[i] = Skip()
    kept_modules = [blocks_of(model)[i] for i in (0, 3)]
    result = fg.remove_blocks(model, [2, 1])
    assert result.removed == [1, 2] and result.kept == [0, 3] and result.original_count == N_LAYERS
    assert layer_count(model) == 2 and len(blocks_of(model)) == 2
    assert all(a is b for a, b in zip(blocks_of(model), kept_modules))  # the same modules, renumbered
    idx = [m.layer_idx for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    assert sorted(set(idx)) == [0, 1]
    batch = inputs()
    with torch.no_grad():
        torch.testing.assert_close(output(model, batch), output(reference, batch), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_plain_transformers_rebuilds_it_from_its_config(name, tmp_path):
    model = build(name)
    fg.remove_blocks(model, [0, 2])
    auto = tf.AutoModel if name == "bert" else tf.AutoModelForCausalLM
    rebuilt = auto.from_config(copy.deepcopy(model.config)).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    batch = inputs(pad=3)
    with torch.no_grad():
        torch.testing.assert_close(output(rebuilt, batch), output(model, batch), rtol=0, atol=0)
    if name == "llama":  # and save_pretrained writes a folder from_pretrained reads
        model.save_pretrained(tmp_path)
        loaded = auto.from_pretrained(tmp_path).eval()
        with torch.no_grad():
            torch.testing.assert_close(output(loaded, batch), output(model, batch), rtol=0, atol=0)


@pytest.mark.parametrize("name", DECODERS)
def test_generate_with_dynamic_and_static_cache(name):
    model = build(name)
    fg.remove_blocks(model, [1])
    rebuilt = type(model)(copy.deepcopy(model.config)).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    prompt = torch.randint(1, 61, (1, 5), generator=torch.Generator().manual_seed(3))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    dynamic = model.generate(prompt, **kwargs)
    assert torch.equal(rebuilt.generate(prompt, **kwargs), dynamic)
    assert torch.equal(model.generate(prompt, cache_implementation="static", **kwargs), dynamic)
    assert torch.equal(rebuilt.generate(prompt, cache_implementation="static", **kwargs), dynamic)


def test_per_layer_config_fields_follow_the_blocks():
    model = build("qwen2")
    types = list(model.config.layer_types)
    model.config.fermigates_per_layer = {"intermediate_size": [10, 11, 12, 13]}
    result = fg.remove_blocks(model, [0, 3])
    assert model.config.layer_types == [types[1], types[2]]
    assert model.config.fermigates_per_layer == {"intermediate_size": [11, 12]}
    assert result.config["num_hidden_layers"] == 2
    assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1]


def test_removals_compose_in_original_numbering():
    model = build("llama")
    fg.remove_blocks(model, 0)
    second = fg.remove_blocks(model, [1])  # the original block 2
    assert second.kept == [1, 3] and second.original_count == N_LAYERS
    assert depth.removed_blocks(model) == {"model.layers": {"original": N_LAYERS, "kept": [1, 3]}}


def _snapshot(model):
    return ([id(b) for b in blocks_of(model)], [m.layer_idx for m in model.modules() if hasattr(m, "layer_idx")],
            model.config.to_dict(), getattr(model, depth.DEPTH_ATTR, None))


@pytest.mark.parametrize("indices, error", [([4], IndexError), ([1, 1], ValueError), ([0, 1, 2, 3], ValueError),
                                            (["1"], TypeError), ([1.0], TypeError)])
def test_bad_indices_leave_the_model_alone(indices, error):
    model = build("llama")
    before = _snapshot(model)
    with pytest.raises(error):
        fg.remove_blocks(model, indices)
    assert _snapshot(model) == before


def test_a_failure_midway_undoes_everything(monkeypatch):
    model = build("llama")
    before = _snapshot(model)
    spec = registry.lookup(registry.BLOCK_LISTS, model)

    def explode(model, path, kept):
        raise RuntimeError("boom")

    monkeypatch.setitem(registry.BLOCK_LISTS, registry.qualname(type(model)),
                        BlockListSpec(paths=spec.paths, count_fields=spec.count_fields,
                                      per_layer_fields=spec.per_layer_fields, fixup=explode))
    with pytest.raises(RuntimeError, match="boom"):
        fg.remove_blocks(model, [1, 2])
    assert _snapshot(model) == before
    assert model.config.num_hidden_layers == N_LAYERS


def test_gpt2_inverse_layer_scaling_refuses_renumbering():
    model = build("gpt2")
    model.config.scale_attn_by_inverse_layer_idx = True
    before = _snapshot(model)
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        fg.remove_blocks(model, [1])
    assert _snapshot(model) == before
    fg.remove_blocks(model, [3])  # the last block: nothing is renumbered
    assert model.config.n_layer == 3


def test_unregistered_model_needs_a_path():
    model = nn.Sequential(nn.Linear(4, 4), nn.ModuleList([nn.Linear(4, 4) for _ in range(3)]))
    with pytest.raises(ValueError, match="path="):
        fg.remove_blocks(model, [0])
    fg.remove_blocks(model, [0], path="1")
    assert len(model[1]) == 2


# ------------------------------------------------------------------------------------------------ importance
def test_block_influence_finds_an_identity_block_and_ignores_padding():
    model = build("llama")
    with torch.no_grad():  # block 2 adds nothing to the residual stream: it is the identity
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    padded = inputs(pad=4)
    bi = fg.block_importance(model, [padded], metric="bi")
    angular = fg.block_importance(model, [padded], metric="angular")
    assert len(bi) == N_LAYERS and bi[2] < 1e-6 and angular[2] < 1e-3
    assert min(bi[i] for i in (0, 1, 3)) > 1e-3
    # right padding changes nothing for the real tokens of a causal model, so the mean over real tokens of
    # the padded batch equals the mean over the same tokens given without padding
    rows = [{"input_ids": padded["input_ids"][i:i + 1, : int(padded["attention_mask"][i].sum())]} for i in (0, 1)]
    assert fg.block_importance(model, rows, metric="bi") == pytest.approx(bi, rel=1e-6)
    runs = fg.block_importance(model, [padded], metric="angular", span=2)
    assert len(runs) == N_LAYERS - 1 and all(r > 0 for r in runs)


def test_block_importance_rejects_bad_arguments():
    model = build("bert")
    with pytest.raises(ValueError, match="metric"):
        fg.block_importance(model, [inputs()], metric="cosine")
    with pytest.raises(ValueError, match="span"):
        fg.block_importance(model, [inputs()], span=N_LAYERS + 1)
    with pytest.raises(ValueError, match="no real token"):
        fg.block_importance(model, [])


# ------------------------------------------------------------------------------------------------ checkpoints
def test_save_shrunk_of_a_shallower_llama_loads_back(tmp_path):
    model = build("llama")
    fg.remove_blocks(model, [1, 2])
    batch = inputs()
    with torch.no_grad():
        want = output(model, batch)
    fg.save_shrunk(model, tmp_path)
    with torch.no_grad():  # from the saved config (2 layers), and into a stock model at the original depth
        torch.testing.assert_close(output(fg.from_pretrained(tmp_path), batch), want, rtol=0, atol=0)
        stock = build("llama")
        loaded = fg.load_shrunk(stock, tmp_path)
        torch.testing.assert_close(output(loaded.eval(), batch), want, rtol=0, atol=0)
    assert loaded.config.num_hidden_layers == 2
    assert depth.removed_blocks(loaded) == {"model.layers": {"original": N_LAYERS, "kept": [0, 3]}}
    assert "2 of 4 blocks (removed [1, 2])" in str(fg.inspect_checkpoint(tmp_path))
    plain = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # config.json alone suffices
    with torch.no_grad():
        torch.testing.assert_close(output(plain, batch), want, rtol=0, atol=0)


def test_load_shrunk_refuses_a_model_of_another_depth_and_keeps_it(tmp_path):
    model = build("llama")
    fg.remove_blocks(model, [1])
    fg.save_shrunk(model, tmp_path)
    other = build("llama")
    fg.remove_blocks(other, [0, 1])  # 2 blocks: neither the original 4 nor the saved 3
    before = _snapshot(other)
    with pytest.raises(fg.CheckpointError, match="original depth"):
        fg.load_shrunk(other, tmp_path)
    assert _snapshot(other) == before


def test_timm_vit_blocks_save_and_load(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=4).eval()
    x = torch.randn(2, 3, 32, 32)
    scores = fg.block_importance(model, [x])
    assert len(scores) == 4
    fg.remove_blocks(model, [1])
    assert [f["module"] for f in model.feature_info] == ["blocks.0", "blocks.1", "blocks.2"]
    with torch.no_grad():
        want = model(x)
    fg.save_shrunk(model, tmp_path)
    stock = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=4)
    loaded = fg.load_shrunk(stock, tmp_path).eval()
    assert len(loaded.blocks) == 3
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), want, rtol=0, atol=0)


def test_blocks_removed_after_per_layer_head_pruning_reload_and_generate(tmp_path):
    model = build("llama")
    batches = [inputs() for _ in range(2)]
    with torch.no_grad():  # the heads of layers 0 and 3 matter little: a global budget removes heads there only
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.o_proj.weight.mul_(0.01 if i in (0, 3) else 1.0 + i)
            layer.mlp.down_proj.weight.mul_(0.2 + i)
    fg.prune(model, batches, budget="macs:0.6", progress=False)
    heads = [layer.self_attn.q_proj.out_features // 8 for layer in model.model.layers]
    assert heads[0] < heads[2] == 4 and heads[3] < 4  # per-layer head counts: transformers' per_layer_config describes them
    fg.remove_blocks(model, [1])
    per_layer = model.config.fermigates_per_layer
    assert per_layer["num_attention_heads"] == [heads[0], heads[2], heads[3]]
    assert [c.num_attention_heads for c in model.config.per_layer_config] == [heads[0], heads[2], heads[3]]
    batch = inputs()
    prompt = batch["input_ids"][:1, :5]
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want, tokens = output(model, batch), model.generate(prompt, **kwargs)
    fg.save_shrunk(model, tmp_path)
    loaded = fg.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(output(loaded, batch), want, rtol=0, atol=0)
    assert torch.equal(loaded.generate(prompt, **kwargs), tokens)
    assert torch.equal(loaded.generate(prompt, cache_implementation="static", **kwargs), tokens)
