"""Attention specs: removing heads with prune_heads == zeroing their o columns (the hard-masked reference)."""

from __future__ import annotations

import copy

import pytest
import torch
from fermigates.core import layouts as att
from fermigates.core import registry
from fermigates.converters.hf_attention import apply_hf_config_updates, hf_config_updates
from torch import nn

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

torch.manual_seed(0)


def _bert():
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    return transformers.BertModel(cfg).eval()


def _vit():
    cfg = transformers.ViTConfig(image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=64)
    return transformers.ViTModel(cfg).eval()


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _llama(attn="sdpa", **kw):
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64, **kw)
    cfg._attn_implementation = attn
    return transformers.LlamaForCausalLM(cfg).eval()


def _ids(vocab=100, b=2, t=7):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(1))


def _attention_modules(model):
    return [(n, m) for n, m in model.named_modules() if att.attention_spec(m) is not None]


def _prune_vs_mask(model, run, keep_fn, mode="group", outside=None):
    """Hard-mask a copy, prune the model, compare ``run`` outputs; returns the pruned model."""
    masked = copy.deepcopy(model)
    mods = dict(masked.named_modules())
    for name, m in _attention_modules(model):
        units = att.head_units(m, mode=mode)
        keep = keep_fn(units.n_units)
        att.hard_mask_heads(mods[name], keep, mode=mode,
                            outside_o=mods[outside(name)] if outside else None)
        res = att.prune_heads(m, keep, mode=mode)
        if outside:
            att.slice_linear(model.get_submodule(outside(name)), kept_in=res.kept_channels)
    with torch.no_grad():
        ref, out = run(masked), run(model)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    return model


def _random_keep(seed):
    gen = torch.Generator().manual_seed(seed)

    def keep(n):
        k = torch.rand(n, generator=gen) < 0.5
        k[torch.randint(0, n, (1,), generator=gen)] = True
        return k
    return keep


@pytest.mark.parametrize("seed", [0, 1])
def test_bert_heads(seed):
    model, ids = _bert(), _ids()
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0

    def run(m):
        return m(input_ids=ids, attention_mask=mask).last_hidden_state

    _prune_vs_mask(model, run, _random_keep(seed), outside=lambda n: n.replace(".self", ".output.dense"))
    a = model.encoder.layer[0].attention.self
    assert a.all_head_size == a.num_attention_heads * a.attention_head_size == a.query.out_features


def test_vit_heads():
    model = _vit()
    x = torch.randn(2, 3, 32, 32)
    _prune_vs_mask(model, lambda m: m(pixel_values=x).last_hidden_state, _random_keep(2))
    a = model.layers[1].attention
    assert a.q_proj.out_features == a.num_attention_heads * a.head_dim


def test_gpt2_heads():
    model, ids = _gpt2(), _ids()
    _prune_vs_mask(model, lambda m: m(input_ids=ids).logits, _random_keep(3))
    a = model.transformer.h[0].attn
    assert a.c_attn.nf == 3 * a.split_size == 3 * a.num_heads * a.head_dim
    assert a.c_proj.nx == a.split_size


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", ["group", "slot"])
def test_llama_gqa_heads(attn, mode):
    model, ids = _llama(attn), _ids()
    keeps = iter([torch.tensor([False, True]), torch.tensor([True, False])])
    _prune_vs_mask(model, lambda m: m(input_ids=ids).logits, lambda n: next(keeps), mode=mode)
    a = model.model.layers[0].self_attn
    spec = att.attention_spec(a)
    n_q, n_kv = spec.num_heads(a), spec.kv_heads(a)
    assert (n_q, n_kv) == ((2, 1) if mode == "group" else (2, 2))
    assert a.num_key_value_groups == n_q // n_kv


def test_head_units_layout():
    model = _llama()
    a = model.model.layers[0].self_attn
    units = att.head_units(a)
    d = a.head_dim
    assert units.n_units == 2 and units.q_heads.tolist() == [[0, 1], [2, 3]]
    assert units.q_rows[1].tolist() == list(range(2 * d, 4 * d))
    assert units.k_rows[1].tolist() == list(range(d, 2 * d))
    slots = att.head_units(a, mode="slot")
    assert slots.q_heads.tolist() == [[0, 2], [1, 3]] and slots.kv_heads.shape == (2, 0)
    g = _gpt2().transformer.h[0].attn
    u = att.head_units(g)
    d, e = g.head_dim, g.split_size
    assert u.qkv_rows[2].tolist() == [r + off for off in (0, e, 2 * e) for r in range(2 * d, 3 * d)]
    assert u.q_rows is None and u.o_cols[2].tolist() == list(range(2 * d, 3 * d))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kwargs", [{}, {"qk_norm": True, "norm_layer": nn.LayerNorm}, {"gated": True}])
def test_timm_attention(fused, kwargs):
    from timm.layers.attention import Attention

    m = Attention(dim=32, num_heads=4, qkv_bias=True, **kwargs).eval()
    m.fused_attn = fused
    x = torch.randn(2, 5, 32)
    keep = torch.tensor([True, False, True, False])
    ref = copy.deepcopy(m)
    att.hard_mask_heads(ref, keep)
    att.prune_heads(m, keep)
    assert (m.num_heads, m.attn_dim, m.qkv.out_features) == (2, 16, 48)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref(x), atol=1e-5, rtol=1e-5)


def test_timm_scale_norm_refused():
    from timm.layers.attention import Attention

    m = Attention(dim=32, num_heads=4, scale_norm=True, norm_layer=nn.LayerNorm)
    assert "scale_norm" in att.attention_spec(m).reason(m)
    with pytest.raises(ValueError, match="scale_norm"):
        att.prune_heads(m, torch.tensor([True, False, True, True]))


@pytest.mark.parametrize("mode", ["group", "slot"])
def test_timm_rope_gqa(mode):
    from timm.layers.attention import AttentionRope

    m = AttentionRope(dim=32, num_heads=4, num_kv_heads=2, qkv_fused=False).eval()
    x = torch.randn(2, 5, 32)
    keep = torch.tensor([False, True])
    ref = copy.deepcopy(m)
    att.hard_mask_heads(ref, keep, mode=mode)
    att.prune_heads(m, keep, mode=mode)
    assert m.num_kv_groups * m.num_kv_heads == m.num_heads == 2
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref(x), atol=1e-5, rtol=1e-5)
    fused = AttentionRope(dim=32, num_heads=4)
    assert att.attention_spec(fused).qkv == "qkv"


def test_keep_validation():
    a = _llama().model.layers[0].self_attn
    with pytest.raises(ValueError, match="at least one True"):
        att.prune_heads(a, torch.tensor([False, False]))
    with pytest.raises(ValueError, match="2 entries"):
        att.prune_heads(a, torch.tensor([True, False, True]))
    with pytest.raises(ValueError, match="mode"):
        att.head_units(a, mode="rows")


def test_registry_entries():
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(6, 4)
    assert att.linear_layout(layer) == att.CONV1D and registry.lookup(registry.SHAPE_ATTRS, layer) == ("nf", "nx")
    x = torch.randn(3, 4)
    ref = layer(x)
    att.slice_linear(layer, kept_out=torch.tensor([0, 5]), kept_in=torch.tensor([0, 1, 2, 3]))
    assert (layer.nf, layer.nx) == (2, 4)
    torch.testing.assert_close(layer(x), ref[:, [0, 5]])
    norm = _llama().model.norm
    spec = registry.lookup(registry.RMS_NORMS, norm)(norm)
    assert (spec.weight, spec.eps) == ("weight", "variance_epsilon") and hasattr(norm, spec.eps)
    for model in (_bert(), _gpt2(), _vit()):
        for m in model.modules():
            if att.attention_spec(m) is not None:
                assert all(hasattr(m, a) for a in registry.lookup(registry.SHAPE_ATTRS, m))


def test_example_inputs():
    def first(model):
        return next(x for x in (f(model) for f in registry.EXAMPLE_INPUTS) if x is not None)

    assert set(first(_bert())) == {"input_ids", "attention_mask"}
    assert first(_vit())["pixel_values"].shape == (2, 3, 32, 32)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
    assert first(vit).shape == (2, 3, 32, 32)
    assert all(f(nn.Linear(2, 2)) is None for f in registry.EXAMPLE_INPUTS)


def test_config_updates_uniform_llama_rebuilds():
    model, ids = _llama(), _ids()
    assert hf_config_updates(model) == {}
    kept = torch.arange(0, 64, 2)
    for layer in model.model.layers:
        att.prune_heads(layer.self_attn, torch.tensor([True, False]))
        for name in ("gate_proj", "up_proj"):
            att.slice_linear(getattr(layer.mlp, name), kept_out=kept)
        att.slice_linear(layer.mlp.down_proj, kept_in=kept)
    assert apply_hf_config_updates(model) == {"num_attention_heads": 2, "head_dim": 8, "num_key_value_heads": 1,
                                              "intermediate_size": 32}
    rebuilt = transformers.LlamaForCausalLM(model.config).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(input_ids=ids).logits, model(input_ids=ids).logits)


def test_config_updates_per_layer():
    model = _bert()
    att.prune_heads(model.encoder.layer[1].attention.self, torch.tensor([True, False, True, False]))
    layer = model.encoder.layer[0]
    att.slice_linear(layer.intermediate.dense, kept_out=torch.arange(10))
    att.slice_linear(layer.output.dense, kept_in=torch.arange(10))
    assert hf_config_updates(model) == {"fermigates_per_layer": {
        "num_attention_heads": [4, 2], "num_key_value_heads": [4, 2], "head_dim": [8, 8],
        "intermediate_size": [10, 64]}}
    apply_hf_config_updates(model)
    assert model.config.num_attention_heads == 4  # the stock skeleton stays described natively
    assert model.config.to_dict()["fermigates_per_layer"]["num_attention_heads"] == [4, 2]


def test_config_updates_gpt2_uniform_mlp():
    model = _gpt2()
    for block in model.transformer.h:
        att.slice_linear(block.mlp.c_fc, kept_out=torch.arange(40))
        att.slice_linear(block.mlp.c_proj, kept_in=torch.arange(40))
    assert hf_config_updates(model) == {"n_inner": 40}
    att.prune_heads(model.transformer.h[0].attn, torch.tensor([True, True, False, True]))
    updates = apply_hf_config_updates(model)
    assert updates["fermigates_per_layer"]["num_attention_heads"] == [3, 4]
    # transformers' own per-layer config (sizes eagerly initialised caches); the stock class still builds
    layers = model.config.per_layer_config
    assert [(layers[i].num_attention_heads, layers[i].head_dim) for i in range(2)] == [(3, 8), (4, 8)]
    rebuilt = transformers.GPT2LMHeadModel(copy.deepcopy(model.config))
    assert rebuilt.transformer.h[0].attn.num_heads == 4  # the skeleton load_shrunk resizes


@pytest.mark.parametrize("family", ["Mistral", "Qwen2", "Qwen3", "Roberta"])
def test_registered_relatives(family):
    common = {"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
              "intermediate_size": 64, "max_position_embeddings": 64}
    if family == "Roberta":
        model = transformers.RobertaModel(transformers.RobertaConfig(**common)).eval()
        ids = _ids()
        _prune_vs_mask(model, lambda m: m(input_ids=ids).last_hidden_state, _random_keep(5),
                       outside=lambda n: n.replace(".self", ".output.dense"))
        return
    cfg = getattr(transformers, f"{family}Config")(num_key_value_heads=2, **common)
    model = getattr(transformers, f"{family}ForCausalLM")(cfg).eval()
    ids = _ids()
    _prune_vs_mask(model, lambda m: m(input_ids=ids).logits, lambda n: torch.tensor([False, True]))
    assert att.attention_spec(model.model.layers[0].self_attn).num_heads(model.model.layers[0].self_attn) == 2
