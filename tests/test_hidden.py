"""Hidden-size pruning: the residual stream's channels cut together (embedding columns, every projection that
writes the stream, the RMS norms' weights, the LM head tied or not), exact where the norm is an RMS norm, refused
where it is a layer norm."""

from __future__ import annotations

import copy

import pytest
import torch

import fermigates as fg
from fermigates.surgery.graph import build_dependency_graph
from fermigates.surgery.shrink import mask_model, shrink_model

tf = pytest.importorskip("transformers")

DECODERS = {
    "llama": lambda tie: tf.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=tie),
    "qwen2": lambda tie: tf.Qwen2Config(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=tie),
    "mistral": lambda tie: tf.MistralConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                            tie_word_embeddings=tie),
}


def _decoder(name: str, tie: bool):
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(DECODERS[name](tie)).eval()
    with torch.no_grad():  # norms away from 1, biases away from 0: nothing trivially exact
        for pname, p in model.named_parameters():
            if "norm" in pname or pname.endswith("bias"):
                p.uniform_(0.5, 1.5)
    return model, torch.randint(0, 99, (2, 10), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("name", sorted(DECODERS))
def test_removing_hidden_channels_equals_the_stream_masked_model(name, tie):
    model, ids = _decoder(name, tie)
    graph = build_dependency_graph(model, {"input_ids": ids[:1]}, hidden=True)
    (hidden,) = [g for g in graph.groups if g.kind == "hidden"]
    assert hidden.prunable and hidden.n_units == 32
    roles = {m.role for m in hidden.members}
    assert roles == {"producer", "norm", "consumer"}
    assert any(m.module == "lm_head" and m.role == "consumer" for m in hidden.members)
    keep = torch.ones(32, dtype=torch.bool)
    keep[torch.randperm(32, generator=torch.Generator().manual_seed(2))[:12]] = False
    masked = copy.deepcopy(model)
    mask_model(masked, graph, {hidden.id: keep})
    shrink_model(model, graph, {hidden.id: keep})
    assert model.get_input_embeddings().weight.shape == (99, 20)
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tie
    with torch.no_grad():
        want, got = masked(input_ids=ids).logits, model(input_ids=ids).logits
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (got - want).abs().max()


@pytest.mark.parametrize("tie", [True, False])
def test_pruned_hidden_size_reloads_with_plain_transformers_and_generates_alike(tie, tmp_path):
    model, ids = _decoder("llama", tie)
    config = fg.FermiConfig(granularity=("channel", "hidden"), target_sparsity={"channel": 0.5, "hidden": 0.25})
    report = fg.prune(model, [{"input_ids": ids}], config, progress=False)
    assert report.kept_by_kind()["hidden"] == (24, 32) and report.shrunk
    assert model.config.hidden_size == 24 and model.config.rms_norm_eps == pytest.approx(1e-6 * 32 / 24)
    fg.save_shrunk(model, tmp_path)
    plain = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, model(input_ids=ids).logits)
    for cache in ("dynamic", "static"):
        a = model.generate(ids[:1], max_new_tokens=5, do_sample=False, cache_implementation=cache)
        b = plain.generate(ids[:1], max_new_tokens=5, do_sample=False, cache_implementation=cache)
        assert torch.equal(a, b), cache


def test_hidden_gates_train_and_bake_to_what_was_trained():
    model, ids = _decoder("llama", True)
    x = {"input_ids": ids}
    fg.convert_to_fermi(model, fg.FermiConfig(granularity=("hidden", "channel"),
                                              target_sparsity={"hidden": 0.25, "channel": 0.5}), example_inputs=x)
    with torch.no_grad():
        assert fg.summary(model).n_units == 32 + 2 * 64
    opt = fg.FermiAnnealer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, total_steps=8)
    for _ in range(8):
        (model(**x).logits.float().pow(2).mean() + opt.sparsity_loss()).backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad(), fg.hard_gates(model):
        hard = model(**x).logits
    report = fg.convert_from_fermi(model)
    with torch.no_grad():
        assert torch.allclose(model(**x).logits, hard, rtol=1e-5, atol=1e-6)
    assert report.kept_by_kind()["hidden"] == (24, 32) and report.trained_vs_baked == 0.0


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_a_stream_under_layer_norms_is_left_whole_and_says_why(name):
    torch.manual_seed(0)
    if name == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    else:
        model = tf.BertModel(tf.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=64, max_position_embeddings=64))
    ids = torch.randint(0, 99, (1, 8))
    graph = build_dependency_graph(model.eval(), {"input_ids": ids}, hidden=True)
    (stream,) = [g for g in graph.groups if g.kind == "hidden"]
    assert not stream.prunable and "normalises across channels" in stream.reason
    with pytest.raises(ValueError, match="nothing to convert.*normalises across channels"):
        fg.convert_to_fermi(model, fg.FermiConfig(granularity="hidden"), example_inputs={"input_ids": ids})


def test_a_budget_allocates_across_hidden_size_heads_and_neurons():
    model, ids = _decoder("llama", True)
    data = [{"input_ids": torch.randint(0, 99, (8, 12), generator=torch.Generator().manual_seed(i))}
            for i in range(2)]
    report = fg.prune(model, data, fg.FermiConfig(granularity=("channel", "head", "hidden")), budget="params:0.6",
                      progress=False)
    assert set(report.kept_by_kind()) == {"channel", "head", "hidden"}
    assert abs(report.budget.measured - 0.6) <= 0.05, report.budget  # a tiny model: coarse units
    assert report.kept_by_kind()["hidden"][0] % 4 == 0  # the config needs a multiple of the head count
