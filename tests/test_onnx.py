"""export_onnx: hand-shrunk tiny CNN and BERT run in onnxruntime at another batch size / sequence length."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from fermigates.io.onnx import export_onnx

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")


def keep(n: int, frac: float, seed: int) -> torch.Tensor:
    return (
        torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: max(1, int(n * frac))]
        .sort()
        .values
    )


def take(module: nn.Module, name: str, dim: int, idx: torch.Tensor) -> None:
    t = getattr(module, name)
    if t is not None:
        new = t.detach().index_select(dim, idx).clone()
        if isinstance(t, nn.Parameter):
            setattr(module, name, nn.Parameter(new))
        else:
            module._buffers[name] = new


def shrunk_cnn() -> nn.Module:
    """timm's tiny ``test_resnet`` (BasicBlocks and Bottlenecks) with conv1 outputs of each block sliced."""
    model = timm.create_model("test_resnet", pretrained=False, num_classes=10).eval()
    for i, b in enumerate(
        [b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer]
    ):
        idx = keep(b.conv1.out_channels, 0.4 + 0.15 * i, i)
        take(b.conv1, "weight", 0, idx)
        for name in ("weight", "bias", "running_mean", "running_var"):
            take(b.bn1, name, 0, idx)
        take(b.conv2, "weight", 1, idx)
        b.conv1.out_channels = b.bn1.num_features = b.conv2.in_channels = len(idx)
    return model


def shrunk_bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=32,
    )
    model = transformers.BertModel(config).eval()
    for i, layer in enumerate(model.encoder.layer):
        idx = keep(48, 0.3 + 0.3 * i, i)
        take(layer.intermediate.dense, "weight", 0, idx), take(layer.intermediate.dense, "bias", 0, idx)
        take(layer.output.dense, "weight", 1, idx)
    att = model.encoder.layer[0].attention  # keep heads 1 and 3 of layer 0
    rows = torch.cat([torch.arange(h * 8, h * 8 + 8) for h in (1, 3)])
    for lin in (att.self.query, att.self.key, att.self.value):
        take(lin, "weight", 0, rows), take(lin, "bias", 0, rows)
    take(att.output.dense, "weight", 1, rows)
    att.self.num_attention_heads, att.self.all_head_size = 2, 16
    return model


def test_cnn_dynamic_batch(tmp_path: Path) -> None:
    model = shrunk_cnn()
    path = export_onnx(model, torch.randn(2, 3, 32, 32), tmp_path / "cnn.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.onnx"]  # no temp files left behind
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    x = torch.randn(5, 3, 32, 32)
    (got,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        expected = model(x)
    assert got.shape == (5, 10)
    torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-4, rtol=0)


def test_bert_dynamic_batch_and_sequence(tmp_path: Path) -> None:
    model = shrunk_bert()
    ids = torch.randint(0, 64, (2, 8))
    model.train()
    path = export_onnx(
        model,
        {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
        tmp_path / "bert.onnx",
        optimize=False,
    )
    assert model.training  # the caller's mode is restored
    model.eval()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    ids = torch.randint(0, 64, (3, 13))
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0
    outputs = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    names = [o.name for o in session.get_outputs()]
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask)
    assert names[0] == "last_hidden_state" and outputs[0].shape == (3, 13, 32)
    torch.testing.assert_close(torch.from_numpy(outputs[0]), expected.last_hidden_state, atol=1e-4, rtol=0)


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exporter must be one of"):
        export_onnx(nn.Linear(2, 2), torch.randn(2, 2), tmp_path / "x.onnx", exporter="magic")
    with pytest.raises(TypeError, match="example_inputs"):
        export_onnx(nn.Linear(2, 2), 3, tmp_path / "x.onnx")
    with pytest.raises(IsADirectoryError, match="directory"):
        export_onnx(nn.Linear(2, 2), torch.randn(2, 2), tmp_path)
