"""distill_loss(kind="lm"): per-token KL of next-token distributions, padding excluded, optional top-k."""

from __future__ import annotations

import math

import pytest
import torch

from fermigates.losses import DISTILL, distill_loss


def logits(seed: int, shape=(2, 5, 11)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2


def brute_force(s, t, mask, T, top_k=None):
    """Explicit loops: KL(p_t || q_s) per real position, mean over them, times T^2."""
    total, count = 0.0, 0
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            if mask is not None and not mask[b, i]:
                continue
            q = torch.softmax(s[b, i].double() / T, -1)
            if top_k is None:
                p = torch.softmax(t[b, i].double() / T, -1)
                kl = sum(float(p[v] * (math.log(p[v]) - math.log(q[v]))) for v in range(len(p)))
            else:
                idx = t[b, i].topk(top_k).indices
                p = torch.softmax(t[b, i, idx].double() / T, -1)
                kl = sum(float(p[j] * (math.log(p[j]) - math.log(q[v]))) for j, v in enumerate(idx.tolist()))
            total += kl
            count += 1
    return total / count * T * T


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_lm_kl_matches_brute_force_over_real_tokens(T):
    s, t = logits(0), logits(1)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    got = distill_loss(s, t, "lm", mask, temperature=T)
    assert float(got) == pytest.approx(brute_force(s, t, mask, T), rel=1e-5)
    assert float(distill_loss(s, t, "lm", None, temperature=T)) == pytest.approx(brute_force(s, t, None, T), rel=1e-5)


def test_padding_positions_do_not_count():
    s, t = logits(0), logits(1)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    s2 = s.clone()
    s2[1, 2:] = 100 * torch.randn(3, 11)  # garbage at padded positions
    assert torch.equal(distill_loss(s, t, "lm", mask), distill_loss(s2, t, "lm", mask))
    assert not torch.equal(distill_loss(s, t, "lm"), distill_loss(s2, t, "lm"))


def test_zero_for_the_teacher_itself_and_gradients_reach_the_student():
    t = logits(1)
    assert float(distill_loss(t.clone(), t, "lm")) == pytest.approx(0.0, abs=1e-6)
    s = logits(0).requires_grad_()
    loss = distill_loss(s, t, "lm", torch.ones(2, 5))
    loss.backward()
    assert float(loss.detach()) > 0 and s.grad is not None and s.grad.abs().sum() > 0


def test_top_k_renormalises_the_teacher_over_its_top_tokens():
    s, t = logits(0), logits(1)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    got = distill_loss(s, t, "lm", mask, temperature=2.0, top_k=3)
    assert float(got) == pytest.approx(brute_force(s, t, mask, 2.0, top_k=3), rel=1e-5)
    full = distill_loss(s, t, "lm", mask, top_k=11)  # the whole vocabulary: the plain KL
    assert torch.allclose(full, distill_loss(s, t, "lm", mask))
    # zero only when the student puts the teacher's renormalised top-k mass there and nothing elsewhere
    student = torch.full_like(t, -1e4)
    idx = t.topk(3, dim=-1).indices
    student.scatter_(-1, idx, t.gather(-1, idx))
    assert float(distill_loss(student, t, "lm", top_k=3, temperature=1.0)) == pytest.approx(0.0, abs=1e-5)


def test_model_outputs_with_logits_are_accepted():
    class Out:
        def __init__(self, x):
            self.logits = x

    s, t = logits(0), logits(1)
    assert torch.equal(distill_loss(Out(s), Out(t), "lm"), distill_loss(s, t, "lm"))


@pytest.mark.parametrize("kwargs, match", [
    ({"kind": "kl"}, "kind"),
    ({"kind": "logits", "top_k": 3}, "top_k"),
    ({"kind": "lm", "top_k": 0}, "top_k"),
    ({"kind": "lm", "mask": torch.ones(2, 4)}, "attention mask"),
])
def test_bad_arguments(kwargs, match):
    kind = kwargs.pop("kind")
    with pytest.raises(ValueError, match=match):
        distill_loss(logits(0), logits(1), kind, **kwargs)
    with pytest.raises(ValueError, match="vocab"):
        distill_loss(logits(0), logits(1, (2, 5, 7)), "lm")


def test_existing_kinds_are_unchanged():
    assert DISTILL[:2] == ("logits", "hidden") and "lm" in DISTILL
    s, t = logits(0, (4, 11)), logits(1, (4, 11))
    want = torch.nn.functional.kl_div(torch.log_softmax(s / 2, -1), torch.log_softmax(t / 2, -1), log_target=True,
                                      reduction="batchmean") * 4
    assert torch.allclose(distill_loss(s, t, "logits"), want)


def test_fine_tune_distils_a_causal_lm_with_it():
    tf = pytest.importorskip("transformers")
    import fermigates as fg

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=31, hidden_size=16, intermediate_size=24,
                                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    teacher = tf.LlamaForCausalLM(model.config).eval()
    ids = torch.randint(0, 31, (2, 6))
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    before = float(distill_loss(model(**batches[0]), teacher(**batches[0]), "lm"))
    log = fg.fine_tune(model, batches * 20, steps=20, lr=1e-2, distill="lm", teacher=teacher)
    after = float(distill_loss(model(**batches[0]), teacher(**batches[0]), "lm"))
    assert log.distill == "lm" and log.rows and after < before
