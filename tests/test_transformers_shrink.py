"""Shrinking transformers (HF BERT / ViT / GPT-2 / LLaMA-GQA, timm ViT / DeiT) == hard-masking them.

Two routes to the same claim: the dependency graph + ``shrink_model`` (random keep patterns over every
prunable group; the masked reference zeroes the consumers' input columns of removed units), and the
converters' own helpers (``prune_heads`` + MLP neuron slicing), which pin down the per-family knowledge alone.
After shrinking, LLaMA and GPT-2 still ``generate()`` with their KV cache at another prompt length and BERT
still runs with padding and another batch size.
"""

from __future__ import annotations

import copy

import pytest
import torch
from fermigates.core import layouts as att
from fermigates.converters.hf_attention import apply_hf_config_updates, hf_config_updates

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

RTOL = 1e-4


def _ids(b, t, vocab=100, seed=1):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


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


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def _timm(name):
    return lambda: timm.create_model(name, pretrained=False, img_size=32, depth=2, num_classes=10).eval()


_TEXT = {"input_ids": _ids(2, 8), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
_IMG = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
# name -> (factory, example inputs, output of a run)
MODELS = {
    "bert": (_bert, _TEXT, lambda m, x: m(**x).last_hidden_state),
    "hf_vit": (_vit, {"pixel_values": _IMG}, lambda m, x: m(**x).last_hidden_state),
    "gpt2": (_gpt2, _TEXT, lambda m, x: m(**x).logits),
    "llama": (_llama, _TEXT, lambda m, x: m(**x).logits),
    "vit_tiny": (_timm("vit_tiny_patch16_224"), _IMG, lambda m, x: m(x)),
    "deit_tiny": (_timm("deit_tiny_patch16_224"), _IMG, lambda m, x: m(x)),
}


def _assert_close(out, ref):
    scale = ref.abs().max().clamp_min(1e-6)
    err = (out - ref).abs().max() / scale
    assert out.shape == ref.shape and err < RTOL, f"relative error {err:.2e}"


def _random_keep(n, gen):
    """A random pattern that keeps at least one unit and, when it can, removes at least one."""
    keep = torch.rand(n, generator=gen) < 0.6
    order = torch.randperm(n, generator=gen)
    keep[order[0]] = True
    if n > 1:
        keep[order[1]] = False
    return keep


def _heads(model):
    return [s.num_heads(m) for m in model.modules() if (s := att.attention_spec(m)) is not None]


# ------------------------------------------------------------------------------------------ own helpers
# MLP neurons: (producer suffixes, consumer suffix) -- the per-family layout the graph must rediscover
_MLP = [(("intermediate.dense",), "output.dense"), (("mlp.fc1",), "mlp.fc2"), (("mlp.c_fc",), "mlp.c_proj"),
        (("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj")]


def _zero_cols(layer, cols):
    in_dim = att.linear_layout(layer).in_dim
    with torch.no_grad():
        layer.weight.index_fill_(in_dim, cols, 0.0)


def _shrink_by_hand(model, seed, uneven=False):
    """(shrunk model, masked copy): random heads per attention module and random MLP neurons per block;
    ``uneven``: the first attention module keeps all its heads (layers then differ in head counts)."""
    gen = torch.Generator().manual_seed(seed)
    first = True
    masked = copy.deepcopy(model)
    mm = dict(masked.named_modules())
    for name, module in list(model.named_modules()):
        spec = att.attention_spec(module)
        if spec is not None:
            outside = None if spec.o is not None else name.rsplit(".", 1)[0] + ".output.dense"
            keep = _random_keep(att.head_units(module, spec).n_units, gen)
            if uneven and first:
                keep[:] = True
            first = False
            att.hard_mask_heads(mm[name], keep, outside_o=mm[outside] if outside else None)
            res = att.prune_heads(module, keep)
            if outside:
                att.slice_linear(model.get_submodule(outside), kept_in=res.kept_channels)
        for producers, consumer in _MLP:
            if name.endswith(producers[0]):
                prefix = name[: -len(producers[0])]
                cons = model.get_submodule(prefix + consumer)
                n = cons.weight.shape[att.linear_layout(cons).in_dim]
                keep = _random_keep(n, gen)
                _zero_cols(mm[prefix + consumer], torch.nonzero(~keep).flatten())
                kept = torch.nonzero(keep).flatten()
                for p in producers:
                    att.slice_linear(model.get_submodule(prefix + p), kept_out=kept)
                att.slice_linear(cons, kept_in=kept)
    return model, masked


# ------------------------------------------------------------------------------------------ graph route
def _shrink_with_graph(model, inputs, seed, uneven=False):
    from fermigates.surgery.graph import build_dependency_graph
    from fermigates.core.layouts import weight_axes
    from fermigates.surgery.shrink import shrink_model

    graph = build_dependency_graph(model, inputs)
    gen = torch.Generator().manual_seed(seed)
    keep = {g.id: _random_keep(g.n_units, gen) for g in graph.groups if g.prunable}
    heads = [g.id for g in graph.groups if g.prunable and g.kind == "head"]
    assert heads, "no prunable head group found"
    if uneven:
        keep[heads[0]][:] = True
    masked = copy.deepcopy(model)
    mm = dict(masked.named_modules())
    for group in graph.groups:
        if group.id not in keep:
            continue
        for member in group.members:
            if member.role == "consumer":
                layer = mm[member.module]
                cols = member.index[~keep[group.id]].reshape(-1)
                with torch.no_grad():
                    layer.weight.index_fill_(weight_axes(layer)[0], cols, 0.0)
    result = shrink_model(model, graph, keep)
    return model, masked, result


def _shrink(route, name, seed, uneven=False):
    factory, inputs, run = MODELS[name]
    torch.manual_seed(seed)
    model = factory()
    if route == "graph":
        model, masked, _ = _shrink_with_graph(model, inputs, seed, uneven)
    else:
        model, masked = _shrink_by_hand(model, seed, uneven)
    return model, masked, inputs, run


ROUTES = ["helpers", "graph"]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("name", list(MODELS))
def test_shrunk_equals_masked(route, name):
    model, masked, inputs, run = _shrink(route, name, seed=0)
    before = sum(p.numel() for p in masked.parameters())
    assert sum(p.numel() for p in model.parameters()) < before
    heads, heads_masked = _heads(model), _heads(masked)
    assert heads and len(heads) == len(heads_masked), (heads, heads_masked)
    assert all(a < b for a, b in zip(heads, heads_masked)), (heads, heads_masked)
    with torch.no_grad():
        _assert_close(run(model, inputs), run(masked, inputs))


@pytest.mark.parametrize("route,name,uneven", [
    ("helpers", "llama", True),
    ("graph", "gpt2", True),
    ("graph", "llama", False),
    ("graph", "llama", True),
])
def test_generate_after_shrink(route, name, uneven):
    model, masked, _, _ = _shrink(route, name, seed=1, uneven=uneven)
    apply_hf_config_updates(model)  # per-layer head counts for caches sized from the config
    ids = _ids(2, 5, seed=3)                      # another prompt length than the example inputs (8)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0                               # left padding
    kwargs = {"attention_mask": mask, "max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        out = model.generate(ids, **kwargs)
        ref = masked.generate(ids, **kwargs)
        chunked = model.generate(ids, cache_implementation="static", prefill_chunk_size=3, **kwargs)
    assert out.shape == (2, 11)
    assert torch.equal(out, ref) and torch.equal(chunked, ref)
    if uneven:
        per_layer = model.config.per_layer_config
        assert [per_layer[i].num_attention_heads for i in range(2)] == _heads(model)


@pytest.mark.parametrize("route", ROUTES)
def test_bert_padding_and_batch_size(route):
    model, masked, _, run = _shrink(route, "bert", seed=2)
    ids = _ids(3, 11, seed=4)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    x = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        _assert_close(run(model, x), run(masked, x))


@pytest.mark.parametrize("route", ROUTES)
def test_config_describes_shrunk_llama(route):
    model, _, _, _ = _shrink(route, "llama", seed=0)
    updates = hf_config_updates(model)
    layers = [l.self_attn for l in model.model.layers]
    per_layer = [(a.q_proj.out_features // a.head_dim, a.k_proj.out_features // a.head_dim) for a in layers]
    mlp = [l.mlp.down_proj.in_features for l in model.model.layers]
    per = updates.get("fermigates_per_layer", {})
    if len(set(per_layer)) == 1:
        assert (updates["num_attention_heads"], updates["num_key_value_heads"]) == per_layer[0]
    else:
        assert list(zip(per["num_attention_heads"], per["num_key_value_heads"])) == per_layer
    assert (per["intermediate_size"] if len(set(mlp)) > 1 else [updates["intermediate_size"]] * 2) == mlp
    apply_hf_config_updates(model)  # what convert_from_fermi runs after a shrink: per-module widths too
    assert [l.mlp.intermediate_size for l in model.model.layers] == mlp


@pytest.mark.parametrize("name", ["gpt2", "llama", "deit_tiny"])
def test_pipeline_removes_heads(name):
    """convert_to_fermi (head + channel gates) -> close half the units -> convert_from_fermi shrinks heads."""
    import fermigates as fg
    from fermigates.methods.fermi.layers import GroupGate

    torch.manual_seed(0)
    model = MODELS[name][0]()
    heads_before = _heads(model)
    fg.convert_to_fermi(model, fg.FermiConfig(granularity=("channel", "head"), target_sparsity=0.5))
    with torch.no_grad():
        for gate in [m for m in model.modules() if isinstance(m, GroupGate)]:
            gate.mu.fill_(float((gate.score() / gate.scale).median()) + 1e-6)
    report = fg.convert_from_fermi(model, progress=False)
    heads = _heads(model)
    assert heads and len(heads) == len(heads_before), (heads, heads_before)
    assert report.shrunk and all(a < b for a, b in zip(heads, heads_before)), report.not_shrunk
    if name != "deit_tiny":
        apply_hf_config_updates(model)
        ids = _ids(1, 5, seed=5)
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
            chunked = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0,
                                     cache_implementation="static", prefill_chunk_size=2)
        assert torch.equal(out, chunked)
