"""fermigates.perplexity: sliding windows, padded batches, labels, plain-tensor models, errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fermigates as fg

tf = pytest.importorskip("transformers")

V = 53


def llama() -> nn.Module:
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return tf.LlamaForCausalLM(cfg).eval()


def gpt2() -> nn.Module:
    torch.manual_seed(0)
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()


def corpus(n: int = 20) -> torch.Tensor:
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(2))


@torch.no_grad()
def nll_of(model: nn.Module, context: torch.Tensor, target: int) -> float:
    """-log p(target | context), one forward of the context alone."""
    logits = model(context[None]).logits[0, -1].double()
    return float(-torch.log_softmax(logits, -1)[target])


@pytest.mark.parametrize("build", [llama, gpt2])
def test_sliding_windows_score_each_token_once_with_its_context(build):
    model, ids = build(), corpus(20)
    # context 8, stride 4: windows [0, 8) [4, 12) [8, 16) [12, 20); the first scores tokens 1..7, each later one
    # the tokens past the previous window's end, with the window's start as the start of the context
    starts = {t: 0 for t in range(1, 8)} | {t: 4 for t in range(8, 12)} | {t: 8 for t in range(12, 16)} | {
        t: 12 for t in range(16, 20)}
    want = sum(nll_of(model, ids[starts[t]:t], int(ids[t])) for t in range(1, 20)) / 19
    got = fg.perplexity(model, ids, context_length=8, stride=4, batch_size=3, progress=False)
    assert got.tokens == 19
    assert got.nll == pytest.approx(want, rel=1e-5)
    assert got.perplexity == pytest.approx(math.exp(want), rel=1e-5)


def test_disjoint_windows_and_a_short_last_window():
    model, ids = llama(), corpus(19)
    # context 8 (stride defaults to it): [0, 8) [8, 16) [16, 19); the first token of each window has no context
    scored = [(0, t) for t in range(1, 8)] + [(8, t) for t in range(9, 16)] + [(16, t) for t in (17, 18)]
    want = sum(nll_of(model, ids[b:t], int(ids[t])) for b, t in scored) / len(scored)
    for batch_size in (1, 8):
        got = fg.perplexity(model, ids, context_length=8, batch_size=batch_size, progress=False)
        assert got.tokens == len(scored) and got.nll == pytest.approx(want, rel=1e-5)


def test_context_length_defaults_to_the_config():
    model, ids = llama(), corpus(30)
    assert fg.perplexity(model, ids, progress=False) == fg.perplexity(model, ids, context_length=64, progress=False)


def test_padding_is_excluded_from_batches():
    model = llama()
    a, b = torch.randint(0, V, (10,)), torch.randint(0, V, (6,))
    ids = torch.zeros(2, 10, dtype=torch.long)
    mask = torch.zeros(2, 10, dtype=torch.long)
    ids[0], mask[0] = a, 1
    ids[1, :6], mask[1, :6] = b, 1
    ids[1, 6:] = 7  # right padding with a real-looking token: it must not be scored
    padded = fg.perplexity(model, [{"input_ids": ids, "attention_mask": mask}], progress=False)
    separate = [fg.perplexity(model, [{"input_ids": s[None], "attention_mask": torch.ones(1, len(s))}],
                              progress=False) for s in (a, b)]
    assert padded.tokens == 9 + 5
    total = sum(r.nll * r.tokens for r in separate)
    assert padded.nll == pytest.approx(total / 14, rel=1e-5)
    # and the corpus form over the same sequence agrees with the batch form
    assert fg.perplexity(model, a, context_length=10, progress=False).nll == pytest.approx(separate[0].nll, rel=1e-6)


def test_labels_choose_what_is_scored():
    model = llama()
    ids = torch.randint(0, V, (1, 9))
    labels = ids.clone()
    labels[0, :5] = -100  # score only tokens 5..8
    got = fg.perplexity(model, [{"input_ids": ids, "labels": labels}], progress=False)
    want = sum(nll_of(model, ids[0, :t], int(ids[0, t])) for t in range(5, 9)) / 4
    assert got.tokens == 4 and got.nll == pytest.approx(want, rel=1e-5)


class Uniform(nn.Module):
    """Returns all-zero (B, T, V) logits as a plain tensor: every token has probability 1 / V."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(()))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.ones(*ids.shape, V)


def test_plain_tensor_output_and_mode_restored():
    model = Uniform().train()
    got = fg.perplexity(model, corpus(25), context_length=10, stride=5, progress=False)
    assert got.perplexity == pytest.approx(V, rel=1e-6) and got.tokens == 24
    assert model.training
    batches = [torch.randint(0, V, (2, 7))]  # (B, T) tensors: every position real
    assert fg.perplexity(model, batches, progress=False).tokens == 12


@pytest.mark.parametrize("data, kwargs, error, match", [
    (torch.zeros(2, 5, dtype=torch.long), {}, ValueError, "1-D corpus"),
    ("some text", {}, TypeError, "tokenize"),
    (corpus(), {"context_length": 1}, ValueError, "context_length"),
    (corpus(), {"context_length": 8, "stride": 9}, ValueError, "stride"),
    (corpus(), {"context_length": 8, "stride": 0}, ValueError, "stride"),
    (corpus().float(), {"context_length": 8}, ValueError, "integer token ids"),
    (corpus(1), {"context_length": 8}, ValueError, "at least 2 tokens"),
    ([{"input_ids": torch.zeros(1, 4, dtype=torch.long)}], {"context_length": 8}, ValueError, "corpus"),
    ([{"ids": torch.zeros(1, 4, dtype=torch.long)}], {}, TypeError, "input_ids"),
    ([{"input_ids": torch.zeros(1, 4, dtype=torch.long), "attention_mask": torch.ones(1, 3)}], {}, ValueError,
     "attention_mask"),
    ([[1, 2, 3]], {}, TypeError, "batch 0"),
    ([{"input_ids": torch.zeros(1, 4, dtype=torch.long), "attention_mask": torch.zeros(1, 4)}], {}, ValueError,
     "no token to score"),
    (corpus(), {"batch_size": 0}, ValueError, "batch_size"),
])
def test_bad_input_is_refused(data, kwargs, error, match):
    with pytest.raises(error, match=match):
        fg.perplexity(llama(), data, progress=False, **kwargs)


def test_a_model_without_logits_or_context_is_refused():
    encoder = tf.BertModel(tf.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                         intermediate_size=48, max_position_embeddings=64)).eval()
    with pytest.raises(TypeError, match="logits"):
        fg.perplexity(encoder, corpus(), context_length=8, progress=False)
    with pytest.raises(ValueError, match="context_length="):
        fg.perplexity(Uniform(), corpus(), progress=False)
    with pytest.raises(ValueError, match="causal language model"):
        fg.perplexity(nn.Sequential(nn.Embedding(V, 4), nn.Flatten()), corpus(), context_length=8, progress=False)
