"""Tiny random-weight models of the families fermigates supports (no download, seconds to build)."""

from __future__ import annotations

import torch

TIMM = {
    "resnet18": {},
    "mobilenetv3_small_100": {},
    "convnext_atto": {},
    "vit_tiny_patch16_224": {"img_size": 32},
}


def timm_model(name: str):
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **TIMM.get(name, {})).eval()
    size = TIMM.get(name, {}).get("img_size", 64)
    return model, torch.randn(2, 3, size, size)


def hf_model(name: str):
    import transformers as tf

    torch.manual_seed(0)
    if name == "bert":
        cfg = tf.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=64)
        model = tf.BertModel(cfg)
    elif name == "gpt2":
        cfg = tf.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                             bos_token_id=0, eos_token_id=0)
        model = tf.GPT2LMHeadModel(cfg)
    elif name == "llama":
        cfg = tf.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model = tf.LlamaForCausalLM(cfg)
    else:
        raise KeyError(name)
    model.eval()
    ids = torch.randint(0, 99, (2, 12))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


FAMILIES = [("timm", n) for n in TIMM] + [("hf", n) for n in ("bert", "gpt2", "llama")]


def build(family: str, name: str):
    return timm_model(name) if family == "timm" else hf_model(name)


def run(model, inputs):
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


class TokenLabels(torch.utils.data.Dataset):
    """``n`` fixed random 8-token sequences (vocabulary 99) with 3 classes, for the Trainer tests."""

    def __init__(self, n: int = 32) -> None:
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        ids = torch.randint(0, 99, (8,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "attention_mask": torch.ones(8, dtype=torch.long), "labels": int(ids[0] % 3)}


def tiny_bert_classifier(layers: int = 1):
    """``(transformers, a random 32-wide BertForSequenceClassification)``."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=64, num_labels=3)
    return tf, tf.BertForSequenceClassification(cfg)
