"""The command line a practitioner uses (issue 27): the demo, real weights from local files and caches (timm and
torchvision layouts), the head fitted to the data, the input size, one normalisation, evaluation in every run,
reports that print without writing, plots, help text."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fermigates.cli import main

timm = pytest.importorskip("timm")

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
TINY = """\
description: tiny test run
convert:
  granularity: channel
  budget: macs:0.6
train:
  steps: {steps}
  batch_size: 4
calibration:
  samples: 8
  batch_size: 4
eval:
  samples: 8
"""


def fermigates(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "fermigates.cli", *map(str, args)], capture_output=True, text=True,
                          env={**ENV, **(env or {})}, timeout=timeout)


def _image_folder(root: Path, classes=("cat", "dog", "emu"), per_class: int = 8) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for j in range(per_class):
            pixels = rng.integers(0, 256, (20, 26, 3), dtype=np.uint8) // (i + 1)
            Image.fromarray(pixels).save(root / c / f"{j}.png")
    return root


# ------------------------------------------------------------------------------------------------------ demo
def test_the_demo_runs_end_to_end_in_its_quick_form(tmp_path):
    out = tmp_path / "demo"
    run = fermigates("demo", "--quick", "--out", out)
    assert run.returncode == 0, run.stderr[-3000:]
    for words in ("accuracy     dense", "after the cut", "after fine-tuning", "latency", "synthetic shapes",
                  "(the same as after fine-tuning)"):
        assert words in run.stdout, run.stdout
    for phase in ("build", "read", "train the dense model", "evaluate", "save model.safetensors"):
        assert phase in run.stderr, phase  # progress throughout
    details = json.loads((out / "report.json").read_text())
    phases = details["evaluation"]["phases"]
    assert set(phases) == {"dense", "cut", "final"} and all(0 <= p["accuracy"] <= 1 for p in phases.values())
    assert details["demo"]["reloaded_accuracy"] == pytest.approx(phases["final"]["accuracy"])
    assert details["latency_ms"]["before"] > 0 and details["latency_ms"]["after"] > 0
    assert abs(details["macs"]["after"] / details["macs"]["before"] - 0.5) < 0.02
    for png in ("kept_per_layer.png", "size.png", "training.png"):
        assert (out / "plots" / png).is_file()
    again = fermigates("demo", "--quick", "--out", out, "--quiet")  # an earlier demo is replaced
    assert again.returncode == 0 and again.stdout == "", again.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------- weights
def _resnet_file(tmp_path: Path, seed: int = 1) -> tuple[Path, dict]:
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    state = timm.create_model("test_resnet", pretrained=False).state_dict()
    path = tmp_path / "weights.safetensors"
    save_file(state, str(path))
    return path, state


def test_pretrained_from_a_file_a_folder_and_the_cache(tmp_path, monkeypatch):
    from fermigates.model_specs import PipelineInputError, build_model

    path, state = _resnet_file(tmp_path)
    for source in (path, tmp_path):  # a file, or a folder holding model.safetensors
        (tmp_path / "model.safetensors").write_bytes(path.read_bytes())
        built = build_model("timm:test_resnet", pretrained=str(source))
        assert built.weights.startswith("pretrained") and not built.notices
        assert all(torch.equal(v, state[k]) for k, v in built.model.state_dict().items())
    # the Hugging Face cache, as timm would have filled it (nothing is downloaded)
    import huggingface_hub.constants as hub

    cache = tmp_path / "hub"
    repo = cache / "models--timm--test_resnet.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "model.safetensors").write_bytes(path.read_bytes())
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    for built in (build_model("timm:test_resnet", pretrained=True),
                  build_model("timm:test_resnet", {"pretrained": True}),  # model.kwargs={pretrained: true}
                  build_model("timm:test_resnet", {"pretrained": True, "num_classes": 5})):
        ok = {k for k, v in built.model.state_dict().items() if k in state and torch.equal(v, state[k])}
        assert ok == {k for k in state if not k.startswith("fc.")} | ({"fc.weight", "fc.bias"} if
                                                                       built.model.num_classes == 1000 else set())
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(PipelineInputError, match="no local copy of timm:test_resnet's pretrained weights"):
        build_model("timm:test_resnet", pretrained=True)
    random = build_model("timm:test_resnet")
    assert random.weights == "random" and "random weights" in random.notices[0]


def test_weights_in_torchvision_layout_load_by_position_or_say_which_keys_differ(tmp_path):
    from safetensors.torch import save_file

    from fermigates.model_specs import PipelineInputError, build_model

    path, state = _resnet_file(tmp_path)
    renamed = {f"features.{i}.{k.rsplit('.', 1)[-1]}": v for i, (k, v) in enumerate(state.items())}
    torch.save(renamed, tmp_path / "tv.pth")  # as torchvision ships its weights: a pickle keeps the order
    save_file(renamed, str(tmp_path / "tv.safetensors"))  # sorted keys: no order to match by
    with pytest.raises(PipelineInputError, match="a .safetensors file keeps no order"):
        build_model("timm:test_resnet", weights=str(tmp_path / "tv.safetensors"))
    built = build_model("timm:test_resnet", weights=str(tmp_path / "tv.pth"))
    assert all(torch.equal(v, state[k]) for k, v in built.model.state_dict().items())
    assert "matched by position" in built.notices[0] and not any("random weights" in n for n in built.notices)
    # a 5-class model: everything but the classifier loads, and the note says so
    built = build_model("timm:test_resnet", {"num_classes": 5}, weights=str(tmp_path / "tv.pth"))
    assert torch.equal(built.model.conv1[0].weight, state["conv1.0.weight"]) and "fc kept at random" in built.notices[0]
    # another architecture: two lines naming the keys
    torch.save(timm.create_model("resnet10t").state_dict(), tmp_path / "other.pt")
    with pytest.raises(PipelineInputError) as info:
        build_model("timm:test_resnet", weights=str(tmp_path / "other.pt"))
    message = str(info.value)
    assert len(message.splitlines()) == 2 and "by position" in message and "not in the model" in message


# -------------------------------------------------------------- head, input size, normalisation, evaluation
def test_a_timm_run_fits_head_and_size_to_the_data_and_evaluates(tmp_path):
    path, _ = _resnet_file(tmp_path)
    data = _image_folder(tmp_path / "images")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY.format(steps=4))
    out = tmp_path / "out"
    run = fermigates("prune", recipe, "--model", "timm:test_resnet", "--pretrained", path, "--data", data,
                     "--out", out, "--set", "model.input_size=24")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "random weights" not in run.stderr
    assert "the classifier 'fc' had 1000 outputs and the data has 3 classes" in run.stderr
    assert "per forward of float32[1, 3, 24, 24]" in run.stdout
    assert "accuracy     dense" in run.stdout and "held-out samples of --data" in run.stdout
    details = json.loads((out / "report.json").read_text())
    assert set(details["evaluation"]["phases"]) == {"dense", "cut", "final"}
    assert 1 <= details["evaluation"]["phases"]["cut"]["step"] < 4  # where the decisions froze, mid-run
    assert details["run"]["weights"].startswith("pretrained") and "mean (0.5, 0.5, 0.5)" in details["run"]["inputs"]
    assert details["notes"] and details["budget"]["kind"] == "macs"
    assert "num_classes: 3" in (out / "recipe.yaml").read_text()
    import fermigates as fg

    model = fg.load_shrunk(timm.create_model("test_resnet", num_classes=3), out).eval()
    assert model(torch.zeros(1, 3, 24, 24)).shape == (1, 3)
    # printed again, written only when asked; JSON into a closed pipe ends cleanly
    before = sorted(p.name for p in (out / "plots").iterdir())
    (out / "report.md").unlink()
    rep = fermigates("report", out)
    assert rep.returncode == 0 and "accuracy" in rep.stdout and not (out / "report.md").exists()
    rep = fermigates("report", out, "--write")
    assert rep.returncode == 0 and (out / "report.md").is_file()
    assert sorted(p.name for p in (out / "plots").iterdir()) == before
    pipe = subprocess.run(f"{sys.executable} -m fermigates.cli report {out} --json | head -1", shell=True,
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert pipe.returncode == 0 and pipe.stdout == "{\n" and pipe.stderr == "", pipe.stderr
    ins = fermigates("inspect", out)
    assert ins.returncode == 0 and "per forward of float32[1, 3, 24, 24]" in ins.stdout


def test_a_random_weight_build_prints_its_notice(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, x=(rng.random((24, 1, 28, 28)) * 255).astype("uint8"), y=rng.integers(0, 4, 24))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY.format(steps=0))
    run = fermigates("prune", recipe, "--model", "timm:test_resnet", "--data", data, "--out", tmp_path / "out",
                     "--set", "model.kwargs={in_chans: 1, num_classes: 4}")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "note: timm:test_resnet has random weights" in run.stderr
    details = json.loads((tmp_path / "out" / "report.json").read_text())
    assert "random weights" in details["notes"][0] and set(details["evaluation"]["phases"]) == {"dense", "cut"}


def test_unlabelled_text_is_evaluated_by_fidelity_to_the_dense_model(tmp_path):
    import transformers as tf

    words = ["the", "a", "cat", "dog", "sat", "on", "mat", "ran", "far", "away"]
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    tf.BertTokenizerFast(str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    tf.BertModel(tf.BertConfig(vocab_size=15, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=64)).save_pretrained(folder)
    rng = np.random.default_rng(0)
    text = tmp_path / "s.txt"
    text.write_text("\n".join(" ".join(rng.choice(words, rng.integers(3, 9))) for _ in range(40)) + "\n")
    out = tmp_path / "out"
    code = main(["prune", "bert_encoder", "--model", f"hf:{folder}", "--data", str(text), "--out", str(out),
                 "--set", "calibration.samples=16", "--set", "eval.samples=8", "--quiet"])
    assert code == 0
    ev = json.loads((out / "report.json").read_text())["evaluation"]
    assert ev["task"] == "fidelity" and ev["phases"]["dense"]["cosine"] == pytest.approx(1.0)
    assert 0 < ev["phases"]["cut"]["cosine"] <= 1 and ev["phases"]["cut"]["rel_error"] > 0


def test_a_causal_lm_is_evaluated_by_perplexity():
    import transformers as tf

    from fermigates.evaluation import EvalSet, Evaluator, task_of

    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=16)).eval()
    ids = torch.randint(0, 32, (4, 10))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    eval_set = EvalSet([batch], None, "4 sequences")
    assert task_of(model, eval_set) == "perplexity"
    result = Evaluator(eval_set, "perplexity", progress=False)(model, "dense")
    with torch.no_grad():
        loss = float(model(**batch, labels=ids).loss)
    assert result["loss"] == pytest.approx(loss, rel=1e-5) and result["perplexity"] == pytest.approx(np.exp(loss))


def test_help_has_no_markup_and_the_data_readers_normalise_alike(tmp_path):
    for args in (["--help"], ["prune", "--help"], ["demo", "--help"]):
        run = fermigates(*args)
        assert run.returncode == 0 and "``" not in run.stdout, run.stdout
    from fermigates.data_specs import load_samples

    folder = tmp_path / "img" / "one"
    folder.mkdir(parents=True)
    from PIL import Image

    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8)
    Image.fromarray(pixels).save(folder / "a.png")
    np.savez(tmp_path / "a.npz", x=pixels[None, None])
    stats = {"mean": (0.2,), "std": (0.3,)}
    a = load_samples(str(tmp_path / "img"), limit=1, input_size=(1, 8, 8), **stats).inputs
    b = load_samples(str(tmp_path / "a.npz"), limit=1, **stats).inputs
    assert torch.allclose(a, b) and torch.allclose(a[0, 0, 0, 1], torch.tensor((1 / 255 - 0.2) / 0.3))
