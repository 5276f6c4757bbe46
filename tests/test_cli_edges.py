"""The command line at its edges (issue 26): bad input refused before the model is built, signals, killed runs,
finished runs' recipes, ``--out`` that is the working directory or a symlink, byte-identical checkpoints."""

from __future__ import annotations

import gzip
import hashlib
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fermigates.cli import main

HERE = Path(__file__).resolve().parent
MODEL = f"py:{HERE / '_cli_models.py'}:tiny"
OTHER = f"py:{HERE / '_cli_models.py'}:mlp"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
RECIPE = """\
description: tiny test run
convert:
  granularity: channel
  target_sparsity: 0.5
train:
  steps: {steps}
  batch_size: 4
calibration:
  samples: 8
  batch_size: 4
eval:
  samples: 8
"""


def _setup(tmp_path: Path, steps: int = 3, n: int = 40) -> tuple[Path, Path]:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(steps=steps))
    rng = np.random.default_rng(0)
    data = tmp_path / "data.npz"
    np.savez(data, x=rng.standard_normal((n, 3, 8, 8)).astype("float32"), y=rng.integers(0, 3, n))
    return recipe, data


def _hidden(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))


def fermigates(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "fermigates.cli", *map(str, args)], capture_output=True, text=True,
                          env={**ENV, **(env or {})}, timeout=timeout)


# ------------------------------------------------------------------ refused before anything is built (exit 2)
@pytest.mark.parametrize("override, key", [
    ("calibration.ridge=.nan", "calibration.ridge"), ("calibration.ridge=-1", "calibration.ridge"),
    ("anneal.sparsity_weight=.inf", "anneal.sparsity_weight"), ("train.lr=.nan", "train.lr"),
    ("convert.target_sparsity=.nan", "convert.target_sparsity"), ("model.kwargs={depth: 3}", "model.kwargs"),
])
def test_bad_values_exit_2_naming_the_key_before_the_model_is_built(tmp_path, monkeypatch, capsys, override, key):
    recipe, data = _setup(tmp_path)
    monkeypatch.setenv("FG_TEST_BUILT", str(tmp_path / "built"))
    code = main(["prune", str(recipe), "--model", MODEL, "--data", str(data), "--out", str(tmp_path / "out"),
                 "--set", override])
    err = capsys.readouterr().err
    assert code == 2, err
    assert key in err and "Traceback" not in err
    assert not (tmp_path / "built").exists() and not (tmp_path / "out").exists()


def _idx_gz(path: Path, images: bytes, n: int, labels: int | None = None) -> None:
    with gzip.open(path / "train-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(struct.pack(">4B3I", 0, 0, 8, 3, n, 8, 8) + images)
    if labels is not None:
        with gzip.open(path / "train-labels-idx1-ubyte.gz", "wb") as fh:
            fh.write(struct.pack(">4BI", 0, 0, 8, 1, labels) + bytes(labels))


@pytest.mark.parametrize("case, words", [
    ("npz_empty", "holds no samples"), ("npz_few_labels", "10 samples but only 7 labels"),
    ("idx_truncated", "truncated"), ("gz_corrupt", "corrupt"), ("idx_few_labels", "only 2 labels"),
])
def test_bad_data_exits_2_naming_the_file_before_the_model_is_built(tmp_path, monkeypatch, capsys, case, words):
    recipe, _ = _setup(tmp_path)
    folder = tmp_path / "d"
    folder.mkdir()
    if case == "npz_empty":
        data = folder / "e.npz"
        np.savez(data, x=np.zeros((0, 3, 8, 8), "float32"), y=np.zeros(0, "int64"))
    elif case == "npz_few_labels":
        data = folder / "f.npz"
        np.savez(data, x=np.zeros((10, 3, 8, 8), "float32"), y=np.zeros(7, "int64"))
    elif case == "idx_truncated":
        _idx_gz(folder, bytes(5 * 64 - 10), 5)
        data = folder
    elif case == "idx_few_labels":
        _idx_gz(folder, bytes(5 * 64), 5, labels=2)
        data = folder
    else:
        _idx_gz(folder, bytes(5 * 64), 5)
        raw = bytearray((folder / "train-images-idx3-ubyte.gz").read_bytes())
        raw[12:20] = b"\xff" * 8  # inside the deflate stream
        (folder / "train-images-idx3-ubyte.gz").write_bytes(bytes(raw[:-6]))
        data = folder
    monkeypatch.setenv("FG_TEST_BUILT", str(tmp_path / "built"))
    code = main(["prune", str(recipe), "--model", MODEL, "--data", f"fashion-mnist:{data}" if data == folder
                 else str(data), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert words in err and str(folder) in err and "Traceback" not in err
    assert not (tmp_path / "built").exists() and not (tmp_path / "out").exists()


def test_out_dot_is_refused_up_front(tmp_path, monkeypatch, capsys):
    recipe, data = _setup(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FG_TEST_BUILT", str(tmp_path / "built"))
    for out in (".", "..", str(tmp_path)):
        assert main(["prune", str(recipe), "--model", MODEL, "--data", str(data), "--out", out, "--force"]) == 2
        assert "working directory" in capsys.readouterr().err
    assert not (tmp_path / "built").exists() and (tmp_path / "r.yaml").exists()


def test_a_corrupt_report_json_exits_2(tmp_path, capsys):
    (tmp_path / "report.json").write_text('{"params": {"before": 1')
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "report.json is not valid JSON" in err and "Traceback" not in err
    (tmp_path / "report.json").write_text("[1, 2]")
    assert main(["report", str(tmp_path)]) == 2
    assert "not a fermigates report" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ a finished run's recipe
def test_a_run_recipe_refuses_structural_changes_from_the_dir_or_the_file(tmp_path, capsys):
    recipe, data = _setup(tmp_path, steps=0)
    run = tmp_path / "run"
    assert main(["prune", str(recipe), "--model", MODEL, "--data", str(data), "--out", str(run), "--quiet"]) == 0
    assert (run / "recipe.yaml").read_text().startswith("# the recipe that produced this checkpoint")
    for source in (run, run / "recipe.yaml"):
        for extra, words in ((["--set", "convert.target_sparsity=0.3"], "convert.target_sparsity is a structural"),
                             (["--model", OTHER], "--model: model.source is a structural")):
            out = tmp_path / "again"
            code = main(["prune", str(source), "--data", str(data), "--out", str(out), *extra])
            err = capsys.readouterr().err
            assert code == 2 and words in err, err
            assert not out.exists()
    # the same model and runtime keys are fine
    assert main(["prune", str(run / "recipe.yaml"), "--model", MODEL, "--data", str(data), "--out",
                 str(tmp_path / "rerun"), "--set", "calibration.ridge=1e-3", "--quiet"]) == 0


# ---------------------------------------------------------------------------------------- symlinks, identity
def test_a_symlinked_out_is_written_through_and_leaves_nothing_hidden(tmp_path, capsys):
    recipe, data = _setup(tmp_path, steps=0)
    target = tmp_path / "real"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    for _ in range(2):  # into an empty target, then replacing the first run
        assert main(["prune", str(recipe), "--model", MODEL, "--data", str(data), "--out", str(link),
                     "--force"]) == 0
        assert link.is_symlink() and (target / "model.safetensors").is_file()
        assert _hidden(tmp_path) == []
    assert f"wrote {link} ({target})" in capsys.readouterr().out


def test_two_identical_runs_in_two_processes_give_identical_bytes(tmp_path):
    recipe, data = _setup(tmp_path, steps=3)
    digests = []
    for name in ("a", "b"):
        run = fermigates("prune", recipe, "--model", MODEL, "--data", data, "--out", tmp_path / name, "--quiet",
                         env={"PYTHONHASHSEED": name == "a" and "1" or "2"})
        assert run.returncode == 0, run.stderr
        digests.append(hashlib.sha256((tmp_path / name / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]


# ---------------------------------------------------------------------------------------------------- signals
def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, "the run never reached the point to interrupt"
        time.sleep(0.05)


@pytest.mark.parametrize("phase", ["training", "writing"])
def test_sigterm_exits_130_and_leaves_nothing_beside_out(tmp_path, phase):
    recipe, data = _setup(tmp_path, steps=400 if phase == "training" else 3)
    marker = tmp_path / "marker"
    var = "FG_TEST_SLOW_TRAIN" if phase == "training" else "FG_TEST_SLOW_SAVE"
    proc = subprocess.Popen([sys.executable, "-m", "fermigates.cli", "prune", str(recipe), "--model", MODEL,
                             "--data", str(data), "--out", str(tmp_path / "out")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**ENV, var: str(marker)})
    _wait_for(marker, proc)
    if phase == "writing":
        assert [n for n in _hidden(tmp_path) if n.startswith(".out.run-")], _hidden(tmp_path)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "terminated (SIGTERM); nothing was written" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and _hidden(tmp_path) == []


def test_a_killed_run_leaves_a_sibling_that_the_next_run_removes(tmp_path):
    recipe, data = _setup(tmp_path, steps=0)
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-m", "fermigates.cli", "prune", str(recipe), "--model", MODEL,
                             "--data", str(data), "--out", str(tmp_path / "out"), "--quiet"],
                            env={**ENV, "FG_TEST_SLOW_SAVE": str(marker)})
    _wait_for(marker, proc)
    proc.kill()
    proc.wait(30)
    left = [n for n in _hidden(tmp_path) if n.startswith(".out.run-")]
    assert left and not (tmp_path / "out").exists()
    # a sibling of a process that still runs is left alone (another run in progress)
    alive = tmp_path / f".out.run-{left[0].split('-')[1]}-{os.getpid()}-abcd"
    alive.mkdir()
    run = fermigates("prune", recipe, "--model", MODEL, "--data", data, "--out", tmp_path / "out", "--quiet")
    assert run.returncode == 0, run.stderr
    assert _hidden(tmp_path) == [alive.name] and (tmp_path / "out" / "model.safetensors").is_file()
