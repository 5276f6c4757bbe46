"""Bad inputs and faults, in one place: each case is refused with a clear error (or warns), and a refused
operation leaves the user's model and files as they were (issue 10).

Tiny random-weight models only; Hugging Face models are built from configs.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import fermigates as fg
from fermigates.io import manifest as mf
from fermigates.io.checkpoint import CheckpointError, inspect_checkpoint, load_shrunk, save_shrunk

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def bert_config(**kw):
    return transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=48, max_position_embeddings=32, **kw)


def gpt2_config():
    return transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                   bos_token_id=0, eos_token_id=0)


def llama_config():
    return transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, intermediate_size=48, max_position_embeddings=32,
                                    bos_token_id=0, eos_token_id=0, pad_token_id=0)


def tokens() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def first(out):
    return out if isinstance(out, torch.Tensor) else out[0]


def snapshot(model: nn.Module):
    return {k: (v, v.detach().clone()) for k, v in model.state_dict(keep_vars=True).items()}


def assert_untouched(model: nn.Module, before) -> None:
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before)
    for k, (obj, value) in before.items():
        assert after[k] is obj and (value.is_meta or torch.equal(after[k].detach(), value)), k


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).eval()


# ------------------------------------------------------------------------------ 2. tied weights
@pytest.mark.parametrize("kwargs", [{"keep_classifier": False},
                                    {"keep_classifier": False, "target_modules": ["lm_head"]}])
def test_tied_lm_head_is_refused_at_conversion(kwargs) -> None:
    model = transformers.GPT2LMHeadModel(gpt2_config()).eval()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"'lm_head'.*tied to 'transformer\.wte\.weight'.*exclude_modules"):
        fg.convert_to_fermi(model, fg.FermiConfig(**kwargs))
    assert_untouched(model, before)
    assert not any(type(m).__name__.startswith("Fermi") for m in model.modules())
    # the fix the message names works, and baking then leaves the embedding alone
    fg.convert_to_fermi(model, fg.FermiConfig(keep_classifier=False, exclude_modules=["lm_head"]))
    fg.convert_from_fermi(model)
    assert torch.equal(model.transformer.wte.weight, before["transformer.wte.weight"][1])


# ---------------------------------------------------------------------------- 4. checkpoint integrity
@pytest.fixture()
def saved(tmp_path: Path):
    model = mlp()
    save_shrunk(model, tmp_path / "ck")
    return tmp_path / "ck", model


def _data_offset(path: Path, name: str) -> int:
    header, _ = mf.read_header(path)
    (n,) = __import__("struct").unpack("<Q", path.read_bytes()[:8])
    return 8 + n + header[name]["data_offsets"][0]


def test_flipped_bit_is_caught_by_the_checksum(saved) -> None:
    root, model = saved
    path = root / mf.WEIGHTS_NAME
    data = bytearray(path.read_bytes())
    data[_data_offset(path, "0.weight") + 3] ^= 0x40  # the exponent's top bit: a weight of ~1e38
    path.write_bytes(bytes(data))
    target = mlp()
    before = snapshot(target)
    with pytest.raises(CheckpointError, match=r"tensor '0\.weight' does not match the SHA-256"):
        load_shrunk(target, root)
    assert_untouched(target, before)


def _rewrite(root: Path, edit_manifest=None, edit_tensors=None) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(root / mf.WEIGHTS_NAME))
    _, meta = mf.read_header(root / mf.WEIGHTS_NAME)
    manifest = json.loads(meta[mf.METADATA_KEY])
    if edit_manifest:
        edit_manifest(manifest)
    if edit_tensors:
        edit_tensors(tensors)
    meta[mf.METADATA_KEY] = json.dumps(manifest)
    save_file(tensors, str(root / mf.WEIGHTS_NAME), metadata=meta)
    (root / mf.MANIFEST_NAME).write_text(meta[mf.METADATA_KEY])


def test_widths_contradicting_the_weights_are_refused(saved) -> None:
    root, _ = saved
    _rewrite(root, lambda m: m["modules"]["0"]["attrs"].update(out_features=5))
    target = mlp()
    before = snapshot(target)
    with pytest.raises(CheckpointError, match=r"module '0' the widths .*'0\.weight' should have shape \[5, 4\]"):
        load_shrunk(target, root)
    assert_untouched(target, before)


def test_header_contradicting_the_manifest_is_refused(saved) -> None:
    root, _ = saved
    _rewrite(root, edit_tensors=lambda t: t.update({"2.bias": t["2.bias"].double()}))
    with pytest.raises(CheckpointError, match=r"'2\.bias' is F64 \[2\] in the file, F32 \[2\] in the manifest"):
        load_shrunk(mlp(), root)


def test_tensor_contradicting_the_model_is_refused(tmp_path: Path) -> None:
    class Scaled(nn.Module):
        def __init__(self, dtype=torch.float32, shape=(3,)):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.register_buffer("steps", torch.zeros(shape, dtype=dtype))

    save_shrunk(Scaled(torch.int64), tmp_path / "a")
    save_shrunk(Scaled(shape=(3, 1)), tmp_path / "b")
    for folder in ("a", "b"):
        target = Scaled()
        before = snapshot(target)
        with pytest.raises(CheckpointError, match=r"tensor 'steps' is .* in the checkpoint but float32 of shape \[3\]"):
            load_shrunk(target, tmp_path / folder)
        assert_untouched(target, before)


def test_version_1_checkpoint_still_loads(saved, caplog) -> None:
    root, model = saved

    def to_v1(manifest):
        manifest["format_version"] = 1
        del manifest["tensors"]

    _rewrite(root, to_v1)
    x = torch.randn(3, 4)
    with caplog.at_level(logging.INFO, logger="fermigates.io.checkpoint"):
        loaded = load_shrunk(mlp(), root)
    assert torch.equal(loaded(x), model(x)) and "without checksums" in caplog.text


def test_version_2_manifest_without_checksums_is_refused(saved) -> None:
    root, _ = saved
    _rewrite(root, lambda m: m.pop("tensors"))
    with pytest.raises(CheckpointError, match="needs a 'tensors' table"):
        load_shrunk(mlp(), root)


# -------------------------------------------------------------------------------- 5. file permissions
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_files_follow_the_umask(umask: int, tmp_path: Path) -> None:
    old = os.umask(umask)
    try:
        save_shrunk(transformers.GPT2LMHeadModel(gpt2_config()), tmp_path)
    finally:
        os.umask(old)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["config.json", "fermigates.json", "generation_config.json", "model.safetensors"]
    for name in names:
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name


def test_temp_files_of_a_killed_save_are_cleaned_up(tmp_path: Path) -> None:
    tmp_path.joinpath(".model.safetensors.k1ll3d.tmp").write_bytes(b"partial")
    tmp_path.joinpath(".fermigates.json.k1ll3d.tmp").write_text("{")
    tmp_path.joinpath("notes.tmp").write_text("the user's")
    save_shrunk(mlp(), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fermigates.json", "model.safetensors", "notes.tmp"]


# ------------------------------------------------------------------- 6. save refuses what cannot load
def test_save_refuses_a_model_with_gates(tmp_path: Path) -> None:
    model = mlp()
    fg.convert_to_fermi(model, fg.FermiConfig(keep_classifier=False))
    with pytest.raises(ValueError, match=r"still has Fermi gates .*convert_from_fermi"):
        save_shrunk(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    fg.convert_from_fermi(model)
    save_shrunk(model, tmp_path / "out")  # baked: fine
    load_shrunk(mlp(), tmp_path / "out")


def test_save_over_another_checkpoint_needs_overwrite_and_leaves_nothing_stale(tmp_path: Path) -> None:
    save_shrunk(transformers.GPT2LMHeadModel(gpt2_config()), tmp_path)
    (tmp_path / "README.md").write_text("mine")
    (tmp_path / "pytorch_model.bin").write_bytes(b"old weights")
    bert = transformers.BertModel(bert_config()).eval()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(FileExistsError, match=r"already holds a checkpoint \(model\.safetensors.*overwrite=True"):
        save_shrunk(bert, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    save_shrunk(bert, tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md", "config.json", "fermigates.json", "model.safetensors"]  # no GPT-2 generation config
    stock = transformers.AutoModel.from_pretrained(str(tmp_path), local_files_only=True).eval()
    assert type(stock) is transformers.BertModel
    assert torch.equal(first(stock(**tokens())), first(bert(**tokens())))
    save_shrunk(mlp(), tmp_path, overwrite=True)  # a plain model: the BERT config.json goes too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "fermigates.json", "model.safetensors"]


# ---------------------------------------------------------------------------- 7. heads and classes
def test_class_count_must_match(tmp_path: Path) -> None:
    save_shrunk(timm.create_model("resnet18", pretrained=False, num_classes=10), tmp_path)
    target = timm.create_model("resnet18", pretrained=False, num_classes=1000)
    before = snapshot(target)
    with pytest.raises(CheckpointError, match=r"10-class head .* num_classes=1000; build it with num_classes=10"):
        load_shrunk(target, tmp_path)
    assert_untouched(target, before)
    assert target.num_classes == 1000
    load_shrunk(lambda: timm.create_model("resnet18", pretrained=False, num_classes=10), tmp_path)


def test_label_count_must_match(tmp_path: Path) -> None:
    save_shrunk(transformers.BertForSequenceClassification(bert_config(num_labels=3)), tmp_path)
    target = transformers.BertForSequenceClassification(bert_config(num_labels=5))
    with pytest.raises(CheckpointError, match=r"3-label classifier .* num_labels=5"):
        load_shrunk(target, tmp_path)
    assert fg.from_pretrained(tmp_path).config.num_labels == 3


def _prune(model: nn.Module, granularity) -> nn.Module:
    fg.prune(model, [tokens()], fg.FermiConfig(granularity=granularity), target_sparsity=0.5, progress=False)
    return model.eval()


PLAIN = {  # family -> (build, auto class, granularity that plain transformers can describe)
    "bert": (lambda: transformers.BertModel(bert_config()), "AutoModel", "channel"),
    "llama": (lambda: transformers.LlamaModel(llama_config()), "AutoModel", ("channel", "head")),
    "gpt2": (lambda: transformers.GPT2LMHeadModel(gpt2_config()), "AutoModelForCausalLM", "channel"),
    "bert-cls": (lambda: transformers.BertForSequenceClassification(bert_config()),
                 "AutoModelForSequenceClassification", "channel"),
}


@pytest.mark.parametrize("name", list(PLAIN))
def test_uniformly_pruned_model_loads_with_plain_transformers(name: str, tmp_path: Path) -> None:
    build, auto, granularity = PLAIN[name]
    torch.manual_seed(0)
    model = _prune(build(), granularity)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "use fermigates.from_pretrained" warning
        save_shrunk(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["fermigates"]["loads_with"] == "transformers" and config["fermigates"]["modules"] == {}
    if name == "llama":
        assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (2, 1, 8)
    width = config.get("n_inner") or config["intermediate_size"]
    assert width == 24 if name != "gpt2" else width == 64
    stock = getattr(transformers, auto).from_pretrained(str(tmp_path), local_files_only=True).eval()
    assert sum(p.numel() for p in stock.parameters()) == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(first(stock(**tokens())), first(model(**tokens())))


def test_classifier_pooler_is_not_pruned() -> None:
    model = _prune(transformers.BertForSequenceClassification(bert_config()), "channel")
    assert model.bert.pooler.dense.out_features == 32 and model.classifier.in_features == 32


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_head_pruned_model_plain_transformers_cannot_rebuild_says_so(name: str, tmp_path: Path) -> None:
    build = PLAIN[name][0]
    torch.manual_seed(0)
    model = _prune(build(), ("channel", "head"))
    with pytest.warns(UserWarning, match=r"plain transformers cannot rebuild .*fermigates\.from_pretrained"):
        save_shrunk(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["fermigates"]["loads_with"] == (
        "fermigates.from_pretrained")
    with torch.no_grad():
        assert torch.equal(first(fg.from_pretrained(tmp_path)(**tokens())), first(model(**tokens())))


# ------------------------------------------------------------------------------ 8. small validation gaps
@pytest.mark.parametrize("kwargs", [{"temperature": "1.0"}, {"granularity": ()}, {"min_units": "3"},
                                    {"min_units": None}, {"keep_classifier": "no"}])
def test_fermiconfig_refuses_bad_values(kwargs) -> None:
    field = next(iter(kwargs))
    with pytest.raises((TypeError, ValueError), match=field):
        fg.FermiConfig(**kwargs)


def test_meta_device_model_is_refused_at_conversion() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with pytest.raises(ValueError, match=r"'0\.weight' on the meta device.*Load the weights first"):
        fg.convert_to_fermi(model, fg.FermiConfig(keep_classifier=False))
    assert isinstance(model[0], nn.Linear) and type(model[0]) is nn.Linear


@pytest.mark.parametrize("granularity", ["weight", "channel"])
def test_all_zero_layer_warns_at_conversion(granularity: str) -> None:
    model = mlp()
    nn.init.zeros_(model[0].weight)
    nn.init.zeros_(model[0].bias)
    with pytest.warns(UserWarning, match="all.zero"):
        fg.convert_to_fermi(model, fg.FermiConfig(granularity=granularity, keep_classifier=False),
                            example_inputs=torch.randn(2, 4))


def test_inspect_refuses_what_is_not_a_checkpoint(saved, tmp_path: Path, monkeypatch) -> None:
    root, _ = saved
    with pytest.raises(CheckpointError, match="is a file"):
        inspect_checkpoint(root / mf.WEIGHTS_NAME)
    with pytest.raises(CheckpointError, match="does not exist"):
        inspect_checkpoint(tmp_path / "nowhere")

    def unreadable(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(args[0]))

    with monkeypatch.context() as m:
        m.setattr(mf, "open", unreadable, raising=False)
        with pytest.raises(CheckpointError, match="Permission denied"):
            inspect_checkpoint(root)
    _rewrite(root, lambda manifest: manifest["modules"].update({"0": None}))
    with pytest.raises(CheckpointError, match=r"module entry '0' must be an object"):
        inspect_checkpoint(root)


# -- items 1 and 3: a failed bake leaves the converted model as it was; NaN never flows silently ---------------
def _gated_cnn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(16, 5)).eval()
    x = torch.randn(4, 3, 8, 8)
    fg.convert_to_fermi(model, fg.FermiConfig(granularity="channel", target_sparsity=0.5), example_inputs=x[:1])
    fg.FermiAnnealer(torch.optim.SGD(model.parameters(), lr=0.0), model, total_steps=1,
                     ramp=1.0).schedule.apply(model, 1)
    fg.freeze_decisions(model)
    return model, x


def _fingerprint(model):
    with torch.no_grad():
        return ([type(m) for m in model.modules()], {k: v.clone() for k, v in model.state_dict().items()})


def _assert_unchanged(model, before, x, out_before):
    types, state = _fingerprint(model)
    assert types == before[0]
    assert state.keys() == before[1].keys() and all(torch.equal(state[k], before[1][k]) for k in state)
    assert hasattr(model, "_fermigates")
    with torch.no_grad():
        assert torch.equal(model(x), out_before)


def _raising_generator(x):
    yield x
    raise RuntimeError("the data loader died")


@pytest.mark.parametrize("data,match", [
    ("empty", "calibration_data is empty"),
    ("wrong shape", "rejects calibration_data batch 0"),
    ("wrong dtype", "rejects calibration_data batch 0"),
    ("nan", r"batch 1 holds NaN/inf"),
    ("inf", r"batch 1 holds NaN/inf"),
    ("generator", "the data loader died"),
])
def test_a_failed_bake_leaves_the_converted_model_as_it_was(data, match):
    model, x = _gated_cnn()
    before = _fingerprint(model)
    with torch.no_grad():
        out = model(x)
    bad = {"wrong shape": [torch.randn(4, 5, 8, 8)], "wrong dtype": [torch.zeros(4, 3, 8, 8, dtype=torch.long)],
           "nan": [x, x.clone().index_fill_(0, torch.tensor([1]), float("nan"))],
           "inf": [x, x.clone().index_fill_(0, torch.tensor([1]), float("inf"))],
           "generator": _raising_generator(x), "empty": []}[data]
    with pytest.raises((ValueError, RuntimeError), match=match):
        fg.convert_from_fermi(model, calibration_data=bad, progress=False)
    _assert_unchanged(model, before, x, out)
    fg.convert_from_fermi(model, calibration_data=[x], progress=False)  # fixed data: the bake works now
    assert not hasattr(model, "_fermigates")


def test_a_bake_that_fails_inside_calibration_is_undone(monkeypatch):
    import fermigates.bake as bake

    model, x = _gated_cnn()
    before = _fingerprint(model)
    with torch.no_grad():
        out = model(x)

    def boom(*args, **kwargs):
        raise RuntimeError("calibration blew up")
    monkeypatch.setattr(bake, "calibrate", boom)
    with pytest.raises(RuntimeError, match="calibration blew up"):
        fg.convert_from_fermi(model, calibration_data=[x], progress=False)
    _assert_unchanged(model, before, x, out)  # shrunk modules, zeroed weights and the gates all put back


def test_prune_with_nan_data_leaves_the_plain_model_as_it_was():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(32, 6)
    with pytest.raises(ValueError, match="batch 1 holds NaN/inf"):
        fg.prune(model, [x, x * float("nan")], target_sparsity=0.5, progress=False)
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear] and not hasattr(model, "_fermigates")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_nan_gates_are_refused_at_the_bake():
    model, x = _gated_cnn()
    gate = fg.methods.fermi.model.all_gates(model)[0]
    with torch.no_grad():
        gate.mu.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN/inf.*nothing was baked"):
        fg.convert_from_fermi(model, progress=False)
    assert hasattr(model, "_fermigates")


def test_a_nan_loss_step_is_refused_before_anything_moves():
    model, x = _gated_cnn()
    opt = fg.FermiAnnealer(torch.optim.SGD(model.parameters(), lr=0.1), model, total_steps=10)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    (model(x).sum() * float("nan") + opt.sparsity_loss()).backward()
    with pytest.raises(FloatingPointError, match="NaN/inf.*nothing changed"):
        opt.step()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert opt.step_count == 0


def test_refine_gates_on_nan_data_is_refused():
    model, x = _gated_cnn()
    with pytest.raises(ValueError, match="NaN/inf"):
        fg.refine_gates(model, [x, x * float("nan")], steps=2, progress=False)
    assert all(torch.isfinite(g.mu) for g in fg.methods.fermi.model.all_gates(model))


def test_shrink_check_does_not_pass_on_nan_outputs():
    from fermigates.core.batches import max_relative_diff

    nan = torch.tensor([1.0, float("nan")])
    assert max_relative_diff([nan], [nan.clone()]) == float("inf")


def test_annealer_refuses_a_scalar_temperature():
    model, _ = _gated_cnn()
    with pytest.raises(TypeError, match="temperature must be a pair"):
        fg.FermiAnnealer(torch.optim.SGD(model.parameters(), lr=0.1), model, total_steps=10, temperature=0.5)
