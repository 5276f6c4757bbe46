"""Checkpoint edges (issue 26): non-finite tensors, byte-identical files, concurrent saves, manifest attributes
that are not widths, wrong-type first arguments, DEEPR(nc=0)."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fermigates as fg
from fermigates.io import manifest as mf
from fermigates.io.checkpoint import CheckpointError, load_shrunk, save_shrunk

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).eval()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_save_refuses_non_finite_tensors_and_writes_nothing(tmp_path: Path, value: float) -> None:
    model = mlp()
    with torch.no_grad():
        model[2].weight[1, 3] = value
    with pytest.raises(ValueError, match=r"'2\.weight': 1 of its 12 values are NaN or infinite.*allow_non_finite"):
        save_shrunk(model, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()
    # an existing checkpoint is left as it was
    save_shrunk(mlp(), tmp_path / "ok")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ok").iterdir()}
    with pytest.raises(ValueError, match="NaN or infinite"):
        save_shrunk(model, tmp_path / "ok", overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "ok").iterdir()} == before
    # the explicit opt-in writes it
    save_shrunk(model, tmp_path / "nan", allow_non_finite=True)
    loaded = load_shrunk(mlp(), tmp_path / "nan")
    assert not torch.isfinite(loaded[2].weight).all()


_SAVE = """
import sys, torch, torch.nn as nn
from fermigates.io.checkpoint import save_shrunk
torch.manual_seed(0)
m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
save_shrunk(m, sys.argv[1], example_inputs=torch.zeros(1, 4))
"""


def test_the_same_model_gives_the_same_bytes_in_two_processes(tmp_path: Path) -> None:
    digests = set()
    for i in range(4):  # the metadata order of safetensors changes with the process's hash seed
        subprocess.run([sys.executable, "-c", _SAVE, str(tmp_path / f"ck{i}")], check=True, env=ENV)
        digests.add(hashlib.sha256((tmp_path / f"ck{i}" / mf.WEIGHTS_NAME).read_bytes()).hexdigest())
    assert len(digests) == 1
    header, meta = mf.read_header(tmp_path / "ck0" / mf.WEIGHTS_NAME)
    assert list(meta) == sorted(meta) and mf.METADATA_KEY in meta
    load_shrunk(mlp(), tmp_path / "ck0")  # still a valid checkpoint


def _hold_lock(root: str, ready, release) -> None:
    with mf.directory_lock(Path(root)):
        ready.set()
        release.wait(30)


def test_a_second_concurrent_save_into_one_folder_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "ck"
    save_shrunk(mlp(), root)
    before = {p.name: p.read_bytes() for p in root.iterdir()}
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(root), ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(BlockingIOError, match="another process is writing a checkpoint into"):
            save_shrunk(mlp(), root, overwrite=True)
        assert {p.name: p.read_bytes() for p in root.iterdir()} == before
    finally:
        release.set()
        holder.join(30)
    save_shrunk(mlp(), root, overwrite=True)  # the lock went with the other process


def test_a_manifest_attribute_that_is_not_a_width_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    root = tmp_path / "ck"
    save_shrunk(mlp(), root)
    tensors = load_file(str(root / mf.WEIGHTS_NAME))
    _, meta = mf.read_header(root / mf.WEIGHTS_NAME)
    manifest = json.loads(meta[mf.METADATA_KEY])
    manifest["modules"]["0"]["attrs"]["forward"] = 5
    meta[mf.METADATA_KEY] = json.dumps(manifest)
    save_file(tensors, str(root / mf.WEIGHTS_NAME), metadata=meta)
    (root / mf.MANIFEST_NAME).write_text(meta[mf.METADATA_KEY])
    target = mlp()
    state = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"sets 'forward' on module '0'.*not one of its shape attributes"):
        load_shrunk(target, root)
    assert "forward" not in vars(target[0])
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in state.items())
    target(torch.zeros(1, 4))  # the model still runs


@pytest.mark.parametrize("first", ["abc", 3, None, [nn.Linear(2, 2)]])
def test_export_onnx_with_a_wrong_first_argument_is_a_type_error(first, tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got"):
        fg.export_onnx(first, torch.zeros(1, 2), tmp_path / "m.onnx")
    with pytest.raises(TypeError, match="path must be a file path"):
        fg.export_onnx(nn.Linear(2, 2), torch.zeros(1, 2), 5)
    assert not list(tmp_path.iterdir())


def test_deepr_refuses_nc_zero() -> None:
    params = [nn.Parameter(torch.rand(4, 4) + 0.1)]
    with pytest.raises(ValueError, match="nc=0 would switch every connection off"):
        fg.DEEPR(params, nc=0)
    with pytest.raises(ValueError, match="no connection is active"):
        fg.DEEPR([nn.Parameter(-torch.rand(4, 4))])
    assert fg.DEEPR(params, nc=1).nc == 1
